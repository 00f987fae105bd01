"""Sequential, layer-by-layer execution of a causal LM (as llm-compressor's sequential onloading).

All windows go through layer 0, then all through layer 1, and so on; only the layer that
runs is materialised. The arguments each decoder layer needs (rotary embeddings, mask,
positions) are captured per layer by letting the real model run once over a batch with
every decoder layer replaced by a recorder: models whose layers get different arguments
by layer type (sliding-window vs global attention, with their own masks and rotary
embeddings: Gemma 2/3, Cohere2, ...) are then run exactly as their own forward runs them,
with no per-model code. What little is per-architecture lives in pipeline/architectures.py.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .architectures import head_postprocess
from .errors import UserError
from .model_io import ModelSource, find_layers, materialise, offload

LayerArgs = tuple[tuple, dict]
"""What the model passes one decoder layer besides its hidden states: (args, kwargs)."""

_CACHE_KWARGS = frozenset(("past_key_values", "past_key_value", "cache", "layer_past"))
FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")


class _Stop(Exception):
    pass


class _Capture:
    """What the recorders saw during one forward: layer 0's hidden input, each layer's arguments."""

    def __init__(self, n: int) -> None:
        self.hidden: torch.Tensor | None = None
        self.inputs: list[LayerArgs | None] = [None] * n


class _Recorder(nn.Module):
    """Stands in for decoder layer `index`: records the (args, kwargs) the model passes it and
    returns its hidden-states input unchanged; the last layer's recorder stops the forward.

    Attributes it lacks (`attention_type`, `layer_idx`, ...: anything a model's loop may
    read from its layers) come from the layer it stands in for, which is not registered as
    a submodule, so the model's module tree keeps no trace of the swap.
    """

    def __init__(self, inner: nn.Module, index: int, capture: _Capture, last: bool) -> None:
        super().__init__()
        self.__dict__["_inner"] = inner
        self._index, self._capture, self._last = index, capture, last

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_inner")
            if inner is None:
                raise
            return getattr(inner, name)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            hidden, args = args[0], args[1:]
        else:
            hidden = kwargs.pop("hidden_states")
        if self._index == 0:
            self._capture.hidden = hidden
        self._capture.inputs[self._index] = (args, {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS})
        if self._last:
            raise _Stop
        return hidden


def _share(inputs: list[LayerArgs]) -> tuple[LayerArgs, ...]:
    """The per-layer arguments with layers given the very same objects sharing one (args, kwargs)
    pair (layers of one attention type get the same mask and rotary objects); nothing is copied."""
    seen: dict[tuple, LayerArgs] = {}
    out = []
    for args, kwargs in inputs:
        key = (tuple(id(a) for a in args), tuple((k, id(v)) for k, v in kwargs.items()))
        out.append(seen.setdefault(key, (args, kwargs)))
    return tuple(out)


@dataclass
class Batch:
    """Hidden states [B, L, D] of a batch of windows between two layers, and the arguments
    every decoder layer gets for this batch (`inputs[i]` = (args, kwargs) of layer i; empty
    for a batch that only goes through the head, as in `Batch(hidden)`)."""

    hidden: torch.Tensor
    inputs: tuple[LayerArgs, ...] = ()


def layer_output(out: Any) -> torch.Tensor:
    """A decoder layer's hidden states from what it returns: some architectures return a tuple."""
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
        self._post = head_postprocess(model.config)
        self._owners = [n for n, m in model.named_modules()
                        if (n == self.layers_name or not n.startswith(self.layers_name + "."))
                        and n != self.layers_name
                        and (any(True for _ in m.parameters(recurse=False))
                             or any(k in m._buffers and k not in m._non_persistent_buffers_set for k in m._buffers))]
        self.final_norm = next((getattr(self.base, a) for a in FINAL_NORM_NAMES if hasattr(self.base, a)), None)
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
        """Token windows [N, L] -> per-batch hidden states at the input of layer 0, with the
        arguments the model gives each decoder layer for that batch.

        The model's own forward runs once per batch with every decoder layer replaced by a
        recorder (the last one stops it), so masks and rotary embeddings are built by the
        model itself, per layer type; the real layers are put back whatever happens.
        """
        mods = self._load_owners(skip=self._out_emb)
        real = list(self.layers)
        batches = []
        try:
            for start in range(0, windows.shape[0], batch_size):
                capture = _Capture(len(real))
                for j, layer in enumerate(real):
                    self.layers[j] = _Recorder(layer, j, capture, last=j == len(real) - 1)
                try:
                    self.base(input_ids=windows[start:start + batch_size], use_cache=False)
                except _Stop:
                    pass
                missing = [j for j, a in enumerate(capture.inputs) if a is None]
                if capture.hidden is None or missing:
                    raise RuntimeError(f"the forward of {type(self.base).__name__} never reached decoder layer "
                                       f"{missing[0] if missing else 0}")
                batches.append(Batch(capture.hidden.to(self.dtype), _share(capture.inputs)))
        finally:
            for j, layer in enumerate(real):
                self.layers[j] = layer
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

    def layer_index(self, layer: nn.Module) -> int:
        """The index of `layer` (by identity) among the decoder layers."""
        for j, m in enumerate(self.layers):
            if m is layer:
                return j
        raise ValueError(f"{type(layer).__name__} is not one of the decoder layers of this model "
                         "(run the module `with lw.layer(i)` yields)")

    @torch.no_grad()
    def run_layer(self, layer: nn.Module, batches: list[Batch]) -> list[Batch]:
        """Run decoder layer `layer` (one of `self.layers`, e.g. from `with lw.layer(i)`) on
        every batch, with the arguments the model gives that layer."""
        i = self.layer_index(layer)
        out = []
        for b in batches:
            if len(b.inputs) != len(self.layers):
                raise ValueError("this batch carries no per-layer arguments: make batches with LayerwiseModel.embed")
            args, kwargs = b.inputs[i]
            out.append(Batch(layer_output(layer(b.hidden, *args, **kwargs)), b.inputs))
        return out

    @torch.no_grad()
    def map_logits(self, batches: list[Batch], fn: Callable[[int, torch.Tensor], None]) -> None:
        """Call fn(window index, logits [L, V]) for every window, one window at a time
        (a batch of full-vocabulary logits would be the largest tensor of the run).

        The logits are those of the model's CausalLM forward: final norm, lm_head, then what
        that forward applies after the lm_head (soft-capping, logit scale: architectures.py)."""
        mods = self._load_owners(skip=self._in_emb)
        head = self.model.get_output_embeddings()
        row = 0
        try:
            for b in batches:
                for h in b.hidden:
                    logits = head(self.final_norm(h[None]))
                    if self._post is not None:
                        logits = self._post(logits)
                    fn(row, logits.float()[0])
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
