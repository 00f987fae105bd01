"""`soco sweep SWEEP.yaml`: models x methods x ratios (x any config key given as a list), one
run folder each under a sweep root, and one table of all their results.

    root: runs/sweep              # run folders go below it: <model>/<method>-r<ratio>[-<key>=<value>...]
    base: default.yaml            # optional run config every run starts from (relative to this file)
    models: [bundled:smollm2-135m]
    methods: [svd-llm, svd-llm+mgaa, lorap]
    ratios: [0.2, 0.4, 0.6]
    grid: {data.calib_samples: [32, 64]}   # optional: more config keys, each a list of values
    set: {data.eval_samples: 16}           # optional: one value for every run
    parallel: 1                   # runs at once: > 1 runs each run as a Ray task (below)
    cpus_per_run: 2               # CPUs a run's Ray task reserves (and its torch threads)

Every run is an ordinary `pipeline.compress` in its own folder, so everything a run does
holds here: its lease, its checksums, resume, skipping what is committed (re-running a sweep
skips finished runs: all their stages are resumed). Runs whose calibration is the same (same
model, data and statistics: the calibrate stage's key) share it: the first of them
calibrates, the others copy its committed files in (hard links on a local disk) instead of
recomputing them; and the dense model's perplexity is measured once per model and evaluation
data, by the first run, and the table gives it to the others.

Scheduling: first the runs that calibrate, then the rest. With `parallel: 1` one after
another in this process, each run distributing its own stages as its `ray` section says.
With `parallel: N` every run is one Ray task reserving `cpus_per_run` CPUs, Ray starting as
many as the cluster's resources allow (at most N submitted at once), and each run's stages
run inside its task. A failed run does not stop the others; the sweep reports it.

Results under the root: `results.parquet` (one row per run; with `evaluate.tasks` set, also
the mean zero-shot accuracy of each checkpoint), `results.md`, and per model
`<model>.png`: perplexity against achieved ratio, one line per method, the Pareto front
(runs no other run beats on both) marked.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from cluster.errors import Busy
from cluster.executor import Executor, LocalExecutor, RayExecutor
from cluster.storage import Storage

from .config import apply_overrides, from_dict, read_yaml_mapping
from .errors import UserError
from .exits import EXIT, result_line, run_status, status_counts
from .model_io import worker_location

KEYS = ("root", "base", "models", "methods", "ratios", "grid", "set", "parallel", "cpus_per_run")


@dataclass
class SweepRun:
    """One run of a sweep: its folder name below the root, its config, the swept values."""

    name: str
    config: dict[str, Any]
    values: dict[str, Any]
    leader: bool = False  # calibrates for the runs that share its calibration
    dense_group: str = ""  # runs with the same model and evaluation data share one dense perplexity
    donors: list[str] = field(default_factory=list)  # run folders it may copy committed stages from


@dataclass
class Sweep:
    root: str
    runs: list[SweepRun]
    parallel: int = 1
    cpus_per_run: int = 1
    base: dict[str, Any] = field(default_factory=dict)


def _slug(value: Any) -> str:
    """A folder-name-safe rendering of a swept value (bundled:smollm2-135m -> smollm2-135m)."""
    text = str(value).split(":", 1)[-1].rstrip("/")
    text = text.rsplit("/", 1)[-1] or text
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text)


def _as_list(spec: dict[str, Any], key: str, default: list[Any] | None = None) -> list[Any]:
    value = spec.get(key, default)
    if value is None:
        raise UserError(f"sweep key '{key}' is required (a list)")
    value = value if isinstance(value, list) else [value]
    if not value:
        raise UserError(f"sweep key '{key}' must list at least one value")
    return value


def load_sweep(path: str, overrides: list[str] | None = None) -> Sweep:
    """Read and check a sweep file; every run's config is validated before anything runs."""
    spec = read_yaml_mapping(path, "sweep")
    base = read_yaml_mapping(Path(path).parent / str(spec["base"]), "sweep base config") if spec.get("base") else {}
    return expand(spec, base, overrides or [])


