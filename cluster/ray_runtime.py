"""Where the Ray stages run: a local Ray started in-process, or an existing cluster.

- `ray.address` (or `--address`) set, or `$RAY_ADDRESS` set: join that cluster
  (`host:6379`, `auto`, `ray://host:10001`). Inside a Ray Job (`soco submit`) Ray itself
  sets `$RAY_ADDRESS`, so the job's driver joins the cluster it was submitted to.
- Otherwise a local Ray is started in this process: `ray.init(address="local")` (never an
  unrelated cluster found on the machine), `ray.num_cpus` CPUs, a small object store, no
  dashboard. It lives until the process exits, so a sweep calling `pipeline.compress` many
  times pays its start-up (~3 s) once.

A driver outside the cluster's nodes (not a Ray Job) ships the project's code to the
workers with a `working_dir` runtime environment; the Python packages themselves
(torch, transformers, ...) must be installed on the cluster's nodes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[1]

#: Never shipped to a cluster: environments, run folders, benchmark outputs, caches.
RUNTIME_ENV_EXCLUDES = [".venv", ".git", "runs", "bench/out", "bench/results", "**/__pycache__",
                        "*.egg-info", ".pytest_cache", "shared"]


def project_runtime_env(env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """A runtime_env that ships this checkout's code (not its environment) to the workers."""
    env = {"working_dir": str(PROJECT_ROOT), "excludes": list(RUNTIME_ENV_EXCLUDES)}
    env["env_vars"] = {"TOKENIZERS_PARALLELISM": "false", **(env_vars or {})}
    return env


def in_ray_job() -> bool:
    """True in the driver of a Ray Job (its runtime_env is already in place)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by Ray's job supervisor for the entrypoint


#: How this module connected Ray ("local:<cpus>" or the address it joined); None if it did not.
_CONNECTED: str | None = None


def ensure_ray(rc) -> None:
    """Connect this process to Ray as `rc` (a pipeline.config.RayConfig) says.

    An existing connection is reused, unless this module made it for another target (a
    local Ray, then a run asking for a cluster): that one is shut down and replaced. A
    connection the caller made with ray.init itself is always used as it is.
    """
    global _CONNECTED
    import ray
    address = rc.address or os.environ.get("RAY_ADDRESS", "")
    n_cpus = rc.num_cpus or os.cpu_count() or 1
    target = address or f"local:{n_cpus}"
    if ray.is_initialized():
        if _CONNECTED is None or _CONNECTED == target:
            return
        from cluster.ray_tasks import drop_pool
        drop_pool()
        ray.shutdown()
    for key in ("num_cpus", "object_store_mb", "max_in_flight", "calib_workers"):
        if getattr(rc, key) < 0:
            raise UserError(f"ray.{key} must be >= 0, got {getattr(rc, key)}")
    if address.startswith(("http://", "https://")):
        raise UserError(f"ray.address {address} is a dashboard (job submission) address: use `soco submit` "
                        "with it, or give the cluster's GCS address (host:6379) or ray://host:10001")
    kw: dict[str, Any] = {"log_to_driver": True}
    if address:
        if not in_ray_job():
            kw["runtime_env"] = project_runtime_env()
        try:
            ray.init(address=address, **kw)
        except (ConnectionError, ValueError) as e:
            raise UserError(f"cannot join the Ray cluster at {address}: {e}") from None
        _CONNECTED = address
        return
    # Ray runs its workers at niceness +15 by default; on a shared machine any other job would
    # then starve this run's stages, which in-process would have run at the caller's priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    if rc.object_store_mb and rc.object_store_mb < 75:
        raise UserError(f"ray.object_store_mb must be at least 75, got {rc.object_store_mb}")
    ray.init(address="local", num_cpus=n_cpus, include_dashboard=False,
             object_store_memory=(rc.object_store_mb or 512) << 20, **kw)
    _CONNECTED = target


def shutdown() -> None:
    """Stop the pooled actors and disconnect (a local Ray started here stops with it)."""
    global _CONNECTED
    import ray
    if ray.is_initialized():
        from cluster.ray_tasks import drop_pool
        drop_pool()
        ray.shutdown()
    _CONNECTED = None


def accelerator() -> str:
    """'GPU' when the cluster has GPUs (decompose tasks then request one), else 'CPU'."""
    import ray
    return "GPU" if ray.cluster_resources().get("GPU", 0) >= 1 else "CPU"


def slots(kind: str | None = None) -> int:
    """How many one-CPU (or one-GPU) tasks the cluster can run at once."""
    import ray
    kind = kind or accelerator()
    return max(1, int(ray.cluster_resources().get(kind, 1)))


def task_options() -> dict[str, Any]:
    """Resources of one decompose / shard task: a GPU when the cluster has them, else one CPU."""
    return {"num_gpus": 1, "num_cpus": 1} if accelerator() == "GPU" else {"num_cpus": 1}


def max_in_flight(rc) -> int:
    return rc.max_in_flight or 2 * slots()


def calib_workers(rc, n_windows: int) -> int:
    """Actors sharing the calibration / evaluation windows: one per CPU slot, at most one per window."""
    return max(1, min(rc.calib_workers or slots("CPU"), max(n_windows, 1)))
