"""Evaluate: perplexity of the checkpoint (and of the dense model) on the held-out windows,
parameter counts read from the tensors actually stored, and the report.

Units: shares of the evaluation windows (stages/shares.py), each run layer by layer through
the model; the merge adds the shares' summed NLL and token counts. `soco eval` measures a
checkpoint with the same function.

Output: `evaluation.json` (what was measured); the run writes `report.json` and `report.md`
from it with its timings.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from cluster.executor import Executor

from ..errors import UserError
from ..model_io import ModelSource, worker_location
from .base import Stage, StageContext
from .shares import WindowShare, split_windows


def perplexity(executor: Executor, location: str, compressed: bool, dtype_name: str, windows: torch.Tensor,
               batch_size: int, desc: str = "evaluate", progress: bool = True, verify: bool = True) -> float:
    """exp(mean next-token NLL) of the model at `location` over non-overlapping windows [M, L]."""
    n = executor.width(windows.shape[0])
    with executor.group(WindowShare, n) as shares:
        n_layers = shares.get(shares.each("load", [(location, compressed, dtype_name, s, batch_size, verify)
                                                   for s in split_windows(windows, n)]))[0]
        desc = desc + (f" ({n} workers)" if n > 1 else "")
        for i in tqdm(range(n_layers), desc=desc, unit="layer", disable=not progress):
            shares.get(shares.all("forward", i))
        parts = shares.get(shares.all("nll"))
    return math.exp(sum(p[0] for p in parts) / sum(p[1] for p in parts))


def stored_params(source: ModelSource, layers_name: str) -> dict[str, int]:
    """Parameter counts from the shard headers: all tensors, and the 2-D weights inside the
    decoder layers (dense linears, or the modules that replaced them).

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


EVALUATION = "evaluation.json"


class Evaluate(Stage):
    name = "evaluate"
    contract = "2"
    outputs = (EVALUATION,)
    fields = ("data.eval_samples", "data.seq_len", "run.eval_dense", "evaluate")

    def run(self, ctx: StageContext) -> None:
        cfg, store = ctx.cfg, ctx.store
        windows, bs = ctx.windows.eval, cfg.data.batch_size
        ppl_c = perplexity(ctx.executor, store.worker_url() + "/checkpoint", True, ctx.dtype_name, windows, bs,
                           "evaluate compressed", ctx.progress)
        if not math.isfinite(ppl_c):  # never leave a broken model published
            store.rm("checkpoint")
            raise UserError(f"the compressed model's perplexity is {ppl_c}: the checkpoint was removed")
        ppl_d = perplexity(ctx.executor, worker_location(cfg.model), False, ctx.dtype_name, windows, bs,
                           "evaluate dense", ctx.progress) if cfg.run.eval_dense else None
        ckpt = ModelSource(store.url("checkpoint"), verify=False)  # the shares verified it; headers only here
        before, after = stored_params(ctx.source, ctx.layers_name), stored_params(ckpt, ctx.layers_name)
        plan = ctx.method.final_plan(store)
        report = {
            "model": cfg.model, "method": cfg.compress.method, "ratio": cfg.compress.ratio,
            "data": {"source": cfg.data.source, "calib_samples": cfg.data.calib_samples, "seq_len": cfg.data.seq_len,
                     "eval_windows": int(windows.shape[0])},
            "perplexity": {"dense": ppl_d, "compressed": ppl_c},
            "params": {"linear_before": before["linear"], "linear_after": after["linear"],
                       "total_before": before["total"], "total_after": after["total"]},
            "achieved_ratio": {"linear": 1 - after["linear"] / before["linear"],
                               "total": 1 - after["total"] / before["total"]},
            "ranks": {"min": min(plan.ranks.values()), "max": max(plan.ranks.values()), "modules": len(plan.ranks)},
            "checkpoint": store.url("checkpoint"),
            "timings_s": {},
        }
        if cfg.evaluate.tasks:
            from ..checkpoint import load_compressed, load_dense
            models = {"compressed": lambda: load_compressed(store.url("checkpoint"), ctx.dtype_name, verify=False)}
            if cfg.run.eval_dense:
                models["dense"] = lambda: load_dense(worker_location(cfg.model), ctx.dtype_name)
            report["zero_shot"] = accuracy(models, ckpt.tokenizer(), cfg.evaluate.tasks, cfg.evaluate.limit,
                                           cfg.evaluate.batch_size)
        store.write_json(EVALUATION, report)


def accuracy(models: dict[str, Callable[[], Any]], tokenizer, tasks: list[str], limit: int,
             batch_size: int) -> dict[str, Any]:
    """Zero-shot accuracy of each named model, loaded whole in this process one after another
    (lm-eval needs the whole model): {"tasks", "split", "limit", name: {task: {acc, acc_norm, n}}}."""
    import gc

    from ..zeroshot import SPLIT, zero_shot
    out: dict[str, Any] = {"tasks": tasks, "split": SPLIT, "limit": limit}
    for name, load in models.items():
        model = load()
        out[name] = zero_shot(model, tokenizer, tasks, limit, batch_size)
        del model
        gc.collect()
    return out


def write_report(store, report: dict[str, Any]) -> None:
    store.write_json("report.json", report)
    store.write_text("report.md", render_markdown(report))


def print_summary(report: dict[str, Any], output: str) -> None:
    """The lines a finished compression prints (the CLI and a Ray Job's driver alike)."""
    ppl = report["perplexity"]
    print(f"checkpoint: {report['checkpoint']}")
    print(f"perplexity: compressed {ppl['compressed']:.3f}"
          + (f", dense {ppl['dense']:.3f}" if ppl.get("dense") is not None else ""))
    print(f"removed: {report['achieved_ratio']['linear']:.4f} of decoder linear parameters")
    print(f"report: {output.rstrip('/')}/report.md")


def render_markdown(r: dict[str, Any]) -> str:
    p, t = r["params"], r["timings_s"]
    lines = ["# soco compression report", "",
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
    if r.get("zero_shot"):
        lines += ["", zero_shot_table(r["zero_shot"])]
    return "\n".join(lines) + "\n"


def zero_shot_table(z: dict[str, Any]) -> str:
    """Markdown: per task, acc (and acc_norm) of the dense and the compressed model."""
    dense = z.get("dense") or {}
    rows = [f"Zero-shot accuracy (lm-eval, {z['split']} split"
            + (f", first {z['limit']} documents per task" if z.get("limit") else "") + "):", "",
            "| task | documents | dense acc | compressed acc | dense acc_norm | compressed acc_norm |",
            "|---|---|---|---|---|---|"]
    for task, c in z["compressed"].items():
        d = dense.get(task, {})
        rows.append(f"| {task} | {c['n']} | {_pct(d.get('acc'))} | {_pct(c.get('acc'))} | {_pct(d.get('acc_norm'))} "
                    f"| {_pct(c.get('acc_norm'))} |")
    return "\n".join(rows)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x < 1e4 else f"{x:.3g}"
