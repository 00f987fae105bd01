"""`soco` command line: compress a model from a YAML config, evaluate a checkpoint.

Every bad input ends with one line on stderr and exit code 2; a run folder another run is
writing, with exit code 3 ("busy").
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from cluster.errors import Busy

from . import __version__, termination
from .errors import UserError
from .exits import EXIT, result_line, run_status


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soco", description="SVD compression of causal LMs with a learned spectrum")
    p.add_argument("--version", action="version", version=f"soco-pipeline {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="run a compression job from a YAML config")
    c.add_argument("config", help="YAML run config (see configs/)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set compress.ratio=0.6 (repeatable)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--force", action="store_true",
                   help="write into a run folder that holds a run of another model or data source")
    c.add_argument("--address", help="join this Ray cluster (host:6379, ray://host:10001, auto); default: "
                                     "$RAY_ADDRESS, else a local Ray started in-process")
    w = sub.add_parser("sweep", help="run models x methods x ratios from a sweep file, one run folder each")
    w.add_argument("sweep", help="sweep YAML (see pipeline/sweep.py and the README)")
    w.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value of every run (repeatable)")
    w.add_argument("--quiet", action="store_true", help="no progress bars")
    w.add_argument("--force", action="store_true", help="write into run folders that hold another model's run")
    e = sub.add_parser("eval", help="perplexity and parameter counts of a soco checkpoint")
    e.add_argument("checkpoint", help="checkpoint folder (local path or fsspec URL)")
    e.add_argument("--data", default="bundled:wiki", help="text source (default bundled:wiki)")
    e.add_argument("--text-field", default="text")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--eval-samples", type=int, default=32, help="held-out windows (0 = all)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--no-verify", action="store_true", help="skip checking the shards against their recorded SHA-256")
    e.add_argument("--tasks", default="", help="zero-shot tasks, e.g. piqa,hellaswag,winogrande,arc_easy,arc_challenge,"
                                               "openbookqa,boolq (lm-eval, validation splits)")
    e.add_argument("--limit", type=int, default=0, help="first N documents per zero-shot task (0 = all)")
    from .jobs import add_job_parsers
    add_job_parsers(sub)  # submit / status / logs (Ray Jobs)
    return p



def cmd_compress(args: argparse.Namespace) -> int:
    from .config import load_config
    from .run import compress
    from .stages.evaluate import print_summary
    cfg = load_config(args.config, args.overrides)
    if args.address:
        cfg.ray.address = args.address
    report = compress(cfg, progress=not args.quiet, force=args.force)
    print_summary(report, cfg.output)
    status, ran = run_status(report)
    _result(status, output=cfg.output, ran_stages=ran, resumed_stages=report["resumed_stages"],
            perplexity=report["perplexity"], achieved_ratio=report["achieved_ratio"]["linear"],
            seconds=round(sum(report["timings_s"].values()), 1))
    return EXIT[status]


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import load_sweep, run_and_report
    sweep = load_sweep(args.sweep, args.overrides)
    print(f"soco sweep: {len(sweep.runs)} runs under {sweep.root} "
          f"({sum(r.leader for r in sweep.runs)} calibrations)", file=sys.stderr, flush=True)
    return run_and_report(sweep, progress=not args.quiet, force=args.force)


def _result(status: str, **fields) -> None:
    """The last line on stdout of `soco compress` and `soco sweep`: one JSON object for log scrapers."""
    print(result_line(status, **fields), flush=True)


def cmd_eval(args: argparse.Namespace) -> int:
    from cluster.executor import LocalExecutor

    from .checkpoint import entry_modules, soco_entry
    from .data import load_windows
    from .model_io import ModelSource, build_skeleton, find_layers
    from .run import set_threads
    from .stages.evaluate import perplexity, stored_params
    set_threads(0)
    from .zeroshot import parse_tasks
    if args.seq_len < 1 or args.batch_size < 1 or args.eval_samples < 0 or args.limit < 0:
        raise UserError("--seq-len and --batch-size must be >= 1, --eval-samples and --limit >= 0")
    tasks = parse_tasks(args.tasks)
    from cluster.storage import check_reachable
    check_reachable(args.checkpoint, "checkpoint")
    check_reachable(args.data, "data source")
    src = ModelSource(args.checkpoint, verify=not args.no_verify)
    dtype_name = str(getattr(src.config, "dtype", None) or "float32").replace("torch.", "")
    if dtype_name not in ("float32", "bfloat16", "float16"):
        dtype_name = "float32"
    entry = soco_entry(src.config)
    layers_name, _ = find_layers(build_skeleton(src.config))
    w = load_windows(args.data, args.text_field, src.tokenizer(), 1, args.seq_len, args.eval_samples)
    ppl = perplexity(LocalExecutor(), src.location, entry is not None, dtype_name, w.eval, args.batch_size,
                     progress=not args.quiet, verify=not args.no_verify)
    out = {"checkpoint": args.checkpoint, "perplexity": ppl, "eval_windows": int(w.eval.shape[0]),
           "seq_len": args.seq_len, "params": stored_params(src, layers_name),
           "compressed_modules": len(entry_modules(entry)) if entry else 0}
    if tasks:  # a soco checkpoint or a dense model folder alike
        from .checkpoint import load_compressed, load_dense
        from .stages.evaluate import accuracy
        load = load_compressed if entry is not None else load_dense
        out["zero_shot"] = accuracy({"model": lambda: load(src.location, dtype_name)}, src.tokenizer(), tasks,
                                    args.limit, args.batch_size)
    print(json.dumps(out, indent=2))
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "compress":
        return cmd_compress(args)
    if args.command == "sweep":
        return cmd_sweep(args)
    from .jobs import JOB_COMMANDS, run_job_command
    if args.command in JOB_COMMANDS:
        return run_job_command(args)
    return cmd_eval(args)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    import threading
    main_thread = threading.current_thread() is threading.main_thread()  # signals can only be set there
    previous = termination.install() if main_thread else None
    summary = _result if args.command in ("compress", "sweep") else (lambda *a, **k: None)
    try:
        try:
            return _dispatch(args)
        except Exception as e:  # an error that a signal caused is the interruption (pipeline/termination.py)
            stop = termination.pending()
            if stop is None:
                raise
            raise stop from e
    except Busy as e:
        print(f"soco: busy: {e}", file=sys.stderr)
        summary("busy", error=str(e))
        return EXIT["busy"]
    except UserError as e:
        print(f"soco: error: {e}", file=sys.stderr)
        summary("bad_input", error=str(e))
        return EXIT["bad_input"]
    except termination.Terminated as e:
        print(f"soco: {e}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("soco: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or a failure of the machine: the traceback, then the summary line
        import traceback
        traceback.print_exc()
        summary("failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return EXIT["failed"]
    finally:
        if main_thread:
            termination.restore(previous)


if __name__ == "__main__":
    sys.exit(main())
