"""What the global cut may keep: the budget in parameters and every matrix's floor of components.

Shared by the trainer (gradual pruning and the final cut) and the finalisation (the cut made
after training, when it stopped before the schedule made it), so both cut to the same budget.
"""
from __future__ import annotations

import math

from soco.ranks import uniform_rank

from ...plan import Plan


def budget_params(plan: Plan, ratio: float) -> int:
    """Parameters the compressed linears may keep: (1 - ratio) of their dense count."""
    return math.floor((1 - ratio) * plan.dense_params())


def min_ranks(plan: Plan, ratio: float, fraction: float) -> dict[str, int]:
    """The fewest components each matrix keeps in the global cut: `fraction` of its uniform rank."""
    return {n: max(1, math.floor(fraction * uniform_rank(*plan.shapes[n], ratio))) for n in plan.ranks}
