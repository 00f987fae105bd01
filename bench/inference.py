"""Inference bench: is a compressed checkpoint faster, and smaller in memory, when it runs?

For the dense model and checkpoints at each ratio (made here with the pipeline, one run
folder whose calibration all ratios share), each model is measured in a fresh process:

- prefill throughput: tokens/s of one forward pass over prompts of 512 tokens, batch 1 and 8;
- decode throughput: tokens/s generating 128 tokens greedily with the KV cache after a
  512-token prompt, batch 1 (the time of the prompt's own forward is subtracted);
- memory: bytes of the weights (every parameter and buffer) and the process's peak resident
  memory (on a GPU: peak allocated GPU memory).

Each timing is the median of `--repeats` runs after a warm-up. Results: bench/results/
inference.{json,md}. The same script runs on a GPU with `--device cuda` (and `--dtype
bfloat16`, a GPU's usual inference precision).

`--random-weights` builds the dense model from `--model`'s config and tokenizer with random
weights (seed 0) and compresses that: for a machine that does not hold the weights (a GPU
machine with no route to them). Every timing and size depends on the shapes alone (the
ranks of these uniform checkpoints follow from the shapes, decode generates a fixed number of
tokens), so the figures are those of the real model; the perplexities are not, and are not
reported.

    .venv/bin/python bench/inference.py                     # SmolLM2, svd-llm at 0.2/0.4/0.6, CPU
    .venv/bin/python bench/inference.py --device cuda --results bench/results/inference-gpu
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(location: str, compressed: bool, device: str, dtype: str, repeats: int, prompt: int,
            new_tokens: int) -> dict:
    """Run in a fresh process: load one model and time it (see the module docstring)."""
    import resource

    import torch

    from pipeline.checkpoint import load_compressed, load_dense
    torch.manual_seed(0)
    model = (load_compressed(location, dtype) if compressed else load_dense(location, dtype)).eval()
    model.to(device)
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    vocab = model.config.vocab_size

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    out: dict = {"weights_mb": weights / 2**20}
    with torch.no_grad():
        for batch in (1, 8):
            ids = torch.randint(0, vocab, (batch, prompt), device=device)
            s = timed(lambda: model(ids, use_cache=False))
            out[f"prefill_b{batch}_tok_s"] = batch * prompt / s
        ids = torch.randint(0, vocab, (1, prompt), device=device)
        first = timed(lambda: model(ids, use_cache=True))
        total = timed(lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                             do_sample=False, pad_token_id=0))
        out["decode_b1_tok_s"] = new_tokens / max(total - first, 1e-9)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def checkpoints(a: argparse.Namespace, model: str) -> dict[float, str]:
    """{ratio: checkpoint folder}, made with the pipeline (kept between invocations)."""
    from pipeline import compress
    from pipeline.config import from_dict
    work = Path(a.workdir)
    out = {}
    for ratio in a.ratios:
        dest = work / f"{a.method}-r{ratio}"
        if not (dest / "model.safetensors.index.json").exists():
            cfg = from_dict({"model": model, "output": str(work / "run"),
                             "data": {"source": "bundled:wiki", "calib_samples": a.calib_samples, "seq_len": 512,
                                      "eval_samples": 8},
                             "compress": {"method": a.method, "ratio": ratio},
                             "run": {"eval_dense": False}, "ray": {"enabled": False}})
            donor = ROOT / "bench" / "out" / "quality-run" / a.method  # the quality bench's calibration, if any
            reuse = [str(donor)] if donor.exists() and not a.random_weights else []
            compress(cfg, progress=False, reuse_from=reuse)
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(work / "run" / "checkpoint", dest)
        out[ratio] = str(dest)
    return out


def random_dense(a: argparse.Namespace) -> str:
    """A folder with `--model`'s config and tokenizer and random weights (seed 0), made once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pipeline.model_io import ModelSource
    dest = Path(a.workdir) / "dense-random-weights"
    if not (dest / "config.json").exists():
        src = a.model if Path(a.model).is_dir() else ModelSource(a.model).location  # a folder needs no weights
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
        tmp = dest.with_name(dest.name + ".tmp")
        model.save_pretrained(str(tmp), max_shard_size="200MB")
        AutoTokenizer.from_pretrained(src).save_pretrained(str(tmp))
        os.replace(tmp, dest)
    return str(dest)


