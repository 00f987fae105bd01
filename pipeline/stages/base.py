"""The stage contract: what every stage is, and what it is given.

A stage is one module holding its per-unit work (a function or a worker class that any
process can run), its merge, and its on-disk contract (the files it commits to the run
folder, described in its docstring). `run(ctx)` hands the units to `ctx.executor`
(cluster/executor.py: in this process, or Ray tasks and actors) and merges what comes back;
no stage knows which executor it got.

The stage's key in the manifest (pipeline/manifest.py) is derived from what it declares:
`contract` (bumped when its output changes meaning), the config `fields` it reads, and the
fields the method adds for it (`Method.key_fields(stage)`). A stage whose key matches a
committed entry, and whose `outputs` still have the checksums recorded when it committed
them, is skipped; a damaged or missing file makes it run again.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from cluster.executor import Executor
from cluster.storage import Storage

from ..model_io import ModelSource

if TYPE_CHECKING:  # only for the annotations: stages never import a method
    from ..config import Config
    from ..data import Windows
    from ..methods.base import Method


@dataclass
class StageContext:
    """What a run hands every stage."""

    cfg: "Config"
    method: "Method"
    source: ModelSource
    store: Storage
    dtype: torch.dtype
    layers_name: str
    n_layers: int
    windows: "Windows"
    executor: Executor
    progress: bool = True
    resume: bool = False  # the stage was interrupted with the same inputs: go on from its checkpoints
    report: dict[str, Any] | None = None  # what the evaluate stage measured
    # SHA-256 of output files (relative to the run folder) that the stage computed as it wrote
    # them: the manifest commits these instead of reading the files again
    checksums: dict[str, str] = field(default_factory=dict)
    # this stage's files as earlier runs committed them, [(run folder URL, {file: SHA-256})]:
    # this folder's last commit of the stage, then the donors' (`reuse_from`); a stage whose
    # key changed may still take what of them its inputs match (learn's teacher targets)
    earlier: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


class Stage(ABC):
    """One step of a run; see the module docstring."""

    name: str
    contract: str = "1"
    fields: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()  # files and folders it commits: their checksums go into the manifest
    #: config fields (dotted paths) that only bound how long the stage runs: when nothing else
    #: of its inputs changed and `continues(old, new)` holds, a run of the stage under the old
    #: values (finished or interrupted) goes on from its checkpoints instead of starting again
    extendable: tuple[str, ...] = ()

    def continues(self, old: "Config", new: "Config") -> bool:
        """Whether what the stage computed under `old` is the beginning of what it computes
        under `new`, two configs that differ only in `extendable` fields. Only a stage that
        declares such fields is ever asked."""
        return False

    def key_extra(self, method: "Method") -> list[str]:
        """What else of the method the output depends on (calibrate: its statistics)."""
        return []

    @abstractmethod
    def run(self, ctx: StageContext) -> None:
        """Do the work and commit the outputs (a re-run overwrites them)."""
