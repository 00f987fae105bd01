"""Ray Jobs: `soco submit CONFIG --address http://HOST:8265`, `soco status JOB`, `soco logs JOB`.

`submit` validates the config here (a bad key or value fails before anything is sent),
makes local paths absolute, and submits `python -m cluster.jobs run <config>` with a
runtime_env that ships this checkout's code (`working_dir`, without .venv, run folders or
benchmark outputs). On the cluster the job's driver runs `pipeline.compress`, which joins
that cluster through `$RAY_ADDRESS` (Ray sets it for jobs), so every stage runs as Ray
tasks and actors there. The run folder should be storage every node reaches (s3://, gs://,
or a shared filesystem); a local path only works for a single-node cluster.

The address is the head's dashboard (`http://HOST:8265`); without `--address`,
`$RAY_API_SERVER_ADDRESS` or `$RAY_ADDRESS` is used.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from typing import Any

from pipeline.errors import UserError

JOB_COMMANDS = ("submit", "status", "logs")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


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


def _address(given: str | None) -> str:
    address = given or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("no Ray cluster given: pass --address http://HOST:8265 (the head's dashboard) or set RAY_ADDRESS")
    return address


def _client(given: str | None):
    from ray.job_submission import JobSubmissionClient
    address = _address(given)
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot reach the Ray job server at {address}: {str(e).splitlines()[0]}") from None


def _portable(location: str) -> str:
    """Local relative paths made absolute (the job runs in another folder); URLs and bundled: as they are."""
    from cluster.storage import is_local, local_path
    if location.startswith("bundled:") or not is_local(location):
        return location
    return os.path.abspath(local_path(location))


def job_payload(cfg) -> str:
    """The resolved config as the job's argument (URL-safe base64 of its JSON)."""
    data = cfg.to_dict()
    data["model"], data["output"] = _portable(cfg.model), _portable(cfg.output)
    data["data"]["source"] = _portable(cfg.data.source)
    data["ray"]["address"] = ""  # the job's driver joins the cluster it runs on ($RAY_ADDRESS)
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode()


def submit(args: argparse.Namespace) -> int:
    from cluster.ray_runtime import project_runtime_env
    from pipeline.config import load_config
    cfg = load_config(args.config, args.overrides)
    env = {}
    for item in args.env:
        if "=" not in item:
            raise UserError(f"--env expects KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        env[k] = v
    client = _client(args.address)
    try:
        job = client.submit_job(entrypoint=f"{args.python} -m cluster.jobs run {job_payload(cfg)}",
                                runtime_env=project_runtime_env(env), submission_id=args.submission_id,
                                metadata={"soco_config": os.path.basename(args.config), "soco_output": cfg.output})
    except RuntimeError as e:
        raise UserError(f"job submission failed: {str(e).splitlines()[0]}") from None
    print(job, flush=True)
    if not args.wait:
        return 0
    _follow(client, job)
    status = str(client.get_job_status(job).value)
    print(f"{job}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _follow(client, job: str) -> None:
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job):
            print(chunk, end="", flush=True)

    asyncio.run(tail())


def status(args: argparse.Namespace) -> int:
    client = _client(args.address)
    try:
        info = client.get_job_info(args.job)
    except RuntimeError as e:
        raise UserError(f"no job {args.job} on {_address(args.address)}: {str(e).splitlines()[0]}") from None
    line = f"{args.job}: {info.status.value}"
    if info.message:
        line += f" ({info.message})"
    print(line)
    return 0


def logs(args: argparse.Namespace) -> int:
    client = _client(args.address)
    try:
        if args.follow:
            _follow(client, args.job)
        else:
            print(client.get_job_logs(args.job), end="")
    except RuntimeError as e:
        raise UserError(f"no logs for job {args.job}: {str(e).splitlines()[0]}") from None
    return 0


def run_job_command(args: argparse.Namespace) -> int:
    return {"submit": submit, "status": status, "logs": logs}[args.command](args)


def wait_for(client, job: str, timeout_s: float = 600, poll_s: float = 1.0) -> str:
    """Poll a job until it ends; its final status (scripts and tests)."""
    end = time.monotonic() + timeout_s
    while True:
        s = str(client.get_job_status(job).value)
        if s in TERMINAL or time.monotonic() > end:
            return s
        time.sleep(poll_s)


def _job_main(payload: str) -> int:
    """Inside the job: run the compression and print where its results are."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipeline.config import from_dict
    from pipeline.run import compress
    try:
        cfg = from_dict(json.loads(base64.urlsafe_b64decode(payload.encode())))
        print(f"soco job: model {cfg.model}, method {cfg.compress.method}, ratio {cfg.compress.ratio}, "
              f"output {cfg.output}", flush=True)
        report = compress(cfg, progress=False)
    except UserError as e:
        print(f"soco: error: {e}", file=sys.stderr)
        return 2
    from pipeline.cli import print_summary
    print_summary(report, cfg.output)
    print("stage seconds: " + json.dumps(report["timings_s"]), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        sys.exit(_job_main(sys.argv[2]))
    print("usage: python -m cluster.jobs run <payload>  (started by `soco submit`)", file=sys.stderr)
    sys.exit(2)
