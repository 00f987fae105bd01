"""A run whose model, data and run folder all live on S3-compatible storage (a real moto
server on 127.0.0.1, started and stopped by the test)."""
from __future__ import annotations

import socket

import fsspec
import pytest
import torch

from pipeline import compress, load_compressed

from conftest import tiny_config


@pytest.fixture(scope="module")
def s3_endpoint(monkeypatch_module=None):
    from moto.server import ThreadedMotoServer
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    old = fsspec.config.conf.get("s3")
    # how a user points soco at an S3-compatible store: fsspec's config (or FSSPEC_S3_* env vars)
    fsspec.config.conf["s3"] = {"endpoint_url": url, "key": "testing", "secret": "testing"}
    try:
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("soco-test")
        yield url
    finally:
        if old is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = old
        server.stop()


@pytest.mark.slow
def test_model_data_and_run_folder_on_s3(s3_endpoint, tiny_qwen2, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("SOCO_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("s3")
    fs.put(str(tiny_qwen2) + "/", "soco-test/models/tiny/", recursive=True)
    fs.put_file(str(text_file), "soco-test/data/wiki.txt")
    cfg = tiny_config("s3://soco-test/models/tiny", "s3://soco-test/runs/r1", "s3://soco-test/data/wiki.txt")
    report = compress(cfg, progress=False)
    assert report["checkpoint"] == "s3://soco-test/runs/r1/checkpoint"
    fs.invalidate_cache()
    names = {p.rsplit("/", 1)[1] for p in fs.ls("soco-test/runs/r1/checkpoint")}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= names
    assert {"manifest.json", "report.json", "report.md", "calib", "factors"} <= {
        p.rsplit("/", 1)[1] for p in fs.ls("soco-test/runs/r1")}
    assert fs.exists("soco-test/runs/r1/factors/plan.json")
    model = load_compressed("s3://soco-test/runs/r1/checkpoint")
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(out).all()
