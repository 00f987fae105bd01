"""One compression run: the method's stages, in a run folder, on one executor.

Stages: calibrate -> decompose -> (the method's extra stages, e.g. SoCo's learn) ->
assemble -> evaluate; each is one module in pipeline/stages with its contract. The executor
(cluster/executor.py) is chosen here, once: `ray.enabled` picks Ray tasks and actors, else
everything runs in this process. Nothing else depends on it.

Run folder (local path or fsspec URL):
  manifest.json                 config, stage states and keys (see pipeline/manifest.py)
  calib/layer-00012.safetensors  input statistics of layer 12 (stages/calibrate.py)
  factors/plan.json             the decomposition's ranks; factors/layer-00012.safetensors
                                U, sigma, Vt of layer 12's linears (stages/decompose.py)
  plan.json, learned/, scores/  SoCo's final ranks and learned factors (stages/learn.py)
  checkpoint/                   Hugging Face layout, published whole (stages/assemble.py)
  evaluation.json               perplexity and parameter counts (stages/evaluate.py)
  report.json, report.md        the evaluation with the run's timings
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from cluster.executor import Executor, LocalExecutor, RayExecutor
from cluster.lease import Lease
from cluster.storage import Storage, check_reachable

from . import termination
from .config import Config
from .data import Windows, load_windows
from .errors import UserError
from .manifest import Manifest, committed_files, donor_entry
from .model_io import DTYPE_MAP, ModelSource, build_skeleton, find_layers
from .stages.assemble import Assemble
from .stages.base import Stage, StageContext
from .stages.calibrate import Calibrate
from .stages.decompose import Decompose
from .stages.evaluate import EVALUATION, Evaluate, write_report


LEASE = "lease.json"  # the run folder's writer lease (cluster/lease.py)


def set_threads(n: int) -> None:
    torch.set_num_threads(n if n > 0 else (os.cpu_count() or 1))


def make_executor(cfg: Config) -> Executor:
    """The one place that chooses where stages run."""
    if cfg.ray.enabled:
        return RayExecutor(cfg.ray.settings(), cfg.ray.max_in_flight, cfg.ray.calib_workers)
    return LocalExecutor()


def run_stages(cfg: Config) -> list[Stage]:
    """The stages of a run with this config's method, in order."""
    return [Calibrate(), Decompose(), *cfg.method.extra_stages(), Assemble(), Evaluate()]


