"""Config validation and the CLI's behaviour on bad input: one line, exit code 2, no output."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_loads():
    cfg = load_config(str(ROOT / "configs" / "default.yaml"))
    assert cfg.model == "bundled:smollm2-135m" and cfg.compress.method == "svd-llm"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    """Every config the README points to parses and validates (a sweep through its runs)."""
    from pipeline.sweep import load_sweep
    if path.name.startswith("sweep"):
        assert load_sweep(str(path)).runs
    else:
        assert load_config(str(path)).output


def test_levers_config_sets_the_measured_levers():
    soco = load_config(str(ROOT / "configs" / "soco-levers.yaml")).soco
    assert (soco.factor_lr, soco.factor_from, soco.hidden_layers, soco.hidden_weight) == (1e-4, "sparsify", 4, 4.0)
    assert (soco.schedule.sparsify_steps, soco.schedule.sparsify_patience, soco.max_steps) == (600, 4, 800)
    assert soco.average_decay == 0.97


def test_generated_config_is_the_levers_config_plus_its_levers():
    """configs/soco-generated.yaml is what the README's generated-windows rows measured: the
    levers config with channel scales and generated windows from the sparsify stage, and no
    other learning setting changed."""
    from dataclasses import asdict
    levers = load_config(str(ROOT / "configs" / "soco-levers.yaml"))
    generated = load_config(str(ROOT / "configs" / "soco-generated.yaml"))
    added = {"channel_scales": True, "generated_windows": 192, "generated_from": "sparsify", "checkpoint_every": 50}
    assert {k: getattr(generated.soco, k) for k in added} == added
    assert {k: v for k, v in asdict(generated.soco).items() if k not in added} == \
        {k: v for k, v in asdict(levers.soco).items() if k not in added}
    assert (generated.data.calib_samples, generated.data.seq_len, generated.data.batch_size) == (64, 512, 32)
    assert asdict(generated.compress) == asdict(levers.compress)


def test_overrides_are_typed():
    cfg = load_config(None, ["compress.ratio=0.6", "data.seq_len=128", "compress.method=asvd"])
    assert cfg.compress.ratio == 0.6 and cfg.data.seq_len == 128 and cfg.compress.method == "asvd"


@pytest.mark.parametrize("overrides,message", [
    (["compress.raito=0.4"], "unknown config key 'compress.raito' (did you mean 'ratio'?)"),
    (["dta.seq_len=3"], "unknown config key 'dta'"),
    (["compress.ratio=1.2"], "compress.ratio must be strictly between 0 and 1"),
    (["compress.ratio=abc"], "compress.ratio' must be float"),
    (["compress.method=pca"], "compress.method must be one of"),
    (["data.seq_len=0"], "data.seq_len must be at least 1"),
    (["noequals"], "--set expects key=value"),
    (["soco.coarse_ratio=0.5"], "soco.coarse_ratio must be null or a number below compress.ratio (0.4)"),
    (["soco.coarse_ratio=abc"], "soco.coarse_ratio must be null or a number below compress.ratio"),
])
def test_bad_config_values_name_the_problem(overrides, message):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def _run_cli(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("case", ["unknown_key", "missing_model", "missing_data", "bad_ratio", "too_little_data",
                                  "missing_config", "output_not_a_run"])
def test_cli_bad_input_exits_2_with_one_line_and_no_output(capsys, tmp_path, tiny_llama, text_file, case):
    out = tmp_path / "out"
    cfg = {"model": str(tiny_llama), "output": str(out),
           "data": {"source": str(text_file), "calib_samples": 4, "seq_len": 16, "eval_samples": 2},
           "run": {"threads": 1}}
    if case == "unknown_key":
        cfg["compress"] = {"ratoi": 0.3}
    elif case == "missing_model":
        cfg["model"] = str(tmp_path / "nope")
    elif case == "missing_data":
        cfg["data"]["source"] = str(tmp_path / "nope.txt")
    elif case == "bad_ratio":
        cfg["compress"] = {"ratio": 0.0}
    elif case == "too_little_data":
        cfg["data"]["calib_samples"] = 100000
    elif case == "output_not_a_run":
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg))  # JSON is valid YAML
    argv = ["compress", str(tmp_path / "missing.yaml") if case == "missing_config" else str(path), "--quiet"]
    code, stdout, stderr = _run_cli(capsys, argv)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("soco: error: "), stderr
    if case == "output_not_a_run":
        assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    else:
        assert not out.exists(), "a failed run must leave nothing at the output"


def test_eval_cli_on_checkpoint_matches_report(capsys, tmp_path, tiny_llama, text_file):
    from conftest import tiny_config
    from pipeline import compress
    report = compress(tiny_config(tiny_llama, tmp_path / "run", text_file), progress=False)
    code, stdout, _ = _run_cli(capsys, ["eval", str(tmp_path / "run" / "checkpoint"), "--data", str(text_file),
                                        "--seq-len", "32", "--eval-samples", "4", "--batch-size", "4", "--quiet"])
    assert code == 0
    res = json.loads(stdout)
    assert abs(res["perplexity"] - report["perplexity"]["compressed"]) < 1e-6 * res["perplexity"]
    assert res["params"]["linear"] == report["params"]["linear_after"]


def test_eval_cli_rejects_missing_checkpoint(capsys, tmp_path):
    code, _, stderr = _run_cli(capsys, ["eval", str(tmp_path / "nothing")])
    assert code == 2 and stderr.strip().startswith("soco: error: model folder not found")


def test_rerun_resumes_committed_stages(tmp_path, tiny_llama, text_file):
    from conftest import tiny_config
    from pipeline import compress
    first = compress(tiny_config(tiny_llama, tmp_path / "run", text_file), progress=False)
    again = compress(tiny_config(tiny_llama, tmp_path / "run", text_file), progress=False)
    # the baselines have no extra stage: learn is SoCo's (pipeline/methods/soco.py)
    assert again["resumed_stages"] == ["calibrate", "decompose", "assemble", "evaluate"]
    assert all(again["timings_s"][s] == 0.0 for s in again["resumed_stages"])
    assert again["perplexity"] == first["perplexity"]
    # a new ratio reuses the calibration only
    other = compress(tiny_config(tiny_llama, tmp_path / "run", text_file, ratio=0.6), progress=False)
    assert other["resumed_stages"] == ["calibrate"]
    assert other["achieved_ratio"]["linear"] >= 0.6
