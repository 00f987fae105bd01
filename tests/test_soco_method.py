"""SoCo's pieces in isolation: gradients, counts, folding, schedule rules, selection, KL."""
from __future__ import annotations

import math

import pytest
import torch

from soco.allocate import out_of_order_share, select_components
from soco.decompose import svd_factors
from soco.lowrank import LowRankLinear
from soco.objective import SoCoObjective, distilled_layers, hidden_distance, teacher_topk, topk_kl
from soco.schedule import ScheduleConfig, ScheduleState, Stage, ThreeStageSchedule
from soco.scores import (ScoredLinear, active_params, apply_cut, exact_count, fold, scored_modules, soft_count,
                         trained_u, trained_vt)


def _tiny_scored_model(tiny_llama, anchors_u: bool = False):
    """The tiny Llama with every decoder linear replaced by a full-rank ScoredLinear."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    for layer in model.model.layers:
        for name in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]:
            f = svd_factors(layer.get_submodule(name).weight.detach())
            layer.set_submodule(name, ScoredLinear(f.U.float(), f.sigma.float(), f.Vt.float(), anchors_u=anchors_u))
    for p in model.parameters():
        p.requires_grad_(False)
    for m in scored_modules(model).values():
        m.score.requires_grad_(True)
    return model


def test_gradients_reach_only_the_scores(tiny_llama):
    model = _tiny_scored_model(tiny_llama)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        logp, idx = teacher_topk(torch.randn(2, 12, model.config.vocab_size), 8)
    kl, _, soft, _, _ = SoCoObjective(model)(ids, logp, idx)
    (kl + soft / 1e4).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(n.endswith(".score") for n in with_grad)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith(".score"))
    assert any(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if n.endswith(".score"))


def test_distilled_layers_spread_over_depth_and_end_at_the_last():
    assert distilled_layers(30, 4) == [6, 14, 21, 29]
    assert distilled_layers(5, 1) == [4]
    assert distilled_layers(3, 3) == [0, 1, 2]
    assert distilled_layers(8, 0) == []
    with pytest.raises(ValueError):
        distilled_layers(2, 3)


def test_hidden_distance_is_relative_per_token():
    teacher = torch.randn(2, 3, 5, 8)  # [windows, layers, tokens, d]
    assert float(hidden_distance(list(teacher.unbind(1)), teacher)) == 0.0
    noise = torch.randn(2, 3, 5, 8)
    base = float(hidden_distance(list((teacher + 0.1 * noise).unbind(1)), teacher))
    assert base > 0
    # one token of the teacher 1000x larger (an attention sink), its error scaled alike: the same distance
    big, student = teacher.clone(), teacher + 0.1 * noise
    big[:, :, 0] *= 1000
    student[:, :, 0] = big[:, :, 0] + 1000 * 0.1 * noise[:, :, 0]
    assert abs(float(hidden_distance(list(student.unbind(1)), big)) - base) < 1e-4 * base


def test_hidden_distillation_compares_the_chosen_layers_outputs(tiny_llama):
    """With the scored model's own layer outputs as the teacher's, the distance is 0; against
    other targets it is positive and its gradient reaches the scores without the KL."""
    model = _tiny_scored_model(tiny_llama)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    picked = distilled_layers(model.config.num_hidden_layers, 2)
    with torch.no_grad():
        outputs = []
        hooks = [model.model.layers[i].register_forward_hook(
            lambda _m, _a, o: outputs.append(o[0] if isinstance(o, tuple) else o)) for i in picked]
        logp, idx = teacher_topk(model(ids).logits, 8)
        for h in hooks:
            h.remove()
    own = torch.stack(outputs, dim=1)
    objective = SoCoObjective(model, [model.model.layers[i] for i in picked])
    kl, hidden, _, _, _ = objective(ids, logp, idx, own)
    assert float(hidden.detach()) < 1e-10 and float(kl.detach()) < 1e-5
    _, hidden, _, _, _ = objective(ids, logp, idx, own * 1.1)
    assert float(hidden.detach()) > 1e-3
    hidden.backward()
    assert any(float(m.score.grad.abs().sum()) > 0 for m in scored_modules(model).values())
    # without teacher states the term is 0
    assert float(objective(ids, logp, idx)[1].detach()) == 0.0


def test_soft_count_equals_exact_count_when_gates_are_hard(tiny_llama):
    model = _tiny_scored_model(tiny_llama)
    g = torch.Generator().manual_seed(0)
    for m in scored_modules(model).values():
        with torch.no_grad():
            m.score.copy_(torch.rand(m.rank, generator=g) * 1.6 - 0.3)
    mods = scored_modules(model)
    assert float(soft_count(model)) != exact_count(model)  # soft gates differ from the count
    costs = {n: m.cost for n, m in mods.items()}
    keep = select_components({n: m.score.detach().abs() for n, m in mods.items()}, costs,
                             budget=exact_count(model) // 2)
    apply_cut(mods, keep)  # the final cut: gates turn hard
    kept = sum(len(keep[n]) * costs[n] for n in mods)
    assert float(soft_count(model)) == exact_count(model) == kept


def test_folding_scores_gives_the_scored_models_logits(tiny_llama):
    model = _tiny_scored_model(tiny_llama)
    g = torch.Generator().manual_seed(1)
    for m in scored_modules(model).values():
        with torch.no_grad():
            m.score.copy_(torch.rand(m.rank, generator=g) * 2.0)
            m.in_scale.copy_(0.5 + torch.rand(m.in_features, generator=g))  # trained channel scales fold too
            m.out_scale.copy_(0.5 + torch.rand(m.out_features, generator=g))
    mods = scored_modules(model)
    keep = {n: torch.nonzero(m.score.detach().abs() >= 0.5).flatten() for n, m in mods.items()}
    apply_cut(mods, keep)  # the pruned components contribute exactly nothing
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=g)
    with torch.no_grad():
        scored = model(ids).logits
        for name, m in list(mods.items()):
            up, down = m.folded(keep[name])
            model.set_submodule(name, LowRankLinear.from_factors(up, down))
        folded = model(ids).logits
    assert torch.allclose(scored, folded, atol=1e-4, rtol=1e-4)


def test_removing_pruned_components_changes_no_logit_nor_gradient(tiny_llama):
    """After a cut the forward computes with the kept components only: the same logits and
    score gradients as multiplying the pruned ones by their mask of 0 (up to the rounding of
    a shorter sum), at the kept components' cost."""
    model = _tiny_scored_model(tiny_llama)
    mods = scored_modules(model)
    g = torch.Generator().manual_seed(2)
    for m in mods.values():
        with torch.no_grad():
            m.score.copy_(torch.rand(m.rank, generator=g) * 2.0)
    keep = {n: torch.nonzero(m.score.detach() >= 0.8).flatten() for n, m in mods.items()}
    candidates = active_params(mods)
    apply_cut(mods, keep)
    assert active_params(mods) == exact_count(model) == sum(len(keep[n]) * m.cost for n, m in mods.items())
    assert active_params(mods) < 0.75 * candidates
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=g)
    logp, idx = teacher_topk(torch.randn(2, 10, model.config.vocab_size, generator=g), 8)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        for m in mods.values():
            m.score.grad = None
        kl, _, _, _, _ = SoCoObjective(model)(ids, logp, idx)
        kl.backward()
        return model(ids).logits.detach(), {n: m.score.grad.clone() for n, m in mods.items()}

    removed, removed_grads = run()
    for m in mods.values():
        m.kept = None  # the same cut, computed by masking
    masked, masked_grads = run()
    assert torch.allclose(removed, masked, rtol=1e-5, atol=1e-5)
    assert float((removed - masked).abs().max()) < 1e-4 * float(masked.abs().max())
    for n, m in mods.items():
        assert torch.allclose(removed_grads[n], masked_grads[n], rtol=1e-4, atol=1e-6)
        assert not removed_grads[n][m.mask == 0].any()  # pruned: no gradient


