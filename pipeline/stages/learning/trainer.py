"""One rank's training of the spectrum scores: DeepSpeed ZeRO over the scored model.

`train_worker(config)` is the Ray Train entry point (or an in-process call with one rank):
`config` is `{"job": LearnJob}`, since Ray Train passes its workers a dict. Every rank builds
the same scored model (under ZeRO-3 with the factors partitioned among the ranks), takes
its share of each step's windows, and rank 0 writes the score checkpoints.
"""
from __future__ import annotations

import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from cluster import zero
from cluster.storage import Storage
from soco.allocate import select_components
from soco.averaging import IterateAverage
from soco.importance import FisherImportance, pruning_importance
from soco.objective import SoCoObjective
from soco.schedule import Stage, ThreeStageSchedule
from soco.scores import active_params, apply_cut, scored_modules

from ...model_io import ModelSource, find_layers
from ..calibrate import WINDOWS_FILE
from .config import FACTOR_PARTS
from .generated import load_generated
from .job import LearnJob
from .scored_model import (BEST_SCORES, FINAL_SCORES, SCORE_PARTS, build_scored_model, drop_old_checkpoints,
                           latest_checkpoint, load_scores, save_scores, saved_keep, trained_tensors)
from .teacher import TEACHER_FILE, load_hidden


def batch_indices(step: int, batch: int, n: int, seed: int) -> list[int]:
    """Windows of a step: position p = step*batch + j walks a fresh permutation each epoch,
    so the order depends only on (step, seed) and a resumed run sees the same batches."""
    out = []
    for j in range(batch):
        p = step * batch + j
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + p // n))
        out.append(int(perm[p % n]))
    return out


