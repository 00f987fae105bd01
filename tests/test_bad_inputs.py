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


def test_sigterm_turned_into_another_error_still_stops_the_run_as_sigterm(capsys, tmp_path, tiny_llama, text_file,
                                                                          monkeypatch):
    """A C extension can turn the signal's exception into an error of its own (safetensors'
    reader, interrupted while building a tensor, said it could not read the file). The run
    still ends as stopped by SIGTERM: exit 143, and its manifest gives that reason."""
    from pipeline.errors import UserError
    from pipeline.stages.decompose import Decompose

    def read_interrupted_by_sigterm(self, ctx):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        except KeyboardInterrupt:
            raise UserError("cannot read model.layers.0.mlp.gate_proj.weight: could not determine the shape") from None

    monkeypatch.setattr(Decompose, "run", read_interrupted_by_sigterm)
    code, _, err = _cli(capsys, ["compress", str(_config(tmp_path, tiny_llama, text_file)), "--quiet"])
    assert code == 143 and err[-1] == "soco: stopped by signal SIGTERM", err
    state = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert state["status"] == "failed" and state["error"] == "Terminated: stopped by signal SIGTERM"


# --------------------------------------------------------------------------- one writer, one owner
def _lease(folder: Path, age_s: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lease.json").write_text(json.dumps({"owner": "elsewhere:1:x", "host": "elsewhere", "pid": 1,
                                                   "heartbeat": time.time() - age_s}))


