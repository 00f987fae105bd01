"""The module types a method writes into a checkpoint, and how each is saved and loaded.

A kind knows three things about a compressed module: the tensors it stores (names and sizes,
so the shard plan is computed before any tensor exists), how to build those tensors from the
run's factors, and how to put an empty module of the recorded shape into a meta skeleton (so
loading never allocates the dense weights). The checkpoint's `config.json["soco"]` entry
records each kind's modules under the kind's own key (`ranks` for low-rank modules).

A method names each module's kind (`Method.module_specs`); a new kind is a class here plus an
entry in KINDS, and checkpoint writing and loading need no change.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from soco.decompose import Factors
from soco.lowrank import LowRankLinear


class ModuleKind(ABC):
    """One type of compressed module (see the module docstring)."""

    name: str
    entry_key: str  # where config.json["soco"] records {module: spec}

    @abstractmethod
    def stored(self, m: int, n: int, spec: Any, bias: bool) -> list[tuple[str, int]]:
        """(tensor key, element count) of what the module stores, in writing order."""

    @abstractmethod
    def tensors(self, factors: dict[str, torch.Tensor], bias: torch.Tensor | None,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The stored tensors, built from the run's factors of the module."""

    @abstractmethod
    def skeleton(self, dense: nn.Module, spec: Any, dtype: torch.dtype) -> nn.Module:
        """An empty (meta) module of the recorded shape, standing in for `dense`."""


class LowRank(ModuleKind):
    """y = up(down(x)): `down.weight` (k x n), `up.weight` (m x k), `up.bias` when the dense
    linear had one; sqrt(sigma) goes to each side to balance magnitudes."""

    name, entry_key = "lowrank", "ranks"

    def stored(self, m: int, n: int, spec: Any, bias: bool) -> list[tuple[str, int]]:
        k = int(spec)
        return [("down.weight", k * n), ("up.weight", m * k)] + ([("up.bias", m)] if bias else [])

    def tensors(self, factors: dict[str, torch.Tensor], bias: torch.Tensor | None,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return self.module(factors, bias, dtype).state_dict()

    @staticmethod
    def module(factors: dict[str, torch.Tensor], bias: torch.Tensor | None, dtype: torch.dtype) -> LowRankLinear:
        """The LowRankLinear of factors {U, sigma, Vt} (split in float64, then cast)."""
        f = Factors(factors["U"].double(), factors["sigma"].double(), factors["Vt"].double())
        up, down = f.split(dtype=dtype)
        return LowRankLinear.from_factors(up, down, bias)

    def skeleton(self, dense: nn.Module, spec: Any, dtype: torch.dtype) -> nn.Module:
        return LowRankLinear(dense.in_features, dense.out_features, int(spec), bias=dense.bias is not None,
                             device="meta", dtype=dtype)


class Narrow(ModuleKind):
    """A dense linear with fewer output or input channels than the original (a structurally
    pruned MLP: gate/up lose output rows, down the matching input columns). Spec: its shape
    [out, in]. Stores `weight` (+ `bias`), built from the factors `W` (+ `b`, the pruned bias;
    else the dense one, when the output channels were kept)."""

    name, entry_key = "narrow", "shapes"

    def stored(self, m: int, n: int, spec: Any, bias: bool) -> list[tuple[str, int]]:
        out, inp = (int(x) for x in spec)
        return [("weight", out * inp)] + ([("bias", out)] if bias else [])

    def tensors(self, factors: dict[str, torch.Tensor], bias: torch.Tensor | None,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {"weight": factors["W"].to(dtype).contiguous()}
        b = factors.get("b", bias)
        if b is not None:
            out["bias"] = b.to(dtype).contiguous()
        return out

    def skeleton(self, dense: nn.Module, spec: Any, dtype: torch.dtype) -> nn.Module:
        out, inp = (int(x) for x in spec)
        return nn.Linear(inp, out, bias=dense.bias is not None, device="meta", dtype=dtype)


KINDS: dict[str, ModuleKind] = {k.name: k for k in (LowRank(), Narrow())}
