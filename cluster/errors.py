"""The one exception that means 'the user's input is wrong'.

It lives in the lowest layer because infrastructure meets bad input too (an unreachable
Ray address, a dashboard URL given as a cluster address); `pipeline.errors` re-exports it.
The CLI prints it as a single line and exits with code 2; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad input: a config key, a path, a ratio, a model the pipeline cannot handle."""


class Busy(UserError):
    """Another live writer holds the folder (cluster/lease.py; the CLI exits with code 3)."""
