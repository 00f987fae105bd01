"""`soco sweep`: one run folder per model x method x ratio, one shared calibration per model
and data, finished runs skipped on a re-run, results as Parquet, Markdown and a PNG."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.sweep import load_sweep, pareto


def write_sweep(tmp_path: Path, models: list[str], data: Path, **extra) -> Path:
    spec = {"root": str(tmp_path / "sweep"), "models": models, "methods": ["svd-llm", "svd"],
            "ratios": [0.3, 0.5],
            "set": {"data.source": str(data), "data.calib_samples": 8, "data.seq_len": 32, "data.eval_samples": 4,
                    "data.batch_size": 4, "run.threads": 1, "run.shard_size_mb": 0.05, "ray.enabled": False}} | extra
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_sweep_shares_calibration_and_skips_finished_runs(tmp_path, tiny_llama, tiny_qwen2, text_file, capsys):
    path = write_sweep(tmp_path, [str(tiny_llama), str(tiny_qwen2)], text_file)
    assert main(["sweep", str(path), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert last_json(out) == {"soco": "done", "exit": 0, "root": str(tmp_path / "sweep"), "runs": {"done": 8}}
    root = tmp_path / "sweep"
    rows = pq.read_table(root / "results.parquet").to_pylist()
    assert len(rows) == 8 and {r["status"] for r in rows} == {"done"}
    for model in (tiny_llama, tiny_qwen2):
        mine = [r for r in rows if r["model"] == str(model)]
        # one run per model calibrated; the other three copied its committed calibration in
        assert sorted(r["adopted_stages"] for r in mine) == ["", "calibrate", "calibrate", "calibrate"]
        # the dense perplexity was measured once per model and is given to every row
        assert len({r["dense_ppl"] for r in mine}) == 1 and mine[0]["dense_ppl"] > 1
        assert (root / f"{model.name}.png").read_bytes()[:4] == b"\x89PNG"
    leader = root / tiny_llama.name / "svd-llm-r0.3"
    follower = root / tiny_llama.name / "svd-r0.5"
    calib = sorted(p.relative_to(leader) for p in (leader / "calib").iterdir())
    assert calib and calib == sorted(p.relative_to(follower) for p in (follower / "calib").iterdir())
    for rel in calib:  # the same committed bytes (a hard link on one disk)
        assert (leader / rel).read_bytes() == (follower / rel).read_bytes()
    manifest = json.loads((follower / "manifest.json").read_text())
    assert manifest["stages"]["calibrate"]["adopted_from"] == str(leader)
    # each row equals what a run of its own would report
    svd = next(r for r in rows if r["run"] == f"{tiny_llama.name}/svd-r0.5")
    report = json.loads((follower / "report.json").read_text())
    assert svd["ppl"] == report["perplexity"]["compressed"]
    assert "| run | model | method | ratio |" in (root / "results.md").read_text()

    # a re-run skips every finished run: nothing to do, exit 4
    assert main(["sweep", str(path), "--quiet"]) == 4
    out, _ = capsys.readouterr()
    assert last_json(out)["runs"] == {"nothing_to_do": 8}
    again = pq.read_table(root / "results.parquet").to_pylist()
    assert [r["ppl"] for r in again] == [r["ppl"] for r in rows]


def test_each_run_gets_the_earlier_runs_of_its_calibration_as_donors(tmp_path, tiny_llama, tiny_qwen2, text_file):
    """The leader first (its calibration), then every later folder: a SoCo run at another
    ratio takes an earlier one's teacher targets (tests/test_teacher_reuse.py)."""
    sweep = load_sweep(str(write_sweep(tmp_path, [str(tiny_llama), str(tiny_qwen2)], text_file, methods=["soco"],
                                       ratios=[0.2, 0.4, 0.6], grid={"soco.holdout_samples": [2]})))
    root = tmp_path / "sweep"
    for model in (tiny_llama, tiny_qwen2):
        runs = [r for r in sweep.runs if r.config["model"] == str(model)]
        folders = [str(root / model.name / f"soco-r{r}-holdout_samples=2") for r in (0.2, 0.4, 0.6)]
        assert [r.config["output"] for r in runs] == folders
        assert [r.leader for r in runs] == [True, False, False]
        assert [r.donors for r in runs] == [[], folders[:1], folders[:2]]


