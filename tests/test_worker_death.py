"""A Ray worker that dies in the middle of calibrate or decompose (its process exits, as when
the OOM killer or a lost node takes it) does not fail the run: calibration runs again from its
last saved layer, a decompose task is retried, and the checkpoint equals an undisturbed run's.

The deaths are real: the toy method below is the svd-llm baseline whose calibration
statistic, or whose factorisation, ends its own worker process once (a marker file records
that it happened, so the retry goes through).
"""
from __future__ import annotations

import hashlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pipeline import compress  # noqa: E402
from pipeline.methods import Method, register  # noqa: E402
from pipeline.stages.calibrate import InputStats  # noqa: E402

from conftest import tiny_config  # noqa: E402


def _die_once(marker: str) -> None:
    """Exit this process without any cleanup, the first time only."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)


class DyingStats(InputStats):
    """InputStats whose collection of layer 1 kills its worker once."""

    marker = ""

    @classmethod
    @contextmanager
    def collecting(cls, layer):
        if getattr(layer.self_attn, "layer_idx", None) == 1 and cls.marker:
            _die_once(cls.marker)
        with super().collecting.__func__(cls, layer) as stats:
            yield stats


class DiesInCalibrate(Method):
    name = "toy-dies-in-calibrate"
    statistics = (DyingStats,)


class DiesInDecompose(Method):
    name = "toy-dies-in-decompose"
    marker = ""

    def factorise(self, W, stats, rank, cfg):
        if W.shape[0] == 96 and self.marker:  # the first MLP matrix of some layer
            _die_once(self.marker)
        return super().factorise(W, stats, rank, cfg)


DYING_CALIBRATE, DYING_DECOMPOSE = DiesInCalibrate(), DiesInDecompose()
register(DYING_CALIBRATE)
register(DYING_DECOMPOSE)
# Ray workers import code by module name; this test module is not importable there, so its
# classes travel by value
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.suffix == ".safetensors"}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from cluster.ray_runtime import RaySettings, connect
    started = not ray.is_initialized()
    connect(RaySettings())
    yield
    if started:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("method, stage", [(DYING_CALIBRATE, "calibrate"), (DYING_DECOMPOSE, "decompose")])
def test_a_dead_ray_worker_is_retried_and_the_run_completes(tmp_path, tiny_llama, text_file, ray_local, capfd,
                                                             method, stage):
    marker = tmp_path / "died"
    cfg = tiny_config(tiny_llama, tmp_path / "undisturbed", text_file, method=method.name)
    cfg.run.calib_resume_s = 0.0
    calm = compress(cfg, progress=False)  # no marker set: nothing dies

    if stage == "calibrate":
        DyingStats.marker = str(marker)
    else:
        DiesInDecompose.marker = str(marker)
    try:
        cfg = tiny_config(tiny_llama, tmp_path / "run", text_file, method=method.name)
        cfg.run.calib_resume_s = 0.0
        report = compress(cfg, progress=False)
    finally:
        DyingStats.marker = DiesInDecompose.marker = ""
    assert marker.exists(), "the worker was never killed"
    err = capfd.readouterr().err
    if stage == "calibrate":  # the group's actor died: the stage ran again from its saved layer
        assert "calibrate: a worker died" in err and "going on from layer 1" in err
    assert report["perplexity"]["compressed"] == pytest.approx(calm["perplexity"]["compressed"], rel=1e-9)
    assert digests(tmp_path / "run" / "checkpoint") == digests(tmp_path / "undisturbed" / "checkpoint")