def test_fold_keeps_the_components_with_sigma_a_magnitude():
    """The fold behind the learned files: U' diag(sigma') Vt' is the kept part of
    out * U diag(s sigma) Vt * in, sigma' >= 0 (a negative score flips its column of U'), and
    absent channel scales fold exactly as scales of 1 (the files without them stay unchanged)."""
    g = torch.Generator().manual_seed(3)
    U, Vt = torch.randn(6, 5, generator=g), torch.randn(5, 7, generator=g)
    sigma, score = torch.rand(5, generator=g) + 0.1, torch.tensor([1.2, -0.7, 0.0, 0.4, -1.5])
    in_s, out_s = 0.5 + torch.rand(7, generator=g), 0.5 + torch.rand(6, generator=g)
    keep = torch.tensor([0, 1, 4])
    Uk, sk, Vk = fold(U, sigma, Vt, score, keep, in_s, out_s)
    assert Uk.shape == (6, 3) and sk.shape == (3,) and Vk.shape == (3, 7) and bool((sk >= 0).all())
    expected = out_s[:, None] * (U[:, keep] * (score * sigma)[keep]) @ Vt[keep] * in_s[None, :]
    assert torch.allclose(Uk @ torch.diag(sk) @ Vk, expected, atol=1e-6)
    assert torch.equal(Uk[:, 1], -out_s * U[:, 1])  # score -0.7: the sign moved into U
    plain, ones = fold(U, sigma, Vt, score, keep), fold(U, sigma, Vt, score, keep, torch.ones(7), torch.ones(6))
    assert all(torch.equal(a, b) for a, b in zip(plain, ones))


