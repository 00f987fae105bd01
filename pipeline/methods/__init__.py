"""Compression methods as registered objects (base.py says what a method declares).

Importing this package registers the built-in methods: the uniform-rank baselines svd, asvd
and svd-llm (uniform.py), SoCo (soco.py), the same with MGAA's allocation (mgaa.py:
svd+mgaa, asvd+mgaa, svd-llm+mgaa, soco+mgaa) and LoRAP (lorap.py).
"""
from . import lorap, mgaa, soco, uniform  # noqa: F401 - registration
from .base import Method
from .registry import get, names, register, sections

__all__ = ["Method", "get", "names", "register", "sections"]
