"""SoCo end to end on a tiny model: DeepSpeed ZeRO training, exact budget, resume, 2 ranks."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline import compress
from pipeline.config import from_dict

SOCO_TINY = {"lr": 0.05, "batch_size": 2, "holdout_samples": 4, "topk": 16, "eval_every": 3, "checkpoint_every": 5,
             "launcher": "local",
             "schedule": {"refine_steps": 6, "sparsify_steps": 4, "sparsify_ramp": 2, "coarse_max_steps": 30}}


def soco_config(model, output, data, **soco):
    """SOCO_TINY with `soco` overriding it; keys of the schedule go to soco.schedule."""
    from dataclasses import fields
    from soco.schedule import ScheduleConfig
    names = {f.name for f in fields(ScheduleConfig)}
    schedule = {**SOCO_TINY["schedule"], **{k: v for k, v in soco.items() if k in names}}
    soco = {**SOCO_TINY, **{k: v for k, v in soco.items() if k not in names}, "schedule": schedule}
    return from_dict({"model": str(model), "output": str(output),
                      "data": {"source": str(data), "calib_samples": 16, "seq_len": 32, "eval_samples": 4,
                               "batch_size": 4},
                      "compress": {"method": "soco", "ratio": 0.4},
                      "soco": soco,
                      "run": {"threads": 1, "shard_size_mb": 0.05}})


def test_soco_end_to_end_keeps_exact_budget(tmp_path, tiny_llama, text_file):
    report = compress(soco_config(tiny_llama, tmp_path / "run", text_file), progress=False)
    run = tmp_path / "run"
    learn = json.loads((run / "learn.json").read_text())
    assert learn["kept_params"] <= learn["budget_params"]
    # counted on the saved checkpoint's tensors: within 0.5% of the target
    assert abs(report["achieved_ratio"]["linear"] - 0.4) < 0.005
    ranks = json.loads((run / "checkpoint" / "config.json").read_text())["soco"]["ranks"]
    assert len(set(ranks.values())) > 3, "learned ranks should not be uniform"
    assert learn["steps"] >= 1 and len(learn["stage_boundaries"]) >= 1
    # gradual pruning ended in the final cut; the saved ranks are its unmasked components
    assert learn["frozen_at"] == learn["stage_boundaries"][1] + SOCO_TINY["schedule"]["sparsify_ramp"]  # last ramp step
    saved, state, curve = _final_scores(run)
    assert {n: int(saved[f"{n}.mask"].sum()) for n in ranks} == ranks
    assert state.best_step >= learn["frozen_at"] and learn["best_holdout_kl"] == min(
        e["holdout_kl"] for e in curve if "holdout_kl" in e and e["step"] >= learn["frozen_at"])
    # the saved scores are the average of the pruned network's iterates from the cut to the best step
    t = int(saved["avg.steps"][0])
    assert t == state.best_step - learn["frozen_at"] + 1
    for n in ranks:
        assert torch.allclose(saved[f"{n}.score"], saved[f"{n}.score.avg"] / (1 - 0.9 ** t))
    # each step's time and the parameters it computed with: after the cut, the kept ones only
    costs = learn["step_costs"]
    assert set(costs) == {"coarse", "refine", "sparsify"} and all(c["mean_step_s"] > 0 for c in costs.values())
    assert costs["sparsify"]["mean_active_params"] < costs["refine"]["mean_active_params"]
    assert [e["active_params"] for e in curve if e["step"] >= learn["frozen_at"]] == \
        [learn["kept_params"]] * sum(e["step"] >= learn["frozen_at"] for e in curve)
    for png in ("training_curve.png", "scores.png", "ranks.png"):
        assert (run / "plots" / png).stat().st_size > 1000
    assert report["perplexity"]["compressed"] > 1


def test_zero2_prunes_by_fisher_like_zero3(tmp_path, tiny_llama, text_file):
    """Stage 2 keeps the scores' gradients in its own partitioned buffers: the Fisher
    importance must read them there too, and the run must reach the same exact budget."""
    report = compress(soco_config(tiny_llama, tmp_path / "run", text_file, zero_stage=2), progress=False)
    learn = json.loads((tmp_path / "run" / "learn.json").read_text())
    assert learn["kept_params"] <= learn["budget_params"] and learn["frozen_at"] > 0
    assert abs(report["achieved_ratio"]["linear"] - 0.4) < 0.005
    saved, state, _ = _final_scores(tmp_path / "run")
    assert int(saved["fisher.steps"][0]) == state.best_step
    assert all(float(v.sum()) > 0 for k, v in saved.items() if k.endswith(".fisher"))


@pytest.mark.parametrize("factor_vt,factor_rank", [(False, 0), (True, 0), (False, 2)])
def test_factor_lr_trains_the_factors_and_the_checkpoint_holds_them(tmp_path, tiny_llama, text_file, factor_vt,
                                                                     factor_rank):
    """soco.factor_lr trains every matrix's U with the scores (and its Vt with soco.factor_vt;
    with soco.factor_rank a rank-2 change up @ down of U instead of U itself): the final scores
    file holds what trained, it moved away from svd-llm's factors, what did not train is
    neither saved nor changed, and the learned factors fold exactly those."""
    from cluster.storage import Storage
    from pipeline.stages.decompose import load_layer_factors
    from pipeline.stages.learn import load_layer_learned
    from soco.scores import fold
    report = compress(soco_config(tiny_llama, tmp_path / "run", text_file, factor_lr=1e-3, factor_vt=factor_vt,
                                  factor_rank=factor_rank), progress=False)
    assert abs(report["achieved_ratio"]["linear"] - 0.4) < 0.005
    store = Storage(str(tmp_path / "run"))
    saved, _, _ = _final_scores(tmp_path / "run")
    name = "model.layers.0.self_attn.q_proj"
    factors = {k: v.float() for k, v in load_layer_factors(store, 0)["self_attn.q_proj"].items()}
    if factor_rank:  # U itself neither trained nor saved: its change, rank 2
        assert f"{name}.U" not in saved and saved[f"{name}.u_up"].shape == (factors["U"].shape[0], 2)
        assert saved[f"{name}.u_down"].shape == (2, factors["U"].shape[1]) and saved[f"{name}.u_up"].abs().sum() > 0
        saved[f"{name}.U"] = factors["U"] + saved[f"{name}.u_up"] @ saved[f"{name}.u_down"]
    assert saved[f"{name}.U"].shape == factors["U"].shape
    assert not torch.allclose(saved[f"{name}.U"], factors["U"])
    if factor_vt:  # Vt's change, in units of its rows' norms
        assert saved[f"{name}.vt_delta"].shape == factors["Vt"].shape and saved[f"{name}.vt_delta"].abs().sum() > 0
    else:
        assert f"{name}.vt_delta" not in saved
    keep = torch.nonzero(saved[f"{name}.mask"] > 0).flatten()
    Vt = factors["Vt"] if not factor_vt else factors["Vt"] + factors["Vt"].norm(dim=1, keepdim=True) * saved[f"{name}.vt_delta"]
    U, sigma, Vt = fold(saved[f"{name}.U"], factors["sigma"], Vt, saved[f"{name}.score"], keep)
    learned = load_layer_learned(store, 0)["self_attn.q_proj"]
    assert torch.allclose(learned["U"].float() @ torch.diag(learned["sigma"].float()) @ learned["Vt"].float(),
                          U @ torch.diag(sigma) @ Vt, atol=1e-5)


@pytest.mark.parametrize("counts_idle", [True, False])
def test_factor_from_sparsify_holds_the_factors_until_the_pruning_starts(tmp_path, tiny_llama, text_file,
                                                                          counts_idle):
    """soco.factor_from = sparsify (with U and Vt trained): every checkpoint written before the
    sparsify stage holds svd-llm's factors unchanged (their gradients are not even computed),
    and both train from there on. Adam's step count of the factors' groups is the scores'
    (soco.factor_counts_idle_steps, the default) or only the steps they trained."""
    from cluster.storage import Storage
    from pipeline.stages.decompose import load_layer_factors
    from pipeline.stages.learning.scored_model import load_scores, periodic_checkpoints
    from soco.schedule import Stage
    compress(soco_config(tiny_llama, tmp_path / "run", text_file, factor_lr=1e-3, factor_from="sparsify",
                         factor_vt=True, checkpoint_every=1, keep_checkpoints=0,
                         factor_counts_idle_steps=counts_idle), progress=False)
    store = Storage(str(tmp_path / "run"))
    name, factors = "model.layers.0.self_attn.q_proj", load_layer_factors(store, 0)["self_attn.q_proj"]
    stages = []
    for rel in periodic_checkpoints(store):
        saved, state, _ = load_scores(store, rel)
        stages.append(state.stage)
        score_steps, u_steps, vt_steps = saved["optimizer.step"].tolist()  # groups: score, U, vt_delta
        assert score_steps == state.step and u_steps == vt_steps
        trained = state.step - state.boundaries[1] if len(state.boundaries) > 1 else 0  # steps since refine ended
        assert u_steps == (state.step if counts_idle else trained), (rel, state.boundaries)
        if state.stage < Stage.SPARSIFY:  # the next step is still before sparsify: factors untouched
            assert torch.equal(saved[f"{name}.U"], factors["U"].float())
            assert not saved[f"{name}.vt_delta"].any()
    assert Stage.COARSE in stages and Stage.REFINE in stages and max(stages) >= Stage.SPARSIFY
    final, _, _ = _final_scores(tmp_path / "run")
    assert not torch.allclose(final[f"{name}.U"], factors["U"].float()) and final[f"{name}.vt_delta"].any()


def test_factor_anchor_holds_the_trained_u_near_the_decomposed_one(tmp_path, tiny_llama, text_file):
    """soco.factor_anchor through the whole learn stage (ZeRO-3, the decomposed U as a buffer
    beside the partitioned one): U still trains, and ends far nearer svd-llm's U than
    the same run without the anchor."""
    from cluster.storage import Storage
    from pipeline.stages.decompose import load_layer_factors
    moved = {}
    for anchor in (0.0, 1000.0):
        run = tmp_path / f"run-{anchor}"
        compress(soco_config(tiny_llama, run, text_file, factor_lr=1e-3, factor_from="sparsify",
                             factor_anchor=anchor), progress=False)
        final, _, _ = _final_scores(run)
        store = Storage(str(run))
        moved[anchor] = sum(float((final[f"model.layers.0.{n}.U"] - f["U"].float()).pow(2).sum())
                            for n, f in load_layer_factors(store, 0).items())
    assert 0 < moved[1000.0] < 0.5 * moved[0.0], moved


def test_hard_lr_end_shrinks_the_steps_the_hard_training_takes(tmp_path, tiny_llama, text_file):
    """soco.schedule.hard_lr_end: the optimiser's learning rates (the curve's lr_scale) are 1 in
    the coarse stage and refine_lr_factor after it until the final cut, then fall at every step
    to hard_lr_end times that at the sparsify stage's cap."""
    compress(soco_config(tiny_llama, tmp_path / "run", text_file, hard_lr_end=0.1, sparsify_steps=8,
                         sparsify_patience=100, factor_lr=1e-3, factor_from="sparsify"), progress=False)
    _, state, curve = _final_scores(tmp_path / "run")
    factor = 0.4  # soco.refine_lr_factor's default
    cut = state.frozen_at  # the step (counted from 1) that made the final cut
    assert state.boundaries[-1] - state.boundaries[-2] == 8, "ran to the sparsify stage's cap"
    assert {e["lr_scale"] for e in curve if e["stage"] == 1} == {1.0}
    assert {e["lr_scale"] for e in curve if e["stage"] > 1 and e["step"] <= cut} == {factor}
    hard = [e["lr_scale"] for e in curve if e["step"] > cut]
    assert len(hard) == 6 and all(a > b for a, b in zip(hard, hard[1:]))
    assert factor * 0.1 < hard[-1] < factor * 0.2