def prepare_output(store: Storage) -> bool:
    """Refuse an output that exists and is not a soco run folder, or that cannot be a folder
    (a local path below a regular file); return True if it is new."""
    if store.local:
        blocker = next((p for p in Path(store.path()).parents if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise UserError(f"output {store.url()} cannot be created: {blocker} is a file")
    if not store.exists():
        return True
    if store.exists("manifest.json") or store.exists(LEASE):
        return False
    if store.listdir():
        raise UserError(f"output {store.url()} exists and is not a soco run folder; choose another output")
    return True


def check_owner(man: Manifest, cfg: Config, force: bool) -> None:
    """A run folder belongs to one model and one data source: refuse another unless forced."""
    old = man.previous_config
    if not old or force:
        return
    for key, new in (("model", cfg.model), ("data.source", cfg.data.source)):
        before = old.get("model") if key == "model" else (old.get("data") or {}).get("source")
        if before is not None and before != new:
            raise UserError(f"run folder {man.store.url()} holds a run of {key} {before!r}, not {new!r}; "
                            "choose another output, or pass --force to replace it")


#: times a stage is run again, from its own checkpoints, after a worker process died under it
WORKER_LOSS_RETRIES = 2


def run_stage(stage: Stage, ctx: StageContext) -> None:
    """stage.run(ctx); when a worker dies under it (a killed or out-of-memory Ray worker), the
    stage runs again with `resume` set, going on from what it committed (calibration from its
    last saved layer), up to WORKER_LOSS_RETRIES times."""
    for attempt in range(WORKER_LOSS_RETRIES + 1):
        try:
            stage.run(ctx)
            return
        except Exception as e:
            if attempt == WORKER_LOSS_RETRIES or not ctx.executor.lost_worker(e):
                raise
            print(f"soco: {stage.name}: a worker died ({type(e).__name__}); running the stage again from its "
                  f"checkpoints (retry {attempt + 1} of {WORKER_LOSS_RETRIES})", file=sys.stderr, flush=True)
            ctx.resume = True


def adopt_stages(man: Manifest, stages: list[Stage], donors: Sequence[str]) -> dict[str, str]:
    """Copy in, from the first donor run folder that has it, each leading stage this folder
    lacks ({stage: donor}); stops at the first stage no donor has with the same key."""
    adopted: dict[str, str] = {}
    for stage in stages:
        if man.done(stage.name):  # its checksums are verified by the run's own loop, once
            continue
        donor = next((d for d in donors if man.adopt(stage.name, Storage(d), stage.outputs)), None)
        if donor is None:
            break
        print(f"soco: {stage.name}: reused from {donor}", file=sys.stderr, flush=True)
        adopted[stage.name] = donor
    return adopted


def compress(cfg: Config, progress: bool = True, force: bool = False,
             reuse_from: Sequence[str] = ()) -> dict[str, Any]:
    """Run every stage whose inputs changed and return the report (also written to the run folder).

    All inputs are checked before anything is written: a bad model, data source or ratio
    fails with UserError and leaves no output behind. One writer at a time: the run holds a
    lease on its folder (cluster/lease.py), and a second run gets `Busy`. A run folder of
    another model or data source is refused unless `force`. `reuse_from`: other run folders
    whose committed stages with the same keys are copied in instead of recomputed (`soco
    sweep` passes the run that calibrated the same model and data).
    """
    set_threads(cfg.run.threads)
    dtype = DTYPE_MAP[cfg.run.dtype]
    t_load = time.perf_counter()
    for url, what in ((cfg.model, "model"), (cfg.data.source, "data source"), (cfg.output, "output")):
        check_reachable(url, what)  # seconds, one line: before anything is read or written
    source = ModelSource(cfg.model)
    source.check_index()
    tokenizer = source.tokenizer()
    model = build_skeleton(source.config, dtype)
    layers_name, layers = find_layers(model)
    cfg.method.decomposition_plan(cfg, model)  # refuses ratios the model cannot meet, before anything is written
    d = cfg.data
    windows = load_windows(d.source, d.text_field, tokenizer, d.calib_samples, d.seq_len, d.eval_samples)
    load_s = time.perf_counter() - t_load

    store = Storage(cfg.output)
    created = prepare_output(store)
    with make_executor(cfg) as executor:  # joins (or starts) Ray before anything is written
        store.makedirs()
        with Lease(store, LEASE) as lease:
            return _run(cfg, executor, store, created, lease, source, dtype, layers_name, len(layers), windows,
                        load_s, progress, force, reuse_from)


def _run(cfg: Config, executor: Executor, store: Storage, created: bool, lease: Lease, source: ModelSource,
         dtype: torch.dtype, layers_name: str, n_layers: int, windows: Windows, load_s: float, progress: bool,
         force: bool, reuse_from: Sequence[str] = ()) -> dict[str, Any]:
    """The stages in the run folder: skip what is committed for the same inputs, run the rest.
    `created`: the run folder is new (a failure before any commit removes it again)."""
    stages = run_stages(cfg)
    man = Manifest(store, cfg, stages)
    check_owner(man, cfg, force)
    previous = {k: dict(v) for k, v in man.stages.items()}  # stage entries before this invocation
    try:
        adopted = adopt_stages(man, stages, reuse_from)
        resumed: list[str] = []  # committed before (or adopted): skipped
        continued: list[str] = []  # interrupted before with the same inputs: picked up where they were (SoCo's learn)
        stale = False
        for stage in stages:
            if not stale and man.done(stage.name):
                damaged = man.damaged(stage.name)
                if not damaged:
                    resumed.append(stage.name)
                    continue
                print(f"soco: {stage.name}: {len(damaged)} committed file(s) damaged or missing "
                      f"({', '.join(damaged[:3])}): running it again", file=sys.stderr, flush=True)
            prev = previous.get(stage.name) or {}
            # the stage this run was interrupted in, with the same inputs, goes on from its checkpoints
            resume = not stale and prev.get("key") == man.keys[stage.name] and prev.get("status") != "done"
            # ... as does one whose earlier run only had lower caps (Stage.extendable)
            raised = man.extension(stage, prev) if not stale and not resume else {}
            if raised:
                print(f"soco: {stage.name}: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in raised.items())
                      + ": going on from the earlier run's checkpoints", file=sys.stderr, flush=True)
                resume = True
            if not stale:
                man.invalidate_from(stage.name)
                stale = True
            if resume:
                continued.append(stage.name)
            earlier = [(store.url(), committed_files(prev))] + [
                (d, committed_files(donor_entry(Storage(d), stage.name))) for d in reuse_from]
            ctx = StageContext(cfg, cfg.method, source, store, dtype, layers_name, n_layers, windows, executor,
                               progress, resume=resume, earlier=[(url, files) for url, files in earlier if files])
            t0 = man.start(stage.name)
            run_stage(stage, ctx)
            man.finish(stage.name, t0, stage.outputs, ctx.checksums)
        report = store.read_json(EVALUATION)
        report["timings_s"] = {"load": round(load_s, 3)} | {
            s.name: 0.0 if s.name in resumed else man.stages[s.name]["seconds"] for s in stages}
        report["resumed_stages"] = resumed
        report["continued_stages"] = continued
        report["adopted_stages"] = adopted
        report["worker_peak_rss_mb"] = {str(pid): round(mb, 1) for pid, mb in executor.peak_rss_mb.items()}
        write_report(store, report)
        man.set_status("done")
        return report
    except BaseException as e:
        # an error that a signal caused is the interruption (pipeline/termination.py)
        stop = termination.pending() if isinstance(e, Exception) else None
        if created and not any(man.done(s.name) for s in stages):
            lease.release()
            store.rm("")  # nothing committed: leave no trace of the run
        else:
            man.set_status("failed", f"{type(stop or e).__name__}: {stop or e}")
        if stop is not None:
            raise stop from e
        raise
