"""`soco submit CONFIG --address http://HOST:8265`, `soco status JOB`, `soco logs JOB`.

`submit` validates the config here (a bad key or value fails before anything is sent),
makes local paths absolute, and submits `python -m pipeline.jobs run <config>` through
cluster/jobs.py with a runtime_env that ships this checkout's code (`working_dir`, without
.venv, run folders or benchmark outputs). On the cluster the job's driver runs
`pipeline.compress`, which joins that cluster through `$RAY_ADDRESS` (Ray sets it for jobs),
so every stage runs as Ray tasks and actors there. The run folder should be storage every
node reaches (s3://, gs://, or a shared filesystem); a local path only works for a
single-node cluster.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import zlib
from typing import Any

from cluster import jobs
from cluster.ray_runtime import project_runtime_env

from .errors import UserError
from .model_io import worker_location
from .sweep import from_payload, load_sweep, run_and_report, to_payload

JOB_COMMANDS = ("submit", "status", "logs")


def add_job_parsers(sub: Any) -> None:
    s = sub.add_parser("submit", help="submit a compression run to a Ray cluster as a Ray Job; prints the job id")
    s.add_argument("config", help="YAML run config (see configs/)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    s.add_argument("--address", help="the head's dashboard, e.g. http://HOST:8265 (default: $RAY_ADDRESS)")
    s.add_argument("--submission-id", help="job id to use (default: one chosen by Ray)")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job's processes, e.g. AWS_ACCESS_KEY_ID=... (repeatable)")
    s.add_argument("--python", default="python", help="Python interpreter on the cluster's nodes (default: python)")
    s.add_argument("--wait", action="store_true", help="follow the job's logs until it ends; exit 1 unless it succeeded")
    for name, text in (("status", "state of a submitted job"), ("logs", "logs of a submitted job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job", help="job id printed by `soco submit`")
        p.add_argument("--address", help="the head's dashboard, e.g. http://HOST:8265 (default: $RAY_ADDRESS)")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing until the job ends")


def encode(obj: Any) -> str:
    """A job's argument: URL-safe base64 of its zlib-compressed JSON (a sweep of many runs
    stays far below the command-line limit)."""
    return base64.urlsafe_b64encode(zlib.compress(json.dumps(obj).encode(), 9)).decode()


def decode(payload: str) -> Any:
    return json.loads(zlib.decompress(base64.urlsafe_b64decode(payload.encode())))


def job_payload(cfg) -> str:
    """The resolved config as the job's argument; local paths absolute (the job runs in
    another folder), the job joins the cluster it runs on."""
    data = cfg.to_dict()
    data["model"], data["output"] = worker_location(cfg.model), worker_location(cfg.output)
    data["data"]["source"] = worker_location(cfg.data.source)
    data["ray"]["address"] = ""
    return encode(data)


def sweep_payload(sweep) -> str:
    """An expanded sweep as the job's argument (its paths are absolute already); its runs and
    its Ray executor join the cluster the job runs on."""
    data = to_payload(sweep)
    for run in data["runs"]:
        run["config"]["ray"]["address"] = ""
    data["base"].get("ray", {}).pop("address", None)
    return encode(data)


def is_sweep(path: str) -> bool:
    """A sweep file lists `models`; a run config names one `model`."""
    import yaml
    try:
        data = yaml.safe_load(open(path, "rb").read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False  # load_config says what is wrong with it
    return isinstance(data, dict) and "models" in data


def submit(args: argparse.Namespace) -> int:
    from .config import load_config
    if is_sweep(args.config):
        sweep = load_sweep(args.config, args.overrides)
        entry, output = f"sweep {sweep_payload(sweep)}", sweep.root
    else:
        cfg = load_config(args.config, args.overrides)
        entry, output = f"run {job_payload(cfg)}", cfg.output
    env = {}
    for item in args.env:
        if "=" not in item:
            raise UserError(f"--env expects KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        env[k] = v
    client, job = jobs.submit(args.address, f"{args.python} -m pipeline.jobs {entry}",
                              project_runtime_env(env), args.submission_id,
                              {"soco_config": os.path.basename(args.config), "soco_output": output})
    print(job, flush=True)
    if not args.wait:
        return 0
    jobs.follow(client, job)
    return 0 if jobs.final_status(client, job) == "SUCCEEDED" else 1


def run_job_command(args: argparse.Namespace) -> int:
    if args.command == "submit":
        return submit(args)
    if args.command == "status":
        print(jobs.status_line(args.address, args.job))
    else:
        jobs.print_logs(args.address, args.job, args.follow)
    return 0


def _job_main(payload: str) -> int:
    """Inside the job: run the compression and print where its results are."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .config import from_dict
    from .run import compress
    from .stages.evaluate import print_summary
    try:
        cfg = from_dict(decode(payload))
        print(f"soco job: model {cfg.model}, method {cfg.compress.method}, ratio {cfg.compress.ratio}, "
              f"output {cfg.output}", flush=True)
        report = compress(cfg, progress=False)
    except UserError as e:
        print(f"soco: error: {e}", file=sys.stderr)
        return 2
    print_summary(report, cfg.output)
    print("stage seconds: " + json.dumps(report["timings_s"]), flush=True)
    return 0


def _sweep_main(payload: str) -> int:
    """Inside the job: run the sweep; exit as `soco sweep` would."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sweep = from_payload(decode(payload))
    print(f"soco sweep job: {len(sweep.runs)} runs under {sweep.root}", flush=True)
    return run_and_report(sweep, progress=False)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("run", "sweep"):
        sys.exit((_job_main if sys.argv[1] == "run" else _sweep_main)(sys.argv[2]))
    print("usage: python -m pipeline.jobs run|sweep <payload>  (started by `soco submit`)", file=sys.stderr)
    sys.exit(2)
