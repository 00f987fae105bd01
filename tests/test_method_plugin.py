"""A method is one file: a toy method registered here, in the test file, runs through the
whole pipeline on both executors, and its checkpoint saves and loads like any other.

The toy factors each matrix on a random orthonormal basis of its input space (a random
projection: W ~ (W Q) Q^T with Q n x k), not by any SVD, so nothing in the stages can be
quietly computing one of the built-in methods instead.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pipeline import compress, load_compressed  # noqa: E402
from pipeline.methods import Method, register  # noqa: E402
from soco.decompose import Factors  # noqa: E402

from conftest import tiny_config  # noqa: E402


class RandomProjection(Method):
    """W ~ U diag(sigma) Vt with Vt = Q^T (a seeded random orthonormal basis of k input
    directions), sigma the norms of the columns of W Q, U those columns normalised."""

    name = "toy-random-projection"

    def factorise(self, W, stats, rank, cfg):
        m, n = W.shape
        g = torch.Generator().manual_seed(m * 100_003 + n)
        Q, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))
        A = W.to(torch.float64) @ Q
        sigma = A.norm(dim=0).clamp_min(1e-12)
        return Factors(A / sigma, sigma, Q.T.contiguous())


register(RandomProjection())
# Ray workers import code by module name; this test module is not importable there, so its
# classes travel by value (a method in an installed package needs nothing of the kind).
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory, tiny_llama, text_file):
    import ray
    root = tmp_path_factory.mktemp("toy")
    local = tiny_config(tiny_llama, root / "local", text_file, method="toy-random-projection")
    local.ray.enabled = False
    on_ray = tiny_config(tiny_llama, root / "ray", text_file, method="toy-random-projection")
    started = not ray.is_initialized()
    try:
        reports = compress(local, progress=False), compress(on_ray, progress=False)
    finally:
        if started:
            ray.shutdown()
    return root, reports


def test_toy_method_runs_on_both_executors_with_equal_results(toy_runs):
    root, (rep_local, rep_ray) = toy_runs
    assert rep_local["method"] == "toy-random-projection"
    for key in ("dense", "compressed"):
        assert rep_ray["perplexity"][key] == pytest.approx(rep_local["perplexity"][key], rel=1e-6)
    assert rep_local["perplexity"]["compressed"] > rep_local["perplexity"]["dense"]  # it did compress
    assert abs(rep_local["achieved_ratio"]["linear"] - 0.4) < 0.05
    a, b = load_compressed(str(root / "local" / "checkpoint")), load_compressed(str(root / "ray" / "checkpoint"))
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.allclose(ta, tb, rtol=1e-5, atol=1e-6), na


def test_toy_checkpoint_loads_and_holds_the_toy_factors(toy_runs, tiny_llama):
    from transformers import AutoModelForCausalLM
    root, _ = toy_runs
    loaded = load_compressed(str(root / "local" / "checkpoint"))
    dense = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    q = loaded.model.layers[1].self_attn.q_proj
    W = dense.model.layers[1].self_attn.q_proj.weight.double()
    factors = RandomProjection().factorise(W, {}, q.rank, None)
    expected = factors.dense()  # W Q Q^T
    assert torch.allclose((q.up.weight @ q.down.weight).double(), expected, atol=1e-5)
    assert not torch.allclose(expected, W, atol=1e-3), "a rank-k projection is not W itself"
    ids = torch.randint(0, loaded.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(loaded(ids).logits).all()