def test_deviation_is_the_relative_change_of_the_matrix_and_is_paid_after_the_coarse_stage():
    """With orthonormal factors (as in the whitened coordinates) the deviation is the squared
    Frobenius change the scores make, over the unscaled matrix's; pruned components do not count."""
    g = torch.Generator().manual_seed(3)
    f = svd_factors(torch.randn(12, 9, generator=g, dtype=torch.float64))
    m = ScoredLinear(f.U, f.sigma, f.Vt)
    assert float(m.deviation()) == 0.0  # scores start at 1: the unscaled spectrum
    with torch.no_grad():
        m.score.copy_(torch.rand(m.rank, generator=g, dtype=torch.float64) * 2)
    unscaled = f.U @ torch.diag(f.sigma) @ f.Vt
    scaled = f.U @ torch.diag(m.score.detach() * f.sigma) @ f.Vt
    assert float(m.deviation()) == pytest.approx(float((scaled - unscaled).norm() ** 2 / unscaled.norm() ** 2))
    apply_cut({"m": m}, {"m": torch.arange(4)})
    dev = m.deviation()
    expected = (f.sigma[:4] ** 2 * (m.score.detach()[:4] - 1) ** 2).sum() / (f.sigma ** 2).sum()
    assert float(dev) == pytest.approx(float(expected))
    dev.backward()
    assert not m.score.grad[4:].any() and m.score.grad[:4].any()
    sched = ThreeStageSchedule(ScheduleConfig(deviation_weight=0.5))
    assert float(sched.regulariser(torch.tensor(2.0))) == 0.0  # coarse stage: free to prune
    sched.state.stage = Stage.REFINE
    assert float(sched.regulariser(torch.tensor(2.0))) == 1.0
    sched.state.stage = Stage.SPARSIFY
    assert float(sched.regulariser(torch.tensor(2.0))) == 1.0
    assert float(ThreeStageSchedule(ScheduleConfig(), sched.state).regulariser(torch.tensor(2.0))) == 0.0  # off


def test_schedule_switching_rules():
    cfg = ScheduleConfig(coarse_max_steps=100, refine_steps=3, sparsify_steps=6, sparsify_ramp=2, patience=2)
    s = ThreeStageSchedule(cfg)
    assert s.after_step(soft_count=120.0, target=100.0) == Stage.COARSE
    assert s.after_step(soft_count=100.0, target=100.0) == Stage.REFINE  # reached the budget
    assert s.state.boundaries == [2] and s.prune_target(1000.0, 100.0) is None
    s.after_holdout(1.0)
    s.after_step(99.0, 100.0)
    s.after_holdout(1.5)
    assert s.stage == Stage.REFINE
    s.after_holdout(1.2)  # second evaluation without improvement: early stop
    assert s.stage == Stage.SPARSIFY and s.state.boundaries == [2, 3]
    # gradual pruning: a cubic schedule from all candidates (1000) to exactly the budget (100)
    targets = [s.prune_target(1000.0, 100.0)]
    assert targets[0] == pytest.approx(100 + 900 * 0.5 ** 3)  # first of the 2 ramp steps
    s.after_step(99.0, 100.0)
    targets.append(s.prune_target(1000.0, 100.0))
    assert targets[1] == 100.0  # the ramp's last step cuts to the budget
    s.after_step(99.0, 100.0)
    assert s.state.frozen_at == s.state.step  # the schedule records the step that made the final cut
    assert s.prune_target(1000.0, 100.0) is None  # the hard network trains on
    b, sp = s.penalty(torch.tensor(90.0), 100.0)
    assert float(b) == 0.0 and float(sp) == 0.0  # the schedule holds the count, not a penalty
    assert s.after_holdout(0.9) and s.state.best_step == s.state.step  # best so far: keep its scores
    s.after_step(99.0, 100.0)
    assert not s.after_holdout(0.95) and s.stage == Stage.SPARSIFY
    s.after_step(99.0, 100.0)
    assert not s.after_holdout(0.91) and s.stage == Stage.DONE  # patience 2: the hard training stops
    assert s.state.frozen_best == 0.9
    u = ThreeStageSchedule(ScheduleConfig(sparsify_steps=2), ScheduleState(stage=Stage.SPARSIFY, step=10, stage_start=10))
    u.after_step(1.0, 1.0)
    assert u.after_step(1.0, 1.0) == Stage.DONE  # without early stopping: after sparsify_steps
    # the coarse stage ends after coarse_max_steps even above the budget
    t = ThreeStageSchedule(ScheduleConfig(coarse_max_steps=2))
    t.after_step(200.0, 100.0)
    assert t.after_step(200.0, 100.0) == Stage.REFINE


