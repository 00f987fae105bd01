"""Rank and parameter-count arithmetic for low-rank factorisations.

A dense m x n matrix stores m*n numbers; a rank-k factorisation stores k*(m+n).
The removal ratio r is the fraction of the dense parameters removed, so the
uniform rank that meets it is k = floor((1 - r) * m * n / (m + n)).
"""
from __future__ import annotations

import math


class RankError(ValueError):
    """A requested rank or ratio cannot produce a smaller factorisation."""


def lowrank_params(m: int, n: int, k: int, bias: bool = False) -> int:
    """Numbers stored by a rank-k factorisation of an m x n matrix (plus an optional bias)."""
    return k * (m + n) + (m if bias else 0)


def max_saving_rank(m: int, n: int) -> int:
    """Largest rank whose factorisation is strictly smaller than the dense matrix."""
    return (m * n - 1) // (m + n)


def check_ratio(ratio: float) -> None:
    """Refuse ratios that remove nothing or everything."""
    if not (isinstance(ratio, (int, float)) and 0.0 < float(ratio) < 1.0):
        raise RankError(f"ratio must be a fraction strictly between 0 and 1, got {ratio!r}")


def uniform_rank(m: int, n: int, ratio: float) -> int:
    """Rank that removes `ratio` of an m x n matrix's parameters: floor((1-r)mn/(m+n)).

    Raises RankError when that rank is 0 (nothing would be kept) or would not save parameters.
    """
    check_ratio(ratio)
    k = math.floor((1.0 - ratio) * m * n / (m + n))
    check_rank(m, n, k)
    return k


def check_rank(m: int, n: int, k: int) -> None:
    """Refuse a rank that keeps nothing or does not store fewer numbers than the dense matrix."""
    if k < 1:
        raise RankError(f"rank {k} for a {m}x{n} matrix keeps no component")
    if k * (m + n) >= m * n:
        raise RankError(
            f"rank {k} for a {m}x{n} matrix stores {k * (m + n)} numbers, not fewer than the "
            f"dense {m * n}; the largest rank that saves parameters is {max_saving_rank(m, n)}"
        )


def candidate_rank(m: int, n: int, coarse: float) -> int:
    """Rank of SoCo's candidate factors at a coarse removal ratio `coarse` < 1, which may be
    negative (candidates worth more than the dense matrix): floor((1-coarse)mn/(m+n)), at
    most the full rank min(m, n)."""
    return max(1, min(m, n, math.floor((1.0 - coarse) * m * n / (m + n))))


def coarse_ratio(configured: float | None, ratio: float) -> float:
    """SoCo's pre-truncation removal ratio: as configured, else 1 - 2(1 - ratio). Twice the
    budget leaves the learned selection free to drop half of the candidates of any matrix
    (a pool barely above the budget makes SoCo little more than svd-llm's truncation)."""
    return configured if configured is not None else 1.0 - 2.0 * (1.0 - ratio)
