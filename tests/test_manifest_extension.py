"""Manifest.extension: which earlier runs of a stage a new config goes on from (raised caps of
SoCo's learn stage) and which it must run again. No model is read: keys hash config fields."""
from __future__ import annotations

from typing import Any

import pytest

from cluster.storage import Storage
from pipeline.config import from_dict
from pipeline.manifest import Manifest, stage_keys
from pipeline.run import run_stages

BASE: dict[str, Any] = {"output": "unused", "compress": {"method": "soco", "ratio": 0.4},
                        "soco": {"max_steps": 300, "schedule": {"sparsify_steps": 100, "sparsify_patience": 0}}}


def config(**soco: Any) -> Any:
    """BASE with soco fields replaced; keys of the schedule go under `schedule`."""
    data = {**BASE, "soco": {**BASE["soco"], "schedule": dict(BASE["soco"]["schedule"])}}
    for k, v in soco.items():
        (data["soco"]["schedule"] if k in ("sparsify_steps", "sparsify_patience", "hard_lr_end", "patience")
         else data["soco"])[k] = v
    return from_dict(data)


def raised(tmp_path, old: Any, new: Any, status: str = "done") -> dict:
    """What Manifest.extension says for a folder whose learn entry `old` wrote, run under `new`."""
    store = Storage(str(tmp_path))
    key = stage_keys(old, run_stages(old))["learn"]
    store.write_json("manifest.json", {"config": old.to_dict(), "stages": {"learn": {"status": status, "key": key}}})
    man = Manifest(store, new, run_stages(new))
    learn = next(s for s in run_stages(new) if s.name == "learn")
    return man.extension(learn, man.stages["learn"])


@pytest.mark.parametrize("status", ["done", "running"])
def test_raised_caps_go_on_from_the_earlier_run(tmp_path, status):
    got = raised(tmp_path, config(), config(max_steps=500, sparsify_steps=300, sparsify_patience=4), status)
    assert got == {"soco.max_steps": (300, 500), "soco.schedule.sparsify_steps": (100, 300),
                   "soco.schedule.sparsify_patience": (0, 4)}


@pytest.mark.parametrize("new", [
    {"max_steps": 200},  # a lower cap: not the same run made longer
    {"max_steps": 500, "sparsify_steps": 50},  # one raised, one lowered
    {"sparsify_patience": 1},  # 0 meant the refinement's patience, 2: lower
    {"max_steps": 500, "lr": 0.1},  # something else changed too
    {"max_steps": 300},  # nothing raised: the ordinary rules apply
])
def test_anything_but_raised_caps_runs_the_stage_again(tmp_path, new):
    assert raised(tmp_path, config(), config(**new)) == {}


def test_a_cap_that_the_step_decays_over_is_not_extended(tmp_path):
    """With soco.schedule.hard_lr_end below 1 the hard stage's step follows a cosine to its
    cap: a longer cap changes every step after the cut, so the stage runs again."""
    old = config(hard_lr_end=0.1)
    assert raised(tmp_path, old, config(hard_lr_end=0.1, sparsify_steps=300)) == {}


def test_another_methods_stage_or_a_folder_without_a_config_is_never_extended(tmp_path):
    store = Storage(str(tmp_path))
    new = config(max_steps=500)
    man = Manifest(store, new, run_stages(new))  # a new folder: no previous config
    learn = next(s for s in run_stages(new) if s.name == "learn")
    assert man.extension(learn, {"status": "done", "key": "0" * 16}) == {}
    calibrate = run_stages(new)[0]
    assert calibrate.extendable == () and man.extension(calibrate, {"status": "done", "key": "x"}) == {}
