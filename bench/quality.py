"""Quality benchmark: perplexity of dense, svd, asvd and svd-llm at several removal ratios.

Every method and ratio goes through the real pipeline (`pipeline.compress`) in one run
folder, so all of them share one calibration pass (same samples) and are evaluated on the
same held-out windows. Writes bench/results/quality.{json,md}.

    .venv/bin/python bench/quality.py                 # SmolLM2, wiki, 0.2/0.4/0.6
    .venv/bin/python bench/quality.py --ratios 0.4 --methods svd-llm
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from pipeline import compress
from pipeline.config import from_dict

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled:smollm2-135m")
    ap.add_argument("--data", default="bundled:wiki")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument("--methods", nargs="+", default=["svd", "asvd", "svd-llm"])
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "quality-run"))
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "quality"))
    a = ap.parse_args()

    rows: dict[str, dict[float, dict]] = {}
    dense = None
    t0 = time.time()
    for ratio in a.ratios:
        for method in a.methods:
            cfg = from_dict({"model": a.model, "output": a.workdir,
                             "data": {"source": a.data, "calib_samples": a.calib_samples, "seq_len": a.seq_len,
                                      "eval_samples": a.eval_samples},
                             "compress": {"method": method, "ratio": ratio},
                             "run": {"eval_dense": dense is None}})
            r = compress(cfg, progress=False)
            if dense is None:
                dense = r["perplexity"]["dense"]
            rows.setdefault(method, {})[ratio] = {
                "ppl": r["perplexity"]["compressed"], "achieved_ratio": r["achieved_ratio"]["linear"],
                "linear_after": r["params"]["linear_after"], "linear_before": r["params"]["linear_before"],
                "seconds": {k: v for k, v in r["timings_s"].items()}}
            print(f"{method:8s} r={ratio}: ppl {r['perplexity']['compressed']:.4g}", flush=True)
    protocol = (f"model `{a.model}`, text `{a.data}` tokenised whole and split in halves; calibration = "
                f"{a.calib_samples} windows x {a.seq_len} tokens from the start of the first half; evaluation = "
                f"the first {a.eval_samples} non-overlapping windows of {a.seq_len} tokens of the second half; "
                f"every decoder linear at uniform rank k = floor((1-r)mn/(m+n)); factorisation in float64, "
                f"model in float32; calibration activations from the dense model")
    out = {"protocol": protocol, "dense_ppl": dense, "rows": rows, "wall_s": round(time.time() - t0, 1)}
    res = Path(a.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(json.dumps(out, indent=2))
    res.with_suffix(".md").write_text(render(out, a.ratios))
    print(render(out, a.ratios))


def fmt(x: float) -> str:
    return f"{x:.1f}" if x < 1e4 else f"{x:.2e}"


def render(out: dict, ratios: list[float]) -> str:
    lines = [f"Protocol: {out['protocol']}.", "",
             "| wiki ppl | " + " | ".join(f"r={r}" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios),
             "| dense | " + " | ".join(fmt(out["dense_ppl"]) for _ in ratios) + " |"]
    for method, by_ratio in out["rows"].items():
        lines.append(f"| {method} | " + " | ".join(fmt(by_ratio[r]["ppl"]) if r in by_ratio else "-" for r in ratios) + " |")
    any_method = next(iter(out["rows"].values()))
    lines += ["", "Decoder linear parameters: " + f"{any_method[ratios[0]]['linear_before'] / 1e6:.1f}M -> " +
              " / ".join(f"{any_method[r]['linear_after'] / 1e6:.1f}M" for r in ratios) +
              " (achieved ratios " + ", ".join(f"{any_method[r]['achieved_ratio']:.4f}" for r in ratios) + ").",
              f"Wall time of the whole benchmark: {out['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
