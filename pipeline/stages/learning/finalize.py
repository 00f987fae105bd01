"""After training: the global selection under the exact budget, the fold, and the stage's files.

Writes learned/layer-NNNNN.safetensors (the kept components with the scores folded in, in
the factors contract `<linear>.U/.sigma/.Vt`, read by assemble), plan.json (the learned
ranks), learn.json (the summary) and plots/ (pipeline/plots.py).
"""
from __future__ import annotations

from typing import Any

import torch

from cluster.storage import Storage
from soco.allocate import out_of_order_share, select_components
from soco.importance import FisherImportance, pruning_importance
from soco.schedule import ScheduleState
from soco.scores import effective_score, fold, trained_u, trained_vt

from ...plan import Plan
from ..decompose import load_layer_factors
from .budget import budget_params, min_ranks
from .scored_model import FINAL_SCORES, load_scores, saved_keep


FINAL_PLAN = "plan.json"  # the learned ranks, which assemble builds the checkpoint from


def learned_file(i: int) -> str:
    return f"learned/layer-{i:05d}.safetensors"


def saved_scores(saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{matrix: what multiplies its sigma} of a score checkpoint (soco.scores.effective_score)."""
    return {k[: -len(".score")]: effective_score(v, saved.get(k[: -len(".score")] + ".log_alpha"))
            for k, v in saved.items() if k.endswith(".score")}


def final_keep(saved: dict[str, torch.Tensor], state: ScheduleState, plan: Plan, ratio: float,
               min_rank_fraction: float, prune_by: str) -> dict[str, torch.Tensor]:
    """Indices of the components kept, per matrix, within the budget."""
    if state.frozen_at >= 0:  # training made the final cut: keep exactly the unmasked components
        return saved_keep(saved, plan.ranks)
    # stopped (max_steps) before the final cut: make it among the unpruned, as pruning does
    scores = saved_scores(saved)
    costs = {n: sum(plan.shapes[n]) for n in plan.ranks}
    fisher = FisherImportance({n: v.numel() for n, v in scores.items()})
    fisher.load(saved)
    importance = pruning_importance(prune_by, fisher, scores, {n: saved[f"{n}.mask"] for n in plan.ranks}, costs)
    return select_components(importance, costs, budget_params(plan, ratio), min_ranks(plan, ratio, min_rank_fraction))


def write_learned(store: Storage, saved: dict[str, torch.Tensor], keep: dict[str, torch.Tensor],
                  layers_name: str, n_layers: int) -> dict[str, float]:
    """learned/ files: each layer's kept components with s * sigma and the channel scales folded
    in (s times the hard-concrete gates' deterministic value with those gates), U (and Vt) as
    trained when soco.factor_lr (its low-rank change with soco.factor_rank, and Vt with
    soco.factor_vt) trained them (hard-on components exactly
    as trained). Returns each matrix's out-of-order share."""
    shares = {}
    for i in range(n_layers):
        out = {}
        for name, f in load_layer_factors(store, i).items():
            full = f"{layers_name}.{i}.{name}"
            k = keep[full]
            out[f"{name}.U"], out[f"{name}.sigma"], out[f"{name}.Vt"] = fold(
                trained_u(saved.get(f"{full}.U", f["U"]), saved.get(f"{full}.u_up"), saved.get(f"{full}.u_down")),
                f["sigma"], trained_vt(f["Vt"], saved.get(f"{full}.vt_delta")),
                effective_score(saved[f"{full}.score"], saved.get(f"{full}.log_alpha")), k,
                saved.get(f"{full}.in_scale"), saved.get(f"{full}.out_scale"))
            shares[full] = out_of_order_share(f["sigma"], k)
        store.save_tensors(learned_file(i), out, {"method": "soco"})
    return shares


STAGE_NAMES = {1: "coarse", 2: "refine", 3: "sparsify"}


def step_costs(curve: list[dict]) -> dict[str, dict[str, float]]:
    """Per stage: the mean time of a step and the mean parameters it computed with (the
    scored matrices' multiply-adds per token), from the curve's entries that record them."""
    out = {}
    for stage, name in STAGE_NAMES.items():
        entries = [e for e in curve if e.get("stage") == stage and "step_s" in e]
        if entries:
            out[name] = {"steps": len(entries), "mean_step_s": round(sum(e["step_s"] for e in entries) / len(entries), 3),
                         "mean_active_params": round(sum(e["active_params"] for e in entries) / len(entries))}
    return out


def finalize(store: Storage, plan: Plan, ratio: float, min_rank_fraction: float, train_s: float,
             layers_name: str, n_layers: int, prune_by: str = "fisher") -> dict[str, Any]:
    """Global selection under the exact budget, folding, learned/ files, plan.json, learn.json, plots."""
    saved, state, curve = load_scores(store, FINAL_SCORES)
    keep = final_keep(saved, state, plan, ratio, min_rank_fraction, prune_by)
    shares = write_learned(store, saved, keep, layers_name, n_layers)
    final_ranks = {n: int(keep[n].numel()) for n in shares}
    costs = {n: sum(plan.shapes[n]) for n in plan.ranks}
    summary = {
        "budget_params": budget_params(plan, ratio), "kept_params": sum(final_ranks[n] * costs[n] for n in final_ranks),
        "dense_params": plan.dense_params(),
        "coarse_ranks": plan.ranks, "steps": state.step, "stage_boundaries": state.boundaries,
        "train_seconds": round(train_s, 1), "frozen_at": state.frozen_at, "best_step": state.best_step,
        "best_holdout_kl": state.frozen_best if state.best_step > 0 else None,
        "out_of_order_share": sum(shares[n] * final_ranks[n] for n in shares) / max(1, sum(final_ranks.values())),
        "out_of_order_share_per_matrix": shares, "matrices_with_zero_out_of_order": sum(v == 0 for v in shares.values()),
        "step_costs": step_costs(curve),
    }
    store.write_json("learn.json", summary)
    store.write_json(FINAL_PLAN, Plan("soco", ratio, final_ranks, plan.shapes).to_json())
    try:
        from ...plots import plot_learning
        scores = saved_scores(saved)
        plot_learning(store, curve, state.boundaries, scores, plan, final_ranks, keep, layers_name, state.frozen_at)
    except Exception as e:  # noqa: BLE001 - a missing plot must not lose a finished training
        print(f"soco: warning: plots not written: {e}")
    return summary
