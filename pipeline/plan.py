"""The rank plan: which linears are compressed and at which rank.

`plan.json` in the run folder: {"method", "ratio", "ranks": {qualified name: k},
"shapes": {qualified name: [m, n]}}. Names are the model's own
(`model.layers.12.self_attn.q_proj`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from soco.ranks import RankError, candidate_rank, lowrank_params, uniform_rank

from .errors import UserError
from .model_io import find_layers, linear_names


@dataclass
class Plan:
    method: str
    ratio: float
    ranks: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"method": self.method, "ratio": self.ratio, "ranks": self.ranks,
                "shapes": {k: list(v) for k, v in self.shapes.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        return cls(d["method"], d["ratio"], dict(d["ranks"]), {k: tuple(v) for k, v in d["shapes"].items()})

    def layer_ranks(self, layers_name: str, i: int) -> dict[str, int]:
        """Ranks of layer i keyed by the linear's name inside the layer."""
        prefix = f"{layers_name}.{i}."
        return {k[len(prefix):]: v for k, v in self.ranks.items() if k.startswith(prefix)}

    def dense_params(self) -> int:
        return sum(m * n for m, n in self.shapes.values())

    def lowrank_params(self) -> int:
        return sum(lowrank_params(*self.shapes[k], r) for k, r in self.ranks.items())


def decoder_linears(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Shapes (out, in) of every nn.Linear inside the decoder layers, by qualified name."""
    layers_name, layers = find_layers(model)
    shapes = {}
    for i, layer in enumerate(layers):
        for name in linear_names(layer):
            lin = layer.get_submodule(name)
            shapes[f"{layers_name}.{i}.{name}"] = (lin.out_features, lin.in_features)
    if not shapes:
        raise UserError(f"{type(model).__name__} has no nn.Linear projections in its decoder layers")
    return shapes


def uniform_plan(model: nn.Module, method: str, ratio: float) -> Plan:
    shapes = decoder_linears(model)
    ranks = {}
    for name, (m, n) in shapes.items():
        try:
            ranks[name] = uniform_rank(m, n, ratio)
        except RankError as e:
            raise UserError(f"{name}: {e}") from None
    return Plan(method, ratio, ranks, shapes)


def coarse_plan(model: nn.Module, coarse: float) -> Plan:
    """SoCo's candidates: svd-llm ranks floor((1 - coarse) mn / (m + n)), capped at full rank
    min(m, n): a coarse ratio <= 0 keeps at least the dense count's worth of components."""
    if coarse > 0:
        return uniform_plan(model, "svd-llm", coarse)
    shapes = decoder_linears(model)
    return Plan("svd-llm", coarse, {n: candidate_rank(m, k, coarse) for n, (m, k) in shapes.items()}, shapes)
