"""The worker of the data-parallel stages (calibrate, evaluate): it holds a contiguous share
of the windows and their hidden states, and runs them through one decoder layer at a time.

All shares go through layer i before any goes through layer i + 1, so each process holds one
layer's weights plus its share's activations, whatever the depth. With one share (the
in-process executor) this is exactly a plain layer-by-layer forward of all windows.
"""
from __future__ import annotations

import torch

from ..checkpoint import compressed_skeleton
from ..layerwise import Batch, LayerwiseModel
from ..model_io import DTYPE_MAP, ModelSource, build_skeleton


class WindowShare:
    """A share of the windows, advanced layer by layer (see the module docstring)."""

    def __init__(self) -> None:
        self.lw: LayerwiseModel | None = None
        self.batches: list[Batch] = []
        self.windows: torch.Tensor | None = None

    def load(self, location: str, compressed: bool, dtype_name: str, windows: torch.Tensor, batch_size: int,
             verify: bool = True) -> int:
        """Build the (compressed or dense) model from `location` and embed the windows; the layer
        count. `verify`: check shards against their recorded checksums (model_io.ModelSource)."""
        source = ModelSource(location, verify=verify)
        dtype = DTYPE_MAP[dtype_name]
        model = compressed_skeleton(source.config, dtype) if compressed else build_skeleton(source.config, dtype)
        self.lw = LayerwiseModel(model, source, dtype)
        self.windows = windows
        self.batches = self.lw.embed(windows, batch_size)
        return len(self.lw.layers)

    @torch.no_grad()
    def forward(self, i: int) -> None:
        """Run the share through layer i."""
        with self.lw.layer(i) as layer:
            self.batches = self.lw.run_layer(layer, self.batches)

    def final_hidden(self) -> torch.Tensor:
        """Hidden states after the last layer, [share, L, d] (empty for an empty share)."""
        return torch.cat([b.hidden for b in self.batches]) if self.batches else torch.empty(0)

    def nll(self) -> tuple[float, int]:
        """Summed next-token NLL of the share and its token count."""
        return self.lw.nll(self.batches, self.windows)


def join_shares(parts: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """The shares' tensors (`final_hidden` and the like) joined in window order; an empty
    share's empty tensor has no shape to join, so it is left out."""
    return torch.cat([p for p in parts if p.numel()])


def split_windows(windows: torch.Tensor, n: int) -> list[torch.Tensor]:
    """n contiguous shares (the first ones one window larger when n does not divide)."""
    return [s.contiguous() for s in torch.tensor_split(windows, n)]
