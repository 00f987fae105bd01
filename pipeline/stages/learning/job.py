"""The learn stage's job: everything a training worker needs, in one typed, picklable object.

Ray Train hands its workers a dict (`train_loop_config`), so the launch passes
`{"job": job}` and the worker unpacks it (trainer.train_worker). Locations are the ones every
process resolves the same way, since Ray Train workers start in a directory of their own.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.storage import Storage

from ...model_io import worker_location
from ...plan import Plan
from .budget import budget_params, min_ranks
from .config import SocoConfig

if TYPE_CHECKING:
    from ...config import Config


@dataclass(frozen=True)
class LearnJob:
    run: str  # the run folder, absolute (Storage.worker_url)
    model: str  # the model location (model_io.worker_location)
    threads: int  # torch threads per worker
    resume: bool  # go on from the last score checkpoint
    progress: bool  # rank 0 prints a line per step
    target: float  # the budget, in parameters of the compressed linears
    min_ranks: dict[str, int]  # the fewest components each matrix keeps in the cut
    workers: int  # data-parallel ranks
    soco: SocoConfig  # the run's `soco:` section, as configured

    @property
    def launched_by_ray(self) -> bool:
        """Ray Train workers own their process group; an in-process run keeps it (zero.finish)."""
        return self.soco.launcher == "ray"


def learn_job(cfg: Config, plan: Plan, store: Storage, resume: bool, progress: bool) -> LearnJob:
    """The job of the learn stage of `cfg` over the coarse `plan`, in the run folder `store`."""
    s = cfg.soco
    workers = max(1, s.workers)
    return LearnJob(
        run=store.worker_url(), model=worker_location(cfg.model),
        threads=s.threads_per_worker or max(1, (os.cpu_count() or 1) // workers),
        resume=resume, progress=progress,
        target=float(budget_params(plan, cfg.compress.ratio)),
        min_ranks=min_ranks(plan, cfg.compress.ratio, s.min_rank_fraction),
        workers=workers, soco=s)
