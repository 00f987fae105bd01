"""Step time of SoCo's learn stage, read from finished run folders: the A/B behind the issue's
rule that the learn stage must not get slower per step.

Each run folder's `scores/final.safetensors` holds the training curve (one entry per step, with
`seconds` since training began) and `learn.json` the learn stage's wall time. Runs made by
older commits have the same curve (their entries lack the per-step `step_s` and
`active_params` that later commits add), so a run of the code as it was when the rule was set
and a run of today's code compare on the same figures:

- per stage, the mean time between consecutive curve entries: the step and the held-out
  evaluation or checkpoint that followed it, measured the same way by every commit;
- per stage, the mean of `step_s` (the step alone) and of `active_params` (the scored matrices'
  multiply-adds per token), where the curve has them;
- the training loop's time per step (the last entry's `seconds` over the steps) and the learn
  stage's wall time per step (with the teacher targets it computed, if any).

    .venv/bin/python bench/steptime.py --run "plain soco, commit 5848bd0=bench/out/steptime-filing/soco" \\
        --run "configs/soco-generated.yaml=bench/out/steptime-gencs-v2/soco(...)" \\
        --results bench/results/steptime-vs-filing-curves

Only run folders that ran alone on one machine, one after the other, are worth comparing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cluster.storage import Storage
from pipeline.stages.learning.finalize import STAGE_NAMES, step_costs
from pipeline.stages.learning.scored_model import FINAL_SCORES


def summary(run: Path) -> dict:
    """Per-stage and overall step-time figures of one run folder (module docstring): the
    learn stage's own per-stage step costs (finalize.step_costs, from the entries that record
    them) beside the time between curve entries, which every commit's curve records."""
    curve = json.loads(Storage(str(run)).tensor_metadata(FINAL_SCORES)["curve"])
    learn = json.loads((run / "learn.json").read_text())
    costs = step_costs(curve)
    gaps: dict[str, list[float]] = {}
    for before, e in zip([{"seconds": 0.0}] + curve, curve):
        gaps.setdefault(STAGE_NAMES.get(e["stage"], str(e["stage"])), []).append(e["seconds"] - before["seconds"])
    steps = len(curve)
    return {
        "run": str(run), "steps": steps,
        "stages": {name: {"steps": len(g), "mean_gap_s": round(sum(g) / len(g), 3),
                          "mean_step_s": costs.get(name, {}).get("mean_step_s"),
                          "mean_active_params": costs.get(name, {}).get("mean_active_params")}
                   for name, g in gaps.items()},
        "loop_s_per_step": round(curve[-1]["seconds"] / steps, 3),
        "learn_stage_s": round(float(learn["train_seconds"]), 1),
        "learn_stage_s_per_step": round(float(learn["train_seconds"]) / steps, 3),
    }


def cell(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(rows: dict[str, dict]) -> str:
    """Markdown: one column per run, and the ratio of each later run to the first."""
    names = list(rows)
    head = "| | " + " | ".join(names) + " | " + " | ".join(f"{n} / {names[0]}" for n in names[1:]) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(names) - 1)]

    def line(label: str, get, fmt: str = "{:.2f}", ratio: bool = True) -> None:
        vals = [get(rows[n]) for n in names]
        ratios = [None if not ratio or v is None or vals[0] in (None, 0) else v / vals[0] for v in vals[1:]]
        lines.append(f"| {label} | " + " | ".join(cell(v, fmt) for v in vals) + " | "
                     + " | ".join(cell(r, "{:.2f}x") for r in ratios) + " |")

    for stage in STAGE_NAMES.values():
        if all(stage in r["stages"] for r in rows.values()):
            line(f"{stage}: steps", lambda r, s=stage: r["stages"][s]["steps"], "{:d}", ratio=False)
            line(f"{stage}: mean s between curve entries (step + its evaluation)",
                 lambda r, s=stage: r["stages"][s]["mean_gap_s"])
            line(f"{stage}: mean step s (step alone)", lambda r, s=stage: r["stages"][s]["mean_step_s"])
            line(f"{stage}: scored-matrix multiply-adds per token (M)",
                 lambda r, s=stage: None if r["stages"][s]["mean_active_params"] is None
                 else r["stages"][s]["mean_active_params"] / 1e6, "{:.1f}")
    line("training loop s per step (evaluations included)", lambda r: r["loop_s_per_step"])
    line("learn stage wall time s per step (teacher targets computed here included)",
         lambda r: r["learn_stage_s_per_step"])
    lines.append("")
    lines += [f"- {n}: `{rows[n]['run']}`, {rows[n]['steps']} steps, learn stage {rows[n]['learn_stage_s']} s"
              for n in names]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="NAME=FOLDER",
                    help="a finished soco run folder and its column name; the first is the baseline")
    ap.add_argument("--results", required=True, help="writes <results>.md and <results>.json")
    a = ap.parse_args()
    rows = {}
    for spec in a.run:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            ap.error(f"--run takes NAME=FOLDER, got {spec!r}")
        run = Path(folder)
        if not (run / FINAL_SCORES).is_file() or not (run / "learn.json").is_file():
            ap.error(f"{folder}: not a finished soco run folder (no {FINAL_SCORES} or learn.json)")
        rows[name] = summary(run)
    out = Path(a.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = table(rows)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
