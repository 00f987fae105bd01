"""The three baseline decompositions: plain SVD, ASVD and SVD-LLM (whitened).

Each returns the spectral form W ~ U diag(sigma) Vt (Vt already mapped back to the
original input space), computed in float64. `Factors.split(k)` turns the leading k
components into the two matrices of a low-rank linear layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .whitening import cholesky_whitening, unwhiten_right

FACTORIZATIONS = ("svd", "asvd", "svd-llm")  # how one matrix is factored (ranks are chosen elsewhere)


@dataclass
class Factors:
    """W ~ U diag(sigma) Vt, components sorted by sigma descending.

    sigma are the singular values in the space the method truncates in (whitened for
    svd-llm, scaled for asvd), which is what ranks the components' importance.
    """

    U: torch.Tensor  # m x r
    sigma: torch.Tensor  # r
    Vt: torch.Tensor  # r x n, in the original input space
    damping: float = 0.0

    def truncate(self, k: int) -> "Factors":
        return Factors(self.U[:, :k], self.sigma[:k], self.Vt[:k], self.damping)

    def split(self, k: int | None = None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) with W ~ up @ down; sqrt(sigma) goes to each side to balance magnitudes."""
        f = self if k is None else self.truncate(k)
        root = f.sigma.clamp_min(0).sqrt()
        up = f.U * root[None, :]
        down = root[:, None] * f.Vt
        return up.to(dtype).contiguous(), down.to(dtype).contiguous()

    def dense(self) -> torch.Tensor:
        return (self.U * self.sigma[None, :]) @ self.Vt


def _svd(M: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, s, Vt = torch.linalg.svd(M, full_matrices=False)
    if k is not None:
        U, s, Vt = U[:, :k], s[:k], Vt[:k]
    return U, s, Vt


def svd_factors(W: torch.Tensor, k: int | None = None) -> Factors:
    """Plain truncated SVD of W (ignores the data)."""
    U, s, Vt = _svd(W.to(torch.float64), k)
    return Factors(U, s, Vt)


def asvd_factors(W: torch.Tensor, mean_abs: torch.Tensor, k: int | None = None, alpha: float = 0.5) -> Factors:
    """ASVD: scale input channels by mean|x|^alpha, SVD, scale back.

    Channels with large activations matter more for the output, so W diag(s) is
    truncated instead of W. Zero activations are clamped to keep the scaling invertible.
    """
    W64 = W.to(torch.float64)
    scale = mean_abs.to(torch.float64).clamp_min(1e-6).pow(alpha)
    U, s, Vt = _svd(W64 * scale[None, :], k)
    return Factors(U, s, Vt / scale[None, :])


def svd_llm_factors(W: torch.Tensor, gram: torch.Tensor, k: int | None = None) -> Factors:
    """SVD-LLM: SVD of W S with G = S S^T, right factor Vt S^{-1}."""
    wh = cholesky_whitening(gram)
    U, s, Vt = _svd(W.to(torch.float64) @ wh.S, k)
    return Factors(U, s, unwhiten_right(Vt, wh.S), wh.damping)


def spectrum(method: str, W: torch.Tensor, gram: torch.Tensor | None, mean_abs: torch.Tensor | None,
             alpha: float = 0.5) -> torch.Tensor:
    """The singular values the factorisation `method` truncates (whitened for svd-llm, scaled
    for asvd), without the singular vectors: what a rank allocation compares across matrices."""
    W64 = W.to(torch.float64)
    if method == "svd":
        return torch.linalg.svdvals(W64)
    if method == "asvd":
        if mean_abs is None:
            raise ValueError("asvd needs the mean |x| of the inputs")
        return torch.linalg.svdvals(W64 * mean_abs.to(torch.float64).clamp_min(1e-6).pow(alpha)[None, :])
    if method == "svd-llm":
        if gram is None:
            raise ValueError("svd-llm needs the input Gram matrix")
        return torch.linalg.svdvals(W64 @ cholesky_whitening(gram).S)
    raise ValueError(f"unknown factorisation {method!r}; choose one of {', '.join(FACTORIZATIONS)}")


def factorise(method: str, W: torch.Tensor, gram: torch.Tensor | None, mean_abs: torch.Tensor | None,
              k: int | None = None, alpha: float = 0.5) -> Factors:
    """Dispatch on the factorisation name (svd | asvd | svd-llm)."""
    if method == "svd":
        return svd_factors(W, k)
    if method == "asvd":
        if mean_abs is None:
            raise ValueError("asvd needs the mean |x| of the inputs")
        return asvd_factors(W, mean_abs, k, alpha)
    if method == "svd-llm":
        if gram is None:
            raise ValueError("svd-llm needs the input Gram matrix")
        return svd_llm_factors(W, gram, k)
    raise ValueError(f"unknown factorisation {method!r}; choose one of {', '.join(FACTORIZATIONS)}")