def _dense_forward(model_dir, windows: torch.Tensor, layers: tuple[int, ...]):
    """The dense model's own forward (transformers', not the layer-by-layer one) on `windows`:
    its logits, the outputs of decoder `layers` by index, and its hidden size."""
    from transformers import AutoModelForCausalLM
    from pipeline.layerwise import layer_output
    dense = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    outputs = {}
    for i in layers:
        dense.model.layers[i].register_forward_hook(lambda _m, _a, o, i=i: outputs.__setitem__(i, layer_output(o)))
    with torch.no_grad():
        logits = dense(windows).logits
    return logits, outputs, dense.config.hidden_size


def test_hidden_layers_distil_the_dense_models_own_layer_outputs(tmp_path, tiny_llama, text_file):
    """soco.hidden_layers = 2: the cached targets are the dense model's own outputs of the
    chosen decoder layers on the calibration windows (its forward, not the layer-by-layer
    one), every step records the hidden-state distance, and the budget is still exact."""
    from cluster.storage import Storage
    from pipeline.stages.calibrate import WINDOWS_FILE
    from pipeline.stages.learning.teacher import HIDDEN_FILE
    report = compress(soco_config(tiny_llama, tmp_path / "run", text_file, hidden_layers=2), progress=False)
    assert abs(report["achieved_ratio"]["linear"] - 0.4) < 0.005
    store = Storage(str(tmp_path / "run"))
    cached = store.load_tensors(HIDDEN_FILE)["hidden"]
    assert json.loads(store.tensor_metadata(HIDDEN_FILE)["layers"]) == [0, 2]
    windows = store.load_tensors(WINDOWS_FILE)["windows"]
    _, outputs, hidden_size = _dense_forward(tiny_llama, windows, (0, 2))
    assert cached.shape == (windows.shape[0], 2, windows.shape[1], hidden_size)
    assert cached.dtype == torch.bfloat16
    for j, i in enumerate((0, 2)):
        torch.testing.assert_close(cached[:, j].float(), outputs[i], rtol=1e-2, atol=1e-2)
    _, _, curve = _final_scores(tmp_path / "run")
    assert all(e["hidden"] > 0 for e in curve)


