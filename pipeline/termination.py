"""SIGTERM (what schedulers and Ray send to stop a job) as an interruption, like Ctrl-C.

The handler raises `Terminated` wherever the program is. Code in a C extension can turn that
exception into an error of its own (safetensors' reader, interrupted while it builds a
tensor, reports that it cannot read the file), so the signal is also remembered: `pending()`
lets the run's failure handling and the CLI report the interruption, not the read error.
"""
from __future__ import annotations

import signal
from typing import Any


class Terminated(KeyboardInterrupt):
    """A run stopped by a signal: its manifest says failed, with the reason."""


_received: Terminated | None = None


def _on_signal(signum: int, _frame: Any) -> None:
    global _received
    _received = Terminated(f"stopped by signal {signal.Signals(signum).name}")
    raise _received


def install() -> Any:
    """Handle SIGTERM from now on (main thread only); returns the previous handler."""
    global _received
    _received = None
    return signal.signal(signal.SIGTERM, _on_signal)


def restore(previous: Any) -> None:
    signal.signal(signal.SIGTERM, previous)


def pending() -> Terminated | None:
    """The interruption a signal raised since `install`, whatever became of the exception."""
    return _received
