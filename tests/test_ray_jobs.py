"""A real Ray head (`ray start --head` on 127.0.0.1, free ports, its own temp folder, stopped
afterwards): `soco submit` runs a tiny model there as a Ray Job, `soco status` / `soco logs`
follow it; `soco compress --address` joins the same head from another process."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main

from conftest import tiny_config

BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(scope="module")
def ray_head():
    import psutil
    gcs, dash, client, agent_http, agent_grpc, metrics, rt_agent, node_mgr, obj_mgr = _free_ports(9)
    temp = tempfile.mkdtemp(prefix="soco-rh-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    log = open(os.path.join(temp, "head.log"), "wb")
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={rt_agent}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", "--num-cpus=2", f"--object-store-memory={256 << 20}",
           f"--temp-dir={temp}", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError("ray start --head exited:\n" + Path(temp, "head.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the Ray head's dashboard did not come up in 120 s")
            time.sleep(1)
        yield {"dashboard": url, "gcs": f"127.0.0.1:{gcs}"}
    finally:
        # stop only what this fixture started: the head process, then anything left of its tree
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=10)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _config_file(path: Path, cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _cli(capsys, argv) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_soco_submit_runs_a_ray_job_on_a_real_head(ray_head, tmp_path, tiny_llama, text_file, capsys,
                                                    monkeypatch):
    from ray.job_submission import JobSubmissionClient

    from cluster.jobs import wait_for
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cfg = tiny_config(tiny_llama, tmp_path / "run", text_file)
    cfg_file = _config_file(tmp_path / "job.yaml", cfg)
    code, out, err = _cli(capsys, ["submit", str(cfg_file), "--address", ray_head["dashboard"]])
    assert code == 0, err
    job = out.strip().splitlines()[-1]
    assert job.startswith("raysubmit_"), out
    status = wait_for(JobSubmissionClient(ray_head["dashboard"]), job, timeout_s=300)
    code, out, err = _cli(capsys, ["logs", job, "--address", ray_head["dashboard"]])
    assert code == 0 and "perplexity: compressed" in out, out + err
    assert status == "SUCCEEDED", out
    code, out, _ = _cli(capsys, ["status", job, "--address", ray_head["dashboard"]])
    assert code == 0 and f"{job}: SUCCEEDED" in out

    # what the job wrote: a sharded checkpoint and the report, produced by Ray stages on the head
    run = tmp_path / "run"
    index = json.loads((run / "checkpoint" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((run / "checkpoint" / "config.json").read_text())["soco"]["method"] == "svd-llm"
    report = json.loads((run / "report.json").read_text())
    assert (run / "report.md").exists() and report["checkpoint"] == str(run / "checkpoint")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["config"]["ray"]["enabled"] is True

    # the same run in-process gives the same perplexity
    from pipeline import compress
    local = tiny_config(tiny_llama, tmp_path / "local", text_file)
    local.ray.enabled = False
    expected = compress(local, progress=False)["perplexity"]
    assert report["perplexity"]["compressed"] == pytest.approx(expected["compressed"], rel=1e-6)
    assert report["perplexity"]["dense"] == pytest.approx(expected["dense"], rel=1e-6)


@pytest.mark.slow
def test_soco_submit_accepts_a_sweep(ray_head, tmp_path, tiny_llama, text_file, capsys, monkeypatch):
    """A sweep file submitted as one Ray Job: its runs run as Ray tasks on the head
    (`parallel: 2`), one shared calibration, and the results table is written."""
    import pyarrow.parquet as pq
    from ray.job_submission import JobSubmissionClient

    from cluster.jobs import wait_for
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    spec = {"root": str(tmp_path / "sweep"), "models": [str(tiny_llama)], "methods": ["svd-llm", "svd"],
            "ratios": [0.4], "parallel": 2, "cpus_per_run": 1,
            "set": {"data.source": str(text_file), "data.calib_samples": 8, "data.seq_len": 32,
                    "data.eval_samples": 4, "data.batch_size": 4, "run.shard_size_mb": 0.05}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    code, out, err = _cli(capsys, ["submit", str(tmp_path / "sweep.yaml"), "--address", ray_head["dashboard"]])
    assert code == 0, err
    job = out.strip().splitlines()[-1]
    status = wait_for(JobSubmissionClient(ray_head["dashboard"]), job, timeout_s=300)
    code, out, err = _cli(capsys, ["logs", job, "--address", ray_head["dashboard"]])
    assert status == "SUCCEEDED", out + err
    assert '"soco": "done"' in out and '"runs": {"done": 2}' in out
    rows = pq.read_table(tmp_path / "sweep" / "results.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["done", "done"] and [r["adopted_stages"] for r in rows] == ["", "calibrate"]


@pytest.mark.slow
def test_soco_compress_address_joins_the_head(ray_head, tmp_path, tiny_qwen2, text_file):
    cfg = tiny_config(tiny_qwen2, tmp_path / "run", text_file)
    cfg_file = _config_file(tmp_path / "run.yaml", cfg)
    r = subprocess.run([str(BIN / "soco"), "compress", str(cfg_file), "--address", ray_head["gcs"], "--quiet"],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "perplexity: compressed" in r.stdout
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors.index.json").exists()
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["config"]["ray"]["address"] == ray_head["gcs"]


def test_job_commands_without_a_cluster_fail_with_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    for argv in (["status", "raysubmit_x"], ["logs", "raysubmit_x"], ["submit", str(tmp_path / "none.yaml")]):
        code, out, err = _cli(capsys, argv)
        assert code == 2 and out == "" and err.startswith("soco: error:") and len(err.strip().splitlines()) == 1
    free = _free_ports(1)[0]
    code, _, err = _cli(capsys, ["status", "raysubmit_x", "--address", f"http://127.0.0.1:{free}"])
    assert code == 2 and "cannot reach the Ray job server" in err
