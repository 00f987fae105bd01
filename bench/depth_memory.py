"""Memory against depth: compress 30-, 60- and 120-layer models and compare peak memory.

The models are SmolLM2-135M's architecture (its config.json, hidden 576, MLP 1536, GQA)
with `num_hidden_layers` changed and random weights, saved as sharded safetensors
(200 MB shards) under bench/out/depth-models/. Each is compressed with svd-llm through
the whole pipeline on Ray (calibrate, decompose, assemble, evaluate), each in a fresh
process with a fresh local Ray, with small calibration (8 windows x 64 tokens) so a run
takes minutes. Measured: the driver's peak RSS (getrusage of the driver process) and the
largest peak RSS among the Ray workers that did the work (each task and actor reports its
process's getrusage peak). Passing: both within 20% of the 30-layer figures.
Writes bench/results/depth_memory.{json,md}.

    .venv/bin/python bench/depth_memory.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(layers: int, folder: Path) -> Path:
    """SmolLM2's config with `layers` decoder layers, random weights, sharded safetensors."""
    if (folder / "model.safetensors.index.json").exists():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pipeline.bundled import bundled_model_dir
    src = bundled_model_dir("smollm2-135m")
    cfg = AutoConfig.from_pretrained(src)
    cfg.num_hidden_layers = layers
    torch.manual_seed(layers)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), max_shard_size="200MB")
    AutoTokenizer.from_pretrained(src).save_pretrained(str(tmp))
    del model
    os.replace(tmp, folder)
    return folder


def child(model: str, output: str) -> None:
    """One measured run (in its own process): print a JSON line with the peaks."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from cluster import ray_runtime
    from pipeline import compress
    from pipeline.config import from_dict
    cfg = from_dict({"model": model, "output": output,
                     "data": {"source": "bundled:wiki", "calib_samples": 8, "seq_len": 64, "eval_samples": 4,
                              "batch_size": 4},
                     "compress": {"method": "svd-llm", "ratio": 0.4},
                     "run": {"eval_dense": False, "shard_size_mb": 200.0}})
    t0 = time.perf_counter()
    report = compress(cfg, progress=False)
    wall = time.perf_counter() - t0
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    workers = {int(k): v for k, v in report["worker_peak_rss_mb"].items()}
    ray_runtime.shutdown()
    ckpt = Path(output) / "checkpoint"
    print("RESULT " + json.dumps({
        "driver_peak_mb": driver, "worker_peak_mb": max(workers.values()), "workers": len(workers),
        "worker_peaks_mb": sorted(workers.values(), reverse=True), "wall_s": wall,
        "stage_s": report["timings_s"], "ppl": report["perplexity"]["compressed"],
        "checkpoint_mb": sum(p.stat().st_size for p in ckpt.glob("*.safetensors")) / 2**20,
        "achieved_ratio": report["achieved_ratio"]["linear"]}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[30, 60, 120])
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "depth"))
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "depth_memory"))
    ap.add_argument("--keep", action="store_true", help="keep the run folders (models are always kept)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "OUTPUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    work = Path(a.workdir)
    rows = []
    for depth in a.depths:
        model = build_model(depth, work / "models" / f"smollm2-L{depth}")
        run = work / f"run-L{depth}"
        shutil.rmtree(run, ignore_errors=True)
        print(f"{depth} layers: compressing {model} ...", flush=True)
        p = subprocess.run([sys.executable, __file__, "--child", str(model), str(run)], capture_output=True,
                           text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            sys.exit(f"run of {depth} layers failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        r = json.loads(line[len("RESULT "):]) | {
            "layers": depth, "model_gib": sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**30}
        rows.append(r)
        print(f"  driver {r['driver_peak_mb']:.0f} MiB, largest worker {r['worker_peak_mb']:.0f} MiB, "
              f"{r['wall_s']:.0f} s", flush=True)
        if not a.keep:
            shutil.rmtree(run, ignore_errors=True)
    base = rows[0]
    for r in rows:
        r["driver_vs_first"] = r["driver_peak_mb"] / base["driver_peak_mb"]
        r["worker_vs_first"] = r["worker_peak_mb"] / base["worker_peak_mb"]
    ok = all(abs(r["driver_vs_first"] - 1) <= 0.2 and abs(r["worker_vs_first"] - 1) <= 0.2 for r in rows)
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows, "within_20_percent": ok}
    res = Path(a.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(json.dumps(out, indent=2))
    res.with_suffix(".md").write_text(render(out))
    print(render(out))
    if not ok:
        sys.exit("peak memory grew by more than 20% with depth")


def render(out: dict) -> str:
    lines = ["SmolLM2-135M architecture with random weights at 30/60/120 decoder layers (200 MB safetensors "
             "shards), svd-llm at ratio 0.4, whole pipeline on a local Ray (calibrate, decompose, assemble, "
             "evaluate; 8 calibration windows x 64 tokens, 4 evaluation windows), each run in a fresh process. "
             f"Peak RSS from getrusage; workers: the largest over all Ray workers that ran tasks or actors. "
             f"{out['machine']}.", "",
             "| layers | model on disk (GiB) | driver peak (MiB) | vs 30 | largest worker peak (MiB) | vs 30 | "
             "workers | wall (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['layers']} | {r['model_gib']:.2f} | {r['driver_peak_mb']:.0f} | {r['driver_vs_first']:.3f} | "
                     f"{r['worker_peak_mb']:.0f} | {r['worker_vs_first']:.3f} | {r['workers']} | {r['wall_s']:.0f} |")
    lines += ["", f"Within 20% of the 30-layer figures: {'yes' if out['within_20_percent'] else 'NO'}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
