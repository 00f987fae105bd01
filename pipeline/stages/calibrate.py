"""Calibrate: run the calibration windows through the dense model layer by layer and
collect, for every linear of every layer, the input Gram matrix X^T X (float64) and the
mean |x| per input channel.

Output contract, one file per layer, `calib/layer-00012.safetensors`:
  `<key>.gram` (n x n float64), `<key>.mean_abs` (n float64), metadata
  `alias` = JSON {linear name in the layer: key} (linears fed the same tensor, such as
  q/k/v, share one key) and `tokens` = rows accumulated.
Also `calib/windows.safetensors` (`windows`: the token ids [N, L]) and
`calib/final-hidden.safetensors` (`hidden`: the dense model's last hidden states [N, L, d]),
from which SoCo's learn stage derives its distillation targets without re-running the model.
"""
from __future__ import annotations

import json

import torch
from torch import nn
from tqdm.auto import tqdm

from cluster.storage import Storage

from ..layerwise import LayerwiseModel
from ..model_io import linear_names


WINDOWS_FILE = "calib/windows.safetensors"
FINAL_HIDDEN_FILE = "calib/final-hidden.safetensors"


def calib_file(i: int) -> str:
    return f"calib/layer-{i:05d}.safetensors"


class InputStats:
    """Forward pre-hooks that accumulate X^T X and sum |x| of each linear's input."""

    def __init__(self, layer: nn.Module) -> None:
        self.alias: dict[str, str] = {}
        self.gram: dict[str, torch.Tensor] = {}
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._seen: dict[int, tuple[str, torch.Tensor]] = {}  # holds x so its id is not reused
        self._handles = []
        for name in linear_names(layer):
            mod = layer.get_submodule(name)
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        self._handles.append(layer.register_forward_pre_hook(lambda *_: self._seen.clear()))

    def _hook(self, name: str):
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0]
            key = self._seen.setdefault(id(x), (name, x))[0]
            self.alias[name] = key
            if key != name:
                return  # same tensor as an earlier linear of this forward: already counted
            x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            if name not in self.gram:
                self.gram[name] = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64)
                self.abs_sum[name] = torch.zeros(x2.shape[1], dtype=torch.float64)
                self.rows[name] = 0
            self.gram[name].addmm_(x2.T, x2)
            self.abs_sum[name] += x2.abs().sum(0)
            self.rows[name] += x2.shape[0]
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        out = {}
        for key, g in self.gram.items():
            out[f"{key}.gram"] = g
            out[f"{key}.mean_abs"] = self.abs_sum[key] / max(self.rows[key], 1)
        rows = max(self.rows.values()) if self.rows else 0
        return out, {"alias": json.dumps(self.alias), "tokens": str(rows)}


def load_layer_stats(store: Storage, i: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(gram, mean_abs) by linear name for layer i, resolving shared keys."""
    tensors = store.load_tensors(calib_file(i))
    alias = json.loads(store.tensor_metadata(calib_file(i))["alias"])
    grams = {name: tensors[f"{key}.gram"] for name, key in alias.items()}
    means = {name: tensors[f"{key}.mean_abs"] for name, key in alias.items()}
    return grams, means


@torch.no_grad()
def run_calibrate(lw: LayerwiseModel, calib: torch.Tensor, batch_size: int, store: Storage,
                  progress: bool = True) -> None:
    batches = lw.embed(calib, batch_size)
    for i in tqdm(range(len(lw.layers)), desc="calibrate", unit="layer", disable=not progress):
        with lw.layer(i) as layer:
            stats = InputStats(layer)
            try:
                batches = lw.run_layer(layer, batches)
            finally:
                stats.remove()
        tensors, meta = stats.tensors()
        store.save_tensors(calib_file(i), tensors, meta)
    store.save_tensors(WINDOWS_FILE, {"windows": calib})
    store.save_tensors(FINAL_HIDDEN_FILE, {"hidden": torch.cat([b.hidden for b in batches])})
