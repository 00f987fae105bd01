"""SoCo as a method: svd-llm candidate factors at a looser (coarse) ratio, then the learn
stage trains a score per component and keeps exactly the budget (pipeline/stages/learn.py).
Its settings are the `soco:` config section (pipeline/stages/learning/config.py)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cluster.storage import Storage
from soco.ranks import coarse_ratio

from ..errors import UserError
from ..stages.learning.config import SocoConfig
from ..plan import Plan, coarse_plan, uniform_plan
from ..stages.base import Stage
from ..stages.decompose import Evidence
from ..stages.learn import FINAL_PLAN, Learn, load_layer_learned
from .base import Method
from .registry import register


class Soco(Method):
    name = "soco"
    factorization = "svd-llm"
    sections = (("soco", SocoConfig),)

    def key_fields(self, stage: str) -> tuple[str, ...]:
        return {"decompose": ("soco.coarse_ratio",), "learn": ("soco",)}.get(stage, ())

    def decomposition_plan(self, cfg: Any, model: nn.Module, evidence: Evidence | None = None) -> Plan:
        """svd-llm factors pre-truncated at the coarse ratio (default: candidates worth twice
        the budget's parameters); the target itself must be reachable by every matrix."""
        uniform_plan(model, self.name, cfg.compress.ratio)  # refuses a target ratio no matrix can meet
        n_layers = model.config.num_hidden_layers
        if cfg.soco.hidden_layers > n_layers:
            raise UserError(f"soco.hidden_layers ({cfg.soco.hidden_layers}) is more than the model's "
                            f"{n_layers} decoder layers")
        return coarse_plan(model, coarse_ratio(cfg.soco.coarse_ratio, cfg.compress.ratio))

    def extra_stages(self) -> tuple[Stage, ...]:
        return (Learn(),)

    def final_plan(self, store: Storage) -> Plan:
        return Plan.from_json(store.read_json(FINAL_PLAN))

    @staticmethod
    def layer_factors(store: Storage, i: int) -> dict[str, dict[str, torch.Tensor]]:
        return load_layer_learned(store, i)


register(Soco())
