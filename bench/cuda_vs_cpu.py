"""A run on a GPU against the same run on the CPU: same factors, same perplexity.

On a machine with CUDA the decompose units run their SVDs there, and SoCo's learn stage
runs its DeepSpeed ZeRO engine there (NCCL). This runs one tiny model through the whole
in-process pipeline twice, once with the GPU visible and once with CUDA_VISIBLE_DEVICES=""
(CPU, gloo), and compares the perplexities, the decompose factors layer by layer and, for
`--method soco` (ZeRO stage 3 by default), the learned ranks, the held-out KL and the
learn stage's time. Writes bench/results/cuda_vs_cpu-<method>.json (or into --out).

    python bench/cuda_vs_cpu.py [--method svd-llm|soco] [--zero-stage 2|3] [--soco KEY=VALUE ...] [--out DIR]

`--soco KEY=VALUE` sets a soco option in both runs (e.g. `hidden_layers=2`, `factor_lr=1e-4`,
`schedule.hard_lr_end=0.1`: a dotted key sets one field of a section), so that a mechanism the
default leaves off is checked on the GPU too; the file is then named
cuda_vs_cpu-soco-<KEY-VALUE-...>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(folder: Path) -> None:
    """A random Llama-layout model (hidden 512, 4 layers) and a byte-level tokenizer trained on bundled-free text."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
    text = " ".join(f"word{i % 97} token{i % 13} piece{i % 31}." for i in range(40_000))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)],
                            trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<eos>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(folder / "model"), max_shard_size="4MB")
    fast.save_pretrained(str(folder / "model"))
    (folder / "text.txt").write_text(text)


#: a short SoCo schedule for the tiny model (the same in both runs)
SOCO_SHORT = {"lr": 0.05, "batch_size": 4, "holdout_samples": 4, "topk": 32, "eval_every": 5, "checkpoint_every": 10,
              "launcher": "local", "schedule": {"refine_steps": 20, "sparsify_steps": 10, "sparsify_ramp": 5,
                                                "coarse_max_steps": 40}}


def soco_options(pairs: list[str]) -> dict:
    """`KEY=VALUE` pairs as soco options, read as `soco compress --set` reads them
    (pipeline.config.apply_overrides: a dotted KEY sets one field of a section)."""
    from pipeline.config import apply_overrides
    from pipeline.errors import UserError
    try:
        return apply_overrides({}, pairs)
    except UserError as e:
        raise SystemExit(f"--soco: {e}") from None


