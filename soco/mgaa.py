"""MGAA's rank allocation, pure arithmetic: between sublayers by how much each changes its
input, within a sublayer by equal retained spectral energy.

1. Between sublayers (attention, MLP of every layer): a sublayer whose output hidden states
   are close to its input (high cosine similarity, measured on calibration data) does little
   and is compressed more. Removal ratios r_s = clip(r + t + spread * z_s, lo, hi), z_s the
   standardised similarity, with the shift t found by bisection so that the parameter-weighted
   mean of r_s is exactly the target r: the order of the ratios is the order of the
   similarities, and the whole model meets the target.
2. Within a sublayer: every matrix keeps the same share e of its spectral energy (sum of
   squared singular values of the matrix the factorisation truncates: whitened for svd-llm),
   the largest e whose ranks fit the sublayer's budget; what rounding leaves of the budget
   goes to the components with the most energy per parameter. Energy is compared only within
   one sublayer, and every matrix keeps at least its `min_rank`: ranking energy globally
   across all matrices starved layer 0 and the value projections of SmolLM2 (rank 0 for some,
   perplexity 30,367 against 473.5 uniform; shared/README.md).
"""
from __future__ import annotations

import torch


def sublayer_ratios(similarity: dict[str, float], params: dict[str, int], ratio: float, spread: float = 0.1,
                    bounds: tuple[float, float] = (0.05, 0.9)) -> dict[str, float]:
    """Removal ratio of every sublayer (see the module docstring); sum(r_s P_s) = ratio * sum(P_s)."""
    names = list(similarity)
    lo, hi = bounds
    if not lo <= ratio <= hi:
        raise ValueError(f"ratio {ratio} outside the allowed sublayer ratios [{lo}, {hi}]")
    cos = torch.tensor([similarity[n] for n in names], dtype=torch.float64)
    std = float(cos.std()) if len(names) > 1 else 0.0
    z = (cos - cos.mean()) / std if std > 0 else torch.zeros_like(cos)
    p = torch.tensor([params[n] for n in names], dtype=torch.float64)

    def mean_ratio(t: float) -> tuple[torch.Tensor, float]:
        r = (ratio + t + spread * z).clamp(lo, hi)
        return r, float((r * p).sum() / p.sum())

    a, b = -1.0, 1.0  # mean_ratio is monotone in t; [-1, 1] spans [lo, hi]
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mean_ratio(mid)[1] < ratio:
            a = mid
        else:
            b = mid
    r, _ = mean_ratio(0.5 * (a + b))
    return {n: float(v) for n, v in zip(names, r)}


def energy_ranks(spectra: dict[str, torch.Tensor], costs: dict[str, int], budget: int,
                 min_rank: dict[str, int], max_rank: dict[str, int]) -> dict[str, int]:
    """Ranks of the matrices of one sublayer: the same retained energy share for all, within
    `budget` parameters (sum of k * cost), each between its min and max rank."""
    energy = {n: s.to(torch.float64) ** 2 for n, s in spectra.items()}
    cum = {n: torch.cumsum(e, 0) / e.sum().clamp_min(1e-300) for n, e in energy.items()}

    def ranks_for(share: float) -> dict[str, int]:
        out = {}
        for n, c in cum.items():
            k = int(torch.searchsorted(c, torch.tensor(share, dtype=c.dtype) - 1e-12)) + 1
            out[n] = max(min_rank[n], min(k, max_rank[n]))
        return out

    def cost(ranks: dict[str, int]) -> int:
        return sum(k * costs[n] for n, k in ranks.items())

    floor = {n: min_rank[n] for n in spectra}
    if cost(floor) > budget:
        raise ValueError(f"the minimum ranks need {cost(floor)} parameters, over the sublayer budget {budget}")
    a, b = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (a + b)
        if cost(ranks_for(mid)) <= budget:
            a = mid
        else:
            b = mid
    ranks = ranks_for(a)
    if cost(ranks) > budget:
        ranks = floor
    # fill what rounding left: the next component with the most energy per parameter that still fits
    used = cost(ranks)
    while True:
        best, gain = None, -1.0
        for n, k in ranks.items():
            if k < max_rank[n] and used + costs[n] <= budget and k < energy[n].numel():
                g = float(energy[n][k]) / float(energy[n].sum().clamp_min(1e-300)) / costs[n]
                if g > gain:
                    best, gain = n, g
        if best is None:
            return ranks
        ranks[best] += 1
        used += costs[best]

