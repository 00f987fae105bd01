"""Calibrate: run the calibration windows through the dense model layer by layer and collect,
for every linear of every layer, the statistics the method declares (`Method.statistics`:
classes with `name`, `collecting(layer)`, `merge(parts)`, `save(store, i)`, `load(store, i)`;
every method so far uses InputStats: the input Gram matrix X^T X in float64 and the mean |x|
per input channel).

Units: shares of the windows (stages/shares.py), all advanced through layer i before layer
i + 1; per layer each share returns its raw sums, and the statistics' own `merge(parts)`
adds them in share order on one worker, which commits the layer's file (the Gram matrices
go worker to worker, never through the driver; at most two layers are in flight).

Output contract, one file per layer, `calib/layer-00012.safetensors`:
  `<key>.gram` (n x n float64), `<key>.mean_abs` (n float64), metadata
  `alias` = JSON {linear name in the layer: key} (linears fed the same tensor, such as
  q/k/v, share one key) and `tokens` = rows accumulated.
While it runs, `calib-resume/hidden.safetensors` holds the hidden states at the input of the
next layer every `run.calib_resume_s` seconds, so an interrupted calibration (a killed run,
a dead Ray worker) goes on from there; it is removed when the stage commits.
Also `calib/windows.safetensors` (`windows`: the token ids [N, L]) and
`calib/final-hidden.safetensors` (`hidden`: the dense model's last hidden states [N, L, d]),
from which SoCo's learn stage derives its distillation targets without re-running the model.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from cluster.storage import Storage

from ..model_io import linear_names, worker_location
from .base import Stage, StageContext
from .shares import WindowShare, join_shares, split_windows

WINDOWS_FILE = "calib/windows.safetensors"
#: hidden states of all calibration windows at the input of layer `next_layer` (metadata),
#: saved while the stage runs so an interrupted calibration restarts there, not at layer 0;
#: not an output: removed when the stage commits
RESUME_FILE = "calib-resume/hidden.safetensors"
FINAL_HIDDEN_FILE = "calib/final-hidden.safetensors"


def calib_file(i: int) -> str:
    return f"calib/layer-{i:05d}.safetensors"


@dataclass
class InputStats:
    """Sums over the calibration inputs of each linear of one layer: X^T X, sum |x|, rows.

    `collecting(layer)` fills one with forward pre-hooks; `merge(parts)` adds the shares'
    sums (in order); `save` commits the layer's file in the contract above."""

    name = "inputs"  # statistics are named in the calibrate stage's key

    alias: dict[str, str] = field(default_factory=dict)
    gram: dict[str, torch.Tensor] = field(default_factory=dict)
    abs_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    @classmethod
    @contextmanager
    def collecting(cls, layer: nn.Module) -> Iterator["InputStats"]:
        stats = cls()
        seen: dict[int, tuple[str, torch.Tensor]] = {}  # holds x so that its id is not reused

        def hook_for(name: str):
            def hook(_mod: nn.Module, args: tuple) -> None:
                x = args[0]
                key = seen.setdefault(id(x), (name, x))[0]
                stats.alias[name] = key
                if key == name:  # else: the same tensor as an earlier linear's, already counted
                    stats.add(name, x)
            return hook

        handles = [layer.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in linear_names(layer)]
        handles.append(layer.register_forward_pre_hook(lambda *_: seen.clear()))
        try:
            yield stats
        finally:
            for h in handles:
                h.remove()

    def add(self, name: str, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if name not in self.gram:
            self.gram[name] = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64)
            self.abs_sum[name] = torch.zeros(x2.shape[1], dtype=torch.float64)
            self.rows[name] = 0
        self.gram[name].addmm_(x2.T, x2)
        self.abs_sum[name] += x2.abs().sum(0)
        self.rows[name] += x2.shape[0]

    @classmethod
    def merge(cls, parts: list["InputStats"]) -> "InputStats":
        """The sums of all shares, added in share order."""
        merged = cls()
        for p in parts:
            merged.alias.update(p.alias)
            for key, g in p.gram.items():
                if key in merged.gram:
                    merged.gram[key] += g
                    merged.abs_sum[key] += p.abs_sum[key]
                    merged.rows[key] += p.rows[key]
                else:
                    merged.gram[key] = g.clone()
                    merged.abs_sum[key] = p.abs_sum[key].clone()
                    merged.rows[key] = p.rows[key]
        return merged

    def save(self, store: Storage, i: int) -> None:
        out = {}
        for key, g in self.gram.items():
            out[f"{key}.gram"] = g
            out[f"{key}.mean_abs"] = self.abs_sum[key] / max(self.rows[key], 1)
        rows = max(self.rows.values()) if self.rows else 0
        store.save_tensors(calib_file(i), out, {"alias": json.dumps(self.alias), "tokens": str(rows)})


    @staticmethod
    def load(store: Storage, i: int) -> dict[str, dict[str, torch.Tensor]]:
        """{"gram": {linear: X^T X}, "mean_abs": {linear: mean |x|}} of layer i, shared keys resolved."""
        tensors = store.load_tensors(calib_file(i))
        alias = json.loads(store.tensor_metadata(calib_file(i))["alias"])
        return {"gram": {name: tensors[f"{key}.gram"] for name, key in alias.items()},
                "mean_abs": {name: tensors[f"{key}.mean_abs"] for name, key in alias.items()}}


