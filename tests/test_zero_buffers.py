"""Buffers follow the ZeRO engine's device (cluster/zero.py: place_buffers). Under ZeRO-3,
`zero.Init` places on the device what is created inside it, but not a buffer cloned from a
tensor that already existed (ScoredLinear.U0, soco.factor_anchor's copy of the decomposed U):
on a GPU that buffer stayed on the host and the learn stage's forward mixed devices. This
machine has no GPU, so the meta device stands in for one here."""
from __future__ import annotations

import torch
from torch import nn

from cluster import zero


def _model() -> nn.Module:
    m = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2))
    m[1].register_buffer("copy", torch.ones(2, 3), persistent=False)
    m[1].register_buffer("absent", None)
    return m


def test_every_buffer_elsewhere_moves_to_the_device_and_parameters_stay():
    m = _model()
    zero.place_buffers(m, "meta")
    assert [b.device.type for b in m.buffers()] == ["meta"] * 4  # BatchNorm's 3 and the copy
    assert m[1].absent is None
    assert "copy" in dict(m[1].named_buffers()) and "copy" not in m[1].state_dict()  # still a non-persistent buffer
    assert all(p.device.type == "cpu" for p in m.parameters())  # parameters are ZeRO's to place


def test_buffers_already_there_are_left_as_they_are():
    m = _model()
    before = [b for b in m.buffers()]
    zero.place_buffers(m, "cpu")
    assert all(a is b for a, b in zip(before, m.buffers()))


def test_the_engine_places_the_buffers_on_its_own_device(monkeypatch):
    seen = []
    monkeypatch.setattr(zero, "place_buffers", lambda model, device: seen.append((model, device)))
    m = nn.Linear(3, 2)
    eng = zero.engine(m, [{"params": list(m.parameters()), "lr": 1e-2}], 3, 1)
    assert seen == [(m, eng.device)]
