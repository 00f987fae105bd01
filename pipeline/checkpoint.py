"""Compressed checkpoints in Hugging Face layout, written and read one layer at a time.

Layout: `config.json` (the model's config plus a `soco` entry recording the method, the
ratio and the rank of every compressed module), tokenizer files, sharded
`model-0000k-of-0000n.safetensors` and `model.safetensors.index.json`. A compressed
linear `X` is stored as `X.down.weight` (k x n) and `X.up.weight` (m x k) (+ `X.up.bias`).

`load_compressed(path)` rebuilds the compressed model directly: the skeleton is created
on the meta device, compressed linears are swapped for meta LowRankLinear modules of the
recorded ranks, and the shards are assigned in. No dense weight is ever allocated.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from cluster.storage import Storage
from soco.decompose import Factors
from soco.lowrank import LowRankLinear

from .errors import UserError
from .model_io import DTYPE_MAP, ModelSource, build_skeleton, find_layers, materialise

FORMAT = "soco-lowrank-v1"


class ShardWriter:
    """Streams tensors into ~max_bytes safetensors shards in a local folder, then names them
    `model-0000k-of-0000n.safetensors` and writes the index once the count is known."""

    def __init__(self, folder: str, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        idx = len(self.shards)
        save_file(self.pending, os.path.join(self.folder, f"shard-{idx:05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> dict[str, str]:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        weight_map = {}
        for idx, names in enumerate(self.shards):
            final = f"model-{idx + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.folder, f"shard-{idx:05d}.tmp"), os.path.join(self.folder, final))
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
        return weight_map


def soco_entry(config) -> dict[str, Any] | None:
    entry = getattr(config, "soco", None)
    return entry if isinstance(entry, dict) and entry.get("format") == FORMAT else None


def to_lowrank(layer: nn.Module, ranks: dict[str, int], device: str = "meta",
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """Swap the named linears of a module for (empty) LowRankLinear modules of the given ranks."""
    for name, k in ranks.items():
        lin = layer.get_submodule(name)
        layer.set_submodule(name, LowRankLinear(lin.in_features, lin.out_features, k, bias=lin.bias is not None,
                                                device=device, dtype=dtype))
    return layer


def compressed_skeleton(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Meta skeleton of a compressed checkpoint: low-rank modules where config.soco says so."""
    entry = soco_entry(config)
    if entry is None:
        raise UserError("config.json has no soco entry: not a checkpoint written by soco")
    model = build_skeleton(config, dtype)
    for name, k in entry["ranks"].items():
        parent, child = name.rsplit(".", 1)
        to_lowrank(model.get_submodule(parent), {child: k}, dtype=dtype)
    return model


def lowrank_from_factors(f: dict[str, torch.Tensor], bias: torch.Tensor | None, dtype: torch.dtype) -> LowRankLinear:
    up, down = Factors(f["U"].double(), f["sigma"].double(), f["Vt"].double()).split(dtype=dtype)
    return LowRankLinear.from_factors(up, down, bias)


def write_checkpoint(source: ModelSource, model: nn.Module, layer_factors: Callable[[int], dict[str, dict[str, torch.Tensor]]],
                     soco: dict[str, Any], store: Storage, rel: str, dtype: torch.dtype, shard_bytes: int,
                     progress: bool = True) -> None:
    """Stream the compressed model into a checkpoint folder and publish it at `rel` at once.

    Non-layer tensors are copied from the source (a tied output embedding stays tied); in
    each layer the planned linears are written as factor pairs and everything else as is.
    The folder is built locally and published only when complete.
    """
    layers_name, layers = find_layers(model)
    staging = tempfile.mkdtemp(prefix="soco-ckpt-", dir=store.path() if store.local else None)
    try:
        writer = ShardWriter(staging, shard_bytes)
        layer_prefix = layers_name + "."
        for name in sorted(source.weight_map):
            if not name.startswith(layer_prefix):
                writer.add(name, _cast(source.tensors([name])[name], dtype))
        for i in tqdm(range(len(layers)), desc="assemble", unit="layer", disable=not progress):
            prefix = f"{layers_name}.{i}."
            factors = layer_factors(i)
            names = sorted(n for n in source.weight_map if n.startswith(prefix))
            tensors = source.tensors(names)
            for full in names:
                rel_name = full[len(prefix):]
                owner, leaf = rel_name.rsplit(".", 1)
                if owner in factors:
                    if leaf == "weight":
                        bias = tensors.get(f"{prefix}{owner}.bias")
                        mod = lowrank_from_factors(factors[owner], bias, dtype)
                        for k, v in mod.state_dict().items():
                            writer.add(f"{prefix}{owner}.{k}", v)
                    continue  # a bias went into the low-rank module above
                writer.add(full, _cast(tensors[full], dtype))
        writer.close()
        cfg = source.config.to_dict()
        cfg["soco"] = soco | {"format": FORMAT}
        cfg["torch_dtype"] = cfg["dtype"] = str(dtype).replace("torch.", "")
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        source.tokenizer().save_pretrained(staging)
        store.put_dir(staging, rel)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def load_compressed(path: str, dtype: str | torch.dtype | None = None,
                    storage_options: dict[str, Any] | None = None) -> nn.Module:
    """Load a soco checkpoint (local folder or fsspec URL) as a ready-to-run model.

    >>> model = pipeline.load_compressed("runs/default/checkpoint")
    """
    source = ModelSource(path, storage_options)
    if soco_entry(source.config) is None:
        raise UserError(f"{path} is not a soco checkpoint (config.json has no soco entry)")
    if dtype is None:
        dtype = getattr(source.config, "dtype", None) or getattr(source.config, "torch_dtype", None) or "float32"
    dt = DTYPE_MAP[str(dtype).replace("torch.", "")] if not isinstance(dtype, torch.dtype) else dtype
    model = compressed_skeleton(source.config, dt)
    materialise(model, model, "", source, dt)
    model.tie_weights()
    return model


__all__ = ["load_compressed", "write_checkpoint", "compressed_skeleton", "ShardWriter"]
