"""Executors: run a stage's units of work in this process, or as Ray tasks and actors.

A stage is written once against two primitives, and the executor decides where they run:

- `map(fn, items)`: independent units (a layer to factor, a shard to write): `fn(item)` for
  every item, results in item order. Local: a loop. Ray: one task per item with at most
  `max_in_flight` submitted at once, each asking for one CPU (or one GPU when the cluster
  has them).
- `group(cls, n)`: `n` stateful workers, `cls()` each, that hold data between calls (a
  share of the windows and its hidden states, advanced layer by layer). `group.all(...)`
  calls a method on every worker, `group.each(...)` with per-worker arguments,
  `group.one(k, ...)` on one; they return futures that may be passed straight into other
  calls (Ray hands them actor to actor, never through the driver) and are read with
  `group.get`. Local: the futures are the values themselves, computed at once.

`fn` and `cls` must be importable module-level objects and their arguments picklable: the
same code runs in this process and in a Ray worker. Workers run torch single-threaded (one
task = one CPU slot; oversubscribed threads made an SVD 10-100x slower) and see this
process's fsspec settings (where a user puts an S3 endpoint and keys).

An executor is an object owned by one run: the Ray workers it starts (kept between the
stages of that run, start-up ~3 s each) and their peak memory live on it, and `close()`
stops them.
"""
from __future__ import annotations

import copy
import os
import resource
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterable, Sequence

from tqdm.auto import tqdm

from . import ray_runtime
from .errors import UserError
from .ray_runtime import RaySettings


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise).

    Without this a worker's resident memory grows with every unit it handles: each result
    Ray serialises leaves tens of MB of freed but retained heap (measured: a calibration
    actor went from 0.4 to 1.7 GB over 120 layers; with it, it stays flat).
    """
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


def _get(refs: Any) -> Any:
    """ray.get, raising a worker's UserError as itself (one line for the user), anything else
    with Ray's remote traceback."""
    import ray
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(getattr(e, "cause", None), UserError):
            raise e.cause from None
        raise


def worker_context() -> dict[str, Any]:
    """What a worker needs to reach the same storage as this process: fsspec's config and
    the soco cache folder."""
    import fsspec
    return {"fsspec": copy.deepcopy(fsspec.config.conf),
            "env": {k: os.environ[k] for k in ("SOCO_CACHE",) if k in os.environ}}


def enter_worker(ctx: dict[str, Any]) -> None:
    """Set a worker process up: one torch thread, the driver's storage settings."""
    import fsspec
    import torch
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for protocol, options in ctx["fsspec"].items():
        fsspec.config.conf[protocol] = options
    os.environ.update(ctx["env"])


class WorkerGroup(ABC):
    """Stateful workers of one class; see the module docstring."""

    size: int

    @abstractmethod
    def all(self, method: str, *args: Any) -> list[Any]:
        """method(*args) on every worker; one future each."""

    @abstractmethod
    def each(self, method: str, args: Sequence[tuple]) -> list[Any]:
        """method(*args[k]) on worker k; one future each."""

    @abstractmethod
    def one(self, k: int, method: str, *args: Any) -> Any:
        """method(*args) on worker k; a future."""

    @abstractmethod
    def get(self, futures: Any) -> Any:
        """The value(s) of a future or a list of futures."""

    @abstractmethod
    def drop(self) -> None:
        """Let the workers' objects go (their processes stay for the next group)."""

    def __enter__(self) -> "WorkerGroup":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.drop()
        else:  # a worker may have died or hold half a stage
            self.abandon()

    def abandon(self) -> None:
        """After a failure: stop the workers outright."""
        self.drop()


class Executor(ABC):
    """Runs units of work; see the module docstring."""

    #: pid -> peak resident memory (MiB) of every worker process heard from (none in-process)
    peak_rss_mb: dict[int, float]

    def __init__(self) -> None:
        self.peak_rss_mb = {}

    @abstractmethod
    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], desc: str, progress: bool = True,
            cpus: int = 1) -> list[Any]:
        """fn(item) for every item; the results in item order. `cpus`: what one unit uses
        (a Ray task reserves that many; in-process units run one after another anyway)."""

    @abstractmethod
    def group(self, cls: type, n: int) -> WorkerGroup:
        """n workers, cls() each."""

    @abstractmethod
    def width(self, n_items: int) -> int:
        """How many workers a group sharing n_items should have."""

    def lost_worker(self, error: BaseException) -> bool:
        """Whether `error` says a worker process died (killed, out of memory, its node lost):
        the unit was not wrong, and running the stage again (from its checkpoints) may succeed."""
        return False

    def release(self) -> None:
        """Stop idle workers (before another system, e.g. Ray Train, needs their resources)."""

    def close(self) -> None:
        """Stop every worker this executor started."""
        self.release()

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- in-process
class _LocalGroup(WorkerGroup):
    def __init__(self, cls: type, n: int) -> None:
        self.workers = [cls() for _ in range(n)]
        self.size = n

    def all(self, method: str, *args: Any) -> list[Any]:
        return [getattr(w, method)(*args) for w in self.workers]

    def each(self, method: str, args: Sequence[tuple]) -> list[Any]:
        return [getattr(w, method)(*a) for w, a in zip(self.workers, args)]

    def one(self, k: int, method: str, *args: Any) -> Any:
        return getattr(self.workers[k], method)(*args)

    def get(self, futures: Any) -> Any:
        return futures

    def drop(self) -> None:
        self.workers = []


