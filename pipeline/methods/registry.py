"""The method registry: `compress.method` names an entry here."""
from __future__ import annotations

from ..errors import UserError
from .base import Method

_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method (a later registration under the same name replaces the earlier one)."""
    if not method.name:
        raise ValueError("a method needs a name")
    _METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in _METHODS:
        raise UserError(f"compress.method must be one of {', '.join(_METHODS)}, got '{name}'")
    return _METHODS[name]


def names() -> list[str]:
    return list(_METHODS)


def sections() -> dict[str, type]:
    """{config section name: its dataclass} of every registered method that has one."""
    return {name: cls for m in _METHODS.values() for name, cls in m.sections}
