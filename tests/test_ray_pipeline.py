"""The Ray path against the in-process path on a tiny model: calibration within float tolerance,
checkpoint shards equal within it and identical from the same calibration, same perplexity; a local
Ray started once per module."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token files for a throwaway local Ray

from cluster.storage import Storage  # noqa: E402
from pipeline import compress  # noqa: E402

from conftest import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from cluster.ray_runtime import RaySettings, connect
    started = not ray.is_initialized()
    connect(RaySettings())  # what compress() would start: reused by every run below
    yield ray
    if started:
        ray.shutdown()


def _files(folder, sub):
    return sorted(p.name for p in (folder / sub).iterdir() if p.name.endswith(".safetensors"))


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def both_paths(tmp_path_factory, tiny_qwen2, text_file, ray_local):
    """The same tiny run in-process and on Ray (3 calibration workers: uneven shares of 16 windows)."""
    root = tmp_path_factory.mktemp("paths")
    local = tiny_config(tiny_qwen2, root / "local", text_file)
    local.ray.enabled = False
    on_ray = tiny_config(tiny_qwen2, root / "ray", text_file)
    on_ray.ray.calib_workers = 3
    return root, compress(local, progress=False), compress(on_ray, progress=False)


def test_ray_calibration_equals_single_process(both_paths):
    root, _, _ = both_paths
    a, b = Storage(str(root / "local")), Storage(str(root / "ray"))
    names = _files(root / "local", "calib")
    assert names and names == _files(root / "ray", "calib")
    for name in names:
        ta, tb = a.load_tensors(f"calib/{name}"), b.load_tensors(f"calib/{name}")
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.allclose(ta[k], tb[k], rtol=1e-9, atol=1e-12), (name, k)
        if name.startswith("layer-"):
            assert a.tensor_metadata(f"calib/{name}") == b.tensor_metadata(f"calib/{name}")


def test_ray_path_gives_the_same_perplexity_and_checkpoint(both_paths):
    root, rep_local, rep_ray = both_paths
    for key in ("dense", "compressed"):
        assert rep_ray["perplexity"][key] == pytest.approx(rep_local["perplexity"][key], rel=1e-6)
    assert rep_ray["params"] == rep_local["params"]
    ca, cb = root / "local" / "checkpoint", root / "ray" / "checkpoint"
    assert sorted(p.name for p in ca.iterdir()) == sorted(p.name for p in cb.iterdir())
    assert len(_files(root / "local", "checkpoint")) > 1, "checkpoint should be sharded"
    for name in ("config.json", "tokenizer.json"):
        assert (ca / name).read_bytes() == (cb / name).read_bytes(), name
    # The index maps every tensor to the same shard; its checksums are each side's own, since the
    # Ray calibration sums its workers' shares in another order and a factor may differ in its
    # last bit (the tensors are compared within tolerance below).
    index_a, index_b = (json.loads((c / "model.safetensors.index.json").read_text()) for c in (ca, cb))
    assert index_a["weight_map"] == index_b["weight_map"]
    assert index_a["metadata"]["total_size"] == index_b["metadata"]["total_size"]
    for folder, index in ((ca, index_a), (cb, index_b)):
        sums = index["metadata"]["soco_sha256"]
        assert sorted(sums) == _files(folder.parent, "checkpoint")
        assert all(_digest(folder / shard) == digest for shard, digest in sums.items())
    sa, sb = Storage(str(ca)), Storage(str(cb))
    for name in _files(root / "local", "checkpoint"):
        ta, tb = sa.load_tensors(name), sb.load_tensors(name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.allclose(ta[k], tb[k], rtol=1e-4, atol=1e-6), (name, k)


def test_ray_tasks_write_the_in_process_factors_and_shards(both_paths, tiny_qwen2, text_file):
    """On the same calibration, the decompose and assemble stages run as Ray tasks (one at a
    time) write the same factors and the same shard bytes as in-process."""
    from cluster.executor import RayExecutor
    from cluster.ray_runtime import RaySettings
    from pipeline.data import load_windows
    from pipeline.model_io import DTYPE_MAP, ModelSource
    from pipeline.stages.assemble import Assemble
    from pipeline.stages.base import StageContext
    from pipeline.stages.decompose import Decompose
    root, _, _ = both_paths
    run = root / "replay"
    shutil.copytree(root / "local", run, ignore=shutil.ignore_patterns("checkpoint"))
    for f in (run / "factors").glob("layer-*"):
        f.unlink()
    cfg = tiny_config(tiny_qwen2, run, text_file)
    source = ModelSource(str(tiny_qwen2))
    store = Storage(str(run))
    windows = load_windows(str(text_file), "text", source.tokenizer(), 16, 32, 4)
    with RayExecutor(RaySettings(), max_in_flight=1) as ex:  # bounded submission, one at a time
        ctx = StageContext(cfg, cfg.method, source, store, DTYPE_MAP["float32"], "model.layers", 3, windows, ex,
                           progress=False)
        Decompose().run(ctx)
        assert ex.peak_rss_mb and all(v > 0 for v in ex.peak_rss_mb.values())
        for name in _files(root / "local", "factors"):
            ta = Storage(str(root / "local")).load_tensors(f"factors/{name}")
            tb = store.load_tensors(f"factors/{name}")
            assert ta.keys() == tb.keys()
            for k in ta:
                assert torch.allclose(ta[k], tb[k], rtol=1e-6, atol=1e-7), (name, k)
        Assemble().run(ctx)
    ca, cb = root / "local" / "checkpoint", run / "checkpoint"
    assert sorted(p.name for p in ca.iterdir()) == sorted(p.name for p in cb.iterdir())
    for p in ca.iterdir():
        assert _digest(p) == _digest(cb / p.name), p.name
    assert not [p for p in run.iterdir() if p.name.startswith("soco-ckpt-")], "staging folder left behind"


def test_ray_task_failure_fails_the_stage_and_the_run(tmp_path, tiny_llama, text_file, ray_local):
    """A task that fails (a shard's tensor data is cut short: its header, which the run checks
    before writing anything, is intact) surfaces as the stage's error, as one line when it is
    bad input; the manifest says failed."""
    from pipeline.errors import UserError
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    cfg = tiny_config(model, tmp_path / "run", text_file)
    compress(cfg, progress=False)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.1.self_attn.q_proj.weight"]
    data = (model / shard).read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    (model / shard).write_bytes(data[:header + 16])
    cfg.compress.ratio = 0.3  # decompose reruns on Ray, reading the missing shard
    with pytest.raises(UserError) as e:
        compress(cfg, progress=False)
    assert shard in str(e.value) and len(str(e.value).splitlines()) == 1
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "failed"


def test_a_failed_task_lets_the_tasks_in_flight_finish(tmp_path, ray_local):
    """When one task fails, the map raises its error once the other tasks in flight have run
    to their end: none is cancelled (in Ray 2.60 a cancel that meets a task's completion
    aborts the driver) and none is left half-done."""
    from cluster.executor import RayExecutor
    from cluster.ray_runtime import RaySettings
    from pipeline.errors import UserError
    marks = str(tmp_path)

    def work(k: int) -> int:
        import pathlib
        import time
        if k == 0:
            raise UserError("task 0 fails")
        time.sleep(1.0)
        pathlib.Path(marks, f"done-{k}").write_text("")
        return k

    with RayExecutor(RaySettings(), max_in_flight=4) as ex:
        with pytest.raises(UserError, match="task 0 fails"):
            ex.map(work, range(4), "test", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done-1", "done-2", "done-3"]


def test_sweep_runs_as_ray_tasks_with_the_in_process_results(tmp_path, tiny_llama, text_file, ray_local):
    """`parallel: 2`: each run is a Ray task (its stages inside it); the table equals the same
    sweep run one run after another in this process."""
    import pyarrow.parquet as pq
    import yaml

    from pipeline.sweep import load_sweep, run_sweep
    rows = {}
    for parallel in (1, 2):
        spec = {"root": str(tmp_path / f"p{parallel}"), "models": [str(tiny_llama)], "methods": ["svd-llm", "asvd"],
                "ratios": [0.4], "parallel": parallel, "cpus_per_run": 1,
                "set": {"data.source": str(text_file), "data.calib_samples": 8, "data.seq_len": 32,
                        "data.eval_samples": 4, "data.batch_size": 4, "run.threads": 1, "run.shard_size_mb": 0.05,
                        "ray.enabled": False}}
        (tmp_path / f"s{parallel}.yaml").write_text(yaml.safe_dump(spec))
        run_sweep(load_sweep(str(tmp_path / f"s{parallel}.yaml")), progress=False)
        rows[parallel] = pq.read_table(tmp_path / f"p{parallel}" / "results.parquet").to_pylist()
    assert [r["status"] for r in rows[2]] == ["done", "done"]
    assert [r["adopted_stages"] for r in rows[2]] == ["", "calibrate"]
    for a, b in zip(rows[1], rows[2]):
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-6) and a["achieved_ratio"] == b["achieved_ratio"]


def test_ray_teacher_hidden_states_equal_single_process(both_paths, tiny_qwen2, ray_local):
    """SoCo's hidden-state targets (soco.hidden_layers), computed by 3 Ray workers on uneven
    shares of the calibration windows, are the one-process pass's, in window order."""
    from cluster.executor import LocalExecutor, RayExecutor
    from cluster.ray_runtime import RaySettings
    from pipeline.stages.calibrate import WINDOWS_FILE
    from pipeline.stages.learning.teacher import cache_hidden, load_hidden
    root, _, _ = both_paths
    stores = {}
    for name, executor in (("local", LocalExecutor()), ("ray", RayExecutor(RaySettings(), group_size=3))):
        (root / f"hidden-{name}" / "calib").mkdir(parents=True)
        shutil.copy(root / "local" / WINDOWS_FILE, root / f"hidden-{name}" / WINDOWS_FILE)
        stores[name] = Storage(str(root / f"hidden-{name}"))
        with executor as ex:
            assert ex.width(16) == (1 if name == "local" else 3)
            cache_hidden(ex, str(tiny_qwen2), "float32", stores[name], [0, 2], 4, "inputs", progress=False)
    (la, ha), (lb, hb) = load_hidden(stores["local"]), load_hidden(stores["ray"])
    assert la == lb == [0, 2] and ha.shape == hb.shape == (16, 2, 32, 64)
    torch.testing.assert_close(hb.float(), ha.float(), rtol=1e-2, atol=1e-2)
