"""MGAA (multi-granular adaptive allocation) as methods: `svd+mgaa`, `asvd+mgaa`,
`svd-llm+mgaa` (any factorisation, ranks by MGAA instead of uniform) and `soco+mgaa` (SoCo's
candidate components start from the MGAA allocation instead of uniform ranks).

- Between sublayers (attention, MLP): a sublayer whose output hidden states are close to its
  input (cosine similarity, measured during calibration by `SublayerSimilarity`) changes
  little and is compressed more; the ratios are normalised so the whole model meets the
  target exactly (soco/mgaa.py `sublayer_ratios`).
- Within a sublayer: every matrix keeps the same share of its spectral energy (the spectrum
  the factorisation truncates: whitened for svd-llm), under the sublayer's budget, each at
  least `mgaa.min_rank_fraction` of its uniform rank so that none is starved
  (soco/mgaa.py `energy_ranks`).

Settings: the `mgaa:` config section. The similarity of a sublayer is the mean over tokens of
cos(residual stream before it, residual stream after it): for the first sublayer of a layer
cos(h_in, h_in + y_attn), for the last cos(h_out - y_mlp, h_out), y the sublayer module's
output; exact for the pre-norm sequential layout of most families, an approximation for
parallel (Cohere) and post-norm (OLMo 2) layers.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from cluster.storage import Storage
from soco.mgaa import energy_ranks, sublayer_ratios
from soco.ranks import coarse_ratio, max_saving_rank

from ..errors import UserError
from ..plan import Plan, decoder_linears, uniform_plan
from ..stages.calibrate import InputStats
from ..stages.decompose import Evidence
from .registry import register
from .soco import Soco
from .uniform import Uniform


@dataclass
class MgaaConfig:
    """The `mgaa:` section: how far sublayer ratios spread, and the guard against starving a matrix."""

    spread: float = 0.1  # change of a sublayer's removal ratio per standard deviation of its similarity
    min_ratio: float = 0.05  # no sublayer is compressed less than this ...
    max_ratio: float = 0.9  # ... or more than this
    min_rank_fraction: float = 0.25  # every matrix keeps at least this share of its uniform rank at its sublayer's ratio

    def validate(self, cfg: Any) -> None:
        if not 0.0 <= self.spread <= 1.0:
            raise UserError(f"mgaa.spread must be in [0, 1], got {self.spread}")
        if not 0.0 < self.min_ratio < self.max_ratio < 1.0:
            raise UserError(f"mgaa needs 0 < min_ratio < max_ratio < 1, got {self.min_ratio} and {self.max_ratio}")
        if cfg.compress.method.endswith("+mgaa") and not self.min_ratio <= cfg.compress.ratio <= self.max_ratio:
            raise UserError(f"compress.ratio {cfg.compress.ratio} is outside mgaa's sublayer ratios "
                            f"[{self.min_ratio}, {self.max_ratio}]")
        if not 0.0 <= self.min_rank_fraction <= 1.0:
            raise UserError(f"mgaa.min_rank_fraction must be in [0, 1], got {self.min_rank_fraction}")


def sublayers(layer: nn.Module) -> list[str]:
    """The layer's direct children that hold linears (attention, MLP), in the order they run."""
    return [n for n, m in layer.named_children() if any(isinstance(x, nn.Linear) for x in m.modules())]


def similarity_file(i: int) -> str:
    return f"calib/similarity-{i:05d}.safetensors"


@dataclass
class SublayerSimilarity:
    """Sums over calibration tokens of the cosine similarity between each sublayer's input and
    output residual stream (a calibration statistic: collecting, merge, save, load)."""

    name = "similarity"

    cos_sum: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    @classmethod
    @contextmanager
    def collecting(cls, layer: nn.Module) -> Iterator["SublayerSimilarity"]:
        stats, names = cls(), sublayers(layer)
        seen: dict[str, torch.Tensor] = {}

        def first(x: Any) -> torch.Tensor:
            return x[0] if isinstance(x, (tuple, list)) else x

        def keep(name: str):
            return lambda _m, _a, out: seen.__setitem__(name, first(out).detach())

        def add(name: str, before: torch.Tensor, after: torch.Tensor) -> None:
            cos = torch.nn.functional.cosine_similarity(before.double(), after.double(), dim=-1)
            stats.cos_sum[name] = stats.cos_sum.get(name, 0.0) + float(cos.sum())
            stats.tokens[name] = stats.tokens.get(name, 0) + cos.numel()

        def start(_m: nn.Module, args: tuple) -> None:
            seen.clear()
            seen["<in>"] = args[0].detach()

        def finish(_m: nn.Module, _args: tuple, out: Any) -> None:
            h = seen["<in>"]
            for k, name in enumerate(names):
                y = seen[name]
                if k == len(names) - 1:
                    h_out = first(out).detach()
                    add(name, h_out - y, h_out)
                else:
                    add(name, h, h + y)
                    h = h + y

        handles = [layer.register_forward_pre_hook(start), layer.register_forward_hook(finish)]
        handles += [layer.get_submodule(n).register_forward_hook(keep(n)) for n in names]
        try:
            yield stats
        finally:
            for h in handles:
                h.remove()

    @classmethod
    def merge(cls, parts: list["SublayerSimilarity"]) -> "SublayerSimilarity":
        merged = cls()
        for p in parts:
            for n, v in p.cos_sum.items():
                merged.cos_sum[n] = merged.cos_sum.get(n, 0.0) + v
                merged.tokens[n] = merged.tokens.get(n, 0) + p.tokens[n]
        return merged

    def save(self, store: Storage, i: int) -> None:
        mean = {n: self.cos_sum[n] / max(self.tokens[n], 1) for n in self.cos_sum}
        store.save_tensors(similarity_file(i), {"cos": torch.tensor(list(mean.values()), dtype=torch.float64)},
                           {"sublayers": json.dumps(list(mean)), "tokens": json.dumps(self.tokens)})

    @staticmethod
    def load(store: Storage, i: int) -> dict[str, dict[str, float]]:
        """{"similarity": {sublayer: mean cosine}} of layer i."""
        names = json.loads(store.tensor_metadata(similarity_file(i))["sublayers"])
        return {"similarity": dict(zip(names, store.load_tensors(similarity_file(i))["cos"].tolist()))}