def test_sparsify_patience_is_the_hard_trainings_own():
    """`sparsify_patience` ends the hard training after that many evaluations without
    improvement, while refinement keeps `patience`; 0 falls back to `patience`."""
    def hard(cfg: ScheduleConfig) -> ThreeStageSchedule:
        return ThreeStageSchedule(cfg, ScheduleState(stage=Stage.SPARSIFY, step=10, stage_start=10, frozen_at=10))

    for sparsify_patience, stops_after in ((0, 2), (4, 4), (1, 1)):
        s = hard(ScheduleConfig(sparsify_steps=100, patience=2, sparsify_patience=sparsify_patience))
        assert s.after_holdout(1.0)
        for bad in range(1, stops_after + 1):
            s.after_step(1.0, 1.0)
            assert not s.after_holdout(1.0 + bad / 10)
            assert s.stage == (Stage.DONE if bad == stops_after else Stage.SPARSIFY), (sparsify_patience, bad)
    r = ThreeStageSchedule(ScheduleConfig(patience=2, sparsify_patience=5), ScheduleState(stage=Stage.REFINE))
    r.after_holdout(1.0), r.after_holdout(1.1), r.after_holdout(1.2)
    assert r.stage == Stage.SPARSIFY  # refinement stops on `patience`, not on the hard training's


def test_hard_lr_end_decays_the_hard_trainings_steps_by_a_cosine():
    """`hard_lr_end` leaves every step before the final cut at 1, then follows a cosine from 1
    at the cut to `hard_lr_end` at the sparsify stage's cap; 1 (the default) is constant."""
    def at(step: int, end: float, stage: Stage = Stage.SPARSIFY, frozen_at: int = 20) -> float:
        state = ScheduleState(stage=stage, step=step, stage_start=10, frozen_at=frozen_at)
        return ThreeStageSchedule(ScheduleConfig(sparsify_steps=110, hard_lr_end=end), state).lr_factor()

    assert at(50, 1.0) == 1.0  # the default: constant
    assert at(15, 0.1, frozen_at=-1) == 1.0  # the ramp, before the final cut
    assert at(5, 0.1, stage=Stage.REFINE, frozen_at=-1) == 1.0
    assert at(20, 0.1) == pytest.approx(1.0)  # the cut; the room is 10 + 110 - 20 = 100 steps
    assert at(70, 0.1) == pytest.approx(0.55)  # halfway: the mean of 1 and the end
    assert at(120, 0.1) == pytest.approx(0.1) and at(130, 0.1) == pytest.approx(0.1)
    values = [at(step, 0.0) for step in range(20, 121)]
    assert all(a > b for a, b in zip(values, values[1:])) and values[-1] == pytest.approx(0.0)


def test_schedule_penalties_by_stage():
    s = ThreeStageSchedule(ScheduleConfig(budget_weight=2.0, sparsity_weight=0.5))
    soft = torch.tensor(110.0)
    b, sp = s.penalty(soft, 100.0)
    assert float(b) == pytest.approx(0.2) and float(sp) == pytest.approx(0.55)
    b, sp = s.penalty(torch.tensor(90.0), 100.0)
    assert float(b) == 0.0  # coarse: only an excess is penalised
    s.state.stage = Stage.REFINE
    b, sp = s.penalty(torch.tensor(90.0), 100.0)
    assert float(b) == pytest.approx(0.2) and float(sp) == 0.0  # held from both sides, no sparsity


def test_global_selection_keeps_exactly_the_budget():
    imp = {"a": torch.tensor([5.0, 4.0, 0.1, 3.0]), "b": torch.tensor([0.2, 4.5, 0.05])}
    costs = {"a": 10, "b": 7}
    keep = select_components(imp, costs, budget=40, min_rank={"b": 1})
    used = sum(len(v) * costs[n] for n, v in keep.items())
    assert used <= 40 and 40 - used < min(costs.values())
    assert keep["a"].tolist() == [0, 1] and keep["b"].tolist() == [1] or used == 37
    assert out_of_order_share(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([0, 2])) == 0.5
    assert out_of_order_share(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([0, 1])) == 0.0
    # already pruned components (negative importance) never come back, even where they would fit
    pruned = select_components({"a": torch.tensor([5.0, -1.0]), "b": torch.tensor([-1.0])}, costs, budget=100)
    assert pruned["a"].tolist() == [0] and pruned["b"].tolist() == []


