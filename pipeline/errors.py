"""The one exception that means 'the user's input is wrong' (defined in cluster/errors.py,
the lowest layer, so that infrastructure raises the same type)."""
from cluster.errors import UserError

__all__ = ["UserError"]