@pytest.mark.slow
def test_sweep_grid_key_and_a_failed_run_does_not_stop_the_others(tmp_path, tiny_llama, text_file, capsys):
    path = write_sweep(tmp_path, [str(tiny_llama), str(tmp_path / "missing-model")], text_file,
                       methods=["svd-llm"], ratios=[0.4], grid={"data.eval_samples": [2, 4]})
    assert main(["sweep", str(path), "--quiet"]) == 2  # a run with a bad input: exit 2, the others ran
    out, err = capsys.readouterr()
    assert last_json(out)["runs"] == {"done": 2, "bad_input": 2}
    rows = pq.read_table(tmp_path / "sweep" / "results.parquet").to_pylist()
    assert [r["run"] for r in rows][:2] == [f"{tiny_llama.name}/svd-llm-r0.4-eval_samples=2",
                                           f"{tiny_llama.name}/svd-llm-r0.4-eval_samples=4"]
    assert [r["data.eval_samples"] for r in rows] == [2, 4, 2, 4]
    assert all("missing-model" in r["error"] for r in rows[2:])
    # two evaluation settings: each measured its own dense perplexity
    assert rows[0]["dense_ppl"] != rows[1]["dense_ppl"]
    assert "Runs that did not finish" in (tmp_path / "sweep" / "results.md").read_text()


@pytest.mark.parametrize("spec, message", [
    ({"models": ["m"], "methods": ["svd"], "ratios": [0.4]}, "sweep key 'root'"),
    ({"root": "r", "methods": ["svd"], "ratios": [0.4]}, "sweep key 'models' is required"),
    ({"root": "r", "models": ["m"], "methods": ["svd"], "ratios": []}, "'ratios' must list at least one value"),
    ({"root": "r", "models": ["m"], "methods": ["nope"], "ratios": [0.4]}, "sweep run m/nope-r0.4: compress.method must be one of"),
    ({"root": "r", "models": ["m"], "methods": ["svd"], "ratios": [1.5]}, "compress.ratio must be strictly"),
    ({"root": "r", "models": ["m"], "methods": ["svd"], "ratios": [0.4], "ratio": 1}, "unknown sweep key 'ratio'"),
    ({"root": "r", "models": ["m"], "methods": ["svd"], "ratios": [0.4], "grid": {"data.seq_len": 8}},
     "'grid' must map config keys to non-empty lists"),
    ({"root": "r", "models": ["m"], "methods": ["svd"], "ratios": [0.4], "grid": {"data.seq_lenn": [8]}},
     "unknown config key 'data.seq_lenn'"),
    ({"root": "r", "models": ["m"], "methods": ["svd", "svd"], "ratios": [0.4]}, "twice"),
    ({"root": "r", "models": ["m"], "methods": ["svd"], "ratios": [0.4], "parallel": 0}, "'parallel' must be"),
])
def test_bad_sweep_files_are_one_line(tmp_path, spec, message, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_sweep(str(path))
    assert main(["sweep", str(path)]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and last_json(out)["soco"] == "bad_input"
    assert not (tmp_path / "r").exists()


def test_pareto_front():
    pts = [(0.2, 10.0), (0.4, 20.0), (0.4, 30.0), (0.6, 15.0), (0.1, 12.0)]
    assert pareto(pts) == [True, False, False, True, False]
    assert pareto([(0.2, 10.0), (0.4, 20.0)]) == [True, True]


def test_a_stage_is_adopted_only_with_every_file_checksummed(tmp_path, tiny_llama, text_file):
    """A donor whose manifest records no checksums (an older version wrote it), or whose
    committed files changed, gives nothing: the run computes the stage itself."""
    from pipeline import compress

    from conftest import tiny_config
    donor = tiny_config(tiny_llama, tmp_path / "donor", text_file)
    donor.ray.enabled = False
    compress(donor, progress=False)
    manifest = tmp_path / "donor" / "manifest.json"
    state = json.loads(manifest.read_text())
    state["stages"]["calibrate"]["files"] = {}
    manifest.write_text(json.dumps(state))
    cfg = tiny_config(tiny_llama, tmp_path / "run", text_file)
    cfg.ray.enabled = False
    report = compress(cfg, progress=False, reuse_from=[str(tmp_path / "donor")])
    assert report["adopted_stages"] == {} and "calibrate" in report["timings_s"]
    assert (tmp_path / "run" / "calib" / "layer-00000.safetensors").exists()