def test_topk_kl_is_exact_kl_when_k_covers_the_vocabulary():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    logp, idx = teacher_topk(t, 11)
    full = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                      reduction="none").sum(-1).mean()
    assert float(topk_kl(s, logp, idx)) == pytest.approx(float(full), abs=1e-5)
    assert float(topk_kl(t, *teacher_topk(t, 4))) == pytest.approx(0.0, abs=1e-6)


def test_coarse_pool_is_twice_the_budget_capped_at_full_rank(tiny_llama):
    """The default candidates: svd-llm factors worth 2x the budget, no matrix above full rank."""
    from transformers import AutoModelForCausalLM
    from pipeline.plan import coarse_plan
    from soco.ranks import coarse_ratio
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    assert coarse_ratio(None, 0.8) == pytest.approx(0.6) and coarse_ratio(0.1, 0.4) == 0.1
    loose = coarse_plan(model, coarse_ratio(None, 0.8))  # 2 x 20% of the dense count
    budget = 0.2 * loose.dense_params()
    assert 2 * budget * 0.95 <= loose.lowrank_params() <= 2 * budget
    wide = coarse_plan(model, coarse_ratio(None, 0.2))  # 2 x 80%: more than the dense count
    assert wide.ranks == {n: min(m, k, int(1.6 * m * k / (m + k))) for n, (m, k) in wide.shapes.items()}
    assert any(r == min(wide.shapes[n]) for n, r in wide.ranks.items())  # some capped at full rank


def test_fisher_importance_ranks_by_the_loss_a_removal_costs():
    """At a least-squares optimum the EMA of (s * dL/ds)^2 orders the components as the loss
    that removing each one really costs, where |s| does not (the scores are all ~1 here, and
    the components differ in how much input energy they carry)."""
    from soco.importance import FisherImportance
    torch.manual_seed(0)
    n, r = 12, 6
    U, _ = torch.linalg.qr(torch.randn(n, r))
    V, _ = torch.linalg.qr(torch.randn(n, r))
    sigma = torch.ones(r)
    energy = torch.tensor([4.0, 0.05, 1.0, 0.2, 2.0, 0.5])  # input variance along each v_i
    lin = ScoredLinear(U, sigma, V.T)
    basis = V * energy.sqrt()  # inputs x = basis z: variance energy_i along v_i
    true_w = U @ V.T
    fisher = FisherImportance({"m": r}, decay=0.95)
    for _ in range(400):
        x = torch.randn(64, r) @ basis.T
        y = x @ true_w.T + 0.1 * torch.randn(64, n)  # the scores (all 1) are the optimum
        lin.score.grad = None
        ((lin(x) - y) ** 2).sum(-1).mean().backward()
        fisher.update({"m": lin.score}, {"m": lin.score.grad})
    removal_cost = energy  # E||u_i s_i sigma_i v_i^T x||^2 with unit u_i, s_i, sigma_i
    est = fisher.per_parameter({"m": lin.cost})["m"]
    assert torch.equal(torch.argsort(est), torch.argsort(removal_cost))
    with torch.no_grad():
        lin.score.copy_(torch.linspace(1.2, 0.8, r))  # |s| would prune the last ones instead
    assert not torch.equal(torch.argsort(lin.score.abs()), torch.argsort(removal_cost))


def test_fisher_importance_state_round_trip_and_bias_correction():
    from soco.importance import FisherImportance
    f = FisherImportance({"a": 3, "b": 2}, decay=0.5)
    assert torch.equal(f.estimate("a"), torch.zeros(3))  # nothing seen yet
    f.update({"a": torch.tensor([1.0, 2.0, 0.0]), "b": torch.tensor([1.0, -1.0])},
             {"a": torch.tensor([1.0, 1.0, 5.0]), "b": torch.tensor([3.0, 0.0])})
    assert torch.allclose(f.estimate("a"), torch.tensor([1.0, 4.0, 0.0]))  # one step: the sample itself
    per = f.per_parameter({"a": 10, "b": 4})
    assert torch.allclose(per["b"], torch.tensor([9.0 / 4, 0.0]))
    g = FisherImportance({"a": 3, "b": 2}, decay=0.5)
    g.load(f.state())
    assert g.steps == 1 and torch.equal(g.estimate("a"), f.estimate("a"))
    with pytest.raises(ValueError):
        FisherImportance({"a": 1}, decay=1.0)


