"""The method's arithmetic: whitening exactness, rank rules, low-rank modules."""
from __future__ import annotations

import math

import pytest
import torch

from soco.decompose import asvd_factors, factorise, svd_factors, svd_llm_factors
from soco.lowrank import LowRankLinear
from soco.ranks import RankError, check_rank, lowrank_params, max_saving_rank, uniform_rank
from soco.whitening import cholesky_whitening


def _correlated_inputs(tokens: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix


def test_svd_llm_truncation_error_equals_discarded_whitened_singular_values():
    torch.manual_seed(0)
    m, n, k = 48, 32, 10
    W = torch.randn(m, n, dtype=torch.float64)
    X = _correlated_inputs(400, n)
    G = X.T @ X
    S = cholesky_whitening(G).S
    sigma_all = torch.linalg.svdvals(W @ S)
    f = svd_llm_factors(W, G, k)
    err = torch.linalg.matrix_norm((W - f.dense()) @ X.T) ** 2
    assert math.isclose(float(err), float((sigma_all[k:] ** 2).sum()), rel_tol=1e-8)
    # and the whitened truncation beats plain SVD on these inputs
    plain = torch.linalg.matrix_norm((W - svd_factors(W, k).dense()) @ X.T) ** 2
    assert err < plain


def test_whitening_fallback_on_singular_gram():
    X = _correlated_inputs(8, 32)  # fewer tokens than channels: rank-deficient Gram
    X[:, 3] = 0.0  # and a dead channel
    wh = cholesky_whitening(X.T @ X)
    assert wh.damping > 0 and torch.isfinite(wh.S).all()
    f = svd_llm_factors(torch.randn(16, 32, dtype=torch.float64), X.T @ X, 4)
    assert torch.isfinite(f.Vt).all()


def test_zero_gram_becomes_identity():
    assert torch.equal(cholesky_whitening(torch.zeros(5, 5)).S, torch.eye(5, dtype=torch.float64))


def test_asvd_matches_svd_for_constant_activations():
    W = torch.randn(20, 12, dtype=torch.float64)
    a = asvd_factors(W, torch.full((12,), 4.0, dtype=torch.float64), 5).dense()
    b = svd_factors(W, 5).dense()
    assert torch.allclose(a, b, atol=1e-10)


def test_factorise_rejects_unknown_factorisation():
    with pytest.raises(ValueError, match="unknown factorisation"):
        factorise("nope", torch.eye(3), None, None)


@pytest.mark.parametrize("m,n,r,expected", [(576, 576, 0.4, 172), (1536, 576, 0.2, 335), (192, 576, 0.6, 57),
                                            (4096, 4096, 0.2, 1638)])
def test_uniform_rank_formula(m, n, r, expected):
    assert uniform_rank(m, n, r) == expected == math.floor((1 - r) * m * n / (m + n))
    assert lowrank_params(m, n, expected) <= (1 - r) * m * n


@pytest.mark.parametrize("r", [0.0, 1.0, -0.1, 1.5])
def test_bad_ratio_refused(r):
    with pytest.raises(RankError):
        uniform_rank(64, 64, r)


def test_rank_that_saves_nothing_is_refused():
    assert max_saving_rank(64, 64) == 31
    check_rank(64, 64, 31)
    with pytest.raises(RankError, match="not fewer"):
        check_rank(64, 64, 32)
    with pytest.raises(RankError, match="keeps no component"):
        uniform_rank(2, 2, 0.9)


def test_lowrank_module_at_full_rank_reproduces_dense_layer():
    torch.manual_seed(0)
    dense = torch.nn.Linear(24, 40, bias=True).double()
    f = svd_factors(dense.weight.detach())
    up, down = f.split(dtype=torch.float64)
    lr = LowRankLinear.from_factors(up, down, dense.bias.detach())
    x = torch.randn(7, 24, dtype=torch.float64)
    assert lr.rank == 24
    assert torch.allclose(lr(x), dense(x), atol=1e-10)
    assert set(lr.state_dict()) == {"down.weight", "up.weight", "up.bias"}