class Trainer:
    """The state of one rank's training (model, engine, schedule, pruning importance, iterate
    average, data) and its parts: a step, the held-out evaluation, pruning, checkpoints.

    Built in the order the training always ran in (seed, model, resume, engine), so that
    the same job gives the same scores bit for bit.
    """

    def __init__(self, job: LearnJob) -> None:
        s = self.soco = job.soco
        self.job = job
        torch.set_num_threads(job.threads)
        torch.manual_seed(s.seed)
        self.store, source = Storage(job.run), ModelSource(job.model)
        micro_batch = s.batch_size // zero.init_distributed()
        self.model = build_scored_model(source, self.store, torch.float32,
                                        partitioned=lambda: zero.partitioned_init(s.zero_stage, micro_batch,
                                                                                  torch.float32),
                                        trains_vt=s.factor_vt, anchors_u=s.factor_anchor > 0,
                                        u_rank=s.factor_rank, seed=s.seed)
        if s.activation_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.train()  # HF recomputes layers only in training mode (these models have no dropout)
        self.mods = scored_modules(self.model)
        for m in self.mods.values():
            m.gate_power, m.gate = s.gate_power, s.gate
            m.measures_deviation = s.schedule.deviation_weight > 0
        state, self.curve = None, []
        ckpt = latest_checkpoint(self.store) if job.resume else None
        rates = s.learning_rates()
        # the trained tensors by optimiser group (one per part, in the order of `rates`), and all of them
        self.groups = [trained_tensors(self.mods, [part]) for part in rates]
        self.trained = {k: p for named in self.groups for k, p in named.items()}
        for p in self.trained.values():
            p.requires_grad_(True)
        saved: dict[str, torch.Tensor] = {}
        if ckpt is not None:
            saved, state, self.curve = load_scores(self.store, ckpt)
            self.swap_in({k: v for k, v in saved.items() if k in self.trained})
            if state.stage >= Stage.SPARSIFY:  # resumed while pruning: the same components stay pruned
                apply_cut(self.mods, saved_keep(saved, self.mods))
        self.schedule = ThreeStageSchedule(s.schedule, state)
        groups = [{"params": list(named.values()), "lr": lr} for named, lr in zip(self.groups, rates.values())]
        # the distilled layers are those whose dense outputs the teacher cache holds, [windows,
        # distilled layers, tokens, d] in bfloat16, widened per batch
        distilled, self.teacher_hidden = load_hidden(self.store) if s.hidden_layers else ([], None)
        layers = find_layers(self.model)[1]
        self.engine = zero.engine(SoCoObjective(self.model, [layers[i] for i in distilled]), groups,
                                  s.zero_stage, micro_batch)
        # where the engine put the model (a GPU when this process sees one, as NCCL needs); the
        # windows, the teacher, the schedule's and the averages' state stay on the host
        self.device = self.engine.device
        # Adam's moments and step counts, saved in every checkpoint: a resumed run takes the same
        # steps an uninterrupted one would (a checkpoint written before this existed has none:
        # then Adam starts afresh, as it used to)
        self.restored_optimizer = ckpt is not None and zero.load_optimizer_state(self.engine, self.groups, saved)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if ckpt is not None and self.rank == 0:
            print(f"soco: learn: going on from step {state.step} ({ckpt}; Adam's moments "
                  f"{'restored' if self.restored_optimizer else 'restart: the checkpoint has none'})",
                  file=sys.stderr, flush=True)
        self.base_lrs = [g["lr"] for g in groups]
        self.parts = list(rates)  # each optimiser group's part
        # what the effective scores are read from (soco.scores.effective_score)
        self.score_params = [p for k, p in self.trained.items() if k.rsplit(".", 1)[1] in SCORE_PARTS]
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.windows = self.store.load_tensors(WINDOWS_FILE)["windows"]
        self.teacher = self.store.load_tensors(TEACHER_FILE)
        n_real = self.windows.shape[0]
        self.real_train_ids = list(range(n_real - s.holdout_samples))
        self.train_ids = list(self.real_train_ids)
        self.hold_ids = list(range(n_real - s.holdout_samples, n_real))
        if s.generated_windows:  # trained on beside the real training windows, never held out
            generated = load_generated(self.store)
            self.windows = torch.cat([self.windows, generated["windows"]])
            self.teacher = {k: torch.cat([self.teacher[k], generated[k]]) for k in ("logp", "idx")}
            if self.teacher_hidden is not None:
                self.teacher_hidden = torch.cat([self.teacher_hidden, generated["hidden"]])
            self.train_ids += range(n_real, self.windows.shape[0])
        self.costs = {n: m.cost for n, m in self.mods.items()}
        self.candidates = float(sum(m.rank * self.costs[n] for n, m in self.mods.items()))
        self.fisher = FisherImportance({n: m.rank for n, m in self.mods.items()}, s.fisher_decay)
        # Polyak average of the hard network's iterates (soco/averaging.py): updated after every
        # step from the final cut on; held-out evaluation, the best scores and the saved ones use it
        self.average = IterateAverage(s.average_decay) if s.average_decay > 0 else None
        if ckpt is not None:
            self.fisher.load(saved)
            if self.average is not None:
                self.average.load(saved)
        self.t0 = time.perf_counter()

    # --- parts of a step ---------------------------------------------------------------
    @property
    def averaging(self) -> bool:
        """Whether the iterate average is on and running (from the final cut on)."""
        return self.average is not None and self.schedule.state.frozen_at >= 0

    def swap_in(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write the given trained tensors and return what they held before. Every rank holds
        the same values; rank 0's copy is re-partitioned on exit."""
        with zero.gathered(list(self.trained.values()), modify=True), torch.no_grad():
            previous = {k: p.detach().clone() for k, p in self.trained.items()}
            for k, v in values.items():
                self.trained[k].copy_(v)
        return previous

    def forward(self, ids: list[int], with_hidden: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(KL to the teacher, hidden-state distance to it, soft parameter count, deviation
        from the unscaled spectrum, U's change from the decomposed U) on the given windows;
        without `with_hidden` the distance is not computed (0): the held-out evaluation reads
        the KL alone."""
        hidden = (None if self.teacher_hidden is None or not with_hidden
                  else self.teacher_hidden[ids].to(self.device, torch.float32))
        # teacher row t and student logits at t both predict token t+1 of the window
        return self.engine(self.windows[ids].to(self.device), self.teacher["logp"][ids].to(self.device),
                           self.teacher["idx"][ids].to(self.device), hidden)

    def all_mean(self, v: float) -> float:
        """The mean of a per-rank value over the ranks."""
        if self.world == 1:
            return v
        t = torch.tensor([v], dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(t)
        return float(t) / self.world

    def record_importance(self) -> None:
        """Fold this step's score gradients into the Fisher importance. Runs between backward
        and step: every rank takes part in gathering the (partitioned) grads."""
        grads = {n: zero.full_grad(m.score) for n, m in self.mods.items()}
        with zero.gathered(self.score_params):
            self.fisher.update({n: m.score for n, m in self.mods.items()}, grads)

    def prune(self, keep_params: float) -> None:
        """Keep the most important components among those still alive, within keep_params."""
        with zero.gathered(self.score_params):  # the scores themselves are read only when pruning by |s z|
            importance = pruning_importance(self.soco.prune_by, self.fisher,
                                            {n: m.effective_score().detach().cpu() for n, m in self.mods.items()},
                                            {n: m.mask.cpu() for n, m in self.mods.items()}, self.costs)
        apply_cut(self.mods, select_components(importance, self.costs, int(keep_params), self.job.min_ranks))

    def checkpoint(self, rel: str) -> None:
        """A score checkpoint of the current state (written by rank 0; every rank gathers)."""
        with zero.gathered(list(self.trained.values())):
            values = {k: p.detach().cpu().clone() for k, p in self.trained.items()}
        values.update({f"{n}.mask": m.mask.detach().cpu().clone() for n, m in self.mods.items()})
        values.update(self.fisher.state())
        if self.average is not None:
            values.update(self.average.state())
        values.update({k: v.cpu() for k, v in zero.optimizer_state(self.engine, self.groups).items()})
        if self.rank == 0:
            save_scores(self.store, rel, values, self.schedule.state, self.curve)

    # --- a step, an evaluation, the run ---------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """One optimisation step (pruning first while the ramp runs); its curve entry."""
        s, sched, target = self.soco, self.schedule, self.job.target
        step, t_step = sched.state.step, time.perf_counter()
        keep_params = sched.prune_target(self.candidates, target)
        if keep_params is not None:  # gradual pruning; the ramp's last step cuts to the budget
            self.prune(keep_params)
        factor = (1.0 if sched.stage == Stage.COARSE else s.refine_lr_factor) * sched.lr_factor()
        factor_trains = sched.stage >= Stage[s.factor_from.upper()]
        for group, base, part in zip(self.engine.optimizer.param_groups, self.base_lrs, self.parts):
            group["lr"] = base * factor
            group[zero.IDLE] = part in FACTOR_PARTS and not factor_trains  # Adam only counts its step
            group[zero.COUNTS_IDLE] = s.factor_counts_idle_steps  # ... or not even that
        for m in self.mods.values():  # the factors' gradients only from soco.factor_from on
            m.factor_trains = factor_trains
        # the windows the step draws from: the real training windows, and the generated ones
        # too from soco.generated_from on
        pool = self.train_ids if sched.stage >= Stage[s.generated_from.upper()] else self.real_train_ids
        ids = batch_indices(step, s.batch_size, len(pool), s.seed)[self.rank::self.world]
        # the step's random draws (the hard-concrete gates' noise) depend on (seed, step) alone,
        # the same on every rank, so a resumed run draws what an uninterrupted one would
        torch.manual_seed(s.seed * 1_000_003 + step)
        kl, hidden, soft, deviation, factor_change = self.forward([pool[i] for i in ids])
        budget, sparsity = sched.penalty(soft, target)
        self.engine.backward(kl + s.hidden_weight * hidden + budget + sparsity + sched.regulariser(deviation)
                             + s.factor_anchor * factor_change)
        self.record_importance()
        self.engine.step()
        soft_v = float(soft.detach())  # once pruning starts: exactly the kept parameters
        kl_v = self.all_mean(float(kl.detach()))
        hidden_v = self.all_mean(float(hidden.detach()))
        stage_before = sched.stage
        sched.after_step(soft_v, target)
        if self.averaging:
            with zero.gathered(list(self.trained.values())):
                self.average.update(self.trained)
        entry = {"step": step + 1, "stage": int(stage_before), "kl": kl_v, "soft_count": soft_v,
                "budget": float(budget.detach()),
                # what the learning rates were multiplied by (refine_lr_factor, the hard training's decay)
                "lr_scale": round(self.engine.optimizer.param_groups[0]["lr"] / self.base_lrs[0], 6),
                # the step's own time against the multiply-adds per token of the scored matrices it computed
                "step_s": round(time.perf_counter() - t_step, 3), "active_params": active_params(self.mods),
                "seconds": round(time.perf_counter() - self.t0, 2)}
        if self.teacher_hidden is not None:
            entry["hidden"] = hidden_v
        return entry

    def evaluation_due(self, step: int) -> bool:
        """Whether the held-out KL is measured after `step` (counted from 1): every
        soco.eval_every steps and when the schedule has just ended, if windows are held out."""
        return bool(self.hold_ids) and (step % self.soco.eval_every == 0 or self.schedule.stage == Stage.DONE)

    def evaluate_holdout(self) -> float:
        """Held-out KL of the hard network (its iterate average once averaging), saved as the
        best scores when it is the best so far; training goes on from the raw iterates."""
        raw = self.swap_in(self.average.value()) if self.averaging else None
        with torch.no_grad():
            hk = self.all_mean(float(self.forward(self.hold_ids[self.rank::self.world], with_hidden=False)[0]))
        if self.schedule.after_holdout(hk):  # the hard network's best so far: its scores are the ones kept
            self.checkpoint(BEST_SCORES)
        if raw is not None:
            self.swap_in(raw)
        return hk

    def run(self) -> None:
        """Steps until the schedule ends or soco.max_steps; then the final scores."""
        sched = self.schedule
        self.t0 = time.perf_counter()
        while sched.stage != Stage.DONE and sched.state.step < self.soco.max_steps:
            entry = self.train_step()
            if self.evaluation_due(entry["step"]):
                entry["holdout_kl"] = self.evaluate_holdout()
            self.curve.append(entry)
            if self.job.progress and self.rank == 0:
                print(f"learn step {entry['step']} stage {entry['stage']} kl {entry['kl']:.4f} "
                      + (f"hidden {entry['hidden']:.4f} " if "hidden" in entry else "")
                      + f"soft/target {entry['soft_count'] / self.job.target:.4f}"
                      + (f" holdout {entry['holdout_kl']:.4f}" if "holdout_kl" in entry else ""), flush=True)
            # none once the schedule has ended: the last periodic checkpoint is then always one
            # that a longer cap can go on from (Learn.continues); the final scores follow anyway
            if sched.stage != Stage.DONE and sched.state.step % self.soco.checkpoint_every == 0:
                self.checkpoint(f"scores/step-{sched.state.step:06d}.safetensors")
                if self.rank == 0:  # only once the new one is written (save_tensors renames it into place)
                    drop_old_checkpoints(self.store, self.soco.keep_checkpoints)
        if sched.state.best_step <= 0:
            self.checkpoint(FINAL_SCORES)
        elif self.rank == 0:  # the hard network's best scores, with the whole curve and state
            best, _, _ = load_scores(self.store, BEST_SCORES)
            save_scores(self.store, FINAL_SCORES, best, sched.state, self.curve)
        zero.finish(destroy=self.job.launched_by_ray)


def train_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (or in-process): `config` is `{"job": LearnJob}`."""
    Trainer(config["job"]).run()
