"""Truncation-aware whitening (SVD-LLM) from the input Gram matrix G = X^T X.

With G = S S^T (S lower triangular), for any W' the output error on the calibration
inputs is ||(W - W') X^T||_F^2 = ||(W - W') S||_F^2. So truncating the SVD of W S
discards exactly the singular values of W S that are dropped, and the result is the
best rank-k approximation for those inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: Relative diagonal loads tried, in order, when G is not positive definite.
DAMPING_STEPS: tuple[float, ...] = (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)


@dataclass
class Whitening:
    """Lower-triangular S with G + damp*mean(diag G)*I = S S^T, and the damping that was needed."""

    S: torch.Tensor
    damping: float


def cholesky_whitening(gram: torch.Tensor) -> Whitening:
    """Cholesky factor of the Gram matrix, with a documented fallback.

    G = X^T X is only positive semi-definite: dead input channels or fewer tokens than
    channels make it singular. The fallback adds a diagonal load lambda = d * mean(diag G),
    trying d in DAMPING_STEPS until Cholesky succeeds. A load is the ridge term of the
    least-squares problem, so it biases the result towards plain SVD of W, never breaks it.
    A Gram matrix that is all zeros (a layer that never saw input) becomes the identity.
    """
    g = gram.to(torch.float64)
    g = 0.5 * (g + g.T)
    mean_diag = float(torch.diagonal(g).mean())
    if not mean_diag > 0:
        return Whitening(torch.eye(g.shape[0], dtype=torch.float64), float("inf"))
    eye = torch.eye(g.shape[0], dtype=torch.float64)
    for d in DAMPING_STEPS:
        S, info = torch.linalg.cholesky_ex(g + d * mean_diag * eye)
        if int(info) == 0 and bool(torch.isfinite(S).all()):
            return Whitening(S, d)
    raise ValueError("Gram matrix is not positive definite even with the largest damping")


def unwhiten_right(Vt: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Return Vt @ S^{-1} by a triangular solve (never forming the inverse)."""
    # X = Vt S^{-1}  <=>  X S = Vt  <=>  S^T X^T = Vt^T
    return torch.linalg.solve_triangular(S.T, Vt.T, upper=True).T
