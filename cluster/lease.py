"""A lease on a folder: one writer at a time, on local disks and object stores alike.

The lease is a small JSON file (`owner`, `host`, `pid`, `heartbeat`) in the folder. Taking
it: if a lease is there and its heartbeat is younger than `ttl_s`, the folder is busy;
otherwise (none, or stale: its holder died without releasing, seen by the heartbeat's age or,
on the same host, by its process being gone) the file is written with this
holder's identity, read back after a short pause, and the lease is ours only if what comes
back is still ours (object stores have no compare-and-swap; of two writers racing, the later
write wins and the earlier one sees it and backs off). A thread renews the heartbeat every
ttl/3 while the lease is held; releasing deletes the file if it is still ours.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from .errors import Busy
from .storage import Storage


def _dead_here(held: dict[str, Any]) -> bool:
    """Whether a lease's holder ran on this host and its process is gone (killed: the lease
    is stale now, without waiting for its heartbeat to age)."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class Lease:
    """A held lease on `store` (see the module docstring); use as a context manager."""

    def __init__(self, store: Storage, name: str = "lease.json", ttl_s: float = 60.0, settle_s: float = 0.2) -> None:
        self.store, self.name, self.ttl_s, self.settle_s = store, name, ttl_s, settle_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.read_bytes(self.name))
        except (FileNotFoundError, ValueError):
            return None  # none, or half-written by a writer that died: no live holder

    def acquire(self) -> "Lease":
        held = self._read()
        if held and held.get("owner") != self.owner and time.time() - float(held.get("heartbeat", 0)) < self.ttl_s \
                and not _dead_here(held):
            raise Busy(f"{self.store.url()} is busy: another run ({held.get('host')}, pid {held.get('pid')}) is "
                       f"writing it (lease renewed {time.time() - float(held['heartbeat']):.0f} s ago)")
        self.store.write_json(self.name, self._record())
        time.sleep(self.settle_s)
        held = self._read()
        if not held or held.get("owner") != self.owner:
            raise Busy(f"{self.store.url()} is busy: another run took it at the same moment")
        self._thread = threading.Thread(target=self._renew, name="soco-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.store.write_json(self.name, self._record())
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried; only a long outage loses the lease
                pass

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (again: nothing happens)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        held = self._read()
        if held and held.get("owner") == self.owner:
            self.store.rm(self.name)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *_: Any) -> None:
        self.release()
