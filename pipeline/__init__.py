"""soco-pipeline stages, on-disk contracts, the run manifest and the CLI.

The scripted entry points are `compress(config) -> report` and `load_compressed(path)`.
"""
from __future__ import annotations

__version__ = "0.1.0"


def compress(config, **kw):  # noqa: D401 - thin re-export, imported lazily to keep CLI start fast
    """Run a whole compression job and return its report (see pipeline.run.compress)."""
    from .run import compress as _compress
    return _compress(config, **kw)


def load_compressed(path: str, **kw):
    """Load a checkpoint written by soco (see pipeline.checkpoint.load_compressed)."""
    from .checkpoint import load_compressed as _load
    return _load(path, **kw)