def load_layer_stats(store: Storage, i: int, statistics: tuple[type, ...] = (InputStats,)) -> dict[str, dict]:
    """Every statistic of layer i: {statistic: {linear: tensor}}."""
    out: dict[str, dict] = {}
    for cls in statistics:
        out.update(cls.load(store, i))
    return out


class CalibrationShare(WindowShare):
    """A share of the calibration windows that collects statistics while it runs."""

    @torch.no_grad()
    def collect(self, i: int, statistics: tuple[type, ...]) -> list:
        """Run layer i on this share with every statistic's hooks; their raw sums, in order."""
        with self.lw.layer(i) as layer, contextlib.ExitStack() as hooks:
            parts = [hooks.enter_context(cls.collecting(layer)) for cls in statistics]
            self.batches = self.lw.run_layer(layer, self.batches)
        return parts

    def commit(self, run_url: str, i: int, statistics: tuple[type, ...], *shares: list) -> None:
        """Merge each statistic's sums of layer i over the shares and commit its file."""
        for k, cls in enumerate(statistics):
            cls.merge([parts[k] for parts in shares]).save(Storage(run_url), i)

    def save_resume(self, run_url: str, next_layer: int, *hidden: torch.Tensor) -> None:
        """Commit every share's hidden states at the input of `next_layer` (one file)."""
        Storage(run_url).save_tensors(RESUME_FILE, {"hidden": join_shares(hidden)},
                                      {"next_layer": str(next_layer)})

    def restore(self, run_url: str, first: int) -> None:
        """Replace this share's hidden states by the saved ones (its rows start at `first`)."""
        hidden = Storage(run_url).load_tensors(RESUME_FILE)["hidden"]
        for b in self.batches:
            b.hidden = hidden[first:first + b.hidden.shape[0]].to(b.hidden.dtype).clone()
            first += b.hidden.shape[0]

    def commit_extras(self, run_url: str, windows: torch.Tensor, *hidden: torch.Tensor) -> None:
        store = Storage(run_url)
        store.save_tensors(WINDOWS_FILE, {"windows": windows})
        store.save_tensors(FINAL_HIDDEN_FILE, {"hidden": join_shares(hidden)})


class Calibrate(Stage):
    name = "calibrate"
    contract = "2"
    outputs = ("calib",)
    fields = ("model", "data.source", "data.text_field", "data.calib_samples", "data.seq_len", "run.dtype")

    def key_extra(self, method) -> list[str]:
        return [cls.name for cls in method.statistics]

    def run(self, ctx: StageContext) -> None:
        stats = tuple(ctx.method.statistics)
        calib = ctx.windows.calib
        ex = ctx.executor
        n = ex.width(calib.shape[0])
        url = ctx.store.worker_url()
        start = resume_point(ctx.store, ctx.n_layers) if ctx.resume else 0
        if start == 0:
            ctx.store.rm(RESUME_FILE)
        every_s = ctx.cfg.run.calib_resume_s
        with ex.group(CalibrationShare, n) as shares:
            loc = worker_location(ctx.cfg.model)
            bs = ctx.cfg.data.batch_size
            parts = split_windows(calib, n)
            shares.get(shares.each("load", [(loc, False, ctx.dtype_name, s, bs) for s in parts]))
            if start:
                firsts = [sum(p.shape[0] for p in parts[:k]) for k in range(n)]
                shares.get(shares.each("restore", [(url, f) for f in firsts]))
                print(f"soco: calibrate: layers 0-{start - 1} were committed before: going on from layer {start}",
                      file=sys.stderr, flush=True)
            in_flight = []
            saved = time.monotonic()
            desc = "calibrate" + (f" ({n} workers)" if n > 1 else "")
            for i in tqdm(range(start, ctx.n_layers), desc=desc, unit="layer", disable=not ctx.progress,
                          initial=start, total=ctx.n_layers):
                in_flight.append(shares.one(0, "commit", url, i, stats, *shares.all("collect", i, stats)))
                if len(in_flight) > 1:  # at most two layers' statistics alive at once
                    shares.get(in_flight.pop(0))
                if i + 1 < ctx.n_layers and time.monotonic() - saved >= every_s:
                    shares.get(in_flight)  # layers up to i are committed: a restart may begin at i + 1
                    in_flight = []
                    shares.get(shares.one(0, "save_resume", url, i + 1, *shares.all("final_hidden")))
                    saved = time.monotonic()
            shares.get(in_flight)
            shares.get(shares.one(0, "commit_extras", url, calib, *shares.all("final_hidden")))
        ctx.store.rm("calib-resume")


def resume_point(store: Storage, n_layers: int) -> int:
    """The layer an interrupted calibration goes on from: the saved hidden states' layer when
    every layer before it is committed, else 0."""
    if not store.exists(RESUME_FILE):
        return 0
    try:
        start = int(store.tensor_metadata(RESUME_FILE).get("next_layer", 0))
    except (ValueError, OSError):
        return 0  # a damaged file: start over
    if not 0 < start < n_layers or not all(store.exists(calib_file(i)) for i in range(start)):
        return 0
    return start
