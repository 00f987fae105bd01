"""Evaluate: perplexity on held-out windows, computed layer by layer, and parameter counts
read from the tensors actually stored in a checkpoint."""
from __future__ import annotations

import math
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from ..layerwise import LayerwiseModel
from ..model_io import ModelSource


@torch.no_grad()
def perplexity(lw: LayerwiseModel, windows: torch.Tensor, batch_size: int,
               transform: Callable[[int, nn.Module], nn.Module] | None = None,
               desc: str = "evaluate", progress: bool = True) -> float:
    """exp(mean next-token NLL) over non-overlapping windows [M, L]."""
    batches = lw.embed(windows, batch_size)
    for i in tqdm(range(len(lw.layers)), desc=desc, unit="layer", disable=not progress):
        with lw.layer(i, transform) as layer:
            batches = lw.run_layer(layer, batches)
    total, count = lw.nll(batches, windows)
    return math.exp(total / count)


def stored_params(source: ModelSource, layers_name: str) -> dict[str, int]:
    """Parameter counts from the shard headers: all tensors, and the 2-D weights inside the
    decoder layers (dense linears, or the up/down pairs that replaced them).

    A tied output embedding is not stored and so is counted once, as the model holds it once.
    """
    total = linear = 0
    prefix = layers_name + "."
    for shard in sorted(set(source.weight_map.values())):
        with safe_open(source.file(shard), "pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                total += math.prod(shape)
                if name.startswith(prefix) and name.endswith(".weight") and len(shape) == 2:
                    linear += math.prod(shape)
    return {"total": total, "linear": linear}


def write_report(store, report: dict) -> None:
    store.write_json("report.json", report)
    store.write_text("report.md", render_markdown(report))


def render_markdown(r: dict) -> str:
    p, t = r["params"], r["timings_s"]
    lines = [f"# soco compression report", "",
             f"- model: `{r['model']}`", f"- method: `{r['method']}`, target ratio {r['ratio']}",
             f"- data: `{r['data']['source']}`: {r['data']['calib_samples']} calibration windows x "
             f"{r['data']['seq_len']} tokens (first half), {r['data']['eval_windows']} evaluation windows x "
             f"{r['data']['seq_len']} tokens (second half)", "",
             "| | dense | compressed |", "|---|---|---|",
             f"| perplexity | {_fmt(r['perplexity'].get('dense'))} | {_fmt(r['perplexity']['compressed'])} |",
             f"| decoder linear parameters | {p['linear_before']:,} | {p['linear_after']:,} |",
             f"| all parameters | {p['total_before']:,} | {p['total_after']:,} |", "",
             f"Achieved ratio: {r['achieved_ratio']['linear']:.4f} of the decoder's linear parameters removed "
             f"({r['achieved_ratio']['total']:.4f} of all parameters).", "",
             "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in t.items()]
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x < 1e4 else f"{x:.3g}"
