"""Bad inputs end with one line and exit 2, leaving the output as it was; SIGTERM stops a run
the way Ctrl-C does (manifest `failed` with the reason, exit 143)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.config import load_config


def _cli(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, [line for line in out.err.splitlines() if line.strip()]


def _config(tmp_path, model, text, **extra) -> Path:
    cfg = {"model": str(model), "output": str(tmp_path / "out"),
           "data": {"source": str(text), "calib_samples": 4, "seq_len": 16, "eval_samples": 2},
           "run": {"threads": 1}, "ray": {"enabled": False}} | extra
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_a_ratio_written_as_1e_minus_1_is_a_float():
    assert load_config(None, ["compress.ratio=1e-1"]).compress.ratio == pytest.approx(0.1)


def test_non_utf8_config_and_data_are_one_line(capsys, tmp_path, tiny_llama):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model: caf\xe9\n".encode("latin-1"))
    code, _, err = _cli(capsys, ["compress", str(bad)])
    assert code == 2 and len(err) == 1 and "not UTF-8" in err[0]
    text = tmp_path / "latin1.txt"
    text.write_bytes(("caf\xe9 " * 5000).encode("latin-1"))
    code, _, err = _cli(capsys, ["compress", str(_config(tmp_path, tiny_llama, text)), "--quiet"])
    assert code == 2 and len(err) == 1 and "not UTF-8" in err[0]
    assert not (tmp_path / "out").exists()


def test_output_below_a_regular_file_is_one_line(capsys, tmp_path, tiny_llama, text_file):
    (tmp_path / "afile").write_text("keep me")
    cfg = _config(tmp_path, tiny_llama, text_file, output=str(tmp_path / "afile" / "run"))
    code, _, err = _cli(capsys, ["compress", str(cfg), "--quiet"])
    assert code == 2 and len(err) == 1 and "is a file" in err[0]
    assert (tmp_path / "afile").read_text() == "keep me"


def _damaged_copy(src: Path, dst: Path, damage) -> Path:
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = dst / index["weight_map"]["model.layers.1.self_attn.v_proj.weight"]
    damage(shard)
    return dst


def test_nan_in_a_weight_is_one_line_and_leaves_nothing(capsys, tmp_path, tiny_llama, text_file):
    from safetensors.torch import load_file, save_file

    def poison(shard: Path) -> None:
        t = load_file(str(shard))
        t["model.layers.1.self_attn.v_proj.weight"][0, 0] = float("nan")
        save_file(t, str(shard), metadata={"format": "pt"})

    model = _damaged_copy(tiny_llama, tmp_path / "nan-model", poison)
    code, _, err = _cli(capsys, ["compress", str(_config(tmp_path, model, text_file)), "--quiet"])
    assert code == 2 and len(err) == 1, err
    assert "model.layers.1.self_attn.v_proj.weight" in err[0] and "NaN or Inf" in err[0]
    assert not (tmp_path / "out").exists() or json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "failed"


def test_truncated_shard_is_one_line(capsys, tmp_path, tiny_llama, text_file):
    def truncate(shard: Path) -> None:
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])

    model = _damaged_copy(tiny_llama, tmp_path / "cut-model", truncate)
    code, _, err = _cli(capsys, ["compress", str(_config(tmp_path, model, text_file)), "--quiet"])
    assert code == 2 and len(err) == 1 and "cannot read" in err[0], err


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path, tiny_llama, text_file):
    cfg = _config(tmp_path, tiny_llama, text_file,
                  data={"source": str(text_file), "calib_samples": 64, "seq_len": 64, "eval_samples": 2})
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "compress", str(cfg), "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest = tmp_path / "out" / "manifest.json"
    deadline = time.monotonic() + 120
    while not manifest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by signal SIGTERM" in err
    state = json.loads(manifest.read_text()) if manifest.exists() else None
    assert state is None or (state["status"] == "failed" and "SIGTERM" in state["error"])