def test_soft_gate_power_is_concave_and_agrees_at_the_ends():
    from soco.scores import soft_gate
    s = torch.tensor([0.0, 0.25, 0.5, 1.0, 1.7, -0.25], requires_grad=True)
    linear, concave = soft_gate(s), soft_gate(s, 0.5)
    assert torch.allclose(linear, torch.tensor([0.0, 0.25, 0.5, 1.0, 1.0, 0.25]))
    assert torch.allclose(concave[[0, 3, 4]], torch.tensor([1e-3, 1.0, 1.0]))  # |s| floored at 1e-6
    assert torch.allclose(concave[[1, 2, 5]], torch.tensor([0.5, 0.5 ** 0.5, 0.5]))  # above the linear gate
    concave.sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad[4] == 0  # no push on a score already above 1


def test_iterate_average_is_a_bias_corrected_ema_that_round_trips():
    from soco.averaging import IterateAverage
    avg = IterateAverage(0.5)
    avg.update({"a.score": torch.tensor([2.0, 0.0])})
    assert torch.equal(avg.value()["a.score"], torch.tensor([2.0, 0.0]))  # one update: the iterate itself
    avg.update({"a.score": torch.tensor([4.0, 3.0])})
    # weights 0.5 (newest) and 0.25, renormalised by 1 - 0.5^2: (0.25*2 + 0.5*4) / 0.75
    assert torch.allclose(avg.value()["a.score"], torch.tensor([10.0 / 3, 2.0]))
    again = IterateAverage(0.5)
    again.load(avg.state())
    assert again.steps == 2 and torch.equal(again.value()["a.score"], avg.value()["a.score"])
    last = IterateAverage(0.0)
    last.update({"x": torch.ones(2)})
    last.update({"x": torch.full((2,), 5.0)})
    assert torch.equal(last.value()["x"], torch.full((2,), 5.0))  # decay 0: the last iterate
    with pytest.raises(ValueError):
        IterateAverage(1.0)
    with pytest.raises(RuntimeError):
        IterateAverage(0.9).value()


def test_hard_concrete_expected_count_is_the_exact_count_at_the_limit():
    """With log alpha far from 0 every sampled gate is exactly 0 or 1, and the expected count
    P(z > 0) * cost equals the exact count of the open components; in between, P(z > 0) is
    the frequency of open samples."""
    from soco.scores import hard_concrete_open, hard_concrete_sample
    torch.manual_seed(0)
    m = _scored(8, 6, 5)
    m.gate = "hard_concrete"
    with torch.no_grad():
        m.log_alpha.copy_(torch.tensor([30.0, -30.0, 30.0, 30.0, -30.0]))
    assert torch.allclose(m.gates().sum() * m.cost, torch.tensor(3.0 * m.cost))
    for _ in range(20):
        z = hard_concrete_sample(m.log_alpha, torch.rand(5).clamp(1e-6, 1 - 1e-6))
        assert torch.equal(z, torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]))
    la = torch.tensor([-1.0, 0.0, 2.0])
    z = hard_concrete_sample(la.expand(200_000, 3), torch.rand(200_000, 3).clamp(1e-6, 1 - 1e-6))
    assert torch.allclose((z > 0).float().mean(0), hard_concrete_open(la), atol=5e-3)


def test_hard_concrete_gates_sample_in_training_and_fold_their_deterministic_value():
    from soco.scores import hard_concrete_mean
    torch.manual_seed(0)
    m = _scored(8, 6, 5)
    m.gate = "hard_concrete"
    with torch.no_grad():
        m.log_alpha.copy_(torch.tensor([3.0, -0.5, 0.2, 1.0, -3.0]))
        m.score.copy_(torch.tensor([1.2, 0.7, 1.0, 0.9, 1.1]))
    m.log_alpha.requires_grad_(True)
    x = torch.randn(4, 6)
    with torch.no_grad():  # a held-out evaluation: the deterministic gates
        y = m(x)
        z = hard_concrete_mean(m.log_alpha)
        expected = x @ (m.U @ torch.diag(m.score * z * m.sigma) @ m.Vt).T
    assert torch.allclose(y, expected, atol=1e-5)
    up, down = m.folded(torch.arange(5))
    assert torch.allclose(x @ (up @ down).T, expected, atol=1e-5)
    y1, y2 = m(x), m(x)  # training forwards draw fresh gates, and log alpha gets a gradient
    assert not torch.allclose(y1, y2)
    y1.sum().backward()
    assert m.log_alpha.grad is not None and torch.isfinite(m.log_alpha.grad).all()
    apply_cut({"m": m}, {"m": torch.tensor([0, 2, 3])})  # the hard network: deterministic gates
    assert torch.equal(m(x), m(x)) and torch.equal(m.gates(), torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]))