def expand(spec: dict[str, Any], base: dict[str, Any], overrides: list[str]) -> Sweep:
    """The runs of a sweep spec (already parsed), each config validated."""
    import copy
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise UserError(f"unknown sweep key '{unknown[0]}' (sweep keys: {', '.join(KEYS)})")
    if not spec.get("root") or not isinstance(spec["root"], str):
        raise UserError("sweep key 'root' must name the folder the run folders go below")
    grid = spec.get("grid") or {}
    fixed = spec.get("set") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError("sweep key 'grid' must map config keys to non-empty lists of values")
    if not isinstance(fixed, dict):
        raise UserError("sweep key 'set' must map config keys to values")
    parallel, cpus = spec.get("parallel", 1), spec.get("cpus_per_run", 1)
    for key, v in (("parallel", parallel), ("cpus_per_run", cpus)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"sweep key '{key}' must be an integer >= 1, got {v!r}")
    axes = {"model": _as_list(spec, "models"), "compress.method": _as_list(spec, "methods"),
            "compress.ratio": _as_list(spec, "ratios")} | {str(k): v for k, v in grid.items()}
    root = worker_location(spec["root"].rstrip("/"))
    runs, seen = [], set()
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo))
        extra = "".join(f"-{k.rsplit('.', 1)[-1]}={_slug(v)}" for k, v in list(values.items())[3:])
        name = f"{_slug(values['model'])}/{values['compress.method']}-r{values['compress.ratio']}{extra}"
        if name in seen:
            raise UserError(f"sweep lists run {name} twice (a value repeated in a list?)")
        seen.add(name)
        data = copy.deepcopy(base)
        sets = [f"{k}={json.dumps(v)}" for k, v in fixed.items()] + overrides
        sets += [f"{k}={json.dumps(v)}" for k, v in values.items()] + [f"output={json.dumps(f'{root}/{name}')}"]
        try:
            cfg = from_dict(apply_overrides(data, sets))
        except UserError as e:
            raise UserError(f"sweep run {name}: {e}") from None
        config = cfg.to_dict()  # local paths absolute: a run may execute in a Ray worker elsewhere
        config["model"], config["output"] = worker_location(cfg.model), worker_location(cfg.output)
        config["data"]["source"] = worker_location(cfg.data.source)
        runs.append(SweepRun(name, config, values))
    plan_sharing(runs)
    return Sweep(root, runs, parallel, cpus, base)


def plan_sharing(runs: list[SweepRun]) -> None:
    """Mark the first run of each calibration as its leader and give each later run with that
    calibration the folders of the runs before it, the leader first: it copies the leader's
    calibration in, and any stage an earlier run committed with the same key, and a SoCo run
    takes the teacher targets an earlier one committed for the same inputs. Only the first
    run of each model and evaluation data measures the dense model."""
    from .manifest import stage_keys
    from .stages.calibrate import Calibrate
    same_calibration: dict[str, list[str]] = {}
    dense_seen: set[str] = set()
    for run in runs:
        cfg = from_dict(run.config)
        earlier = same_calibration.setdefault(stage_keys(cfg, [Calibrate()])["calibrate"], [])
        run.donors, run.leader = list(earlier), not earlier
        earlier.append(cfg.output)
        d = cfg.data
        dense_key = json.dumps([cfg.model, d.source, d.text_field, d.seq_len, d.eval_samples, d.batch_size,
                                cfg.run.dtype])
        run.config["run"]["eval_dense"] = dense_key not in dense_seen
        run.dense_group = dense_key
        dense_seen.add(dense_key)


def _run_one(item: tuple[str, dict[str, Any], list[str], bool]) -> dict[str, Any]:
    """One run of the sweep (module level: it also runs as a Ray task). Its outcome, never an
    exception: a failed run does not stop the sweep."""
    name, config, donors, force = item
    out = _outcome(config, donors, force)
    print(f"soco sweep: {name}: {out['status']}" + (f" ({out['error']})" if "error" in out else
                                                    f", ppl {out['ppl']:.4g}, ran {', '.join(out['ran_stages']) or 'nothing'}"),
          file=sys.stderr, flush=True)
    return out


