"""Low-rank replacement for nn.Linear: y = up(down(x)), no dense copy kept.

State-dict keys are `<name>.down.weight` (k x n), `<name>.up.weight` (m x k) and, when the
original had one, `<name>.up.bias`; checkpoints use this layout.
"""
from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """A rank-k linear map, stored as two matrices."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None) -> "LowRankLinear":
        m, k = up.shape
        k2, n = down.shape
        assert k == k2, (up.shape, down.shape)
        mod = cls(n, m, k, bias=bias is not None, device="meta", dtype=up.dtype)
        state = {"down.weight": down, "up.weight": up}
        if bias is not None:
            state["up.bias"] = bias.to(up.dtype)
        mod.load_state_dict(state, assign=True)
        return mod

    @property
    def weight_numel(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
