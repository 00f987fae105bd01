"""What a compression method is: a registered object that the stages call, never a string
they compare.

A method declares
- `name` (the value of `compress.method`) and `factorization` (how one matrix is factored:
  a name in soco.decompose.FACTORIZATIONS, or override `factorise`);
- its config sections: `sections = (("soco", SocoConfig),)` makes `soco:` a config section
  parsed into that dataclass (`cfg.soco`), validated by its `validate(cfg)` method if it has
  one (methods may share a section: every MGAA method reads `mgaa:`);
- the calibration statistics it needs (`statistics`: classes calibrate collects, see
  stages/calibrate.py; every method so far uses InputStats, the input Gram matrix and mean |x|);
- how it plans ranks (`decomposition_plan`: uniform from sizes by default) and which plan and
  factors the checkpoint is built from (`final_plan`, `layer_factors`);
- its extra stages (`extra_stages()`: SoCo's learn), run between decompose and assemble;
- how it compresses one layer (`compress_layer`: by default each matrix factored at its rank;
  `spectrum` when its plan needs every matrix's singular values first, `needs_spectra`);
- the module kind it writes (`module_kind`, pipeline/modules.py), which also says how the
  checkpoint loads; `module_specs(plan)` gives each module's kind and recorded shape;
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
from soco.decompose import Factors, factorise, spectrum

from ..plan import Plan, uniform_plan
from ..stages.base import Stage
from ..stages.calibrate import InputStats
from ..stages.decompose import FACTORS_PLAN, Evidence, load_layer_factors


class Method:
    """A compression method; the defaults are those of the uniform-rank baselines."""

    name: str = ""
    factorization: str = "svd-llm"
    sections: tuple[tuple[str, type], ...] = ()
    statistics: tuple[type, ...] = (InputStats,)
    module_kind: str = "lowrank"
    needs_spectra: bool = False  # decompose measures every matrix's spectrum before the plan

    def key_fields(self, stage: str) -> tuple[str, ...]:
        """Config fields (dotted paths, or a whole section) the stage's key depends on for this method."""
        return ()

    def decomposition_plan(self, cfg: Any, model: nn.Module, evidence: Evidence | None = None) -> Plan:
        """Ranks the decompose stage factors to. Called once before anything is written, with no
        evidence (it must then refuse a ratio the model cannot meet), and again in the decompose
        stage with the calibration statistics and, if `needs_spectra`, every matrix's spectrum."""
        return uniform_plan(model, self.name, cfg.compress.ratio)

    def spectrum(self, name: str, W: torch.Tensor, stats: dict[str, Any], cfg: Any) -> torch.Tensor | None:
        """The singular values this method's factorisation would truncate of the linear `name`
        (its name in the layer), or None when its plan needs none (for `needs_spectra`)."""
        return spectrum(self.factorization, W, stats.get("gram"), stats.get("mean_abs"), cfg.compress.asvd_alpha)

    def factorise(self, W: torch.Tensor, stats: dict[str, Any], rank: int, cfg: Any) -> Factors:
        """W ~ U diag(sigma) Vt of the given rank, from the layer's calibration statistics."""
        return factorise(self.factorization, W, stats.get("gram"), stats.get("mean_abs"), k=rank,
                         alpha=cfg.compress.asvd_alpha)

    def compress_layer(self, weights: dict[str, torch.Tensor], stats: dict[str, dict[str, Any]],
                       plan: dict[str, int], cfg: Any) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """The factors of one layer's planned modules ({module: {tensor name: tensor}}, the
        module kind's input) and what to record of them (metadata). By default every matrix
        is factored on its own at its planned rank; a method that compresses matrices jointly
        (LoRAP's MLP) overrides this."""
        out, damping = {}, {}
        for name, k in plan.items():
            f = self.factorise(weights[name], {key: v.get(name) for key, v in stats.items()}, k, cfg)
            out[name] = {"U": f.U, "sigma": f.sigma, "Vt": f.Vt}
            damping[name] = f.damping
        return out, {"damping": damping}

    def extra_stages(self) -> tuple[Stage, ...]:
        return ()

    def final_plan(self, store: Storage) -> Plan:
        """The plan the checkpoint is built from (after the extra stages)."""
        return Plan.from_json(store.read_json(FACTORS_PLAN))

    @staticmethod
    def layer_factors(store: Storage, i: int) -> dict[str, dict[str, torch.Tensor]]:
        """Layer i's factors the checkpoint is built from (a static function: it travels to the units)."""
        return load_layer_factors(store, i)

    def module_specs(self, plan: Plan) -> dict[str, tuple[str, Any]]:
        """{module: (its kind, the spec the kind records)}: a rank for low-rank modules."""
        return {name: (self.module_kind, k) for name, k in plan.ranks.items()}

    def __repr__(self) -> str:
        return f"<method {self.name}>"
