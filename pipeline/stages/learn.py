"""Learn (method `soco` only): train the spectrum scores, then keep exactly the budget.

Inputs: `factors/` (svd-llm factors pre-truncated to the coarse ranks), `calib/windows`
and `calib/final-hidden` (from calibrate), the model's non-linear weights.
Outputs:
  teacher/topk.safetensors      dense top-k log-probs (`logp`) and ids (`idx`) per token
  scores/step-000020.safetensors score checkpoints: `<module>.score` tensors; metadata
                                `state` (schedule state JSON) and `curve` (per-step log JSON)
                                and `<module>.mask` (0 = pruned by sparsification's gradual
                                pruning; the last ramp step leaves exactly the final cut),
                                `<module>.fisher` and `fisher.steps` (the pruning importance,
                                soco/importance.py), and after the final cut `<module>.score.avg`
                                and `avg.steps` (the running average, soco/averaging.py)
  scores/best.safetensors       the hard network's scores at its best held-out KL after the final cut
                                (the average of its iterates since the cut, unless soco.average_decay is 0)
  scores/final.safetensors      the scores kept: those best ones (else the last), with
                                the whole run's state and curve
  learned/layer-00012.safetensors kept components with the scores folded in, in the factors
                                contract (`<linear>.U/.sigma/.Vt`), read by assemble
  learn.json                    ranks, budget, out-of-order shares, steps, wall time
  plots/*.png                   training curve, scores per component, ranks per layer
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from typing import Any

import torch
from torch import nn

from cluster.storage import Storage
from soco.allocate import out_of_order_share, select_components
from soco.averaging import IterateAverage
from soco.importance import FisherImportance, pruning_importance
from soco.objective import SoCoObjective, teacher_topk
from soco.schedule import ScheduleConfig, ScheduleState, Stage, ThreeStageSchedule
from soco.scores import ScoredLinear, apply_cut, scored_modules

from ..layerwise import Batch, LayerwiseModel
from ..model_io import ModelSource, build_skeleton, find_layers, materialise, worker_location
from ..plan import Plan
from .calibrate import FINAL_HIDDEN_FILE, WINDOWS_FILE
from .decompose import load_factor_file, load_layer_factors

TEACHER_FILE = "teacher/topk.safetensors"
FINAL_SCORES = "scores/final.safetensors"
BEST_SCORES = "scores/best.safetensors"


def learned_file(i: int) -> str:
    return f"learned/layer-{i:05d}.safetensors"


def load_layer_learned(store: Storage, i: int) -> dict[str, dict[str, torch.Tensor]]:
    """Layer i's kept components with the scores folded in, in the factors contract."""
    return load_factor_file(store, learned_file(i))


# --- teacher cache -----------------------------------------------------------------
@torch.no_grad()
def cache_teacher(source: ModelSource, store: Storage, k: int, dtype: torch.dtype) -> None:
    """Top-k log-probabilities of the dense model on the calibration windows, from the final
    hidden states that calibrate saved (only the norm and head run here)."""
    hidden = store.load_tensors(FINAL_HIDDEN_FILE)["hidden"]
    lw = LayerwiseModel(build_skeleton(source.config, dtype), source, dtype)
    logp = torch.empty(*hidden.shape[:2], k, dtype=torch.float32)
    idx = torch.empty(*hidden.shape[:2], k, dtype=torch.int32)

    def keep(row: int, logits: torch.Tensor) -> None:
        logp[row], idx[row] = teacher_topk(logits, k)

    lw.map_logits([Batch(hidden, (), {})], keep)
    store.save_tensors(TEACHER_FILE, {"logp": logp, "idx": idx})