def render(res: dict) -> str:
    rows = res["rows"]
    dense = rows["dense"]
    lines = [f"Device: {res['device']} ({res['machine']}), torch threads {res['threads']}, {res['dtype']}; prompts of "
             f"{res['prompt']} random tokens; decode = {res['new_tokens']} greedy tokens with the KV cache after "
             f"the prompt, batch 1; median of {res['repeats']} runs after a warm-up; each model in a fresh process. "
             f"Compressed: `{res['method']}` checkpoints of `{res['model']}` (uniform ranks)"
             + (", random weights of its shapes (timings and sizes depend on the shapes alone)"
                if res.get("random_weights") else "") + ".", "",
             "| model | weights (MB) | peak memory (MB) | prefill b1 (tok/s) | prefill b8 (tok/s) | decode b1 (tok/s) "
             "| speedup prefill b1 / b8 / decode |", "|---|---|---|---|---|---|---|"]
    mem = "peak_gpu_mb" if "peak_gpu_mb" in dense else "peak_rss_mb"
    for name, r in rows.items():
        sp = " / ".join(f"{r[k] / dense[k]:.2f}x" for k in ("prefill_b1_tok_s", "prefill_b8_tok_s", "decode_b1_tok_s"))
        lines.append(f"| {name} | {r['weights_mb']:.0f} | {r[mem]:.0f} | {r['prefill_b1_tok_s']:.0f} | "
                     f"{r['prefill_b8_tok_s']:.0f} | {r['decode_b1_tok_s']:.1f} | {sp} |")
    lines += ["", "Reference point: SVD-LLM V2 reports 1.29x / 1.63x / 2.08x throughput at 20 / 40 / 60% "
              "compression on an A100 (LLaMA-7B)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled:smollm2-135m")
    ap.add_argument("--method", default="svd-llm")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--calib-samples", type=int, default=64,
                    help="calibration windows of the checkpoints (uniform ranks: their shapes do not depend on it)")
    ap.add_argument("--random-weights", action="store_true",
                    help="random weights of --model's shapes (for a machine without the weights)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "inference"))
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "inference"))
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one model, in a fresh process
    ap.add_argument("--compressed", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure, a.compressed, a.device, a.dtype, a.repeats, a.prompt, a.new_tokens)))
        return
    import torch

    from pipeline.model_io import ModelSource
    model = random_dense(a) if a.random_weights else a.model  # the name the quality bench's calibration was made with
    models = {"dense": (ModelSource(model).location, False)}
    models |= {f"{a.method} r={r}": (p, True) for r, p in checkpoints(a, model).items()}
    res = {"device": a.device if a.device == "cpu" else torch.cuda.get_device_name(0),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "threads": torch.get_num_threads(),
           "prompt": a.prompt, "new_tokens": a.new_tokens, "repeats": a.repeats, "method": a.method,
           "model": a.model, "dtype": a.dtype, "random_weights": a.random_weights, "rows": {}}
    out = Path(a.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, (loc, compressed) in models.items():
        cmd = [sys.executable, __file__, "--measure", loc, "--device", a.device, "--dtype", a.dtype,
               "--repeats", str(a.repeats),
               "--prompt", str(a.prompt), "--new-tokens", str(a.new_tokens)] + (["--compressed"] if compressed else [])
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res["rows"][name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(name, res["rows"][name], flush=True)
        out.with_suffix(".json").write_text(json.dumps(res, indent=2))  # after every model
        out.with_suffix(".md").write_text(render(res))
    print(render(res))


if __name__ == "__main__":
    main()
