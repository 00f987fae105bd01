"""Compressed checkpoints in Hugging Face layout: the shard plan, the shard writer (the
assemble stage's unit of work) and loading.

Layout: `config.json` (the model's config plus a `soco` entry recording the method, the
ratio and, under each module kind's key, the shape of every compressed module: `ranks` for
low-rank ones), tokenizer files, sharded `model-0000k-of-0000n.safetensors` and
`model.safetensors.index.json`. A low-rank linear `X` is stored as `X.down.weight` (k x n)
and `X.up.weight` (m x k) (+ `X.up.bias`); see pipeline/modules.py.

`shard_plan` packs every tensor into shards from the source's tensor headers and the
compressed modules' specs alone, before any tensor is built; each shard is then one unit of
work that any process can write (`write_shard`). `load_compressed(path)` rebuilds the
compressed model directly: the skeleton is created on the meta device, compressed modules
are swapped for meta modules of the recorded shapes, and the shards are assigned in. No
dense weight is ever allocated.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from cluster.storage import Storage, local_path, open_fs

from .errors import UserError
from .model_io import DTYPE_MAP, ModelSource, build_skeleton, materialise
from .modules import KINDS, ModuleKind

FORMAT = "soco-lowrank-v1"

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U64": 8, "U32": 4, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8}


# --------------------------------------------------------------------------- the soco entry
def soco_entry(config) -> dict[str, Any] | None:
    entry = getattr(config, "soco", None)
    return entry if isinstance(entry, dict) and entry.get("format") == FORMAT else None


def entry_modules(entry: dict[str, Any]) -> dict[str, tuple[ModuleKind, Any]]:
    """{qualified module name: (kind, spec)} of every compressed module an entry records."""
    return {name: (kind, spec) for kind in KINDS.values() for name, spec in (entry.get(kind.entry_key) or {}).items()}


def compressed_skeleton(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Meta skeleton of a compressed checkpoint: compressed modules where config.soco says so."""
    entry = soco_entry(config)
    if entry is None:
        raise UserError("config.json has no soco entry: not a checkpoint written by soco")
    model = build_skeleton(config, dtype)
    for name, (kind, spec) in entry_modules(entry).items():
        model.set_submodule(name, kind.skeleton(model.get_submodule(name), spec, dtype))
    return model


# --------------------------------------------------------------------------- shard plan
def _open_remote(url: str, storage_options: dict | None):
    fs, path = open_fs(url, storage_options)
    return fs.open(path, "rb")