def _outcome(config: dict[str, Any], donors: list[str], force: bool) -> dict[str, Any]:
    from .run import compress
    try:
        report = compress(from_dict(config), progress=False, force=force, reuse_from=donors)
    except Busy as e:
        return {"status": "busy", "error": str(e)}
    except UserError as e:
        return {"status": "bad_input", "error": str(e)}
    except Exception as e:  # noqa: BLE001 - reported in the sweep's table and exit code
        return {"status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    status, ran = run_status(report)
    zs = (report.get("zero_shot") or {}).get("compressed") or {}
    accs = [r.get("acc_norm", r.get("acc")) for r in zs.values()]
    return {"status": status, "ran_stages": ran,
            "zero_shot_mean": sum(accs) / len(accs) if accs else None,
            "adopted_stages": sorted(report.get("adopted_stages", {})),
            "ppl": report["perplexity"]["compressed"], "dense_ppl": report["perplexity"].get("dense"),
            "achieved_ratio": report["achieved_ratio"]["linear"], "linear_params": report["params"]["linear_after"],
            "seconds": round(sum(report["timings_s"].values()), 1)}


def executor_for(sweep: Sweep) -> Executor:
    """In-process for one run at a time; else Ray, with the base config's connection."""
    if sweep.parallel <= 1:
        return LocalExecutor()
    ray_cfg = from_dict(sweep.base | {"output": sweep.root}).ray
    return RayExecutor(ray_cfg.settings(), max_in_flight=sweep.parallel)


def run_sweep(sweep: Sweep, progress: bool = True, force: bool = False) -> list[dict[str, Any]]:
    """Run every run (leaders first), gather the results table; one row per run, in order."""
    items = []
    for run in sweep.runs:
        config = json.loads(json.dumps(run.config))
        if sweep.parallel > 1:  # the run is one Ray task: its stages run inside it
            config["ray"]["enabled"] = False
            config["run"]["threads"] = sweep.cpus_per_run
        items.append((run.name, config, run.donors, force))
    outcomes: dict[int, dict[str, Any]] = {}
    with executor_for(sweep) as ex:
        for leaders in (True, False):
            phase = [k for k, r in enumerate(sweep.runs) if r.leader == leaders]
            if phase:
                results = ex.map(_run_one, [items[k] for k in phase], "sweep", progress, cpus=sweep.cpus_per_run)
                outcomes.update(zip(phase, results))
    rows = table_rows(sweep, [outcomes[k] for k in range(len(sweep.runs))])
    write_results(Storage(sweep.root), rows)
    return rows


def table_rows(sweep: Sweep, outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per run; the dense perplexity of each model and evaluation data filled in
    from the run that measured it."""
    dense = {r.dense_group: o.get("dense_ppl") for r, o in zip(sweep.runs, outcomes)
             if o.get("dense_ppl") is not None}
    rows = []
    for run, out in zip(sweep.runs, outcomes):
        row = {"run": run.name, "model": run.values["model"], "method": run.values["compress.method"],
               "ratio": float(run.values["compress.ratio"])}
        row |= {k: json.dumps(v) if isinstance(v, (list, dict)) else v
                for k, v in run.values.items() if k not in ("model", "compress.method", "compress.ratio")}
        row |= {"status": out["status"], "ppl": out.get("ppl"), "dense_ppl": dense.get(run.dense_group),
                "achieved_ratio": out.get("achieved_ratio"), "linear_params": out.get("linear_params"),
                "zero_shot_mean": out.get("zero_shot_mean"),
                "seconds": out.get("seconds"), "adopted_stages": ",".join(out.get("adopted_stages", [])),
                "error": out.get("error", "")}
        rows.append(row)
    return rows


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """For (achieved ratio, perplexity) points: True where no other point removes at least as
    much with a perplexity at least as low, and is better in one of the two."""
    out = []
    for k, (r, p) in enumerate(points):
        out.append(not any(r2 >= r and p2 <= p and (r2 > r or p2 < p) for j, (r2, p2) in enumerate(points) if j != k))
    return out


def write_results(store: Storage, rows: list[dict[str, Any]]) -> None:
    """results.parquet, results.md and one PNG per model, under the sweep root."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    store.makedirs()
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    store.write_bytes("results.parquet", buf.getvalue())
    store.write_text("results.md", render_markdown(rows))
    for model in dict.fromkeys(r["model"] for r in rows):
        png = plot_model([r for r in rows if r["model"] == model], model)
        if png is not None:
            store.write_bytes(f"{_slug(model)}.png", png)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.5f}" if x < 1 else (f"{x:.2f}" if x < 1e4 else f"{x:.3e}")
    return str(x)


def render_markdown(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in rows[0] if c not in ("error",)] if rows else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    failed = [r for r in rows if r["error"]]
    if failed:
        lines += ["", "Runs that did not finish:", ""] + [f"- {r['run']}: {r['status']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def plot_model(rows: list[dict[str, Any]], model: str) -> bytes | None:
    """PNG bytes: perplexity against achieved ratio, a line per method, Pareto front circled."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [r for r in rows if r["ppl"] is not None and r["achieved_ratio"] is not None]
    if not done:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, method in enumerate(dict.fromkeys(r["method"] for r in done)):
        pts = sorted((r["achieved_ratio"], r["ppl"]) for r in done if r["method"] == method)
        ax.plot(*zip(*pts), marker="o", color=f"C{k}", label=method)
    front = [r for r, on in zip(done, pareto([(r["achieved_ratio"], r["ppl"]) for r in done])) if on]
    ax.scatter([r["achieved_ratio"] for r in front], [r["ppl"] for r in front], s=160, facecolors="none",
               edgecolors="black", label="Pareto front")
    dense = next((r["dense_ppl"] for r in done if r["dense_ppl"] is not None), None)
    if dense is not None:
        ax.axhline(dense, color="grey", lw=0.8, ls="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("removed fraction of decoder linear parameters")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_title(str(model))
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def to_payload(sweep: Sweep) -> dict[str, Any]:
    """The expanded sweep as JSON-able data (`soco submit` sends it to the cluster as is)."""
    return dataclasses.asdict(sweep)


def from_payload(data: dict[str, Any]) -> Sweep:
    return Sweep(**(data | {"runs": [SweepRun(**r) for r in data["runs"]]}))


def sweep_status(rows: list[dict[str, Any]]) -> str:
    """The sweep's outcome for the exit code: failed > bad_input > busy > done > nothing_to_do."""
    statuses = {r["status"] for r in rows}
    for status in ("failed", "bad_input", "busy", "done"):
        if status in statuses:
            return status
    return "nothing_to_do"


def run_and_report(sweep: Sweep, progress: bool = True, force: bool = False) -> int:
    """Run the sweep, then print where its results are and the closing JSON line (the same
    for `soco sweep` and a submitted sweep job); returns the exit code."""
    rows = run_sweep(sweep, progress=progress, force=force)
    status = sweep_status(rows)
    print(f"results: {sweep.root}/results.md, results.parquet", flush=True)
    print(result_line(status, root=sweep.root, runs=status_counts(rows)), flush=True)
    return EXIT[status]