def similarities(evidence: Evidence) -> dict[str, float]:
    """{qualified sublayer ("model.layers.3.mlp"): mean cosine similarity} of every layer."""
    return {f"{evidence.layers_name}.{i}.{s}": c for i in range(evidence.n_layers)
            for s, c in SublayerSimilarity.load(evidence.store, i)["similarity"].items()}


def sublayer_of(linear: str, layers_name: str) -> str:
    """'model.layers.3.mlp' for 'model.layers.3.mlp.down_proj'."""
    head, rest = linear[: len(layers_name) + 1], linear[len(layers_name) + 1:]
    i, child = rest.split(".")[:2]
    return f"{head}{i}.{child}"


def mgaa_ranks(cfg: Any, model: nn.Module, evidence: Evidence, ratio: float) -> tuple[dict[str, int], dict]:
    """MGAA's rank of every decoder linear at removal `ratio`, and the sublayer ratios."""
    mc = cfg.mgaa
    shapes = decoder_linears(model)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(sublayer_of(name, evidence.layers_name), []).append(name)
    sim = similarities(evidence)
    missing = set(groups) - set(sim)
    if missing:
        raise UserError(f"no calibration similarity for sublayers {sorted(missing)[:3]}: recalibrate")
    params = {s: sum(shapes[n][0] * shapes[n][1] for n in names) for s, names in groups.items()}
    ratios = sublayer_ratios({s: sim[s] for s in groups}, params, ratio, mc.spread, (mc.min_ratio, mc.max_ratio))
    ranks: dict[str, int] = {}
    carry = 0  # what rounding left of earlier sublayers' budgets
    for s, names in groups.items():
        budget = math.floor((1 - ratios[s]) * params[s]) + carry
        costs = {n: sum(shapes[n]) for n in names}
        low = {n: max(1, math.floor(mc.min_rank_fraction * (1 - ratios[s]) * shapes[n][0] * shapes[n][1] / costs[n]))
               for n in names}
        high = {n: max_saving_rank(*shapes[n]) for n in names}
        got = energy_ranks({n: evidence.spectra[n] for n in names}, costs, budget, low, high)
        ranks.update(got)
        carry = budget - sum(got[n] * costs[n] for n in names)
    return ranks, ratios


class UniformPlusMgaa(Uniform):
    """A factorisation with MGAA's ranks."""

    statistics = (InputStats, SublayerSimilarity)
    sections = (("mgaa", MgaaConfig),)
    needs_spectra = True

    def __init__(self, factorization: str) -> None:
        super().__init__(factorization)
        self.name = f"{factorization}+mgaa"

    def key_fields(self, stage: str) -> tuple[str, ...]:
        return super().key_fields(stage) + (("mgaa",) if stage == "decompose" else ())

    def decomposition_plan(self, cfg: Any, model: nn.Module, evidence: Evidence | None = None) -> Plan:
        if evidence is None:  # before anything is written: the target must be reachable at all
            return uniform_plan(model, self.name, cfg.compress.ratio)
        ranks, _ = mgaa_ranks(cfg, model, evidence, cfg.compress.ratio)
        return Plan(self.name, cfg.compress.ratio, ranks, decoder_linears(model))


class SocoPlusMgaa(Soco):
    """SoCo whose candidate components are MGAA's allocation at the target ratio, each matrix's
    rank scaled by the candidate pool's factor ((1 - coarse) / (1 - ratio), 2 by default) and
    capped at full rank, instead of uniform candidates."""

    name = "soco+mgaa"
    statistics = (InputStats, SublayerSimilarity)
    sections = Soco.sections + (("mgaa", MgaaConfig),)
    needs_spectra = True

    def key_fields(self, stage: str) -> tuple[str, ...]:
        return super().key_fields(stage) + (("mgaa",) if stage == "decompose" else ())

    def decomposition_plan(self, cfg: Any, model: nn.Module, evidence: Evidence | None = None) -> Plan:
        if evidence is None:
            return super().decomposition_plan(cfg, model)
        ratio = cfg.compress.ratio
        ranks, _ = mgaa_ranks(cfg, model, evidence, ratio)
        factor = (1 - coarse_ratio(cfg.soco.coarse_ratio, ratio)) / (1 - ratio)
        shapes = decoder_linears(model)
        pool = {n: min(min(shapes[n]), math.ceil(k * factor)) for n, k in ranks.items()}
        return Plan("svd-llm", coarse_ratio(cfg.soco.coarse_ratio, ratio), pool, shapes)


for _f in ("svd", "asvd", "svd-llm"):
    register(UniformPlusMgaa(_f))
register(SocoPlusMgaa())