def test_a_live_lease_makes_the_second_writer_busy_and_a_stale_one_is_taken_over(capsys, tmp_path, tiny_llama,
                                                                                 text_file):
    cfg = _config(tmp_path, tiny_llama, text_file)
    _lease(tmp_path / "out", age_s=1)
    code, _, err = _cli(capsys, ["compress", str(cfg), "--quiet"])
    assert code == 3 and len(err) == 1 and err[0].startswith("soco: busy:") and "elsewhere" in err[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lease.json"]  # nothing else written
    _lease(tmp_path / "out", age_s=3600)  # its holder died an hour ago
    code, out, err = _cli(capsys, ["compress", str(cfg), "--quiet"])
    assert code == 0, err
    assert not (tmp_path / "out" / "lease.json").exists(), "the lease is released at the end"


def test_two_processes_on_one_folder_one_runs_the_other_is_busy(tmp_path, tiny_llama, text_file):
    """Started together: both reach the lease at about the same moment; one runs, the other is
    told the folder is busy (exit 3) and prints no numbers of its own or of the other run."""
    cfg = _config(tmp_path, tiny_llama, text_file,
                  data={"source": str(text_file), "calib_samples": 64, "seq_len": 64, "eval_samples": 8})
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "pipeline.cli", "compress", str(cfg), "--quiet"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append((p.returncode, out, err))
    codes = sorted(code for code, _, _ in results)
    # the usual outcome is [0, 3]; on a loaded machine the second may reach the lease only
    # after the first finished, and then finds its work committed: nothing to do (4)
    assert codes in ([0, 3], [0, 4]), [r[2][-500:] for r in results]
    winner = next(r for r in results if r[0] == 0)
    other = next(r for r in results if r[0] != 0)
    assert "perplexity: compressed" in winner[1]
    if other[0] == 3:
        assert "soco: busy:" in other[2] and "perplexity" not in other[1]
    else:
        assert json.loads(other[1].strip().splitlines()[-1])["ran_stages"] == []
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "done"


def test_a_run_folder_of_another_model_is_refused_unless_forced(capsys, tmp_path, tiny_llama, tiny_qwen2, text_file):
    code, _, err = _cli(capsys, ["compress", str(_config(tmp_path, tiny_llama, text_file)), "--quiet"])
    assert code == 0, err
    before = (tmp_path / "out" / "report.json").read_text()
    other = _config(tmp_path, tiny_qwen2, text_file)
    code, _, err = _cli(capsys, ["compress", str(other), "--quiet"])
    assert code == 2 and len(err) == 1 and "--force" in err[0]
    assert (tmp_path / "out" / "report.json").read_text() == before
    code, _, err = _cli(capsys, ["compress", str(other), "--quiet", "--force"])
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["config"]["model"] == str(tiny_qwen2)


def test_a_staging_folder_left_by_a_killed_run_is_removed(capsys, tmp_path, tiny_llama, text_file):
    cfg = _config(tmp_path, tiny_llama, text_file)
    assert _cli(capsys, ["compress", str(cfg), "--quiet"])[0] == 0
    (tmp_path / "out" / "soco-ckpt-killed").mkdir()
    (tmp_path / "out" / "soco-ckpt-killed" / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    code, _, err = _cli(capsys, ["compress", str(cfg), "--quiet", "--set", "run.shard_size_mb=0.02"])  # assemble again
    assert code == 0, err
    assert not list((tmp_path / "out").glob("soco-ckpt-*"))


def test_exit_codes_and_the_json_summary_line_for_schedulers(capsys, tmp_path, tiny_llama, text_file):
    cfg = _config(tmp_path, tiny_llama, text_file)
    code, out, _ = _cli(capsys, ["compress", str(cfg), "--quiet"])
    last = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and last["soco"] == "done" and last["exit"] == 0 and "calibrate" in last["ran_stages"]
    code, out, _ = _cli(capsys, ["compress", str(cfg), "--quiet"])  # the same job again: nothing to do
    last = json.loads(out.strip().splitlines()[-1])
    assert code == 4 and last["soco"] == "nothing_to_do" and last["ran_stages"] == []
    code, out, err = _cli(capsys, ["compress", str(cfg), "--quiet", "--set", "compress.ratio=2"])
    last = json.loads(out.strip().splitlines()[-1])
    assert code == 2 and last["soco"] == "bad_input" and "compress.ratio" in last["error"] and len(err) == 1


# --------------------------------------------------------------------------- integrity
def test_zeroed_bytes_in_a_checkpoint_shard_are_caught_by_eval_and_the_loader(capsys, tmp_path, tiny_llama,
                                                                               text_file):
    from pipeline import load_compressed
    from pipeline.errors import UserError
    assert _cli(capsys, ["compress", str(_config(tmp_path, tiny_llama, text_file)), "--quiet"])[0] == 0
    ckpt = tmp_path / "out" / "checkpoint"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = ckpt / sorted(index["metadata"]["soco_sha256"])[-1]
    data = bytearray(shard.read_bytes())
    data[-64:] = bytes(64)  # zero the tail of the last tensor: still a valid safetensors file
    shard.write_bytes(bytes(data))
    code, _, err = _cli(capsys, ["eval", str(ckpt), "--data", str(text_file), "--seq-len", "16", "--eval-samples", "2",
                                 "--quiet"])
    assert code == 2 and len(err) == 1 and "damaged" in err[0] and shard.name in err[0]
    with pytest.raises(UserError, match="damaged"):
        load_compressed(str(ckpt))
    code, out, _ = _cli(capsys, ["eval", str(ckpt), "--data", str(text_file), "--seq-len", "16", "--eval-samples", "2",
                                 "--quiet", "--no-verify"])
    assert code == 0 and json.loads(out)["perplexity"] > 1
    load_compressed(str(ckpt), verify=False)


def test_checkpoint_shards_are_hashed_once_and_committed_with_that_checksum(capsys, tmp_path, tiny_llama, text_file,
                                                                            monkeypatch):
    """assemble hashes each shard as it writes it; the manifest commits those checksums
    instead of reading the checkpoint a second time, and they are the files' own."""
    import hashlib

    from cluster.storage import Storage
    hashed: list[str] = []
    real = Storage.sha256

    def counting(self, rel):
        hashed.append(rel)
        return real(self, rel)

    monkeypatch.setattr(Storage, "sha256", counting)
    cfg = _config(tmp_path, tiny_llama, text_file, run={"threads": 1, "shard_size_mb": 0.05})
    assert _cli(capsys, ["compress", str(cfg), "--quiet"])[0] == 0
    ckpt = tmp_path / "out" / "checkpoint"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["metadata"]["soco_sha256"]
    assert len(index) > 1
    committed = json.loads((tmp_path / "out" / "manifest.json").read_text())["stages"]["assemble"]["files"]
    for name, digest in index.items():
        assert [r for r in hashed if r.endswith(name)] == [name]  # once, by the shard's writer
        assert committed[f"checkpoint/{name}"] == digest == hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    assert committed["checkpoint/config.json"] == hashlib.sha256((ckpt / "config.json").read_bytes()).hexdigest()


def test_a_damaged_committed_file_is_recomputed_on_resume(capsys, tmp_path, tiny_llama, text_file):
    cfg = _config(tmp_path, tiny_llama, text_file)
    assert _cli(capsys, ["compress", str(cfg), "--quiet"])[0] == 0
    first = (tmp_path / "out" / "checkpoint" / "model.safetensors.index.json").read_text()
    calib = tmp_path / "out" / "calib" / "layer-00001.safetensors"
    calib.write_bytes(calib.read_bytes()[:100])  # truncated
    code, out, err = _cli(capsys, ["compress", str(cfg), "--quiet"])
    assert code == 0, err
    assert any("calibrate" in line and "layer-00001" in line and "running it again" in line for line in err)
    assert json.loads(out.strip().splitlines()[-1])["ran_stages"][0] == "calibrate"
    assert (tmp_path / "out" / "checkpoint" / "model.safetensors.index.json").read_text() == first


@pytest.mark.parametrize("override,fragment", [
    ("data.seq_len=0", "data.seq_len must be at least 1"),
    ("data.eval_samples=-1", "data.eval_samples must be >= 0"),
    ("run.dtype=float8", "run.dtype must be one of"),
    ("run.shard_size_mb=0", "run.shard_size_mb must be positive"),
    ("soco.zero_stage=4", "soco.zero_stage must be 2 or 3"),
    ("soco.prune_by=magnitude", "soco.prune_by must be"),
    ("soco.launcher=mpi", "soco.launcher must be"),
    ("soco.schedule.deviation_weight=-1", "soco.schedule.deviation_weight must be at least 0"),
    ("soco.schedule.patience=0", "soco.schedule.patience must be at least 1"),
    ("soco.schedule.sparsify_patience=-1", "soco.schedule.sparsify_patience must be at least 0"),
    ("soco.schedule.hard_lr_end=1.5", "soco.schedule.hard_lr_end must be in [0, 1]"),
    ("soco.factor_lr=-0.001", "soco.factor_lr must be a number of at least 0"),
    ("soco.factor_from=cut", "soco.factor_from must be one of coarse, refine, sparsify"),
    ("soco.factor_vt=true", "soco.factor_vt trains Vt at soco.factor_lr: set soco.factor_lr above 0"),
    ("soco.factor_rank=4", "soco.factor_rank trains a low-rank change of U at soco.factor_lr: set soco.factor_lr above 0"),
    ("soco.factor_rank=-1", "soco.factor_rank must be an integer of at least 0 (0 = U itself trains), got -1"),
    ("soco.factor_rank=1.5", "config key 'soco.factor_rank' must be int"),
    ("soco.factor_vt=2", "config key 'soco.factor_vt' must be bool, got 2"),
    ("soco.factor_counts_idle_steps=2", "config key 'soco.factor_counts_idle_steps' must be bool, got 2"),
    ("soco.factor_anchor=1", "soco.factor_anchor pulls a trained U toward its decomposed value: set soco.factor_lr above 0"),
    ("soco.factor_anchor=-1", "soco.factor_anchor must be a number of at least 0 (0 = off), got -1"),
    ("soco.gate=l0", "soco.gate must be one of magnitude, hard_concrete"),
    ("soco.hidden_layers=-1", "soco.hidden_layers must be at least 0"),
    ("soco.hidden_layers=1.5", "config key 'soco.hidden_layers' must be int"),
    ("soco.hidden_weight=-1", "soco.hidden_weight must be at least 0"),
    ("soco.generated_windows=-1", "soco.generated_windows must be an integer of at least 0 (0 = none), got -1"),
    ("soco.generate_prompt=0", "soco.generate_prompt must be an integer from 1 to data.seq_len - 1"),
    ("soco.generate_temperature=0", "soco.generate_temperature must be a number above 0, got 0"),
    ("soco.generated_from=cut", "soco.generated_from must be one of coarse, refine, sparsify, got 'cut'"),
    ("soco.keep_checkpoints=-1", "soco.keep_checkpoints must be at least 0 (0 keeps every one), got -1"),
    ("soco.gate_lr=0", "soco.gate_lr must be above 0"),
    ("soco.refine_steps=3", "did you mean 'soco.schedule.refine_steps'"),
    ("soco.schedule.refine_stepz=3", "unknown config key 'soco.schedule.refine_stepz'"),
    ("ray.num_cpus=-1", "ray.num_cpus must be >= 0"),
    ("ray.object_store_mb=10", "ray.object_store_mb must be at least 75"),
    ("ray.address=http://127.0.0.1:8265", "dashboard (job submission) address"),
    ("ray.calib_workers=-2", "ray.calib_workers must be >= 0"),
    ("compress.method=pca", "compress.method must be one of"),
    ("mgaa.spread=2", "mgaa.spread must be in [0, 1]"),
    ("lorap.keep_least_fraction=1.5", "lorap.keep_least_fraction must be in [0, 1)"),
    ("data.source=bundled:nope", "unknown bundled text 'nope'"),
    ("model=bundled:nope", "unknown bundled model 'nope'"),
    ("compress.ratio=0.99", "keeps no component"),
])
def test_bad_values_are_one_line_and_write_nothing(capsys, tmp_path, tiny_llama, text_file, override, fragment):
    cfg = _config(tmp_path, tiny_llama, text_file)
    code, out, err = _cli(capsys, ["compress", str(cfg), "--quiet", "--set", override])
    assert code == 2 and len(err) == 1 and err[0].startswith("soco: error:") and fragment in err[0], err
    assert json.loads(out.strip().splitlines()[-1])["soco"] == "bad_input"
    assert not (tmp_path / "out").exists()


def test_soco_and_mgaa_values_that_depend_on_the_method(capsys, tmp_path, tiny_llama, text_file):
    cfg = _config(tmp_path, tiny_llama, text_file)
    for overrides, fragment in ((["compress.method=soco", "soco.holdout_samples=100"], "soco.holdout_samples (100)"),
                                (["compress.method=soco", "soco.holdout_samples=1", "soco.hidden_layers=4"],
                                 "soco.hidden_layers (4) is more than the model's 3 decoder layers"),
                                (["compress.method=svd-llm+mgaa", "compress.ratio=0.95"], "outside mgaa's sublayer ratios")):
        code, _, err = _cli(capsys, ["compress", str(cfg), "--quiet"] + [x for o in overrides for x in ("--set", o)])
        assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_truncated_manifest_is_one_line(capsys, tmp_path, tiny_llama, text_file):
    cfg = _config(tmp_path, tiny_llama, text_file)
    assert _cli(capsys, ["compress", str(cfg), "--quiet"])[0] == 0
    manifest = tmp_path / "out" / "manifest.json"
    manifest.write_text(manifest.read_text()[:50])
    code, _, err = _cli(capsys, ["compress", str(cfg), "--quiet"])
    assert code == 2 and len(err) == 1 and "manifest.json is damaged" in err[0]


# --------------------------------------------------------------------------- unreachable storage
@pytest.fixture
def dead_s3(monkeypatch):
    """fsspec pointed at S3 endpoints that cannot answer: a closed port (refused at once) and a
    socket that accepts connections and never replies (a hung server)."""
    import socket

    import fsspec
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    ends = {"closed": f"http://127.0.0.1:{closed}", "silent": f"http://127.0.0.1:{silent.getsockname()[1]}"}

    def point(kind: str) -> None:
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": ends[kind], "key": "k", "secret": "s"})
    yield point
    silent.close()


@pytest.mark.parametrize("field, kind", [("model", "closed"), ("data", "closed"), ("output", "closed"),
                                         ("output", "silent")])
def test_unreachable_object_storage_is_one_line_within_seconds(capsys, tmp_path, tiny_llama, text_file, dead_s3,
                                                               field, kind):
    dead_s3(kind)
    url = f"s3://nowhere/{field}"
    cfg = _config(tmp_path, url if field == "model" else tiny_llama, url + ".txt" if field == "data" else text_file,
                  **({"output": url} if field == "output" else {}))
    t0 = time.monotonic()
    code, out, err = _cli(capsys, ["compress", str(cfg), "--quiet"])
    seconds = time.monotonic() - t0
    assert code == 2 and len(err) == 1, err
    what = {"model": "model", "data": "data source", "output": "output"}[field]
    assert err[0].startswith(f"soco: error: cannot reach the {what} at s3://nowhere/{field}")
    assert ("Timeout" in err[0]) == (kind == "silent")
    assert json.loads(out.strip().splitlines()[-1])["soco"] == "bad_input"
    assert seconds < 60, f"gave up after {seconds:.0f} s"  # bounded retries and timeouts, never a long hang
    assert not (tmp_path / "out").exists()


def test_soco_eval_of_an_unreachable_checkpoint_is_one_line(capsys, dead_s3):
    dead_s3("closed")
    code, _, err = _cli(capsys, ["eval", "s3://nowhere/checkpoint"])
    assert code == 2 and len(err) == 1 and "cannot reach the checkpoint at s3://nowhere/checkpoint" in err[0]


# --------------------------------------------------------------------------- model folders and data files
def _index_points_elsewhere(folder: Path) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]
    path.write_text(json.dumps(index))


def _no_tokenizer(folder: Path) -> None:
    for f in list(folder.iterdir()):
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            f.unlink()


def _shard_deleted(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    (folder / sorted(set(index["weight_map"].values()))[-1]).unlink()


def _header_garbled(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / sorted(set(index["weight_map"].values()))[0]
    data = bytearray(shard.read_bytes())
    data[8:24] = b"\x00" * 16
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, fragment", [
    (_index_points_elsewhere, "which does not hold it"),
    (_no_tokenizer, "has no tokenizer"),
    (_shard_deleted, "named by the weight index, is missing"),
    (_header_garbled, "cannot read the header of"),
])
def test_a_damaged_model_folder_is_one_line_before_anything_is_written(capsys, tmp_path, tiny_llama, text_file,
                                                                       damage, fragment):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    damage(model)
    code, out, err = _cli(capsys, ["compress", str(_config(tmp_path, model, text_file)), "--quiet"])
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "out").exists()