def test_generated_windows_continue_training_prompts_and_carry_the_dense_targets(tmp_path, tiny_llama, text_file,
                                                                                  monkeypatch):
    """soco.generated_windows = 6: windows sampled from the dense model begin with the first
    soco.generate_prompt tokens of the training windows (in turn), are full length, carry the
    dense model's own top-k and layer outputs on them, and training draws batches from them
    while the held-out evaluation sees only real held-out windows."""
    from cluster.storage import Storage
    from pipeline.stages.calibrate import WINDOWS_FILE
    from pipeline.stages.learning.generated import GENERATED_FILE
    from pipeline.stages.learning.trainer import Trainer
    seen: list[list[int]] = []
    forward = Trainer.forward
    monkeypatch.setattr(Trainer, "forward", lambda self, ids, *a, **k: (seen.append(list(ids)),
                                                                       forward(self, ids, *a, **k))[1])
    cfg = soco_config(tiny_llama, tmp_path / "run", text_file, hidden_layers=2, generated_windows=6,
                      generate_prompt=4)
    report = compress(cfg, progress=False)
    assert abs(report["achieved_ratio"]["linear"] - 0.4) < 0.005
    store = Storage(str(tmp_path / "run"))
    real = store.load_tensors(WINDOWS_FILE)["windows"]
    gen = store.load_tensors(GENERATED_FILE)
    n_train = real.shape[0] - SOCO_TINY["holdout_samples"]
    assert gen["windows"].shape == (6, real.shape[1])
    assert torch.equal(gen["windows"][:, :4], real[torch.arange(6) % n_train, :4])
    assert not torch.equal(gen["windows"][:, 4:], real[:6, 4:])  # sampled, not copied
    logits, outputs, _ = _dense_forward(tiny_llama, gen["windows"], (0, 2))
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(gen["logp"], logp.gather(-1, gen["idx"].long()), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gen["logp"][..., 0], logp.max(-1).values, rtol=1e-4, atol=1e-4)
    assert json.loads(store.tensor_metadata(GENERATED_FILE)["layers"]) == [0, 2]
    for j, i in enumerate((0, 2)):
        torch.testing.assert_close(gen["hidden"][:, j].float(), outputs[i], rtol=1e-2, atol=1e-2)
    n_real = real.shape[0]
    trained = {i for ids in seen if len(ids) == SOCO_TINY["batch_size"] for i in ids}
    held = [ids for ids in seen if len(ids) != SOCO_TINY["batch_size"]]
    assert trained & set(range(n_real, n_real + 6)), "no step drew a generated window"
    assert held and all(set(ids) == set(range(n_train, n_real)) for ids in held)