def child(folder: Path, out: Path, method: str, zero_stage: int, pairs: list[str]) -> None:
    import torch
    from pipeline import compress
    from pipeline.config import from_dict
    t0 = time.perf_counter()
    cfg = {"model": str(folder / "model"), "output": str(out),
           "data": {"source": str(folder / "text.txt"), "calib_samples": 32, "seq_len": 128,
                    "eval_samples": 8, "batch_size": 8},
           "compress": {"method": method, "ratio": 0.4}, "ray": {"enabled": False}}
    if method == "soco":
        from pipeline.config import apply_overrides
        cfg["soco"] = apply_overrides(copy.deepcopy({**SOCO_SHORT, "zero_stage": zero_stage}), pairs)
    report = compress(from_dict(cfg), progress=False)
    learn = json.loads((out / "learn.json").read_text()) if (out / "learn.json").exists() else None
    curve = None
    if learn:  # the training curve's ends: the loss terms a --soco option turns on are compared too
        from cluster.storage import Storage
        from pipeline.stages.learning.scored_model import FINAL_SCORES, load_scores
        steps = load_scores(Storage(str(out)), FINAL_SCORES)[2]
        curve = {"first": steps[0], "last": steps[-1]}
    print("RESULT " + json.dumps({"cuda": torch.cuda.is_available(), "seconds": time.perf_counter() - t0,
                                  "timings_s": report["timings_s"], "perplexity": report["perplexity"],
                                  "learn": learn and {k: learn[k] for k in ("steps", "best_holdout_kl", "kept_params",
                                                                            "budget_params", "train_seconds")},
                                  "curve": curve,
                                  "ranks": json.loads((out / "plan.json").read_text())["ranks"] if learn else None}),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--method", default="svd-llm", choices=["svd-llm", "soco"])
    ap.add_argument("--zero-stage", type=int, default=3, choices=[2, 3], help="soco's DeepSpeed ZeRO stage")
    ap.add_argument("--soco", action="append", default=[], metavar="KEY=VALUE",
                    help="a soco option for both runs (repeatable), e.g. hidden_layers=2")
    a = ap.parse_args()
    extra = soco_options(a.soco)
    if extra and a.method != "soco":
        raise SystemExit("--soco needs --method soco")
    import torch
    from cluster.storage import Storage
    tmp = Path(tempfile.mkdtemp(prefix="soco-cuda-"))
    build(tmp)
    results = {}
    path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    for name, visible in (("gpu", os.environ.get("CUDA_VISIBLE_DEVICES", "0")), ("cpu", "")):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=visible, PYTHONPATH=path)  # the project first, then the rest
        r = subprocess.run([sys.executable, __file__, "--child", str(tmp), str(tmp / name), a.method,
                            str(a.zero_stage), json.dumps(a.soco)], env=env, capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not line:
            raise SystemExit(f"{name} run failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        results[name] = json.loads(line[0][7:])
    gpu, cpu = Storage(str(tmp / "gpu")), Storage(str(tmp / "cpu"))
    worst = {"U": 0.0, "sigma": 0.0, "Vt": 0.0, "product": 0.0}
    for i in range(4):
        a_, b_ = gpu.load_tensors(f"factors/layer-{i:05d}.safetensors"), cpu.load_tensors(f"factors/layer-{i:05d}.safetensors")
        for key in a_:
            part = key.rsplit(".", 1)[1]
            if part == "sigma":
                worst["sigma"] = max(worst["sigma"], float(((a_[key] - b_[key]).abs() / b_[key].abs().max()).max()))
        for key in [k for k in a_ if k.endswith(".U")]:
            base = key[:-2]
            pa = (a_[f"{base}.U"] * a_[f"{base}.sigma"]) @ a_[f"{base}.Vt"]
            pb = (b_[f"{base}.U"] * b_[f"{base}.sigma"]) @ b_[f"{base}.Vt"]
            worst["product"] = max(worst["product"], float((pa - pb).norm() / pb.norm()))
    out = {"device": torch.cuda.get_device_name(0) if results["gpu"]["cuda"] else "none",
           "gpu_run_saw_cuda": results["gpu"]["cuda"], "cpu_run_saw_cuda": results["cpu"]["cuda"],
           "decompose_s": {k: v["timings_s"]["decompose"] for k, v in results.items()},
           "perplexity": {k: v["perplexity"] for k, v in results.items()},
           "max_rel_sigma_diff": worst["sigma"], "max_rel_factor_product_diff": worst["product"],
           "method": a.method, "soco_options": extra}
    if a.method == "soco":
        g, c = results["gpu"], results["cpu"]
        out |= {"zero_stage": a.zero_stage, "backend": {"gpu": "nccl" if g["cuda"] else "gloo", "cpu": "gloo"},
                "learn_s": {k: v["timings_s"]["learn"] for k, v in results.items()},
                "learn": {k: v["learn"] for k, v in results.items()},
                "curve": {k: v["curve"] for k, v in results.items()},
                "matrices_with_other_learned_rank": sum(g["ranks"][n] != c["ranks"][n] for n in c["ranks"]),
                "matrices": len(c["ranks"]),
                "max_learned_rank_diff": max(abs(g["ranks"][n] - c["ranks"][n]) for n in c["ranks"])}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    tag = "-" + re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(a.soco)) if a.soco else ""  # a plain file name
    (Path(a.out) / f"cuda_vs_cpu-{a.method}{tag}.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5]), json.loads(sys.argv[6]))
    else:
        main()
