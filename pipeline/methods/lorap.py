"""LoRAP as a method (`method: lorap`): attention and MLP compressed differently.

- Attention projections: activation-weighted SVD, W diag(a) truncated and scaled back, a_j
  the root of the input's X^T X diagonal (the norm of input channel j over the calibration
  tokens); the attention budget of a layer is shared between its projections by how low-rank
  each is: all keep the same share of their weighted spectral energy (soco/mgaa.py
  `energy_ranks`, with the same guard against starving a matrix as MGAA).
- MLP: gradient-free structured channel pruning. Intermediate channel j is scored by the
  activation-weighted magnitude of every weight it owns (Wanda's |W| * ||x|| summed over the
  group): sum_i |gate[j, i]| a_i + |up[j, i]| a_i + sum_o |down[o, j]| b_j, with a the MLP
  input's and b the intermediate activations' channel norms. The highest-scored channels are
  kept, except that `lorap.keep_least_fraction` (1%) of the kept channels are the lowest-scored
  ones, as the paper found the least important weights to matter. The MLP stays dense but
  narrower: gate/up lose rows, down the matching columns, and the checkpoint records each
  narrowed linear's shape (module kind `narrow`, pipeline/modules.py).

Both sublayers of every layer keep (1 - ratio) of their parameters; what rounding leaves goes
to the next sublayer, so the whole model meets the target to within one MLP channel.
Supported: MLPs of gate_proj / up_proj / down_proj (the Llama layout and its relatives).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from soco.decompose import asvd_factors, spectrum
from soco.mgaa import energy_ranks
from soco.ranks import max_saving_rank

from ..errors import UserError
from ..plan import Plan, decoder_linears
from ..stages.decompose import Evidence
from .base import Method
from .registry import register

MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class LorapConfig:
    """The `lorap:` section."""

    keep_least_fraction: float = 0.01  # share of the kept MLP channels taken from the lowest-scored ones
    min_rank_fraction: float = 0.25  # every attention projection keeps at least this share of its uniform rank

    def validate(self, cfg: Any) -> None:
        for key in ("keep_least_fraction", "min_rank_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise UserError(f"lorap.{key} must be in [0, 1), got {getattr(self, key)}")


def _channel_norms(gram: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(gram).to(torch.float64).clamp_min(0).sqrt()


def channel_scores(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, gram_in: torch.Tensor,
                   gram_mid: torch.Tensor) -> torch.Tensor:
    """Activation-weighted importance of every intermediate channel (see the module docstring)."""
    a, b = _channel_norms(gram_in), _channel_norms(gram_mid)
    return ((gate.abs().double() + up.abs().double()) @ a) + down.abs().double().sum(0) * b


def kept_channels(scores: torch.Tensor, k: int, least_fraction: float) -> torch.Tensor:
    """Indices (sorted) of the k kept channels: the best k - q and the q = round(least_fraction k) worst."""
    order = torch.argsort(scores, descending=True, stable=True)
    q = min(k, round(least_fraction * k))
    chosen = torch.cat([order[: k - q], order[len(order) - q:]]) if q else order[:k]
    return torch.sort(chosen).values


class Lorap(Method):
    name = "lorap"
    factorization = "asvd"
    sections = (("lorap", LorapConfig),)
    needs_spectra = True

    def key_fields(self, stage: str) -> tuple[str, ...]:
        return ("lorap",) if stage == "decompose" else ()

    @staticmethod
    def _mlp_shapes(shapes: dict[str, tuple[int, int]], layers_name: str, n_layers: int) -> None:
        for i in range(n_layers):
            names = {n[len(f"{layers_name}.{i}."):] for n in shapes if n.startswith(f"{layers_name}.{i}.mlp.")}
            if names != set(MLP):
                raise UserError(f"lorap prunes MLPs of {', '.join(MLP)}; layer {i} has {', '.join(sorted(names))}")

    def decomposition_plan(self, cfg: Any, model: nn.Module, evidence: Evidence | None = None) -> Plan:
        from ..model_io import find_layers
        shapes = decoder_linears(model)
        layers_name, layers = find_layers(model)
        self._mlp_shapes(shapes, layers_name, len(layers))
        ratio, lc = cfg.compress.ratio, cfg.lorap
        ranks: dict[str, int] = {}
        carry = 0
        for i in range(len(layers)):
            prefix = f"{layers_name}.{i}."
            attn = [n for n in shapes if n.startswith(prefix) and not n.startswith(prefix + "mlp.")]
            costs = {n: sum(shapes[n]) for n in attn}
            params = sum(shapes[n][0] * shapes[n][1] for n in attn)
            budget = math.floor((1 - ratio) * params) + carry
            low = {n: max(1, math.floor(lc.min_rank_fraction * (1 - ratio) * shapes[n][0] * shapes[n][1] / costs[n]))
                   for n in attn}
            high = {n: max_saving_rank(*shapes[n]) for n in attn}
            if evidence is None:  # before anything is written: the minimum ranks must fit; no carry
                if sum(low[n] * costs[n] for n in attn) > budget:
                    raise UserError(f"ratio {ratio} leaves layer {i}'s attention too few parameters for lorap")
                got, carry = low, 0
            else:
                got = energy_ranks({n: evidence.spectra[n] for n in attn}, costs, budget, low, high)
                carry = budget - sum(got[n] * costs[n] for n in attn)
            ranks.update(got)
            gate_m, gate_n = shapes[prefix + "mlp.gate_proj"]  # intermediate x hidden
            mlp_params = 3 * gate_m * gate_n
            per_channel = 3 * gate_n
            k = min(gate_m - 1, (math.floor((1 - ratio) * mlp_params) + carry) // per_channel)
            if k < 1:
                raise UserError(f"ratio {ratio} keeps no MLP channel of layer {i}")
            ranks.update({prefix + n: k for n in MLP})
            carry = math.floor((1 - ratio) * mlp_params) + carry - k * per_channel
        return Plan(self.name, ratio, ranks, shapes)

    def spectrum(self, name: str, W: torch.Tensor, stats: dict[str, Any], cfg: Any) -> torch.Tensor | None:
        if name.startswith("mlp."):
            return None
        return spectrum("asvd", W, None, _channel_norms(stats["gram"]), alpha=1.0)

    def compress_layer(self, weights: dict[str, torch.Tensor], stats: dict[str, dict[str, Any]],
                       plan: dict[str, int], cfg: Any) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, k in plan.items():
            if not name.startswith("mlp."):
                f = asvd_factors(weights[name], _channel_norms(stats["gram"][name]), k, alpha=1.0)
                out[name] = {"U": f.U, "sigma": f.sigma, "Vt": f.Vt}
        gate, up, down = (weights[n] for n in MLP)
        scores = channel_scores(gate, up, down, stats["gram"]["mlp.gate_proj"], stats["gram"]["mlp.down_proj"])
        keep = kept_channels(scores, plan["mlp.gate_proj"], cfg.lorap.keep_least_fraction)
        out["mlp.gate_proj"] = {"W": gate[keep]}
        out["mlp.up_proj"] = {"W": up[keep]}
        out["mlp.down_proj"] = {"W": down[:, keep]}
        return out, {"kept_channels": keep.tolist()}

    def module_specs(self, plan: Plan) -> dict[str, tuple[str, Any]]:
        specs: dict[str, tuple[str, Any]] = {}
        for name, k in plan.ranks.items():
            m, n = plan.shapes[name]
            if name.endswith(("mlp.gate_proj", "mlp.up_proj")):
                specs[name] = ("narrow", [k, n])
            elif name.endswith("mlp.down_proj"):
                specs[name] = ("narrow", [m, k])
            else:
                specs[name] = ("lowrank", k)
        return specs


register(Lorap())
