"""Which config values a stage's key depends on (pipeline/manifest.py). No model is read."""
from __future__ import annotations

from typing import Any

import pytest

from pipeline.config import from_dict, value_at
from pipeline.manifest import stage_keys
from pipeline.run import run_stages

GENERATED = {"generated_windows": 8, "generate_prompt": 4, "generate_temperature": 0.7, "generated_from": "sparsify"}


def keys(**soco: Any) -> dict[str, str]:
    cfg = from_dict({"output": "unused", "compress": {"method": "soco", "ratio": 0.4}, "soco": soco})
    return stage_keys(cfg, run_stages(cfg))


def test_fields_added_later_stay_out_of_the_key_at_their_default():
    """soco.generated_* came after run folders existed: at their defaults the soco section
    hashed into learn's key is the one an earlier version (without them) hashed, so an
    upgrade keeps a folder's committed learn stage and an interrupted one's checkpoints."""
    cfg = from_dict({"output": "unused", "compress": {"method": "soco", "ratio": 0.4}})
    section = value_at(cfg, "soco")
    assert not set(GENERATED) & set(section)
    assert "lr" in section and "checkpoint_every" not in section  # a result field stays; execution-only ones never enter
    assert keys(generated_windows=0, generate_prompt=16, generate_temperature=1.0, generated_from="coarse") == keys()


@pytest.mark.parametrize("field", sorted(GENERATED))
def test_a_field_added_later_changes_the_key_once_set(field):
    plain, changed = keys(), keys(**{field: GENERATED[field]})
    assert changed["learn"] != plain["learn"]
    assert changed["decompose"] == plain["decompose"]  # the stages before learn keep theirs
