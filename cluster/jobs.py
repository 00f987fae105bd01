"""Ray Jobs: submit an entrypoint to a cluster's job server, follow it, read its state.

Generic infrastructure: what runs (the entrypoint and its arguments) is the caller's
business (pipeline/jobs.py builds the compression job). The address is the head's dashboard
(`http://HOST:8265`); without one, `$RAY_API_SERVER_ADDRESS` or `$RAY_ADDRESS` is used.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from .errors import UserError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def job_server(given: str | None) -> str:
    address = given or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("no Ray cluster given: pass --address http://HOST:8265 (the head's dashboard) or set RAY_ADDRESS")
    return address


def client(given: str | None):
    """A JobSubmissionClient of the job server, or one line saying why not."""
    from ray.job_submission import JobSubmissionClient
    address = job_server(given)
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot reach the Ray job server at {address}: {str(e).splitlines()[0]}") from None


def submit(address: str | None, entrypoint: str, runtime_env: dict[str, Any], submission_id: str | None = None,
           metadata: dict[str, str] | None = None) -> tuple[Any, str]:
    """Submit a job; (the client, the job id)."""
    c = client(address)
    try:
        job = c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                           metadata=metadata or {})
    except RuntimeError as e:
        raise UserError(f"job submission failed: {str(e).splitlines()[0]}") from None
    return c, job


def follow(c, job: str) -> None:
    """Print a job's logs as they come, until it ends."""
    import asyncio

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job):
            print(chunk, end="", flush=True)

    asyncio.run(tail())


def status_line(address: str | None, job: str) -> str:
    """'<job>: <STATE> (message)'."""
    c = client(address)
    try:
        info = c.get_job_info(job)
    except RuntimeError as e:
        raise UserError(f"no job {job} on {job_server(address)}: {str(e).splitlines()[0]}") from None
    line = f"{job}: {info.status.value}"
    return line + (f" ({info.message})" if info.message else "")


def print_logs(address: str | None, job: str, keep_following: bool = False) -> None:
    c = client(address)
    try:
        if keep_following:
            follow(c, job)
        else:
            print(c.get_job_logs(job), end="")
    except RuntimeError as e:
        raise UserError(f"no logs for job {job}: {str(e).splitlines()[0]}") from None


def final_status(c, job: str) -> str:
    status = str(c.get_job_status(job).value)
    print(f"{job}: {status}", file=sys.stderr)
    return status


def wait_for(c, job: str, timeout_s: float = 600, poll_s: float = 1.0) -> str:
    """Poll a job until it ends; its final status (scripts and tests)."""
    end = time.monotonic() + timeout_s
    while True:
        s = str(c.get_job_status(job).value)
        if s in TERMINAL or time.monotonic() > end:
            return s
        time.sleep(poll_s)
