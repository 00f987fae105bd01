"""What a compression method is: a registered object that the stages call, never a string
they compare.

A method declares
- `name` (the value of `compress.method`) and `factorization` (how one matrix is factored:
  a name in soco.decompose.FACTORIZATIONS, or override `factorise`);
- its config section: `section = ("soco", SocoConfig)` makes `soco:` a config section parsed
  into that dataclass (`cfg.soco`), validated by its `validate(cfg)` method if it has one;
- the calibration statistics it needs (`statistics`: classes calibrate collects, see
  stages/calibrate.py; every method so far uses InputStats, the input Gram matrix and mean |x|);
- how it plans ranks (`decomposition_plan`: uniform from sizes by default) and which plan and
  factors the checkpoint is built from (`final_plan`, `layer_factors`);
- its extra stages (`extra_stages()`: SoCo's learn), run between decompose and assemble;
- the module kind it writes (`module_kind`, pipeline/modules.py), which also says how the
  checkpoint loads; `module_specs(plan)` gives each module's recorded shape;
- the config fields each stage's key depends on beyond the stage's own (`key_fields`).

Adding a method is one file with a subclass and one `register(...)` call
(docs/architecture.md has a worked example). Methods must be picklable: the decompose
units receive the method object itself.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cluster.storage import Storage
from soco.decompose import Factors, factorise

from ..plan import Plan, uniform_plan
from ..stages.base import Stage
from ..stages.calibrate import InputStats
from ..stages.decompose import FACTORS_PLAN, load_layer_factors


class Method:
    """A compression method; the defaults are those of the uniform-rank baselines."""

    name: str = ""
    factorization: str = "svd-llm"
    section: tuple[str, type] | None = None
    statistics: tuple[type, ...] = (InputStats,)
    module_kind: str = "lowrank"

    def key_fields(self, stage: str) -> tuple[str, ...]:
        """Config fields (dotted paths, or a whole section) the stage's key depends on for this method."""
        return ()

    def decomposition_plan(self, cfg: Any, model: nn.Module) -> Plan:
        """Ranks the decompose stage factors to (checked before anything is written)."""
        return uniform_plan(model, self.name, cfg.compress.ratio)

    def factorise(self, W: torch.Tensor, stats: dict[str, torch.Tensor | None], rank: int, cfg: Any) -> Factors:
        """W ~ U diag(sigma) Vt of the given rank, from the layer's calibration statistics."""
        return factorise(self.factorization, W, stats.get("gram"), stats.get("mean_abs"), k=rank,
                         alpha=cfg.compress.asvd_alpha)

    def extra_stages(self) -> tuple[Stage, ...]:
        return ()

    def final_plan(self, store: Storage) -> Plan:
        """The plan the checkpoint is built from (after the extra stages)."""
        return Plan.from_json(store.read_json(FACTORS_PLAN))

    @staticmethod
    def layer_factors(store: Storage, i: int) -> dict[str, dict[str, torch.Tensor]]:
        """Layer i's factors the checkpoint is built from (a static function: it travels to the units)."""
        return load_layer_factors(store, i)

    def module_specs(self, plan: Plan) -> dict[str, Any]:
        """{module: the spec its kind records} (a rank for low-rank modules)."""
        return dict(plan.ranks)

    def __repr__(self) -> str:
        return f"<method {self.name}>"
