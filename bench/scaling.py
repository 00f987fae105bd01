"""Scaling benchmark: the decompose stage of SmolLM2 in-process, on 1 Ray worker and on 2.

All 210 decoder linears of `bundled:smollm2-135m` are factored with svd-llm at one ratio
from one calibration (computed once, reused by every variant; the decomposition's cost does
not depend on the number of calibration tokens, only on the matrix shapes). Variants:

- in-process, torch single-threaded (the reference: what one worker does alone);
- in-process, torch on all cores (the in-process path's default);
- Ray with W workers (a local Ray with W CPUs; one task per layer, one thread per task),
  timed cold (the first stage after Ray starts: workers still import torch and the
  pipeline) and warm (the same stage again on the same workers, as in a sweep).

Every variant runs the same Decompose stage object; only the executor differs.

Ideal for W workers = in-process single-threaded time / W; overhead = Ray time / ideal - 1.
Writes bench/results/scaling.{json,md}.

    .venv/bin/python bench/scaling.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled:smollm2-135m")
    ap.add_argument("--method", default="svd-llm")
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2, help="warm Ray runs (and in-process references) per size")
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "scaling-run"))
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "scaling"))
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from cluster import ray_runtime
    from cluster.executor import LocalExecutor, RayExecutor
    from cluster.ray_runtime import RaySettings
    from cluster.storage import Storage
    from pipeline.config import from_dict
    from pipeline.data import load_windows
    from pipeline.model_io import DTYPE_MAP, ModelSource, build_skeleton, find_layers
    from pipeline.plan import uniform_plan
    from pipeline.stages.base import StageContext
    from pipeline.stages.calibrate import Calibrate, calib_file
    from pipeline.stages.decompose import Decompose

    cfg = from_dict({"model": a.model, "output": a.workdir,
                     "data": {"calib_samples": a.calib_samples, "seq_len": a.seq_len},
                     "compress": {"method": a.method, "ratio": a.ratio}})
    source = ModelSource(cfg.model)
    model = build_skeleton(source.config)
    layers_name, layers = find_layers(model)
    n_layers = len(layers)
    plan = uniform_plan(model, a.method, a.ratio)
    store = Storage(a.workdir)
    store.makedirs()
    windows = load_windows("bundled:wiki", "text", source.tokenizer(), a.calib_samples, a.seq_len, 0)

    def context(executor) -> StageContext:
        return StageContext(cfg, cfg.method, source, store, DTYPE_MAP["float32"], layers_name, n_layers, windows,
                            executor, progress=False)

    stamp = {"model": a.model, "calib_samples": a.calib_samples, "seq_len": a.seq_len}
    if not (store.exists("calib-stamp.json") and store.read_json("calib-stamp.json") == stamp
            and all(store.exists(calib_file(i)) for i in range(n_layers))):
        torch.set_num_threads(os.cpu_count() or 1)
        t0 = time.perf_counter()
        Calibrate().run(context(LocalExecutor()))
        store.write_json("calib-stamp.json", stamp)
        print(f"calibration ({a.calib_samples} x {a.seq_len} tokens): {time.perf_counter() - t0:.1f} s", flush=True)

    load_start = os.getloadavg()[0]

    def timed(executor) -> float:
        t0 = time.perf_counter()
        Decompose().run(context(executor))
        return time.perf_counter() - t0

    def inprocess(threads: int) -> float:
        torch.set_num_threads(threads)
        return timed(LocalExecutor())

    cores = os.cpu_count() or 1
    single: list[float] = []  # in-process single-thread times, interleaved with the Ray runs
    ray_rows = []
    for w in a.workers:
        ray_runtime.shutdown()
        t0 = time.perf_counter()
        ray_runtime.connect(RaySettings(num_cpus=w))
        start_s = time.perf_counter() - t0
        with RayExecutor(RaySettings(num_cpus=w)) as ex:
            for rep in range(a.repeats + 1):
                mode = "cold" if rep == 0 else "warm"
                wall = timed(ex)
                ray_rows.append({"variant": f"Ray, {w} worker{'s' if w > 1 else ''} ({mode})", "workers": w,
                                 "wall_s": wall, "ray_start_s": start_s if mode == "cold" else 0.0,
                                 "worker_processes": len(ex.peak_rss_mb)})
                print(f"Ray {w} workers ({mode}): {wall:.2f} s (load {os.getloadavg()[0]:.2f})", flush=True)
                if rep >= 1:  # the reference, measured beside each warm Ray run (min of all: least disturbed)
                    single.append(inprocess(1))
                    print(f"in-process, 1 thread: {single[-1]:.2f} s", flush=True)
                    torch.set_num_threads(1)
    ray_runtime.shutdown()
    multi = inprocess(cores)  # last: multi-threaded runs suffer most from a busy machine
    print(f"in-process, {cores} threads: {multi:.2f} s", flush=True)

    t1 = min(single)
    rows = [{"variant": "in-process, 1 thread (reference)", "workers": 1, "wall_s": t1, "samples_s": single},
            {"variant": f"in-process, {cores} threads", "workers": 1, "wall_s": multi}]
    for w in a.workers:  # cold run, then the best warm run (min over repeats)
        mine = [r for r in ray_rows if r["workers"] == w]
        warm = [r for r in mine if r["variant"].endswith("(warm)")]
        best = min(warm, key=lambda r: r["wall_s"]) | {"samples_s": [r["wall_s"] for r in warm]}
        rows += [mine[0], best]
    for r in rows:
        r["ideal_s"] = t1 / r["workers"]
        r["speedup"] = t1 / r["wall_s"]
        r["overhead"] = r["wall_s"] / r["ideal_s"] - 1
    out = {"model": a.model, "method": a.method, "ratio": a.ratio, "layers": n_layers, "linears": len(plan.ranks),
           "calibration": stamp, "machine": f"{platform.machine()}, {cores} cores, torch {torch.__version__}",
           "load_avg_1min": {"start": load_start, "end": os.getloadavg()[0]}, "rows": rows}
    res = Path(a.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(json.dumps(out, indent=2))
    res.with_suffix(".md").write_text(render(out))
    print(render(out))


def render(out: dict) -> str:
    lines = [f"Decompose stage, `{out['model']}`: {out['linears']} linears in {out['layers']} layers, "
             f"{out['method']} at ratio {out['ratio']}, one calibration reused "
             f"({out['calibration']['calib_samples']} x {out['calibration']['seq_len']} tokens). "
             f"{out['machine']}. Ideal = in-process single-thread time / workers; overhead = wall / ideal - 1. "
             "Cold: first stage after Ray starts (workers import torch and the pipeline inside the timing; "
             "Ray's own start-up, listed apart, is not included); warm: workers already running, best of "
             f"{len(out['rows'][-1].get('samples_s', [1]))} runs; the reference is the best of the single-thread "
             "in-process runs interleaved with them (the machine is shared). "
             f"1-min load average: {out['load_avg_1min']['start']:.2f} at the start, "
             f"{out['load_avg_1min']['end']:.2f} at the end.", "",
             "| variant | wall (s) | ideal (s) | speedup | overhead vs ideal |", "|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['variant']} | {r['wall_s']:.2f} | {r['ideal_s']:.2f} | {r['speedup']:.2f}x | "
                     f"{100 * r['overhead']:+.1f}% |")
    starts = [f"{r['ray_start_s']:.1f} s ({r['workers']} CPU)" for r in out["rows"] if r.get("ray_start_s")]
    if starts:
        lines += ["", "Local Ray start-up (`ray.init`), not in the wall times: " + ", ".join(starts) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
