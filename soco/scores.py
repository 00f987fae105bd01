"""SoCo's learnable spectrum: W' = U diag(s * sigma) Vt with frozen U, sigma, Vt.

Each component i of a compressed matrix has a score s_i (initialised to 1) and a gate
g_i = gate(s_i) in [0, 1] that says how much it is "paid for": the differentiable
parameter count of the model is sum_i g_i * (m + n). The gate is

    g(s) = min(1, |s|)

which is 1 for every component whose score is at least 1 (so kept components can
grow above 1 to compensate for pruned ones without costing more) and falls linearly to
0 at s = 0. `hardness` in [0, 1] blends this soft gate into a hard 0/1 step at
`threshold`, which the fine-grained sparsification stage anneals to 1.
"""
from __future__ import annotations

import torch
from torch import nn


def soft_gate(s: torch.Tensor) -> torch.Tensor:
    """Soft gate min(1, |s|): 0 at s=0, 1 for |s| >= 1, linear in between."""
    return s.abs().clamp(max=1.0)


def gate(s: torch.Tensor, hardness: float = 0.0, threshold: float = 0.5) -> torch.Tensor:
    """Blend of the soft gate and a hard step at `threshold` (straight-through gradient)."""
    g = soft_gate(s)
    if hardness <= 0:
        return g
    hard = (s.abs() >= threshold).to(g.dtype)
    hard = g + (hard - g).detach()  # value of the step, gradient of the soft gate
    return (1 - hardness) * g + hardness * hard


def on_factor(s: torch.Tensor, hardness: float, threshold: float) -> torch.Tensor:
    """Multiplier of each component in the forward pass: 1 while soft, and with hardness h
    (1-h) + h * [|s| >= threshold], so at h = 1 components whose gate is off contribute
    exactly zero and the model trains as the pruned network it will become. The step has
    a straight-through gradient so an off component can still come back."""
    if hardness <= 0:
        return torch.ones_like(s)
    step = (s.abs() >= threshold).to(s.dtype)
    step = step + (soft_gate(s) - soft_gate(s).detach())  # value of the step, gradient of the gate
    return (1 - hardness) + hardness * step


class ScoredLinear(nn.Module):
    """y = out * (((in * x) Vt^T) * (s * sigma * on * mask)) U^T (+ b); `score` trains, and the
    channel scales `in`/`out` (initially 1) train only when SoCo's channel scales are on.

    `mask` (a buffer) marks components already removed; they neither contribute to the
    output nor to the parameter count. `on` is 1 until the sparsification stage hardens it.
    """

    def __init__(self, U: torch.Tensor, sigma: torch.Tensor, Vt: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.rank = U.shape
        self.in_features = Vt.shape[1]
        self.U = nn.Parameter(U.contiguous(), requires_grad=False)
        self.sigma = nn.Parameter(sigma.contiguous(), requires_grad=False)
        self.Vt = nn.Parameter(Vt.contiguous(), requires_grad=False)
        self.bias = nn.Parameter(bias.contiguous(), requires_grad=False) if bias is not None else None
        self.score = nn.Parameter(torch.ones(self.rank, dtype=U.dtype))
        # Optional diagonal corrections of the input and output channels (n + m numbers, trained
        # only when enabled): they fold into V' and U, so the stored format does not change.
        self.in_scale = nn.Parameter(torch.ones(self.in_features, dtype=U.dtype), requires_grad=False)
        self.out_scale = nn.Parameter(torch.ones(self.out_features, dtype=U.dtype), requires_grad=False)
        self.register_buffer("mask", torch.ones(self.rank, dtype=U.dtype))
        self.hardness, self.threshold = 0.0, 0.5
        self.last_soft_count: torch.Tensor | None = None  # set by forward, read by the objective

    @property
    def cost(self) -> int:
        """Parameters one component costs: a column of U and a row of Vt."""
        return self.out_features + self.in_features

    def gates(self) -> torch.Tensor:
        return gate(self.score, self.hardness, self.threshold) * self.mask

    def multiplier(self) -> torch.Tensor:
        """Effective weight of each component: s * sigma, switched by the hardened gate."""
        return self.score * self.sigma * self.mask * on_factor(self.score, self.hardness, self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The soft count is computed here, while (under ZeRO-3) this module's parameters are gathered.
        self.last_soft_count = self.gates().sum() * self.cost
        h = torch.nn.functional.linear(x * self.in_scale, self.Vt)
        h = h * self.multiplier()
        y = torch.nn.functional.linear(h, self.U) * self.out_scale
        return y if self.bias is None else y + self.bias

    def folded(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) of the kept components with s*sigma folded in: up @ down == U diag(s sigma) Vt."""
        w = self.multiplier().detach()[keep]
        root = w.abs().sqrt()
        up = self.out_scale.detach()[:, None] * self.U.detach()[:, keep] * (root * torch.sign(w))[None, :]
        down = root[:, None] * self.Vt.detach()[keep] * self.in_scale.detach()[None, :]
        return up.contiguous(), down.contiguous()


def scored_modules(model: nn.Module) -> dict[str, ScoredLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ScoredLinear)}


def soft_count(model: nn.Module) -> torch.Tensor:
    """Differentiable parameter count of all scored matrices (from their gates)."""
    mods = list(scored_modules(model).values())
    return torch.stack([m.gates().sum() * m.cost for m in mods]).sum()


def exact_count(model: nn.Module, threshold: float = 0.5) -> int:
    """Parameters of the components whose gate is on (>= threshold) and not masked."""
    total = 0
    for m in scored_modules(model).values():
        on = (m.score.detach().abs() >= threshold) & (m.mask > 0)
        total += int(on.sum()) * m.cost
    return total


def set_hardness(model: nn.Module, hardness: float, threshold: float = 0.5) -> None:
    for m in scored_modules(model).values():
        m.hardness, m.threshold = hardness, threshold
