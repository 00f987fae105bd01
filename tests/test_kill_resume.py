"""SIGKILL in the middle of a stage, then the same command again: the run goes on from what
was committed, says what it skipped, and its checkpoint is byte-identical to an
uninterrupted run's.

The kill is real: `soco compress` runs in a child process whose safetensors writer sends
SIGKILL to its own process just before writing the chosen file (the Nth write whose path
contains a marker), so the process dies exactly there, with nothing cleaned up.
"""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config

#: the child: patch safetensors' file writer to kill the process at the chosen write, then run the CLI
CHILD = """
import os, signal, sys
import safetensors.torch as st
marker, nth = sys.argv[1], int(sys.argv[2])
seen = [0]
real = st.save_file
def save_file(tensors, filename, metadata=None):
    if marker in str(filename):
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, filename, metadata=metadata)
st.save_file = save_file
import cluster.storage
cluster.storage.save_file = save_file
from pipeline.cli import main
sys.exit(main(sys.argv[3:]))
"""


#: a short SoCo schedule (tests/test_soco_pipeline.py's), score checkpoints every 4 steps
SOCO = {"lr": 0.05, "batch_size": 2, "holdout_samples": 4, "topk": 16, "eval_every": 3, "checkpoint_every": 4,
        "launcher": "local",
        "schedule": {"refine_steps": 6, "sparsify_steps": 4, "sparsify_ramp": 2, "coarse_max_steps": 30}}


def run_config(tiny_llama: Path, text_file: Path, output: Path, method: str) -> Path:
    """A tiny run's config file: several checkpoint shards, calibration's resume point saved
    after every layer (both change how the run executes, never what it computes)."""
    cfg = tiny_config(tiny_llama, output, text_file, method=method)
    if method == "soco":
        from pipeline.config import from_dict
        cfg = from_dict(cfg.to_dict() | {"soco": SOCO})
    cfg.ray.enabled = False
    cfg.run.calib_resume_s = 0.0
    cfg.run.shard_size_mb = 0.02
    path = output.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def soco(args: list[str], kill_at: tuple[str, int] = ("<never>", 1)) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, kill_at[0], str(kill_at[1]), *args],
                          capture_output=True, text=True, timeout=600)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama, text_file):
    """An uninterrupted run's checkpoint digests, for each method tested."""
    root = tmp_path_factory.mktemp("ref")
    out = {}
    for method in ("svd-llm", "svd-llm+mgaa", "soco"):
        r = soco(["compress", str(run_config(tiny_llama, text_file, root / method, method)), "--quiet"])
        assert r.returncode == 0, r.stderr
        out[method] = digests(root / method / "checkpoint")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method, stage, kill_at, skipped", [
    # calibration saves its resume point after every layer here (run.calib_resume_s=0)
    ("svd-llm", "calibrate", ("calib/layer-00002", 1), "layers 0-1 were committed before: going on from layer 2"),
    ("svd-llm", "decompose", ("factors/layer-00002", 1), "2 of 3 layers were committed before: skipped"),
    ("svd-llm+mgaa", "decompose", ("factors/layer-00001", 1), "1 of 3 layers were committed before: skipped"),
    ("svd-llm", "assemble", ("soco-ckpt-", 2), None),
    # killed as it writes the step-8 score checkpoint: it goes on from step 4, Adam's state restored
    ("soco", "learn", ("scores/step-000008", 1), "learn: going on from step 4 (scores/step-000004.safetensors; "
                                                   "Adam's moments restored)"),
    ("soco", "assemble", ("soco-ckpt-", 2), None),
])
def test_sigkill_mid_stage_then_resume_gives_the_same_checkpoint(tmp_path, tiny_llama, text_file, reference,
                                                                    method, stage, kill_at, skipped):
    path = run_config(tiny_llama, text_file, tmp_path / "run", method)
    killed = soco(["compress", str(path), "--quiet"], kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"][stage]["status"] == "running"

    again = soco(["compress", str(path), "--quiet"])
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    order = ["calibrate", "decompose"] + (["learn"] if method == "soco" else []) + ["assemble"]
    assert summary["resumed_stages"] == order[:order.index(stage)]  # the committed stages were skipped
    assert summary["ran_stages"][0] == stage
    if skipped:
        assert skipped in again.stderr
    assert digests(tmp_path / "run" / "checkpoint") == reference[method]
    # nothing left over: no staging copy, no calibration resume point
    assert not list((tmp_path / "run").glob("soco-ckpt-*")) and not (tmp_path / "run" / "calib-resume").exists()
