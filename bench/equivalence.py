"""Fingerprints of a run folder, to show that a refactoring changed no result.

    python bench/equivalence.py fingerprint RUN > a.json   # sha256 of every tensor it wrote
    python bench/equivalence.py compare a.json b.json       # exit 1 and the differences, if any

The fingerprint (keyed by file and tensor name) covers the checkpoint's tensors, the learned scores and masks
(`scores/final.safetensors`), the learned factors (`learned/`) and the report's perplexities.
Tensors are hashed by their bytes, so equal means bit-identical.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def _tensors(path: Path) -> dict[str, str]:
    out = {}
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name).contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
            out[name] = f"{t.dtype}{list(t.shape)}:" + hashlib.sha256(raw).hexdigest()[:24]
    return out


def fingerprint(run: Path) -> dict:
    fp: dict = {}
    for rel in ["checkpoint/*.safetensors", "scores/final.safetensors", "learned/*.safetensors"]:
        for p in sorted(run.glob(rel)):
            for name, h in _tensors(p).items():
                fp[f"{p.relative_to(run)}:{name}"] = h
    report = run / "report.json"
    if report.exists():
        r = json.loads(report.read_text())
        fp["perplexity"] = r["perplexity"]
    return fp


def compare(a: dict, b: dict) -> list[str]:
    diffs = [f"only in first: {k}" for k in a.keys() - b.keys()] + [f"only in second: {k}" for k in b.keys() - a.keys()]
    diffs += [f"differs: {k}: {a[k]} vs {b[k]}" for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
    return diffs


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "fingerprint":
        print(json.dumps(fingerprint(Path(sys.argv[2])), indent=1, sort_keys=True))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        d = compare(json.loads(Path(sys.argv[2]).read_text()), json.loads(Path(sys.argv[3]).read_text()))
        print("\n".join(d) if d else "identical")
        sys.exit(1 if d else 0)
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