def test_factors_held_fixed_have_no_gradient_and_the_same_output():
    """With factor_trains off, U and Vt's change enter the forward detached: the output is the
    same and their gradients are not computed at all (the steps before soco.factor_from); on,
    both get one, also once the pruned components have left the computation, and only on the
    kept components' columns of U and rows of Vt's change."""
    m, x = _scored(6, 5, 4, trains_vt=True), torch.randn(3, 5)
    m.U.requires_grad_(True)
    m.vt_delta.requires_grad_(True)
    y_train = m(x)
    y_train.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (m.U, m.vt_delta))
    m.U.grad, m.vt_delta.grad, m.factor_trains = None, None, False
    apply_cut({"m": m}, {"m": torch.tensor([0, 2])})
    y_fixed = m(x)
    y_fixed.sum().backward()
    assert m.U.grad is None and m.vt_delta.grad is None and m.score.grad is not None
    m.factor_trains = True
    y_cut = m(x)
    assert torch.equal(y_cut, y_fixed)
    y_cut.sum().backward()
    for g in (m.U.grad, m.vt_delta.grad.T):
        assert g[:, [0, 2]].abs().sum() > 0 and g[:, [1, 3]].abs().sum() == 0


def test_low_rank_change_of_u_is_u_plus_up_down_everywhere():
    """soco.factor_rank: U stays as decomposed and U + up @ down is the output factor. At the
    start (up = 0) the output is the plain module's; once up moves, the forward, the fold and
    U's anchor all see U + up @ down, before and after a cut (the pruned components' columns of
    down left out); the gradient reaches up and the kept columns of down, and neither while
    the factors are held fixed. The start is the generator's alone, so every rank draws the same."""
    torch.manual_seed(0)
    plain = _scored(7, 5, 4)
    torch.manual_seed(0)
    m, x = _scored(7, 5, 4, anchors_u=True, u_rank=2), torch.randn(3, 5)
    assert plain.u_up is None and plain.u_down is None and trained_u(plain.U, None, None) is plain.U
    assert m.u_up.shape == (7, 2) and m.u_down.shape == (2, 4) and not m.u_up.any()
    assert torch.equal(m(x), plain(x)) and float(m.factor_change()) == 0.0
    torch.manual_seed(0)
    assert torch.equal(_scored(7, 5, 4, u_rank=2).u_down, m.u_down)  # the same seed, the same start
    with torch.no_grad():
        m.u_up.copy_(0.3 * torch.randn(7, 2, generator=torch.Generator().manual_seed(1)))
        m.score.copy_(torch.tensor([1.2, 0.7, -0.4, 1.0]))
    U = m.U + m.u_up @ m.u_down

    def dense(keep: torch.Tensor) -> torch.Tensor:
        return U[:, keep] @ torch.diag((m.score * m.sigma)[keep]) @ m.Vt[keep]

    assert torch.allclose(m(x), x @ dense(torch.arange(4)).T, atol=1e-6)
    assert math.isclose(float(m.factor_change()), float(((U - m.U) * m.score * m.sigma).pow(2).sum() / m.sigma.pow(2).sum()),
                        rel_tol=1e-5)
    up, down = m.folded(torch.arange(4))
    assert torch.allclose(up @ down, dense(torch.arange(4)), atol=1e-6)
    apply_cut({"m": m}, {"m": torch.tensor([0, 3])})
    assert torch.allclose(m(x), x @ dense(torch.tensor([0, 3])).T, atol=1e-6)
    for p in (m.u_up, m.u_down):
        p.requires_grad_(True)
    m(x).sum().backward()
    assert m.u_up.grad.abs().sum() > 0
    assert m.u_down.grad[:, [0, 3]].abs().sum() > 0 and m.u_down.grad[:, [1, 2]].abs().sum() == 0
    m.u_up.grad = m.u_down.grad = None
    m.factor_trains = False
    m(x).sum().backward()
    assert m.u_up.grad is None and m.u_down.grad is None and m.score.grad is not None


def test_vt_change_is_relative_to_each_rows_norm():
    """Vt's trained change is counted in units of its row's norm: zero changes nothing (the
    same output as a matrix that does not train Vt, which allocates no change at all), and the
    same change moves a row 100 times its size by 100 times as much (trained_vt)."""
    torch.manual_seed(0)
    plain = _scored(6, 5, 4)
    torch.manual_seed(0)
    shifted, x = _scored(6, 5, 4, trains_vt=True), torch.randn(3, 5)
    assert plain.vt_delta is None and torch.equal(plain(x), shifted(x))
    Vt = torch.tensor([[3.0, 4.0], [0.03, 0.04]])
    moved = trained_vt(Vt, torch.full((2, 2), 0.1)) - Vt
    assert torch.allclose(moved, torch.tensor([[0.5, 0.5], [0.005, 0.005]]))
    assert trained_vt(Vt, None) is Vt


