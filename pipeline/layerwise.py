"""Sequential, layer-by-layer execution of a causal LM (as llm-compressor's sequential onloading).

All windows go through layer 0, then all through layer 1, and so on; only the layer that
runs is materialised. The kwargs a decoder layer needs (rotary embeddings, mask, positions)
are captured once by letting the real model run up to its first layer, so any Hugging Face
architecture with a standard decoder-layer stack works without per-model code.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import UserError
from .model_io import ModelSource, find_layers, materialise, offload


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for layer 0 to record what the model passes to its decoder layers."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        if hasattr(inner, "attention_type"):
            self.attention_type = inner.attention_type
        self.captured: tuple[torch.Tensor, tuple, dict] | None = None

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.captured = (hidden, args, kwargs)
        raise _Stop


@dataclass
class Batch:
    """Hidden states of a batch of windows between two layers, with the layer kwargs."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class LayerwiseModel:
    """A meta-device model whose modules are materialised from `source` only while used.

    `layer_factory(i, layer)` may transform a materialised layer before it runs (the
    compressed paths swap linears for low-rank modules there); `on_layer` is called with
    the model after each layer is materialised (tests count resident parameters with it).
    """

    def __init__(self, model: nn.Module, source: ModelSource, dtype: torch.dtype,
                 on_layer: Callable[[nn.Module, int], None] | None = None) -> None:
        self.model, self.source, self.dtype, self.on_layer = model, source, dtype, on_layer
        self.layers_name, self.layers = find_layers(model)
        self.base = getattr(model, model.base_model_prefix)
        names = {id(m): n for n, m in model.named_modules()}
        self._in_emb = names[id(model.get_input_embeddings())]
        out = model.get_output_embeddings()
        self._out_emb = names[id(out)] if out is not None else None
        self._owners = [n for n, m in model.named_modules()
                        if (n == self.layers_name or not n.startswith(self.layers_name + "."))
                        and n != self.layers_name
                        and (any(True for _ in m.parameters(recurse=False))
                             or any(k in m._buffers and k not in m._non_persistent_buffers_set for k in m._buffers))]
        self.final_norm = next((getattr(self.base, a) for a in ("norm", "final_layernorm", "ln_f")
                                if hasattr(self.base, a)), None)
        if self.final_norm is None:
            raise UserError(f"cannot find the final norm of {type(model).__name__}")

    # --- non-layer modules ---------------------------------------------------
    def _load_owners(self, skip: str | None) -> list[nn.Module]:
        """Materialise the non-layer modules (embeddings, final norm, head) except `skip`."""
        mods = []
        for n in self._owners:
            if n == skip:
                continue
            mod = self.model.get_submodule(n)
            materialise(self.model, mod, n, self.source, self.dtype)
            mods.append(mod)
        return mods

    def load_non_layer(self) -> list[nn.Module]:
        """Materialise every non-layer module (for building a whole model from parts)."""
        return self._load_owners(skip=None)

    @torch.no_grad()
    def embed(self, windows: torch.Tensor, batch_size: int) -> list[Batch]:
        """Token windows [N, L] -> per-batch hidden states at the input of layer 0."""
        mods = self._load_owners(skip=self._out_emb)
        first = self.layers[0]
        catcher = _Catcher(first)
        self.layers[0] = catcher
        batches = []
        try:
            for start in range(0, windows.shape[0], batch_size):
                ids = windows[start:start + batch_size]
                try:
                    self.base(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
                assert catcher.captured is not None, "the model never reached its first decoder layer"
                hidden, args, kwargs = catcher.captured
                kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache", "past_key_value")}
                batches.append(Batch(hidden.to(self.dtype), args, kwargs))
        finally:
            self.layers[0] = first
            for m in mods:
                offload(m)
        return batches

    @contextmanager
    def layer(self, i: int, transform: Callable[[int, nn.Module], nn.Module] | None = None) -> Iterator[nn.Module]:
        """Materialise decoder layer i (optionally transformed), yield it, then drop it."""
        layer = self.layers[i]
        materialise(self.model, layer, f"{self.layers_name}.{i}", self.source, self.dtype)
        if transform is not None:
            layer = transform(i, layer)
            self.layers[i] = layer
        if self.on_layer is not None:
            self.on_layer(self.model, i)
        try:
            yield layer
        finally:
            offload(layer)

    @staticmethod
    @torch.no_grad()
    def run_layer(layer: nn.Module, batches: list[Batch]) -> list[Batch]:
        return [Batch(_layer_output(layer(b.hidden, *b.args, **b.kwargs)), b.args, b.kwargs) for b in batches]

    @torch.no_grad()
    def map_logits(self, batches: list[Batch], fn: Callable[[int, torch.Tensor], None]) -> None:
        """Call fn(window index, logits [L, V]) for every window, one window at a time
        (a batch of full-vocabulary logits would be the largest tensor of the run)."""
        mods = self._load_owners(skip=self._in_emb)
        head = self.model.get_output_embeddings()
        row = 0
        try:
            for b in batches:
                for h in b.hidden:
                    fn(row, head(self.final_norm(h[None])).float()[0])
                    row += 1
        finally:
            for m in mods:
                offload(m)

    def nll(self, batches: list[Batch], windows: torch.Tensor) -> tuple[float, int]:
        """Summed next-token negative log-likelihood of the windows, and the token count."""
        acc = {"total": 0.0, "count": 0}

        def add(row: int, logits: torch.Tensor) -> None:
            target = windows[row, 1:]
            acc["total"] += float(torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum"))
            acc["count"] += target.numel()

        self.map_logits(batches, add)
        return acc["total"], acc["count"]