# --- the scored model ------------------------------------------------------------------
def build_scored_model(source: ModelSource, store: Storage, dtype: torch.dtype = torch.float32,
                       partitioned: Any = None) -> nn.Module:
    """The model with every planned linear replaced by a ScoredLinear over its factors.

    Built one layer at a time: the dense layer is read, its linears swapped for the
    factors, and the dense weights dropped, so peak memory is the factored model plus
    one dense layer. With `partitioned` (a context factory: cluster.zero.partitioned_init)
    the factors are partitioned across the ZeRO-3 ranks as each matrix is built, so a rank
    holds its share of the factored model plus one dense layer.
    """
    model = build_skeleton(source.config, dtype)
    lw = LayerwiseModel(model, source, dtype)
    lw.load_non_layer()
    layers_name, layers = find_layers(model)
    for i, layer in enumerate(layers):
        factors = load_layer_factors(store, i)
        materialise(model, layer, f"{layers_name}.{i}", source, dtype)
        for name, f in factors.items():
            lin = layer.get_submodule(name)
            bias = None if lin.bias is None else lin.bias.detach()
            with partitioned() if partitioned else contextlib.nullcontext():
                scored = ScoredLinear(f["U"].to(dtype), f["sigma"].to(dtype), f["Vt"].to(dtype), bias)
            layer.set_submodule(name, scored)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in scored_modules(model).values():
        m.score.requires_grad_(True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def latest_checkpoint(store: Storage) -> str | None:
    steps = sorted(n for n in store.listdir("scores") if n.startswith("step-") and n.endswith(".safetensors"))
    return f"scores/{steps[-1]}" if steps else None


TRAINED_PARTS = ("score", "in_scale", "out_scale")


def save_scores(store: Storage, rel: str, tensors: dict[str, torch.Tensor], state: ScheduleState,
                curve: list[dict]) -> None:
    """A score checkpoint: trained tensors as `<module>.score` (and `.in_scale`/`.out_scale`)."""
    store.save_tensors(rel, tensors, {"state": json.dumps(state.to_dict()), "curve": json.dumps(curve)})


def load_scores(store: Storage, rel: str) -> tuple[dict[str, torch.Tensor], ScheduleState, list[dict]]:
    t = store.load_tensors(rel)
    meta = store.tensor_metadata(rel)
    return t, ScheduleState.from_dict(json.loads(meta["state"])), json.loads(meta["curve"])


def saved_keep(saved: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    """Indices of the components a score checkpoint's masks keep, per matrix."""
    return {n: torch.nonzero(saved[f"{n}.mask"] > 0).flatten() for n in names}


def trained_tensors(mods: dict[str, ScoredLinear], scales: bool) -> dict[str, torch.Tensor]:
    """The trainable tensors of the scored modules by checkpoint name."""
    parts = TRAINED_PARTS if scales else TRAINED_PARTS[:1]
    return {f"{n}.{p}": getattr(m, p) for n, m in mods.items() for p in parts}


# --- the per-worker training loop -------------------------------------------------------
def batch_indices(step: int, batch: int, n: int, seed: int) -> list[int]:
    """Windows of a step: position p = step*batch + j walks a fresh permutation each epoch,
    so the order depends only on (step, seed) and a resumed run sees the same batches."""
    out = []
    for j in range(batch):
        p = step * batch + j
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + p // n))
        out.append(int(perm[p % n]))
    return out


def train_worker(conf: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (or in-process): DeepSpeed ZeRO over the scored model."""
    import torch.distributed as dist

    from cluster import zero

    torch.set_num_threads(conf["threads"])
    torch.manual_seed(conf["seed"])
    store, source = Storage(conf["run"]), ModelSource(conf["model"])
    micro_batch = conf["batch_size"] // zero.init_distributed()
    model = build_scored_model(source, store, torch.float32,
                               partitioned=lambda: zero.partitioned_init(conf["zero_stage"], micro_batch, torch.float32))
    if conf.get("activation_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # HF recomputes layers only in training mode (these models have no dropout)
    mods = scored_modules(model)
    for m in mods.values():
        m.gate_power = conf["gate_power"]
    state, curve = None, []
    ckpt = latest_checkpoint(store) if conf["resume"] else None
    trained = trained_tensors(mods, conf["channel_scales"])
    for p in trained.values():
        p.requires_grad_(True)

    def swap_in(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # writes the given trained tensors (every rank holds the same values; rank 0's copy is
        # re-partitioned on exit) and returns what they held before
        with zero.gathered(list(trained.values()), modify=True), torch.no_grad():
            previous = {k: p.detach().clone() for k, p in trained.items()}
            for k, v in values.items():
                trained[k].copy_(v)
        return previous

    if ckpt is not None:
        saved, state, curve = load_scores(store, ckpt)
        swap_in({k: v for k, v in saved.items() if k in trained})
        if state.stage >= Stage.SPARSIFY:  # resumed while pruning: the same components stay pruned
            apply_cut(mods, saved_keep(saved, mods))
    sched = ThreeStageSchedule(ScheduleConfig(**conf["schedule"]), state)
    objective = SoCoObjective(model)
    groups = [{"params": [p for k, p in trained.items() if k.endswith(".score")], "lr": conf["lr"]}]
    if conf["channel_scales"]:
        groups.append({"params": [p for k, p in trained.items() if not k.endswith(".score")], "lr": conf["scale_lr"]})
    eng = zero.engine(objective, groups, conf["zero_stage"], micro_batch)
    base_lrs = [g["lr"] for g in groups]
    score_params = [m.score for m in mods.values()]
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    windows = store.load_tensors(WINDOWS_FILE)["windows"]
    teacher = store.load_tensors(TEACHER_FILE)
    n_train = windows.shape[0] - conf["holdout"]
    train_ids, hold_ids = list(range(n_train)), list(range(n_train, windows.shape[0]))
    target = conf["target"]

    def run(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # teacher row t and student logits at t both predict token t+1 of the window
        return eng(windows[ids], teacher["logp"][ids], teacher["idx"][ids])

    def all_mean(v: float) -> float:
        if world == 1:
            return v
        t = torch.tensor([v], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / world

    def checkpoint(rel: str) -> None:
        with zero.gathered(list(trained.values())):
            values = {k: p.detach().clone() for k, p in trained.items()}
        values.update({f"{n}.mask": m.mask.detach().clone() for n, m in mods.items()})
        values.update(fisher.state())
        if average is not None:
            values.update(average.state())
        if rank == 0:
            save_scores(store, rel, values, sched.state, curve)

    costs = {n: m.cost for n, m in mods.items()}
    candidates = float(sum(m.rank * costs[n] for n, m in mods.items()))
    fisher = FisherImportance({n: m.rank for n, m in mods.items()}, conf["fisher_decay"])
    # Polyak average of the hard network's iterates (soco/averaging.py): updated after every
    # step from the final cut on; held-out evaluation, the best scores and the saved ones use it
    average = IterateAverage(conf["average_decay"]) if conf["average_decay"] > 0 else None
    if ckpt is not None:
        fisher.load(saved)
        if average is not None:
            average.load(saved)

    def record_importance() -> None:
        # between backward and step: every rank takes part in gathering the (partitioned) grads
        grads = {n: zero.full_grad(m.score) for n, m in mods.items()}
        with zero.gathered(score_params):
            fisher.update({n: m.score for n, m in mods.items()}, grads)

    def prune(keep_params: float) -> None:
        # keep the most important components among those still alive, within keep_params
        with zero.gathered(score_params):  # the scores themselves are read only when pruning by |s|
            importance = pruning_importance(conf["prune_by"], fisher, {n: m.score for n, m in mods.items()},
                                            {n: m.mask for n, m in mods.items()}, costs)
        apply_cut(mods, select_components(importance, costs, int(keep_params), conf["min_rank"]))

    t0 = time.perf_counter()
    while sched.stage != Stage.DONE and sched.state.step < conf["max_steps"]:
        step = sched.state.step
        keep_params = sched.prune_target(candidates, target)
        if keep_params is not None:  # gradual pruning; the ramp's last step cuts to the budget
            prune(keep_params)
        factor = 1.0 if sched.stage == Stage.COARSE else conf["refine_lr_factor"]
        for group, base in zip(eng.optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        ids = batch_indices(step, conf["batch_size"], n_train, conf["seed"])[rank::world]
        kl, soft = run([train_ids[i] for i in ids])
        budget, sparsity = sched.penalty(soft, target)
        eng.backward(kl + budget + sparsity)
        record_importance()
        eng.step()
        soft_v = float(soft.detach())  # once pruning starts: exactly the kept parameters
        kl_v = all_mean(float(kl.detach()))
        stage_before = sched.stage
        sched.after_step(soft_v, target)
        averaging = average is not None and sched.state.frozen_at >= 0
        if averaging:
            with zero.gathered(list(trained.values())):
                average.update(trained)
        entry = {"step": step + 1, "stage": int(stage_before), "kl": kl_v, "soft_count": soft_v,
                 "budget": float(budget.detach()),
                 "seconds": round(time.perf_counter() - t0, 2)}
        if hold_ids and ((step + 1) % conf["eval_every"] == 0 or sched.stage == Stage.DONE):
            raw = swap_in(average.value()) if averaging else None
            with torch.no_grad():
                hk = all_mean(float(run(hold_ids[rank::world])[0]))
            entry["holdout_kl"] = hk
            if sched.after_holdout(hk):  # the hard network's best so far: its scores are the ones kept
                checkpoint(BEST_SCORES)
            if raw is not None:
                swap_in(raw)  # training goes on from the raw iterates
        curve.append(entry)
        if conf["progress"] and rank == 0:
            print(f"learn step {step + 1} stage {int(stage_before)} kl {kl_v:.4f} soft/target {soft_v / target:.4f}"
                  + (f" holdout {entry['holdout_kl']:.4f}" if "holdout_kl" in entry else ""), flush=True)
        if sched.state.step % conf["checkpoint_every"] == 0:
            checkpoint(f"scores/step-{sched.state.step:06d}.safetensors")
    if sched.state.best_step <= 0:
        checkpoint(FINAL_SCORES)
    elif rank == 0:  # the hard network's best scores, with the whole curve and state
        best, _, _ = load_scores(store, BEST_SCORES)
        save_scores(store, FINAL_SCORES, best, sched.state, curve)
    zero.finish(destroy=conf.get("launcher") == "ray")


# --- driver: launch, select, fold -------------------------------------------------------
def learn_settings(cfg, plan: Plan, store: Storage, resume: bool, progress: bool) -> dict[str, Any]:
    s = cfg.soco
    workers = max(1, s.workers)
    import os
    threads = s.threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
    return {"run": store.worker_url(), "model": worker_location(cfg.model), "seed": s.seed, "threads": threads, "lr": s.lr,
            "zero_stage": s.zero_stage, "batch_size": s.batch_size, "holdout": s.holdout_samples,
            "eval_every": s.eval_every, "checkpoint_every": s.checkpoint_every, "max_steps": s.max_steps,
            "target": float(budget_params(plan, cfg.compress.ratio)), "resume": resume, "progress": progress,
            "min_rank": min_ranks(plan, cfg.compress.ratio, s.min_rank_fraction),
            "schedule": {"budget_weight": s.budget_weight, "sparsity_weight": s.sparsity_weight,
                         "coarse_max_steps": s.coarse_max_steps, "refine_steps": s.refine_steps,
                         "sparsify_steps": s.sparsify_steps, "sparsify_ramp": s.sparsify_ramp,
                         "patience": s.patience},
            "workers": workers, "launcher": s.launcher, "channel_scales": s.channel_scales, "scale_lr": s.scale_lr,
            "refine_lr_factor": s.refine_lr_factor, "activation_checkpointing": s.activation_checkpointing,
            "prune_by": s.prune_by, "fisher_decay": s.fisher_decay, "gate_power": s.gate_power,
            "average_decay": s.average_decay}


def min_ranks(plan: Plan, ratio: float, fraction: float) -> dict[str, int]:
    """The fewest components each matrix keeps in the global cut: `fraction` of its uniform rank."""
    from soco.ranks import uniform_rank
    return {n: max(1, math.floor(fraction * uniform_rank(*plan.shapes[n], ratio))) for n in plan.ranks}


def budget_params(plan: Plan, ratio: float) -> int:
    """Parameters the compressed linears may keep: (1 - ratio) of their dense count."""
    return math.floor((1 - ratio) * plan.dense_params())


def run_learn(cfg, source: ModelSource, store: Storage, plan: Plan, dtype: torch.dtype, layers_name: str,
              n_layers: int, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Teacher cache -> ZeRO training (Ray Train workers, or in-process) -> selection -> fold.

    With `resume` (the stage was interrupted with the same inputs) training continues from
    the last score checkpoint; otherwise earlier scores and teacher targets are discarded.
    """
    t0 = time.perf_counter()
    if not resume:
        for rel in ("scores", "teacher", "learned"):
            store.rm(rel)
    if not store.exists(TEACHER_FILE):
        cache_teacher(source, store, cfg.soco.topk, dtype)
    if cfg.data.calib_samples - cfg.soco.holdout_samples < 1:
        from ..errors import UserError
        raise UserError("soco.holdout_samples must leave at least one calibration window for training")
    conf = learn_settings(cfg, plan, store, resume=resume, progress=progress)
    if cfg.soco.workers >= 1 and cfg.soco.launcher == "ray":
        from cluster import zero
        from cluster.ray_runtime import ensure_ray
        from cluster.ray_tasks import drop_pool
        ensure_ray(cfg.ray)
        drop_pool()  # the calibration/evaluation actors would hold the CPUs the trainers need
        zero.launch(train_worker, conf, conf["workers"], cpus_per_worker=conf["threads"])
    else:
        train_worker(conf)
    train_s = time.perf_counter() - t0
    return finalize(store, plan, cfg.compress.ratio, cfg.soco.min_rank_fraction, train_s, layers_name, n_layers,
                    cfg.soco.prune_by)


def finalize(store: Storage, plan: Plan, ratio: float, min_rank_fraction: float, train_s: float,
             layers_name: str, n_layers: int, prune_by: str = "fisher") -> dict[str, Any]:
    """Global selection under the exact budget, folding, learned/ files, plan.json, plots."""
    saved, state, curve = load_scores(store, FINAL_SCORES)
    scores = {k[: -len(".score")]: v for k, v in saved.items() if k.endswith(".score")}
    budget = budget_params(plan, ratio)
    costs = {n: sum(plan.shapes[n]) for n in plan.ranks}
    if state.frozen_at >= 0:  # training made the final cut: keep exactly the unmasked components
        keep = saved_keep(saved, plan.ranks)
    else:  # stopped (max_steps) before the final cut: make it among the unpruned, as pruning does
        fisher = FisherImportance({n: v.numel() for n, v in scores.items()})
        fisher.load(saved)
        importance = pruning_importance(prune_by, fisher, scores, {n: saved[f"{n}.mask"] for n in plan.ranks}, costs)
        keep = select_components(importance, costs, budget, min_ranks(plan, ratio, min_rank_fraction))
    shares, final_ranks = {}, {}
    for i in range(n_layers):
        factors = load_layer_factors(store, i)
        out = {}
        for name, f in factors.items():
            full = f"{layers_name}.{i}.{name}"
            k = keep[full]  # the kept components carry s * sigma: hard-on ones exactly as trained
            w = (scores[full] * f["sigma"])[k]
            in_s = saved.get(f"{full}.in_scale", torch.ones(f["Vt"].shape[1]))
            out_s = saved.get(f"{full}.out_scale", torch.ones(f["U"].shape[0]))
            # fold s * sigma (its sign into U, so that sigma stays a magnitude) and the channel scales
            out[f"{name}.U"] = (out_s[:, None] * f["U"][:, k] * torch.sign(w)[None, :]).contiguous()
            out[f"{name}.sigma"] = w.abs().contiguous()
            out[f"{name}.Vt"] = (f["Vt"][k] * in_s[None, :]).contiguous()
            shares[full] = out_of_order_share(f["sigma"], k)
            final_ranks[full] = int(k.numel())
        store.save_tensors(learned_file(i), out, {"method": "soco"})
    kept = sum(final_ranks[n] * costs[n] for n in final_ranks)
    final_plan = Plan("soco", ratio, final_ranks, plan.shapes)
    summary = {
        "budget_params": budget, "kept_params": kept, "dense_params": plan.dense_params(),
        "coarse_ranks": plan.ranks, "steps": state.step, "stage_boundaries": state.boundaries,
        "train_seconds": round(train_s, 1), "frozen_at": state.frozen_at, "best_step": state.best_step,
        "best_holdout_kl": state.frozen_best if state.best_step > 0 else None,
        "out_of_order_share": sum(shares[n] * final_ranks[n] for n in shares) / max(1, sum(final_ranks.values())),
        "out_of_order_share_per_matrix": shares, "matrices_with_zero_out_of_order": sum(v == 0 for v in shares.values()),
    }
    store.write_json("learn.json", summary)
    store.write_json("plan.json", final_plan.to_json())
    try:
        from ..plots import plot_learning
        plot_learning(store, curve, state.boundaries, scores, plan, final_ranks, keep, layers_name, state.frozen_at)
    except Exception as e:  # noqa: BLE001 - a missing plot must not lose a finished training
        print(f"soco: warning: plots not written: {e}")
    return summary