def test_factor_change_is_the_change_of_the_whitened_matrix_that_u_made():
    """U's distance from its decomposed value (soco.factor_anchor) is the change that U's
    training made to U diag(s sigma) Vt over the candidates' energy (V's rows orthonormal, as
    in the whitened coordinates): 0 at the start, over the kept components only after the
    cut, and its gradient reaches U alone, never the scores."""
    m, x = _scored(6, 5, 4, anchors_u=True), torch.randn(3, 5)
    assert _scored(6, 5, 4).U0 is None  # nothing held without the anchor
    assert float(m.factor_change()) == 0.0
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m.score.copy_(torch.rand(4, generator=g) + 0.5)
        m.U.add_(0.1 * torch.randn(m.U.shape, generator=g))

    U0 = m.U0.clone()

    def changed(keep: torch.Tensor) -> float:
        w = torch.diag((m.score * m.sigma)[keep]).detach()
        d = (m.U[:, keep] - U0[:, keep]) @ w @ m.Vt[keep]
        return float(d.pow(2).sum() / m.sigma.pow(2).sum())

    assert math.isclose(float(m.factor_change()), changed(torch.arange(4)), rel_tol=1e-5)
    apply_cut({"m": m}, {"m": torch.tensor([0, 2])})
    assert torch.equal(m.U0, U0[:, [0, 2]])  # the anchor holds the kept columns only
    before = float(m.factor_change())
    assert math.isclose(before, changed(torch.tensor([0, 2])), rel_tol=1e-5)
    with torch.no_grad():  # a pruned component's column moves: nothing is counted for it
        m.U[:, 1] += 1.0
    assert float(m.factor_change()) == before
    m.U.requires_grad_(True)
    m.factor_change().backward()
    assert m.score.grad is None and m.U.grad[:, [0, 2]].abs().sum() > 0 and m.U.grad[:, [1, 3]].abs().sum() == 0
    # the forward records it (from its own slice of U) only while U trains (soco.factor_from),
    # in a forward that records gradients
    m(x)
    assert m.last_factor_change is not None and math.isclose(float(m.last_factor_change), before, rel_tol=1e-6)
    with torch.no_grad():
        m(x)
    assert m.last_factor_change is None
    # a second, narrower cut narrows U0 again; one that brings a pruned component back is refused
    apply_cut({"m": m}, {"m": torch.tensor([2])})
    assert torch.equal(m.U0, U0[:, [2]]) and math.isclose(float(m.factor_change()), changed(torch.tensor([2])),
                                                          rel_tol=1e-5)
    with pytest.raises(RuntimeError, match="brought back"):
        apply_cut({"m": m}, {"m": torch.tensor([1, 2])})
    m.factor_trains = False
    m(x)
    assert m.last_factor_change is None


def test_the_anchor_keeps_a_trained_u_near_the_decomposed_one(tiny_llama):
    """Adam on U with the KL alone moves U; the same steps with the anchor's penalty beside
    the KL (the objective's fifth output) end nearer the decomposed U."""
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    moved = {}
    for weight in (0.0, 100.0):
        model = _tiny_scored_model(tiny_llama, anchors_u=True)
        with torch.no_grad():
            logp, idx = teacher_topk(model(ids).logits, 8)
        mods = scored_modules(model).values()
        for m in mods:
            with torch.no_grad():  # a network away from the teacher, so that the KL moves U
                m.score.mul_(0.5)
            m.U.requires_grad_(True)
        opt = torch.optim.Adam([m.U for m in mods], lr=1e-2)
        objective = SoCoObjective(model)
        for _ in range(8):
            kl, _, _, _, change = objective(ids, logp, idx)
            opt.zero_grad()
            (kl + weight * change).backward()
            opt.step()
        assert float(change.detach()) > 0
        moved[weight] = sum(float((m.U - m.U0).pow(2).sum()) for m in mods)
    assert 0 < moved[100.0] < 0.5 * moved[0.0]


def _scored(m: int, n: int, k: int, trains_vt: bool = False, anchors_u: bool = False, u_rank: int = 0
            ) -> ScoredLinear:
    """A ScoredLinear over the top-k SVD factors of a random m x n matrix (float32)."""
    f = svd_factors(torch.randn(m, n, dtype=torch.float64))
    return ScoredLinear(f.U[:, :k].float(), f.sigma[:k].float(), f.Vt[:k].float(), trains_vt=trains_vt,
                        anchors_u=anchors_u, u_rank=u_rank, u_seed=3)
