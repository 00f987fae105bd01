"""The one place that connects this process to Ray: a local Ray started in-process, or an
existing cluster.

- An address given (or `$RAY_ADDRESS` set): join that cluster (`host:6379`, `auto`,
  `ray://host:10001`). Inside a Ray Job (`soco submit`) Ray itself sets `$RAY_ADDRESS`,
  so the job's driver joins the cluster it was submitted to.
- Otherwise a local Ray is started in this process: `ray.init(address="local")` (never an
  unrelated cluster found on the machine), `num_cpus` CPUs, a small object store, no
  dashboard. It lives until the process exits, so a sweep calling `pipeline.compress` many
  times pays its start-up (~3 s) once.

What this process is connected to is read back from Ray itself (no module state): a live
connection is reused unless a cluster address is asked for while this process runs its own
local Ray, which is then shut down and replaced.

A driver outside the cluster's nodes (not a Ray Job) ships the project's code to the
workers with a `working_dir` runtime environment; the Python packages themselves
(torch, transformers, ...) must be installed on the cluster's nodes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[1]

#: Never shipped to a cluster: environments, run folders, benchmark outputs, caches.
RUNTIME_ENV_EXCLUDES = (".venv", ".git", "runs", "bench/out", "bench/results", "**/__pycache__",
                        "*.egg-info", ".pytest_cache", "shared")


@dataclass(frozen=True)
class RaySettings:
    """Where to run: a cluster `address` ("" = $RAY_ADDRESS if set, else a local Ray of
    `num_cpus` CPUs, 0 = all cores, with an object store of `object_store_mb`)."""

    address: str = ""
    num_cpus: int = 0
    object_store_mb: int = 512

    def check(self) -> None:
        """Refuse settings that cannot work, with one line each."""
        for key in ("num_cpus", "object_store_mb"):
            if getattr(self, key) < 0:
                raise UserError(f"ray.{key} must be >= 0, got {getattr(self, key)}")
        if self.object_store_mb and self.object_store_mb < 75:
            raise UserError(f"ray.object_store_mb must be at least 75, got {self.object_store_mb}")
        if self.address.startswith(("http://", "https://")):
            raise UserError(f"ray.address {self.address} is a dashboard (job submission) address: use `soco submit` "
                            "with it, or give the cluster's GCS address (host:6379) or ray://host:10001")


def project_runtime_env(env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """A runtime_env that ships this checkout's code (not its environment) to the workers."""
    env: dict[str, Any] = {"working_dir": str(PROJECT_ROOT), "excludes": list(RUNTIME_ENV_EXCLUDES)}
    env["env_vars"] = {"TOKENIZERS_PARALLELISM": "false", **(env_vars or {})}
    return env


def in_ray_job() -> bool:
    """True in the driver of a Ray Job (its runtime_env is already in place)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by Ray's job supervisor for the entrypoint


def _runs_local_ray() -> bool:
    """True when this process started the Ray it is connected to (it owns the head node)."""
    import ray
    return getattr(ray._private.worker.global_worker, "node", None) is not None and \
        ray._private.worker.global_worker.node.is_head()


def connect(settings: RaySettings) -> None:
    """Connect this process to Ray as `settings` say (see the module docstring)."""
    import ray
    settings.check()
    address = settings.address or os.environ.get("RAY_ADDRESS", "")
    if ray.is_initialized():
        if not address or not _runs_local_ray():
            return  # a cluster, or a local Ray when no cluster is asked for: reuse it
        ray.shutdown()
    kw: dict[str, Any] = {"log_to_driver": True}
    if address:
        if not in_ray_job():
            kw["runtime_env"] = project_runtime_env()
        try:
            ray.init(address=address, **kw)
        except (ConnectionError, ValueError) as e:
            raise UserError(f"cannot join the Ray cluster at {address}: {e}") from None
        return
    # Ray runs its workers at niceness +15 by default; on a shared machine any other job would
    # then starve this run's stages, which in-process would have run at the caller's priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", num_cpus=settings.num_cpus or os.cpu_count() or 1, include_dashboard=False,
             object_store_memory=(settings.object_store_mb or 512) << 20, **kw)


def shutdown() -> None:
    """Disconnect (a local Ray started here stops with it)."""
    import ray
    if ray.is_initialized():
        ray.shutdown()


def accelerator() -> str:
    """'GPU' when the cluster has GPUs (tasks then request one), else 'CPU'."""
    import ray
    return "GPU" if ray.cluster_resources().get("GPU", 0) >= 1 else "CPU"


def slots(kind: str | None = None) -> int:
    """How many one-CPU (or one-GPU) tasks the cluster can run at once."""
    import ray
    kind = kind or accelerator()
    return max(1, int(ray.cluster_resources().get(kind, 1)))


def task_options(cpus: int = 1) -> dict[str, Any]:
    """Resources of one task: a GPU when the cluster has them, and `cpus` CPUs."""
    return {"num_gpus": 1, "num_cpus": cpus} if accelerator() == "GPU" else {"num_cpus": cpus}
