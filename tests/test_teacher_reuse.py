"""The learn stage takes teacher targets an earlier commit holds for the same inputs
(pipeline/stages/learning/teacher_reuse.py), and computes again every one whose inputs changed."""
from __future__ import annotations

import os

import pytest
import torch

from cluster.storage import Storage
from pipeline import compress
from pipeline.stages import learn as learn_stage
from pipeline.stages.learning.generated import GENERATED_FILE
from pipeline.stages.learning.teacher import HIDDEN_FILE, TEACHER_FILE

from test_soco_pipeline import soco_config

FILES = (TEACHER_FILE, HIDDEN_FILE, GENERATED_FILE)
TEACHER = {"hidden_layers": 1, "generated_windows": 3, "generate_prompt": 4}


def _inodes(run) -> dict[str, int]:
    return {rel: os.stat(run / rel).st_ino for rel in FILES}


def _same_file(a: Storage, b: Storage, rel: str) -> None:
    """The same tensors, bit for bit, and the same metadata."""
    x, y = a.load_tensors(rel), b.load_tensors(rel)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), rel
    assert a.tensor_metadata(rel) == b.tensor_metadata(rel), rel


def _at(cfg, ratio: float):
    """The config at another target ratio."""
    cfg.compress.ratio = ratio
    return cfg


CACHES = {"cache_teacher": TEACHER_FILE, "cache_hidden": HIDDEN_FILE, "cache_generated": GENERATED_FILE}


def _record_teacher_computation(monkeypatch) -> list[str]:
    """The teacher files computed from now on, in order (inode numbers cannot tell: a new file
    may get the number of the one it replaced)."""
    computed: list[str] = []

    def recording(name: str):
        original = getattr(learn_stage, name)
        return lambda *a, **k: (computed.append(CACHES[name]), original(*a, **k))[1]
    for name in CACHES:
        monkeypatch.setattr(learn_stage, name, recording(name))
    return computed


def _forbid_teacher_computation(monkeypatch) -> None:
    """Any teacher computation in this test from now on fails it."""
    def refuse(*_a, **_k):
        raise AssertionError("a teacher target was computed again")
    for name in CACHES:
        monkeypatch.setattr(learn_stage, name, refuse)


def test_a_second_learn_in_the_same_folder_keeps_the_targets_and_recomputes_what_changed(tmp_path, tiny_llama,
                                                                                          text_file, monkeypatch):
    run = tmp_path / "run"
    compress(soco_config(tiny_llama, run, text_file, **TEACHER), progress=False)
    first = _inodes(run)
    with monkeypatch.context() as m:  # another step size: learn runs again, on the same targets
        _forbid_teacher_computation(m)
        report = compress(soco_config(tiny_llama, run, text_file, lr=0.02, **TEACHER), progress=False)
    assert "learn" not in report["resumed_stages"] and _inodes(run) == first
    # another seed changes the generated windows only; another top-k every file that holds top-k
    computed = _record_teacher_computation(monkeypatch)
    compress(soco_config(tiny_llama, run, text_file, seed=1, **TEACHER), progress=False)
    assert computed == [GENERATED_FILE]
    assert {f: ino for f, ino in _inodes(run).items() if f != GENERATED_FILE} == \
        {f: ino for f, ino in first.items() if f != GENERATED_FILE}
    computed.clear()
    compress(soco_config(tiny_llama, run, text_file, seed=1, topk=8, **TEACHER), progress=False)
    assert computed == [TEACHER_FILE, GENERATED_FILE] and _inodes(run)[HIDDEN_FILE] == first[HIDDEN_FILE]
    assert Storage(str(run)).load_tensors(TEACHER_FILE)["idx"].shape[-1] == 8


@pytest.mark.slow
def test_another_ratio_takes_a_donors_targets_which_equal_its_own(tmp_path, tiny_llama, text_file, monkeypatch):
    """A run at another ratio, given the first as a donor (as `soco sweep` gives the run that
    calibrated the same model and data), links the donor's teacher files instead of computing
    them; computed afresh they are the same bytes, and so is what the learn stage learns."""
    donor, fresh, linked = tmp_path / "r0.4", tmp_path / "r0.6-fresh", tmp_path / "r0.6"
    compress(soco_config(tiny_llama, donor, text_file, **TEACHER), progress=False)
    compress(_at(soco_config(tiny_llama, fresh, text_file, **TEACHER), 0.6), progress=False)
    with monkeypatch.context() as m:
        _forbid_teacher_computation(m)
        report = compress(_at(soco_config(tiny_llama, linked, text_file, **TEACHER), 0.6), progress=False,
                          reuse_from=[str(donor)])
    assert report["adopted_stages"] == {"calibrate": str(donor)}
    assert _inodes(linked) == _inodes(donor)  # hard links
    d, f, ln = Storage(str(donor)), Storage(str(fresh)), Storage(str(linked))
    for rel in FILES:  # (not the bytes: safetensors writes the metadata in no fixed order)
        _same_file(d, f, rel)
    learned = f.files("learned")
    assert learned == ln.files("learned") and learned
    for rel in learned:
        _same_file(f, ln, rel)


def test_a_damaged_donor_file_is_computed_again(tmp_path, tiny_llama, text_file, monkeypatch):
    donor, run = tmp_path / "donor", tmp_path / "run"
    compress(soco_config(tiny_llama, donor, text_file, **TEACHER), progress=False)
    original = Storage(str(donor)).load_tensors(GENERATED_FILE)
    path = donor / GENERATED_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the header (and its input digest) intact, a target changed
    os.unlink(path)  # not in place: the committed file may be linked elsewhere
    path.write_bytes(bytes(data))
    computed = _record_teacher_computation(monkeypatch)
    compress(_at(soco_config(tiny_llama, run, text_file, **TEACHER), 0.6), progress=False, reuse_from=[str(donor)])
    got, was = _inodes(run), _inodes(donor)  # both folders' files exist: equal numbers are one file
    assert computed == [GENERATED_FILE]
    assert got[TEACHER_FILE] == was[TEACHER_FILE] and got[HIDDEN_FILE] == was[HIDDEN_FILE]
    again = Storage(str(run)).load_tensors(GENERATED_FILE)  # computed again, as the donor first had it
    assert all(torch.equal(again[k], original[k]) for k in original)