class LocalExecutor(Executor):
    """Everything in this process, in order, with the process's own thread count."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], desc: str, progress: bool = True,
            cpus: int = 1) -> list[Any]:
        return [fn(item) for item in tqdm(list(items), desc=desc, unit="unit", disable=not progress)]

    def group(self, cls: type, n: int) -> WorkerGroup:
        return _LocalGroup(cls, n)

    def width(self, n_items: int) -> int:
        return 1


# --------------------------------------------------------------------------- Ray
def _run_task(ctx: dict[str, Any], fn: Callable[[Any], Any], item: Any) -> tuple[Any, int, float]:
    enter_worker(ctx)
    try:
        return fn(item), os.getpid(), peak_rss_mb()
    finally:
        trim_heap()


class _Host:
    """A Ray actor that holds one worker object; it reserves no CPU (Ray's default for a live
    actor), so tasks run beside idle hosts."""

    def __init__(self, ctx: dict[str, Any]) -> None:
        enter_worker(ctx)
        self.obj: Any = None

    def load(self, cls: type) -> None:
        self.obj = None
        trim_heap()
        self.obj = cls()

    def call(self, method: str, *args: Any) -> Any:
        trim_heap()  # the previous call's result, serialised by Ray, left its buffers behind
        return getattr(self.obj, method)(*args)

    def drop(self) -> tuple[int, float]:
        self.obj = None
        import gc
        gc.collect()
        trim_heap()
        return os.getpid(), peak_rss_mb()


class _RayGroup(WorkerGroup):
    def __init__(self, executor: "RayExecutor", hosts: list[Any]) -> None:
        self.executor, self.hosts, self.size = executor, hosts, len(hosts)

    def abandon(self) -> None:
        self.executor.release()  # the hosts may be broken: the next group starts fresh ones

    def all(self, method: str, *args: Any) -> list[Any]:
        return [h.call.remote(method, *args) for h in self.hosts]

    def each(self, method: str, args: Sequence[tuple]) -> list[Any]:
        return [h.call.remote(method, *a) for h, a in zip(self.hosts, args)]

    def one(self, k: int, method: str, *args: Any) -> Any:
        return self.hosts[k].call.remote(method, *args)

    def get(self, futures: Any) -> Any:
        return _get(futures)

    def drop(self) -> None:
        import ray
        try:
            for pid, mb in ray.get([h.drop.remote() for h in self.hosts]):
                self.executor._note(pid, mb)
        except Exception:  # noqa: BLE001 - a host died mid-stage: start afresh next time
            self.executor.release()
            raise


class RayExecutor(Executor):
    """Ray tasks and actors, on the cluster `settings` name (or a local Ray).

    `max_in_flight` bounds the tasks submitted at once (0 = 2 x the parallel slots);
    `group_size` is the number of workers sharing windows (0 = one per CPU slot).
    """

    def __init__(self, settings: RaySettings, max_in_flight: int = 0, group_size: int = 0) -> None:
        super().__init__()
        ray_runtime.connect(settings)
        self.max_in_flight, self.group_size = max_in_flight, group_size
        self.hosts: list[Any] = []
        self._ctx = worker_context()

    def _note(self, pid: int, mb: float) -> None:
        self.peak_rss_mb[pid] = max(self.peak_rss_mb.get(pid, 0.0), mb)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], desc: str, progress: bool = True,
            cpus: int = 1) -> list[Any]:
        import ray
        task = ray.remote(_run_task).options(**ray_runtime.task_options(cpus))
        items = list(items)
        limit = self.max_in_flight or 2 * ray_runtime.slots()
        results: dict[int, Any] = {}
        pending: dict[Any, int] = {}
        bar = tqdm(total=len(items), desc=f"{desc} (ray)", unit="task", disable=not progress)

        def collect() -> None:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                value, pid, mb = _get(ref)
                self._note(pid, mb)
                results[pending.pop(ref)] = value
            bar.update(len(done))

        try:
            for k, item in enumerate(items):
                while len(pending) >= limit:
                    collect()
                pending[task.remote(self._ctx, fn, item)] = k
            while pending:
                collect()
        except Exception:
            # No ray.cancel of the rest: in Ray 2.60 a cancel that meets a task's completion
            # aborts this whole process (RAY_CHECK "Tried to complete task that was not
            # pending", ray-project/ray#54846; seen here as a test run that died without a
            # word). The tasks in flight (at most `limit`) run to their end instead, their
            # outcomes dropped, and the first error is raised. An interrupt does not wait:
            # this process is going down, and Ray ends a gone driver's tasks.
            if pending:
                ray.wait(list(pending), num_returns=len(pending))
            raise
        finally:
            bar.close()
        return [results[k] for k in range(len(items))]

    def group(self, cls: type, n: int) -> WorkerGroup:
        import ray
        host = ray.remote(_Host)
        while len(self.hosts) < n:
            self.hosts.append(host.options(num_cpus=0, scheduling_strategy="SPREAD").remote(self._ctx))
        hosts = self.hosts[:n]
        try:
            ray.get([h.load.remote(cls) for h in hosts])
        except BaseException:
            self.close()  # a host may have died: start afresh next time
            raise
        return _RayGroup(self, hosts)

    def lost_worker(self, error: BaseException) -> bool:
        import ray.exceptions as rex
        lost = (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError,
                rex.OwnerDiedError)
        return isinstance(error, lost) or isinstance(getattr(error, "cause", None), lost)

    def width(self, n_items: int) -> int:
        return max(1, min(self.group_size or ray_runtime.slots("CPU"), max(n_items, 1)))

    def release(self) -> None:
        """Stop every host (their objects go with them), noting their peak memory."""
        import ray
        for h in self.hosts:
            try:
                self._note(*ray.get(h.drop.remote()))
                ray.kill(h)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.hosts = []
