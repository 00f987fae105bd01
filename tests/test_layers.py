"""The layers hold: `lint-imports` keeps every contract in pyproject.toml (soco and cluster
import nothing of pipeline or each other, stages import no method, no import circles), and
it would catch a wrong import (checked on a copy of the tree with one bad import added)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_import_contracts_are_kept():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "BROKEN" not in r.stdout and "0 broken" in r.stdout


def test_a_cluster_module_importing_pipeline_breaks_the_contracts(tmp_path):
    for pkg in ("soco", "pipeline", "cluster"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    storage = tmp_path / "cluster" / "storage.py"
    storage.write_text(storage.read_text() + "\n\ndef _bad():\n    from pipeline.config import Config  # noqa\n")
    r = _lint(tmp_path)
    assert r.returncode != 0 and "BROKEN" in r.stdout and "cluster.storage -> pipeline.config" in r.stdout
