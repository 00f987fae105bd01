"""The learn log stays readable: DeepSpeed's ZeRO calls two torch.distributed collectives that
torch 2.13 deprecates, and the warning came back at every step (four lines a step)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from cluster import zero


class _Scores(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.s).sum() ** 2


def test_zero_steps_do_not_repeat_torchs_deprecation_warnings():
    model = _Scores()
    eng = zero.engine(model, [{"params": [model.s], "lr": 1e-2}], 3, 1)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    # a fresh record at every step, as any catch_warnings block elsewhere in the run makes it
    for _ in range(3):
        with warnings.catch_warnings(record=True) as seen:
            eng.backward(eng(x))
            eng.step()
        deprecated = [str(w.message) for w in seen
                      if issubclass(w.category, FutureWarning) and "torch.distributed" in str(w.message)]
        assert deprecated == []
