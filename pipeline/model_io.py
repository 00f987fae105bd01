"""Reading Hugging Face causal LMs one decoder layer at a time.

The model is built on the meta device (parameters take no memory; non-persistent buffers
such as rotary frequencies stay real), and a layer's tensors are read from the
safetensors shards only when that layer runs, then dropped again. Peak memory is one
layer plus activations, whatever the depth.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from cluster.storage import fetch_to_cache, file_sha256, is_local, local_path, open_fs

from .errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def worker_location(location: str) -> str:
    """A model location every process resolves the same way, whatever its working directory
    (Ray tasks and Ray Train workers start elsewhere): absolute for a local path; URLs and
    `bundled:` names unchanged."""
    if location.startswith("bundled:") or not is_local(location):
        return location
    return os.path.abspath(local_path(location))


class ModelSource:
    """A model folder (local path, fsspec URL or `bundled:NAME`) and its weight index.

    Remote shards are fetched into the local cache one file at a time, when first needed;
    tensors are then read from them lazily (safetensors memory-maps the file).
    """

    def __init__(self, location: str, storage_options: dict[str, Any] | None = None, verify: bool = True) -> None:
        """`verify`: check each shard against the SHA-256 its index records (checkpoints written
        by soco record them), once per shard and process, before reading from it."""
        self.verify = verify
        self.checksums: dict[str, str] = {}
        self._verified: set[str] = set()
        if location.startswith("bundled:"):
            from .bundled import bundled_model_dir
            location = bundled_model_dir(location.split(":", 1)[1])
        self.location = location.rstrip("/")
        self.storage_options = storage_options
        self.remote = not is_local(location)
        if not self.remote and not os.path.isdir(local_path(location)):
            raise UserError(f"model folder not found: {location}")
        if not self._exists("config.json"):
            raise UserError(f"no config.json in model folder {location}")
        from transformers import AutoConfig
        self.config = AutoConfig.from_pretrained(os.path.dirname(self.file("config.json")))
        if self._exists("model.safetensors.index.json"):
            try:
                with open(self.file("model.safetensors.index.json")) as f:
                    index = json.load(f)
                self.weight_map: dict[str, str] = index["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"the weight index of {location} is damaged: {type(e).__name__}: {e}") from None
            self.checksums = (index.get("metadata") or {}).get("soco_sha256") or {}
        elif self._exists("model.safetensors"):
            with safe_open(self.file("model.safetensors"), "pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise UserError(f"no safetensors weights (model.safetensors[.index.json]) in {location}")

    # --- files ---------------------------------------------------------------
    def _url(self, name: str) -> str:
        return f"{self.location}/{name}"

    def _exists(self, name: str) -> bool:
        if not self.remote:
            return os.path.exists(os.path.join(local_path(self.location), name))
        fs, p = open_fs(self._url(name), self.storage_options)
        return fs.exists(p)

    def file(self, name: str) -> str:
        """Local path of a file of the model folder (fetched into the cache when remote),
        verified against its recorded checksum (see __init__)."""
        path = os.path.join(local_path(self.location), name) if not self.remote else \
            fetch_to_cache(self._url(name), self.storage_options)
        if self.verify and name in self.checksums and name not in self._verified:
            try:
                digest = file_sha256(open(path, "rb"))
            except FileNotFoundError:
                raise UserError(f"{self.location}/{name} is missing") from None
            if digest != self.checksums[name]:
                raise UserError(f"{self.location}/{name} is damaged: its SHA-256 is not the one its index records "
                                "(soco eval --no-verify skips the check)")
            self._verified.add(name)
        return path

    def tokenizer_dir(self) -> str:
        """A local folder holding the tokenizer files (the cache folder when remote)."""
        if self.remote:
            for name in TOKENIZER_FILES:
                if self._exists(name):
                    self.file(name)
        return os.path.dirname(self.file("config.json"))

    def tokenizer(self):
        from transformers import AutoTokenizer
        if not any(self._exists(name) for name in TOKENIZER_FILES[:5]):
            raise UserError(f"{self.location} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:5])}); "
                            "save the model's tokenizer beside its weights")
        try:
            return AutoTokenizer.from_pretrained(self.tokenizer_dir())
        except Exception as e:  # noqa: BLE001 - any tokenizer failure is a bad model folder
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load the tokenizer of {self.location}: {first}") from None

    def check_index(self) -> None:
        """Every tensor the index names is in the shard it names (read from the shards'
        headers only, so a remote model is not downloaded): a damaged or mismatched index is
        one line before anything is written, not a failure halfway through a run."""
        import struct
        listed: dict[str, set[str]] = {}
        for name, shard in self.weight_map.items():
            listed.setdefault(shard, set()).add(name)
        for shard, names in sorted(listed.items()):
            url = self._url(shard)
            try:
                if self.remote:
                    fs, path = open_fs(url, self.storage_options)
                    f = fs.open(path, "rb")
                else:
                    f = open(os.path.join(local_path(self.location), shard), "rb")
                with f:
                    (size,) = struct.unpack("<Q", f.read(8))
                    if size > 100_000_000:
                        raise ValueError(f"header size {size}")
                    held = set(json.loads(f.read(size))) - {"__metadata__"}
            except FileNotFoundError:
                raise UserError(f"{self.location}/{shard}, named by the weight index, is missing") from None
            except (OSError, ValueError, struct.error) as e:
                raise UserError(f"cannot read the header of {self.location}/{shard}: "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            missing = sorted(names - held)
            if missing:
                raise UserError(f"the weight index of {self.location} puts {missing[0]}"
                                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''} in {shard}, "
                                "which does not hold it")

    # --- tensors -------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.weight_map

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors from the shards.

        Each shard is opened for the call and closed after it: a memory map kept open would
        keep every page read so far resident, and resident memory would grow with depth.
        """
        by_shard: dict[str, list[str]] = {}
        for name in names:
            shard = self.weight_map.get(name)
            if shard is None:
                raise UserError(f"tensor '{name}' is missing from {self.location}")
            by_shard.setdefault(shard, []).append(name)
        out = {}
        for shard, shard_names in by_shard.items():
            try:
                with safe_open(self.file(shard), "pt") as f:
                    for name in shard_names:
                        out[name] = f.get_tensor(name).clone()
            except (OSError, SafetensorError, RuntimeError, ValueError) as e:
                raise UserError(f"cannot read {', '.join(shard_names[:2])} from {self.location}/{shard}: "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            for name in shard_names:
                t = out[name]
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise UserError(f"tensor '{name}' in {self.location}/{shard} holds NaN or Inf values")
        return out


@contextmanager
def _meta_parameters() -> Iterator[None]:
    from accelerate import init_empty_weights
    with init_empty_weights(include_buffers=False):
        yield


def build_skeleton(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model with every parameter on the meta device (no memory) and real buffers."""
    from transformers import AutoModelForCausalLM

    from .architectures import attn_implementation, check_supported
    check_supported(config)
    config._attn_implementation = attn_implementation(config)
    try:
        with _meta_parameters():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except ValueError as e:
        raise UserError(f"not a supported causal LM config ({config.model_type}): {e}") from None
    model.eval()
    return model


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder layers, and its qualified name (e.g. 'model.layers')."""
    n = model.config.num_hidden_layers
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return name, mod
    raise UserError(f"cannot find {n} decoder layers in {type(model).__name__}")


def linear_names(layer: nn.Module) -> list[str]:
    """Names (relative to the layer) of the nn.Linear projections that get compressed."""
    return [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]


def tied_source(model: nn.Module, name: str) -> str | None:
    """For a tied output embedding absent from the shards, the name of the tensor it shares."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return None
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    if out is not None and name == f"{names[id(out)]}.weight":
        return f"{names[id(inp)]}.weight"
    return None


def materialise(model: nn.Module, module: nn.Module, prefix: str, source: ModelSource,
                dtype: torch.dtype) -> None:
    """Replace the meta parameters (and persistent buffers) of `module` with real tensors."""
    keys = list(module.state_dict().keys())
    names = {k: f"{prefix}.{k}" if prefix else k for k in keys}
    wanted = {}
    for k, full in names.items():
        wanted[k] = full if source.has(full) else (tied_source(model, full) or full)
    loaded = source.tensors(sorted(set(wanted.values())))
    state = {}
    for k, full in wanted.items():
        t = loaded[full]
        state[k] = t.to(dtype) if t.is_floating_point() else t
    module.load_state_dict(state, assign=True, strict=True)


def offload(module: nn.Module) -> None:
    """Drop a module's parameters and persistent buffers back to the meta device, freeing
    their memory. Its non-persistent buffers (Gemma's embedding scale, rotary frequencies)
    stay real: they are not in the shards, so a module materialised again could not get
    them back."""
    keep = [(m, k, b) for m in module.modules() for k, b in m._buffers.items()
            if b is not None and k in m._non_persistent_buffers_set]
    module.to("meta")
    for m, k, b in keep:
        m._buffers[k] = b


def count_materialised(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.device.type != "meta")


DTYPE_MAP = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
