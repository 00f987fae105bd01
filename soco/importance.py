"""Importance of each component for pruning: the loss it would cost, per parameter it saves.

Removing component i (setting its score s_i to 0) changes the distillation loss by about
-s_i g_i + 1/2 s_i^2 H_ii (g = dL/ds, H the Hessian). Near a minimum the first-order term
averages to zero and the Fisher E[g_i^2] stands in for H_ii, so the expected increase is
1/2 s_i^2 E[g_i^2] (Optimal Brain Damage with the empirical Fisher). The estimate is an
exponential moving average of (s_i g_i)^2 over the training steps, so it follows the
scores as they adapt to earlier pruning. Divided by the component's cost (m + n) it ranks
components of matrices of different shapes on one scale, which |s| alone does not: a small
score on a component the loss is sensitive to can matter more than a larger one it ignores.

Measured on SmolLM2 at removal 0.2 (refined scores, one-shot cut to the budget, held-out
KL): ranked by |s| 0.86, by this estimate 0.74 (the soft model: 0.44).
"""
from __future__ import annotations

import torch

from .averaging import IterateAverage


class FisherImportance:
    """EMA of (s * dL/ds)^2 per component of every scored matrix; pure tensor arithmetic.

    The checkpoint entries are `<module>.fisher` and `fisher.steps`."""

    def __init__(self, sizes: dict[str, int], decay: float = 0.9) -> None:
        self.sizes = dict(sizes)
        self.mean = IterateAverage(decay, suffix="fisher")

    @property
    def steps(self) -> int:
        return self.mean.steps

    def update(self, scores: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        """Fold one step's scores and their gradients in (every matrix at once)."""
        self.mean.update({n: (s.detach().float() * grads[n].detach().float()) ** 2 for n, s in scores.items()})

    def estimate(self, name: str) -> torch.Tensor:
        """Bias-corrected EMA: 2x the expected loss increase of removing each component."""
        if self.steps == 0 or name not in self.mean.ema:
            return torch.zeros(self.sizes[name], dtype=torch.float32)
        return self.mean.value_of(name)

    def per_parameter(self, costs: dict[str, int]) -> dict[str, torch.Tensor]:
        """Importance per parameter of every component, comparable across matrices."""
        return {n: self.estimate(n) / costs[n] for n in self.sizes}

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors for a checkpoint (`<module>.fisher`, `fisher.steps`)."""
        return self.mean.state()

    def load(self, saved: dict[str, torch.Tensor]) -> None:
        """Restore from a checkpoint written by `state` (absent entries estimate zeros)."""
        self.mean.load(saved)


def pruning_importance(prune_by: str, fisher: FisherImportance, scores: dict[str, torch.Tensor],
                       masks: dict[str, torch.Tensor], costs: dict[str, int]) -> dict[str, torch.Tensor]:
    """What soco/allocate.py ranks, per matrix: each component's importance per parameter, the
    Fisher estimate (`prune_by` "fisher", once it has seen a step) or |s| ("score"), and -1
    for the components already pruned (mask 0), which the selection never keeps."""
    values = fisher.per_parameter(costs) if prune_by == "fisher" and fisher.steps else \
        {n: s.detach().abs() for n, s in scores.items()}
    return {n: torch.where(masks[n] > 0, values[n], -1.0) for n in masks}