def _parquet(path: Path, column) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": column}), path)
    return path


def _jsonl(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, fragment", [
    (lambda p: _jsonl(p.with_suffix(".jsonl"), ('{"text": "caf\xe9 au lait"}\n' * 50).encode("latin-1")),
     "is not UTF-8 text"),
    (lambda p: _parquet(p.with_suffix(".parquet"), [b"caf\xe9 " * 50] * 10), "column 'text' is not UTF-8 text"),
    (lambda p: _parquet(p.with_suffix(".parquet"), [1, 2, 3]), "column 'text' holds int64, not text"),
    (lambda p: _jsonl(p.with_suffix(".jsonl"), b'{"text": [1, 2]}\n' * 5), "not text"),
])
def test_data_files_that_are_not_text_are_one_line(capsys, tmp_path, tiny_llama, make, fragment):
    data = make(tmp_path / "data")
    code, _, err = _cli(capsys, ["compress", str(_config(tmp_path, tiny_llama, data)), "--quiet"])
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "out").exists()


def test_utf8_bytes_in_a_parquet_column_are_read_as_text(tmp_path):
    from pipeline.data import read_texts
    path = _parquet(tmp_path / "d.parquet", ["café".encode(), b"tea"])
    assert read_texts(str(path)) == "café\n\ntea"
