"""Exit codes a scheduler can act on, and the JSON line log scrapers read (README,
"Scheduled batches"); shared by `soco compress`, `soco sweep` and the jobs they become."""
from __future__ import annotations

import json
from typing import Any

EXIT = {"done": 0, "failed": 1, "bad_input": 2, "busy": 3, "nothing_to_do": 4}


def result_line(status: str, **fields: Any) -> str:
    """One JSON object: the outcome, its exit code, and what the command wants to add."""
    return json.dumps({"soco": status, "exit": EXIT[status], **fields})


def status_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """{status: runs with it}, in order of first appearance."""
    return {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}


def ran_stages(report: dict[str, Any]) -> list[str]:
    """The stages a run's report says actually ran (not resumed): none means nothing to do."""
    return [s for s in report["timings_s"] if s != "load" and s not in report["resumed_stages"]]


def run_status(report: dict[str, Any]) -> tuple[str, list[str]]:
    """(the outcome of a finished run, the stages it ran): `done`, or `nothing_to_do` when
    every stage was already committed."""
    ran = ran_stages(report)
    return ("done" if ran else "nothing_to_do"), ran
