"""One compression run: calibrate -> decompose -> assemble -> evaluate, in a run folder.

Run folder (local path or fsspec URL):
  manifest.json                 config, stage states and keys (see pipeline/manifest.py)
  calib/layer-00012.safetensors  input statistics of layer 12 (stages/calibrate.py)
  plan.json                     rank of every compressed linear (plan.py)
  factors/layer-00012.safetensors U, sigma, Vt of layer 12's linears (stages/decompose.py)
  checkpoint/                   Hugging Face layout, published whole (checkpoint.py)
  report.json, report.md        perplexity, parameter counts, ratios, timings
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch

from cluster.storage import Storage
from soco.ranks import coarse_ratio

from .checkpoint import compressed_skeleton, write_checkpoint
from .config import Config
from .data import load_windows
from .errors import UserError
from .layerwise import LayerwiseModel
from .manifest import STAGES, Manifest
from .model_io import DTYPE_MAP, ModelSource, build_skeleton, find_layers
from .plan import Plan, coarse_plan, uniform_plan
from .stages.calibrate import run_calibrate
from .stages.decompose import load_layer_factors, run_decompose
from .stages.evaluate import perplexity, stored_params, write_report


COARSE_PLAN = "factors/plan.json"


def decomposition_plan(cfg: Config, model) -> Plan:
    """Ranks the decompose stage factors to: the target's uniform ranks for the baselines;
    for soco, svd-llm factors pre-truncated at the looser coarse ratio (default: candidates
    worth twice the budget's parameters)."""
    if cfg.compress.method != "soco":
        return uniform_plan(model, cfg.compress.method, cfg.compress.ratio)
    uniform_plan(model, "soco", cfg.compress.ratio)  # refuses a target ratio no matrix can meet
    return coarse_plan(model, coarse_ratio(cfg.soco.coarse_ratio, cfg.compress.ratio))


def set_threads(n: int) -> None:
    torch.set_num_threads(n if n > 0 else (os.cpu_count() or 1))


def prepare_output(store: Storage) -> bool:
    """Refuse an output that exists and is not a soco run folder; return True if it is new."""
    if not store.exists():
        return True
    if store.exists("manifest.json"):
        return False
    if store.listdir():
        raise UserError(f"output {store.url()} exists and is not a soco run folder; choose another output")
    return True


def compress(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """Run every stage whose inputs changed and return the report (also written to the run folder).

    All inputs are checked before anything is written: a bad model, data source or ratio
    fails with UserError and leaves no output behind.
    """
    set_threads(cfg.run.threads)
    dtype = DTYPE_MAP[cfg.run.dtype]
    t_load = time.perf_counter()
    source = ModelSource(cfg.model)
    tokenizer = source.tokenizer()
    model = build_skeleton(source.config, dtype)
    layers_name, layers = find_layers(model)
    plan = decomposition_plan(cfg, model)
    d = cfg.data
    windows = load_windows(d.source, d.text_field, tokenizer, d.calib_samples, d.seq_len, d.eval_samples)
    load_s = time.perf_counter() - t_load

    store = Storage(cfg.output)
    created = prepare_output(store)
    store.makedirs()
    man = Manifest(store, cfg)
    previous = {k: dict(v) for k, v in man.stages.items()}  # stage entries before this invocation
    try:
        timings = {"load": round(load_s, 3)}
        resumed: list[str] = []
        stale = False
        for stage in STAGES:
            if not stale and man.done(stage):
                timings[stage] = 0.0
                resumed.append(stage)
                continue
            if not stale:
                man.invalidate_from(stage)
                stale = True
            t0 = man.start(stage)
            if stage == "calibrate":
                if cfg.ray.enabled:  # data-parallel over Ray actors (cluster/ray_tasks.py)
                    from cluster.ray_tasks import ray_calibrate
                    ray_calibrate(cfg, windows.calib, store, progress)
                else:
                    run_calibrate(LayerwiseModel(model, source, dtype), windows.calib, d.batch_size, store, progress)
            elif stage == "decompose":
                store.write_json(COARSE_PLAN, plan.to_json())
                if cfg.ray.enabled:  # one Ray task per layer, reading and writing the run folder itself
                    from cluster.ray_tasks import ray_decompose
                    ray_decompose(cfg, store, COARSE_PLAN, layers_name, len(layers), progress)
                else:
                    run_decompose(source, store, plan, layers_name, len(layers), cfg.compress.asvd_alpha, progress)
            elif stage == "learn":
                if cfg.compress.method == "soco":
                    from .stages.learn import run_learn
                    prev = previous.get("learn") or {}
                    resume = prev.get("key") == man.keys["learn"]  # same inputs, interrupted: go on
                    run_learn(cfg, source, store, Plan.from_json(store.read_json(COARSE_PLAN)), dtype, layers_name,
                              len(layers), progress, resume=resume)
                else:  # the baselines keep the decomposition's uniform ranks
                    store.write_json("plan.json", store.read_json(COARSE_PLAN))
            elif stage == "assemble":
                final = Plan.from_json(store.read_json("plan.json"))
                from .stages.learn import load_layer_learned
                load = load_layer_learned if cfg.compress.method == "soco" else load_layer_factors
                meta = {"method": cfg.compress.method, "ratio": final.ratio, "ranks": final.ranks}
                if cfg.ray.enabled:  # one Ray task per shard
                    from cluster.ray_tasks import ray_write_checkpoint
                    ray_write_checkpoint(cfg, source, final, meta, load, store, "checkpoint", dtype, progress)
                else:
                    write_checkpoint(source, model, lambda i: load(store, i), meta,
                                     store, "checkpoint", dtype, int(cfg.run.shard_size_mb * 2**20), progress)
            elif stage == "evaluate":
                report = evaluate_run(cfg, source, store, windows.eval, dtype, progress)
            man.finish(stage, t0)
            timings[stage] = man.stages[stage]["seconds"]
        report = store.read_json("report.json")
        report["timings_s"] = {"load": timings["load"]} | {s: man.stages[s]["seconds"] for s in STAGES}
        report["resumed_stages"] = resumed
        write_report(store, report)
        man.set_status("done")
        return report
    except BaseException as e:
        if created and not any(man.done(s) for s in STAGES):
            store.rm("")  # nothing committed: leave no trace of the run
        else:
            man.set_status("failed", f"{type(e).__name__}: {e}")
        raise


def evaluate_run(cfg: Config, source: ModelSource, store: Storage, eval_windows: torch.Tensor,
                 dtype: torch.dtype, progress: bool = True) -> dict[str, Any]:
    """Perplexity of the checkpoint (and of the dense model), counts, ratios -> report.json."""
    ckpt = ModelSource(store.url("checkpoint"))
    cmodel = compressed_skeleton(ckpt.config, dtype)
    layers_name, _ = find_layers(cmodel)
    bs = cfg.data.batch_size
    if cfg.ray.enabled:  # data-parallel over Ray actors (cluster/ray_tasks.py)
        from cluster.ray_tasks import ray_perplexities
        ppl_c, ppl_d = ray_perplexities(cfg, store, eval_windows, progress)
    else:
        ppl_c = perplexity(LayerwiseModel(cmodel, ckpt, dtype), eval_windows, bs, desc="evaluate compressed",
                           progress=progress)
        ppl_d = None
    if cfg.run.eval_dense and not cfg.ray.enabled:
        ppl_d = perplexity(LayerwiseModel(build_skeleton(source.config, dtype), source, dtype), eval_windows, bs,
                           desc="evaluate dense", progress=progress)
    before, after = stored_params(source, layers_name), stored_params(ckpt, layers_name)
    plan = Plan.from_json(store.read_json("plan.json"))
    report = {
        "model": cfg.model, "method": cfg.compress.method, "ratio": cfg.compress.ratio,
        "data": {"source": cfg.data.source, "calib_samples": cfg.data.calib_samples, "seq_len": cfg.data.seq_len,
                 "eval_windows": int(eval_windows.shape[0])},
        "perplexity": {"dense": ppl_d, "compressed": ppl_c},
        "params": {"linear_before": before["linear"], "linear_after": after["linear"],
                   "total_before": before["total"], "total_after": after["total"]},
        "achieved_ratio": {"linear": 1 - after["linear"] / before["linear"],
                           "total": 1 - after["total"] / before["total"]},
        "ranks": {"min": min(plan.ranks.values()), "max": max(plan.ranks.values()), "modules": len(plan.ranks)},
        "checkpoint": store.url("checkpoint"),
        "timings_s": {},
    }
    store.write_json("report.json", report)
    return report
