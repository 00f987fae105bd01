"""Global selection of components under an exact parameter budget.

Every component of every matrix has an importance per parameter (by default the Fisher
estimate of the loss its removal costs over its m + n parameters, soco/importance.py; or
its |score|). Components are ranked globally by
importance and added while they fit the budget; a smaller component that still fits is
taken after a larger one that did not, so the kept count ends within one component of
the budget and never above it. Each matrix keeps at least `min_rank` components, the
guard against starving a matrix that a global ranking needs (see ../shared/README.md).
"""
from __future__ import annotations

import torch


def select_components(importance: dict[str, torch.Tensor], costs: dict[str, int], budget: int,
                      min_rank: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Indices (sorted) of the kept components of each matrix; sum(len * cost) <= budget.
    A component with a negative importance (one already pruned) is never kept."""
    min_rank = min_rank or {}
    keep: dict[str, list[int]] = {n: [] for n in importance}
    used = 0
    candidates: list[tuple[float, str, int]] = []
    for name, imp in importance.items():
        order = torch.argsort(imp, descending=True, stable=True).tolist()
        order = [i for i in order if imp[i] >= 0]
        r = min(min_rank.get(name, 0), len(order))
        keep[name].extend(order[:r])
        used += r * costs[name]
        candidates.extend((float(imp[i]), name, i) for i in order[r:])
    if used > budget:
        raise ValueError(f"the minimum ranks alone need {used} parameters, over the budget {budget}")
    candidates.sort(key=lambda c: -c[0])
    for _, name, i in candidates:
        if used + costs[name] <= budget:
            keep[name].append(i)
            used += costs[name]
    return {n: torch.tensor(sorted(v), dtype=torch.long) for n, v in keep.items()}


def out_of_order_share(sigma: torch.Tensor, keep: torch.Tensor) -> float:
    """Share of kept components with a smaller sigma than some pruned component of the
    same matrix (0 for a pure singular-value truncation)."""
    mask = torch.zeros(sigma.numel(), dtype=torch.bool)
    mask[keep] = True
    if mask.all() or not mask.any():
        return 0.0
    best_pruned = sigma[~mask].max()
    return float((sigma[mask] < best_pruned).sum()) / int(mask.sum())