def tensor_headers(source: ModelSource) -> dict[str, tuple[str, list[int]]]:
    """{tensor: (dtype, shape)} from the shards' headers only (a remote shard is not downloaded)."""
    out = {}
    for shard in sorted(set(source.weight_map.values())):
        url = f"{source.location}/{shard}"
        opener = open(local_path(url), "rb") if not source.remote else _open_remote(url, source.storage_options)
        with opener as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        out.update({k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return out


@dataclass(frozen=True)
class Entry:
    """One tensor of the checkpoint: a source tensor copied (`module` empty), or tensor `key`
    of the compressed module `module` (named `local` inside layer `layer`, kind `kind`, dense
    bias `bias` or "")."""

    name: str
    module: str = ""
    local: str = ""
    layer: int = -1
    kind: str = ""
    key: str = ""
    bias: str = ""


def shard_plan(source: ModelSource, specs: dict[str, tuple[str, Any]], layers_name: str, n_layers: int,
               dtype: torch.dtype, shard_bytes: int) -> tuple[list[list[Entry]], int]:
    """The checkpoint's shards as lists of entries, and the total size in bytes.

    `specs`: {qualified module name: (kind name, spec)}. Order: non-layer tensors by name,
    then each layer's tensors by name; a new shard starts when the next tensor would take
    the current one over `shard_bytes` (one tensor per shard at least).
    """
    heads = tensor_headers(source)
    size_of_dtype = torch.empty(0, dtype=dtype).element_size()

    def nbytes_copy(name: str) -> int:
        dt, shape = heads[name]
        floating = dt.startswith(("F", "BF"))
        return math.prod(shape) * (size_of_dtype if floating else _ITEMSIZE[dt])

    order: list[tuple[Entry, int]] = []
    for name in sorted(source.weight_map):
        if not name.startswith(layers_name + "."):
            order.append((Entry(name), nbytes_copy(name)))
    for i in range(n_layers):
        prefix = f"{layers_name}.{i}."
        for full in sorted(n for n in source.weight_map if n.startswith(prefix)):
            owner, leaf = full.rsplit(".", 1)
            if owner not in specs:
                order.append((Entry(full), nbytes_copy(full)))
                continue
            if leaf != "weight":
                continue  # a bias goes into the compressed module
            kind_name, spec = specs[owner]
            m, n = heads[full][1]
            bias = f"{owner}.bias" if source.has(f"{owner}.bias") else ""
            for key, numel in KINDS[kind_name].stored(m, n, spec, bool(bias)):
                order.append((Entry(f"{owner}.{key}", owner, owner[len(prefix):], i, kind_name, key, bias), numel * size_of_dtype))
    shards: list[list[Entry]] = []
    pending: list[Entry] = []
    pending_bytes = total = 0
    for entry, nb in order:
        if pending and pending_bytes + nb > shard_bytes:
            shards.append(pending)
            pending, pending_bytes = [], 0
        pending.append(entry)
        pending_bytes += nb
        total += nb
    if pending or not shards:
        shards.append(pending)
    return shards, total


def shard_names(n: int) -> list[str]:
    return [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


# --------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class ShardJob:
    """Everything a process needs to write one shard (picklable: locations, not objects).
    `layer_factors(store, i)` reads layer i's factors from the run folder (module level:
    it travels by reference)."""

    model: str
    run: str
    out: str
    dtype: str
    layer_factors: Callable[[Storage, int], dict[str, dict[str, torch.Tensor]]]


def write_shard(job: ShardJob, fname: str, entries: list[Entry]) -> str:
    """Build one shard from the source tensors and the run's factors and write it; returns
    its SHA-256 (the index records it). Holds one layer's factors at a time."""
    source, store, dtype = ModelSource(job.model), Storage(job.run), DTYPE_MAP[job.dtype]
    modules = sorted({(e.layer, e.module, e.local, e.kind, e.bias) for e in entries if e.module})
    copies = [e.name for e in entries if not e.module] + [b for *_, b in modules if b]
    tensors = source.tensors(copies)
    factors: dict[int, dict] = {}
    built: dict[str, dict[str, torch.Tensor]] = {}
    for i, module, local, kind, bias in modules:
        if i not in factors:
            factors = {i: job.layer_factors(store, i)}  # one layer's factors at a time
        built[module] = KINDS[kind].tensors(factors[i][local], tensors.get(bias) if bias else None, dtype)
    out = {}
    for e in entries:
        if e.module:
            out[e.name] = built[e.module][e.key]
        else:
            t = tensors[e.name]
            out[e.name] = t.to(dtype) if t.is_floating_point() else t
        if out[e.name].is_floating_point() and not bool(torch.isfinite(out[e.name]).all()):
            raise UserError(f"{e.name} came out with NaN or Inf values in {job.dtype}: the checkpoint is not written")
    store_out = Storage(job.out)
    store_out.save_tensors(fname, out, {"format": "pt"})
    return store_out.sha256(fname)


def write_metadata(out: Storage, source: ModelSource, entry: dict[str, Any], dtype: torch.dtype,
                   shards: list[list[Entry]], total: int, checksums: list[str]) -> None:
    """config.json (with the soco entry), the tokenizer files, and the index last: its
    presence marks a complete checkpoint; it records every shard's SHA-256, which loading
    verifies."""
    import os
    import tempfile
    c = source.config.to_dict()
    c["soco"] = entry | {"format": FORMAT}
    c["torch_dtype"] = c["dtype"] = str(dtype).replace("torch.", "")
    c["auto_map"] = {"AutoModelForCausalLM": f"{REMOTE_MODULE}.SocoForCausalLM"}  # plain transformers loads it
    out.write_bytes(f"{REMOTE_MODULE}.py", remote_code(source.config).encode())
    with tempfile.TemporaryDirectory(prefix="soco-meta-") as tmp:
        source.tokenizer().save_pretrained(tmp)
        for f in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, f), "rb") as fh:
                out.write_bytes(f, fh.read())
    out.write_bytes("config.json", json.dumps(c, indent=2).encode())
    names = shard_names(len(shards))
    weight_map = {e.name: names[k] for k, entries in enumerate(shards) for e in entries}
    index = {"metadata": {"total_size": total, "soco_sha256": dict(zip(names, checksums))},
             "weight_map": dict(sorted(weight_map.items()))}
    out.write_bytes("model.safetensors.index.json", json.dumps(index, indent=2).encode())


REMOTE_MODULE = "modeling_soco"


def remote_code(config) -> str:
    """modeling_soco.py for a checkpoint of this config: the template (pipeline/hf_remote)
    and the line naming the transformers class of its model type."""
    from importlib import resources

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    base = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]
    template = resources.files("pipeline.hf_remote").joinpath(f"{REMOTE_MODULE}.py").read_text()
    return template + f'SocoForCausalLM = soco_class("{base}")\n'


# --------------------------------------------------------------------------- loading
def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return DTYPE_MAP[str(dtype).replace("torch.", "")] if not isinstance(dtype, torch.dtype) else dtype


def _assign(source: ModelSource, model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The shards of `source` assigned into a meta skeleton; tied weights tied."""
    materialise(model, model, "", source, dtype)
    model.tie_weights()
    return model


def load_compressed(path: str, dtype: str | torch.dtype | None = None,
                    storage_options: dict[str, Any] | None = None, verify: bool = True) -> nn.Module:
    """Load a soco checkpoint (local folder or fsspec URL) as a ready-to-run model; every
    shard is checked against the SHA-256 its index records unless `verify` is False.

    >>> model = pipeline.load_compressed("runs/default/checkpoint")
    """
    source = ModelSource(path, storage_options, verify=verify)
    if soco_entry(source.config) is None:
        raise UserError(f"{path} is not a soco checkpoint (config.json has no soco entry)")
    if dtype is None:
        dtype = getattr(source.config, "dtype", None) or getattr(source.config, "torch_dtype", None) or "float32"
    dt = _resolve_dtype(dtype)
    return _assign(source, compressed_skeleton(source.config, dt), dt)


def load_dense(path: str | ModelSource, dtype: str | torch.dtype = "float32",
               storage_options: dict[str, Any] | None = None) -> nn.Module:
    """The dense model at `path` (local folder, fsspec URL or bundled:NAME, or a source
    already opened), built the way `load_compressed` builds a checkpoint: meta skeleton,
    then the shards assigned."""
    source = path if isinstance(path, ModelSource) else ModelSource(path, storage_options)
    dt = _resolve_dtype(dtype)
    return _assign(source, build_skeleton(source.config, dt), dt)


__all__ = ["load_compressed", "load_dense", "compressed_skeleton", "shard_plan", "write_shard", "soco_entry"]
