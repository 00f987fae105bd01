"""MGAA (svd-llm+mgaa, soco+mgaa) and LoRAP: exact budgets counted on the saved checkpoint,
MGAA's ratios in the order of the similarities, LoRAP's pruned MLP and its checkpoint, and
both methods on both executors with equal results."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pipeline import compress, load_compressed  # noqa: E402

from conftest import tiny_config  # noqa: E402

SOCO_TINY = {"lr": 0.05, "batch_size": 2, "holdout_samples": 4, "topk": 16, "eval_every": 3, "launcher": "local",
             "schedule": {"refine_steps": 6, "sparsify_steps": 4, "sparsify_ramp": 2, "coarse_max_steps": 30}}


def _config(model, out, text, method, ray):
    cfg = tiny_config(model, out, text, method=method)
    cfg.ray.enabled = ray
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama, text_file):
    """svd-llm+mgaa and lorap, each in-process and on Ray."""
    import ray
    root = tmp_path_factory.mktemp("alloc")
    started = not ray.is_initialized()
    out = {}
    try:
        for method in ("svd-llm+mgaa", "lorap"):
            for ray_on in (False, True):
                name = f"{method}-{'ray' if ray_on else 'local'}"
                out[name] = compress(_config(tiny_llama, root / name, text_file, method, ray_on), progress=False)
    finally:
        if started:
            ray.shutdown()
    return root, out


# --------------------------------------------------------------------------- MGAA arithmetic
def test_sublayer_ratios_follow_the_similarity_order_and_meet_the_target():
    from soco.mgaa import sublayer_ratios
    sim = {"a": 0.95, "b": 0.40, "c": 0.70, "d": 0.85}
    params = {"a": 100, "b": 300, "c": 200, "d": 50}
    r = sublayer_ratios(sim, params, 0.4, spread=0.1)
    order = sorted(sim, key=sim.get)
    assert [r[n] for n in order] == sorted(r.values())  # more similar -> compressed more
    assert sum(r[n] * params[n] for n in r) / sum(params.values()) == pytest.approx(0.4, abs=1e-9)
    flat = sublayer_ratios(sim, params, 0.4, spread=0.0)
    assert all(v == pytest.approx(0.4) for v in flat.values())


def test_energy_ranks_share_energy_fit_the_budget_and_never_starve():
    from soco.mgaa import energy_ranks
    spectra = {"low": torch.tensor([10.0, 1.0, 0.1, 0.01] + [0.001] * 60),  # nearly rank 1
               "flat": torch.ones(64)}  # full rank
    costs = {"low": 128, "flat": 128}
    ranks = energy_ranks(spectra, costs, budget=128 * 40, min_rank={"low": 4, "flat": 4},
                         max_rank={"low": 63, "flat": 63})
    assert sum(k * costs[n] for n, k in ranks.items()) <= 128 * 40
    assert sum(k * costs[n] for n, k in ranks.items()) > 128 * 38  # the budget is used
    assert ranks["flat"] > ranks["low"] >= 4  # the flat spectrum needs more components; the guard holds
    with pytest.raises(ValueError):
        energy_ranks(spectra, costs, budget=100, min_rank={"low": 4, "flat": 4}, max_rank={"low": 63, "flat": 63})


# --------------------------------------------------------------------------- LoRAP pieces
def test_lorap_pruned_mlp_reproduces_the_dense_mlp_when_no_channel_is_removed():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from pipeline.methods.lorap import channel_scores, kept_channels
    from pipeline.modules import KINDS
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48)).double()
    x = torch.randn(5, 32, dtype=torch.float64)
    gram_in = x.T @ x
    h = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
    scores = channel_scores(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, gram_in, h.T @ h)
    keep = kept_channels(scores, 48, 0.01)
    assert torch.equal(keep, torch.arange(48))
    narrow = KINDS["narrow"]
    pruned = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48)).double()
    for name, W in (("gate_proj", mlp.gate_proj.weight[keep]), ("up_proj", mlp.up_proj.weight[keep]),
                    ("down_proj", mlp.down_proj.weight[:, keep])):
        mod = narrow.skeleton(getattr(mlp, name), list(W.shape), torch.float64)
        mod.load_state_dict(narrow.tensors({"W": W.detach()}, None, torch.float64), assign=True)
        setattr(pruned, name, mod)
    with torch.no_grad():
        assert torch.equal(pruned(x), mlp(x))
    # fewer channels: the best ones, plus 1% (here one) of the worst
    keep = kept_channels(scores, 40, 0.03)
    worst = torch.argsort(scores)[:1]
    assert len(keep) == 40 and worst.item() in keep.tolist()


# --------------------------------------------------------------------------- whole runs
@pytest.mark.parametrize("method", ["svd-llm+mgaa", "lorap"])
def test_budget_is_exact_on_the_saved_checkpoint(runs, method):
    root, reports = runs
    report = reports[f"{method}-local"]
    assert abs(report["achieved_ratio"]["linear"] - 0.4) < 0.005, report["achieved_ratio"]
    assert report["perplexity"]["compressed"] > 1


def test_both_executors_give_equal_results(runs):
    root, reports = runs
    for method in ("svd-llm+mgaa", "lorap"):
        a, b = reports[f"{method}-local"], reports[f"{method}-ray"]
        for key in ("dense", "compressed"):
            assert b["perplexity"][key] == pytest.approx(a["perplexity"][key], rel=1e-6)
        pa = json.loads((root / f"{method}-local" / "factors" / "plan.json").read_text())
        pb = json.loads((root / f"{method}-ray" / "factors" / "plan.json").read_text())
        assert pa["ranks"] == pb["ranks"]


def test_mgaa_ratios_follow_the_measured_similarities(runs, tiny_llama):
    from cluster.storage import Storage
    from pipeline.methods.mgaa import similarities
    from pipeline.stages.decompose import Evidence
    root, _ = runs
    run = root / "svd-llm+mgaa-local"
    sim = similarities(Evidence(Storage(str(run)), "model.layers", 3, {}))
    assert len(sim) == 6 and all(-1 <= v <= 1 for v in sim.values())
    plan = json.loads((run / "factors" / "plan.json").read_text())
    kept = {}
    for name, k in plan["ranks"].items():
        sub = name.rsplit(".", 1)[0]
        m, n = plan["shapes"][name]
        kept.setdefault(sub, [0, 0])
        kept[sub][0] += k * (m + n)
        kept[sub][1] += m * n
    removed = {s: 1 - a / b for s, (a, b) in kept.items()}
    for kind in ("self_attn", "mlp"):  # like with like: the same shapes, so ranks show the ratios
        subs = sorted((s for s in removed if s.endswith(kind)), key=lambda s: sim[s])
        assert [removed[s] for s in subs] == sorted(removed[s] for s in subs), (kind, sim, removed)


def test_lorap_checkpoint_round_trips_with_identical_logits(runs, tiny_llama):
    from transformers import AutoModelForCausalLM

    from cluster.storage import Storage
    from pipeline.modules import KINDS
    from pipeline.stages.decompose import load_layer_factors
    root, _ = runs
    run = root / "lorap-local"
    config = json.loads((run / "checkpoint" / "config.json").read_text())["soco"]
    assert set(config) >= {"ranks", "shapes"} and config["method"] == "lorap"
    assert config["shapes"]["model.layers.0.mlp.down_proj"][0] == 64  # narrowed in its input only
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    store = Storage(str(run))
    for i, layer in enumerate(model.model.layers):
        for name, f in load_layer_factors(store, i).items():
            kind = KINDS["narrow" if "W" in f else "lowrank"]
            dense = layer.get_submodule(name)
            spec = list(f["W"].shape) if "W" in f else f["sigma"].numel()
            mod = kind.skeleton(dense, spec, torch.float32)
            mod.load_state_dict(kind.tensors(f, None if dense.bias is None else dense.bias.detach(), torch.float32),
                                assign=True)
            layer.set_submodule(name, mod)
    loaded = load_compressed(str(run / "checkpoint"))
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.model.layers[0].mlp.gate_proj.weight.shape[0] < 96  # narrower MLP


def test_soco_from_mgaa_keeps_the_exact_budget(tmp_path, tiny_llama, text_file):
    from pipeline.config import from_dict
    cfg = from_dict({"model": str(tiny_llama), "output": str(tmp_path / "run"),
                     "data": {"source": str(text_file), "calib_samples": 16, "seq_len": 32, "eval_samples": 4,
                              "batch_size": 4},
                     "compress": {"method": "soco+mgaa", "ratio": 0.4}, "soco": SOCO_TINY,
                     "run": {"threads": 1, "shard_size_mb": 0.05}, "ray": {"enabled": False}})
    report = compress(cfg, progress=False)
    assert abs(report["achieved_ratio"]["linear"] - 0.4) < 0.005
    coarse = json.loads((tmp_path / "run" / "factors" / "plan.json").read_text())["ranks"]
    assert len(set(coarse.values())) > 3  # candidates from MGAA's allocation, not uniform
    learn = json.loads((tmp_path / "run" / "learn.json").read_text())
    assert learn["kept_params"] <= learn["budget_params"]