def test_generated_from_sparsify_draws_generated_windows_only_in_the_hard_stage(tmp_path, tiny_llama, text_file,
                                                                                 monkeypatch):
    """soco.generated_from = sparsify: coarse and refinement steps draw real training windows
    only; the sparsify stage's steps draw generated ones too."""
    from pipeline.stages.learning.trainer import Trainer
    from soco.schedule import Stage
    seen: list[tuple[int, list[int]]] = []
    forward = Trainer.forward
    monkeypatch.setattr(Trainer, "forward", lambda self, ids, *a, **k: (
        seen.append((self.schedule.stage, list(ids))), forward(self, ids, *a, **k))[1])
    compress(soco_config(tiny_llama, tmp_path / "run", text_file, generated_windows=8, generate_prompt=4,
                         generated_from="sparsify", sparsify_steps=12, max_steps=40), progress=False)
    n_real, batch = 16, SOCO_TINY["batch_size"]
    steps = [(stage, ids) for stage, ids in seen if len(ids) == batch]
    early = {i for stage, ids in steps if stage < Stage.SPARSIFY for i in ids}
    hard = {i for stage, ids in steps if stage == Stage.SPARSIFY for i in ids}
    assert early and max(early) < n_real - SOCO_TINY["holdout_samples"]
    assert hard & set(range(n_real, n_real + 8)), "no hard-stage step drew a generated window"


