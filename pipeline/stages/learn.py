"""Learn (method `soco` only): train the spectrum scores, then keep exactly the budget.

Inputs: `factors/` (svd-llm factors pre-truncated to the coarse ranks), `calib/windows`
and `calib/final-hidden` (from calibrate), the model's non-linear weights.
Outputs:
  teacher/topk.safetensors      dense top-k log-probs (`logp`) and ids (`idx`) per token
  teacher/hidden.safetensors    with soco.hidden_layers: the dense outputs of the distilled
                                decoder layers (`hidden`, bfloat16, [windows, layers, tokens, d]),
                                from a layer-by-layer dense pass on the executor's workers
  teacher/generated.safetensors with soco.generated_windows: windows sampled from the dense
                                model and its targets on them (learning/generated.py), trained
                                on beside the real training windows
                                (each teacher file records the digest of its inputs: one that
                                an earlier commit holds for the same inputs is taken, not
                                computed again, learning/teacher_reuse.py)
  scores/step-000020.safetensors score checkpoints every soco.checkpoint_every steps (the last
                                soco.keep_checkpoints stay): `<module>.score` tensors; metadata
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

The parts live in pipeline/stages/learning/: job.py (what a worker gets), teacher.py, scored_model.py
(the model and its score checkpoints), trainer.py (one rank's training), finalize.py.
"""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, Sequence

import torch

from cluster.executor import Executor
from cluster.storage import Storage
from soco.objective import distilled_layers

from ..errors import UserError
from .learning.finalize import FINAL_PLAN, finalize, learned_file
from .learning.generated import GENERATED_FILE, cache_generated
from .learning.job import learn_job
from .learning.teacher import HIDDEN_FILE, TEACHER_FILE, cache_hidden, cache_teacher
from .learning.teacher_reuse import reuse_teacher, teacher_inputs
from .learning.trainer import train_worker
from ..model_io import ModelSource, worker_location
from ..plan import Plan
from .base import Stage, StageContext
from .decompose import load_factor_file

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["FINAL_PLAN", "Learn", "learned_file", "load_layer_learned", "run_learn"]


def load_layer_learned(store: Storage, i: int) -> dict[str, dict[str, torch.Tensor]]:
    """Layer i's kept components with the scores folded in, in the factors contract."""
    return load_factor_file(store, learned_file(i))


def run_learn(cfg: Config, source: ModelSource, store: Storage, plan: Plan, dtype: torch.dtype, layers_name: str,
              n_layers: int, executor: Executor, progress: bool = True, resume: bool = False,
              earlier: Sequence[tuple[str, dict[str, str]]] = ()) -> dict[str, Any]:
    """Teacher cache -> ZeRO training (Ray Train workers, or in-process) -> selection -> fold.

    The dense pass for hidden-state targets runs on the `executor`'s workers, which are then
    released: idle calibration workers would hold the CPUs the trainers need.
    With `resume` (the stage was interrupted with the same inputs) training continues from
    the last score checkpoint; otherwise earlier scores are discarded, and so are the teacher
    targets, except those an earlier commit (`earlier`, StageContext.earlier) holds for the
    same inputs (learning/teacher_reuse.py).
    """
    t0 = time.perf_counter()
    distilled = distilled_layers(n_layers, cfg.soco.hidden_layers)
    inputs = teacher_inputs(cfg, store, distilled)
    if not resume:
        for rel in ("scores", "learned"):
            store.rm(rel)
        reused = reuse_teacher(store, inputs, earlier)
        if reused:
            print(f"soco: learn: teacher targets computed before for the same inputs, reused: {', '.join(reused)}",
                  file=sys.stderr, flush=True)
    if not store.exists(TEACHER_FILE):
        cache_teacher(source, store, cfg.soco.topk, dtype, inputs[TEACHER_FILE])
    if cfg.soco.hidden_layers and not store.exists(HIDDEN_FILE):
        cache_hidden(executor, worker_location(cfg.model), cfg.run.dtype, store, distilled, cfg.data.batch_size,
                     inputs[HIDDEN_FILE], progress)
    executor.release()
    if cfg.soco.generated_windows and not store.exists(GENERATED_FILE):  # after the release: it uses every core
        cache_generated(source, store, cfg.soco, distilled, dtype, cfg.data.batch_size, inputs[GENERATED_FILE],
                        progress)
    if cfg.data.calib_samples - cfg.soco.holdout_samples < 1:
        raise UserError("soco.holdout_samples must leave at least one calibration window for training")
    job = learn_job(cfg, plan, store, resume=resume, progress=progress)
    if cfg.soco.workers >= 1 and cfg.soco.launcher == "ray":
        from cluster import zero
        zero.launch(train_worker, {"job": job}, job.workers, cfg.ray.settings(), cpus_per_worker=job.threads)
    else:
        train_worker({"job": job})
    train_s = time.perf_counter() - t0
    return finalize(store, plan, cfg.compress.ratio, cfg.soco.min_rank_fraction, train_s, layers_name, n_layers,
                    cfg.soco.prune_by)


class Learn(Stage):
    """SoCo's extra stage (pipeline/methods/soco.py): its key is the whole `soco` section
    except the execution-only fields, which the method declares."""

    name = "learn"
    contract = "1"
    outputs = ("teacher", "scores/final.safetensors", "learned", FINAL_PLAN, "learn.json")
    extendable = ("soco.max_steps", "soco.schedule.sparsify_steps", "soco.schedule.sparsify_patience")

    def continues(self, old: Config, new: Config) -> bool:
        """Raising the step caps or the hard stage's patience changes no step taken before
        the old run ended, so its last checkpoint (written before the schedule ended, see
        trainer.py) is where the longer run goes on. Not when the hard stage's step decays
        over its cap (`soco.schedule.hard_lr_end` < 1): a longer cap changes every step after
        the cut. Lowering any of them is not a continuation (the stage runs again)."""
        o, n = old.soco, new.soco

        def hard_patience(s: Any) -> int:  # 0 means the refinement's patience
            return s.schedule.sparsify_patience or s.schedule.patience

        return (n.schedule.hard_lr_end == 1.0 and n.max_steps >= o.max_steps
                and n.schedule.sparsify_steps >= o.schedule.sparsify_steps and hard_patience(n) >= hard_patience(o))

    def run(self, ctx: StageContext) -> None:
        from .decompose import FACTORS_PLAN
        run_learn(ctx.cfg, ctx.source, ctx.store, Plan.from_json(ctx.store.read_json(FACTORS_PLAN)), ctx.dtype,
                  ctx.layers_name, ctx.n_layers, ctx.executor, ctx.progress, resume=ctx.resume,
                  earlier=ctx.earlier)