def test_sampled_windows_are_seeded_and_leave_the_callers_random_state(tiny_llama):
    from pipeline.checkpoint import load_dense
    from pipeline.stages.learning.generated import sample_windows
    model = load_dense(str(tiny_llama)).eval()
    prompts = torch.randint(0, model.config.vocab_size, (3, 2), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = sample_windows(model, prompts, 12, 1.0, seed=0, batch_size=2, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.shape == (3, 12) and torch.equal(a[:, :2], prompts)
    assert torch.equal(a, sample_windows(model, prompts, 12, 1.0, seed=0, batch_size=2, progress=False))
    assert not torch.equal(a, sample_windows(model, prompts, 12, 1.0, seed=1, batch_size=2, progress=False))


def test_hard_concrete_gates_keep_the_exact_budget_and_fold_their_value(tmp_path, tiny_llama, text_file):
    """soco.gate = hard_concrete: log alpha trains with the scores, the cut keeps exactly the
    budget, and the learned factors fold s times the gates' deterministic value."""
    from cluster.storage import Storage
    from pipeline.stages.decompose import load_layer_factors
    from pipeline.stages.learn import load_layer_learned
    from soco.scores import HC_INIT, effective_score, fold
    report = compress(soco_config(tiny_llama, tmp_path / "run", text_file, gate="hard_concrete"), progress=False)
    assert abs(report["achieved_ratio"]["linear"] - 0.4) < 0.005
    learn = json.loads((tmp_path / "run" / "learn.json").read_text())
    assert learn["kept_params"] <= learn["budget_params"] and learn["frozen_at"] > 0
    saved, _, _ = _final_scores(tmp_path / "run")
    name = "model.layers.0.self_attn.q_proj"
    assert not torch.allclose(saved[f"{name}.log_alpha"], torch.full_like(saved[f"{name}.log_alpha"], HC_INIT))
    factors = load_layer_factors(Storage(str(tmp_path / "run")), 0)["self_attn.q_proj"]
    keep = torch.nonzero(saved[f"{name}.mask"] > 0).flatten()
    U, sigma, Vt = fold(factors["U"].float(), factors["sigma"].float(), factors["Vt"].float(),
                        effective_score(saved[f"{name}.score"], saved[f"{name}.log_alpha"]), keep)
    learned = load_layer_learned(Storage(str(tmp_path / "run")), 0)["self_attn.q_proj"]
    assert torch.allclose(learned["U"].float() @ torch.diag(learned["sigma"].float()) @ learned["Vt"].float(),
                          U @ torch.diag(sigma) @ Vt, atol=1e-5)


def _final_scores(run):
    from cluster.storage import Storage
    from pipeline.stages.learning.scored_model import FINAL_SCORES, load_scores
    return load_scores(Storage(str(run)), FINAL_SCORES)


@pytest.mark.slow
def test_zero3_two_ranks_match_one_rank(tmp_path, tiny_llama, text_file):
    """Ray Train launches the DeepSpeed ZeRO-3 learn stage on 2 gloo ranks (the frozen factors
    partitioned between them); the result matches a 1-rank run of the same global batch."""
    knobs = {"launcher": "ray", "zero_stage": 3, "max_steps": 6, "coarse_max_steps": 3, "refine_steps": 2,
             "sparsify_steps": 1, "sparsify_ramp": 1, "eval_every": 100}
    one = compress(soco_config(tiny_llama, tmp_path / "one", text_file, workers=1, **knobs), progress=False)
    two = compress(soco_config(tiny_llama, tmp_path / "two", text_file, workers=2, **knobs), progress=False)
    s1, st1, c1 = _final_scores(tmp_path / "one")
    s2, st2, c2 = _final_scores(tmp_path / "two")
    assert st1.step == st2.step == 6
    for name in s1:
        if name.endswith(".mask"):
            continue
        assert torch.allclose(s1[name], s2[name], atol=1e-4), name
    assert [round(e["kl"], 4) for e in c1] == pytest.approx([round(e["kl"], 4) for e in c2], abs=2e-4)
    # the pruning is a discrete cut: scores equal to 1e-4 may order an exact tie (early Adam
    # steps move many scores by the same amount) differently, so allow a few swapped components
    m1 = torch.cat([v for k, v in s1.items() if k.endswith(".mask")])
    m2 = torch.cat([v for k, v in s2.items() if k.endswith(".mask")])
    assert (m1 != m2).float().mean() < 0.02
    assert abs(one["perplexity"]["compressed"] - two["perplexity"]["compressed"]) < 1e-2 * one["perplexity"]["compressed"]


def test_resume_from_score_checkpoint_continues_at_the_same_step(tmp_path, tiny_llama, text_file):
    from cluster.storage import Storage
    from pipeline.run import compress as run_compress
    from dataclasses import replace

    from pipeline.stages.learning.job import learn_job
    from pipeline.stages.learning.scored_model import latest_checkpoint, load_scores, periodic_checkpoints
    from pipeline.stages.learning.trainer import train_worker
    from pipeline.plan import Plan
    cfg = soco_config(tiny_llama, tmp_path / "run", text_file, checkpoint_every=4, max_steps=9,
                      coarse_max_steps=3, refine_steps=20, eval_every=100)
    run_compress(cfg, progress=False)
    store = Storage(str(tmp_path / "run"))
    # only the last periodic checkpoint stays (soco.keep_checkpoints = 1): step 4's was deleted
    assert periodic_checkpoints(store) == ["scores/step-000008.safetensors"]
    assert latest_checkpoint(store) == "scores/step-000008.safetensors"
    scores8, state8, curve8 = load_scores(store, "scores/step-000008.safetensors")
    assert state8.step == 8 and len(curve8) == 8
    # continue the stage from its last checkpoint with a larger step budget
    plan = Plan.from_json(store.read_json("factors/plan.json"))
    job = learn_job(cfg, plan, store, resume=True, progress=False)
    train_worker({"job": replace(job, soco=replace(job.soco, max_steps=12))})
    _, state, curve = _final_scores(tmp_path / "run")
    assert [e["step"] for e in curve] == list(range(1, 13))
    assert curve[:8] == curve8, "the resumed run keeps the history it resumed from"
    assert state.step == 12 and latest_checkpoint(store) == "scores/step-000012.safetensors"
    assert periodic_checkpoints(store) == ["scores/step-000012.safetensors"]
    # the pruning importance (Fisher EMA) went on from the checkpoint's, not from zero
    scores12, _, _ = load_scores(store, "scores/step-000012.safetensors")
    assert int(scores8["fisher.steps"][0]) == 8 and int(scores12["fisher.steps"][0]) == 12


@pytest.mark.parametrize("zero_stage,factor_rank", [(3, 0), (2, 2)])
def test_a_resumed_learn_stage_equals_an_uninterrupted_one(tmp_path, tiny_llama, text_file, zero_stage,
                                                           factor_rank, capsys):
    """A run that ended at its cap (soco.max_steps 8), run again in the same folder with a
    higher cap (12), goes on from its step-8 checkpoint (scores, schedule, Fisher, average and
    Adam's moments and step counts) and takes exactly the steps an uninterrupted 12-step run
    takes: every tensor of the step-12 checkpoint is bit-identical. U (or, under ZeRO-2 here,
    its rank-2 change up @ down: soco.factor_rank) and Vt's change train from refinement on, so
    Adam has three (four) parameter groups, all but the scores' started later."""
    from cluster.storage import Storage
    from pipeline.run import compress as run_compress
    from pipeline.stages.learning.scored_model import load_scores
    knobs = dict(checkpoint_every=4, coarse_max_steps=3, refine_steps=20, eval_every=100, zero_stage=zero_stage,
                 factor_lr=1e-3, factor_from="refine", factor_vt=True, factor_rank=factor_rank)
    whole = soco_config(tiny_llama, tmp_path / "whole", text_file, max_steps=12, **knobs)
    whole_report = run_compress(whole, progress=False)
    cut = soco_config(tiny_llama, tmp_path / "cut", text_file, max_steps=8, **knobs)
    run_compress(cut, progress=False)
    store = Storage(str(tmp_path / "cut"))
    saved8, _, _ = load_scores(store, "scores/step-000008.safetensors")
    assert int(saved8["optimizer.step"][0]) == 8
    parts = ("u_up", "u_down", "vt_delta") if factor_rank else ("U", "vt_delta")
    assert all(any(k.endswith(f".{part}.exp_avg_sq") for k in saved8) for part in parts)
    capsys.readouterr()
    longer = run_compress(soco_config(tiny_llama, tmp_path / "cut", text_file, max_steps=12, **knobs), progress=False)
    assert longer["resumed_stages"] == ["calibrate", "decompose"] and longer["continued_stages"] == ["learn"]
    assert "learn: soco.max_steps 8 -> 12: going on from the earlier run's checkpoints" in capsys.readouterr().err
    a, state_a, curve_a = load_scores(Storage(str(tmp_path / "whole")), "scores/step-000012.safetensors")
    b, state_b, curve_b = load_scores(store, "scores/step-000012.safetensors")
    assert a.keys() == b.keys() and int(b["optimizer.step"][0]) == 12
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert [e["kl"] for e in curve_a] == [e["kl"] for e in curve_b]
    assert longer["perplexity"] == whole_report["perplexity"]


def test_zero3_builds_the_factors_already_partitioned(tmp_path, tiny_llama, text_file, monkeypatch):
    """Under ZeRO-3 each factor is partitioned as its matrix is built (zero.Init), so no rank
    ever holds the whole factored model; the partitioned model gives the same scored logits.
    The factors keep the run's dtype also on a CPU without fp16 support, where DeepSpeed's
    own dtype fallback picks bfloat16 (simulated here, so the check runs on every machine)."""
    from deepspeed.accelerator import get_accelerator
    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: False)
    from cluster import zero
    from cluster.storage import Storage
    from pipeline.model_io import ModelSource
    from pipeline.stages.learning.scored_model import build_scored_model
    from soco.scores import scored_modules
    compress(soco_config(tiny_llama, tmp_path / "run", text_file, max_steps=1), progress=False)
    store, source = Storage(str(tmp_path / "run")), ModelSource(str(tiny_llama))
    zero.init_distributed()
    part = build_scored_model(source, store, partitioned=lambda: zero.partitioned_init(3, 1, torch.float32))
    plain = build_scored_model(source, store)
    mods = scored_modules(part)
    assert mods and all(hasattr(m.U, "ds_id") and m.U.data.numel() == 0 for m in mods.values())
    assert {p.dtype for p in part.parameters()} == {torch.float32}
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad(), zero.gathered(list(part.parameters())):
        assert torch.allclose(part(ids).logits, plain(ids).logits, atol=1e-5)


def test_learn_workers_get_the_run_folder_by_absolute_path(monkeypatch, tiny_llama, text_file):
    """Ray Train workers start in a directory of their own: a relative `output` (and model)
    must reach them as absolute paths, or they look for the factors in the wrong place."""
    from cluster.storage import Storage
    from pipeline.plan import Plan
    from pipeline.stages.learning.job import learn_job
    monkeypatch.chdir(tiny_llama.parent)
    cfg = soco_config(tiny_llama.name, "relative-run", text_file)
    job = learn_job(cfg, Plan("svd-llm", 0.0), Storage(cfg.output), resume=False, progress=False)
    assert job.run == str(tiny_llama.parent / "relative-run")
    assert job.model == str(tiny_llama)
