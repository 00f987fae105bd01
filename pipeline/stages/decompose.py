"""Decompose: factor every planned linear as the method says.

Units: decoder layers. A unit reads the plan, the layer's weights from the model's shards and
its `calib/` statistics, and commits its own factors file; only locations go in and a number
comes back. Per layer rather than per matrix: all layers of a model cost the same, so with
layers >> workers the load balances; q/k/v (and gate/up) share one Gram matrix, read once;
and the output stays one file per layer. On a Ray cluster with GPUs each unit gets one and
the SVDs run there.

Input: the dense weights, `calib/layer-*.safetensors`, the plan the method made, committed
first as `factors/plan.json` ({"method", "ratio", "ranks", "shapes"}, pipeline/plan.py).
A method whose plan needs every matrix's spectrum first (MGAA) gets a first pass of units
that return the singular values of each layer's matrices; the plan is made from them.
Output contract, one file per layer, `factors/layer-00012.safetensors`: per module, the
tensors its kind is built from (pipeline/modules.py), float32: for a low-rank module
`<linear>.U` (m x k), `<linear>.sigma` (k), `<linear>.Vt` (k x n) with W ~ U diag(sigma) Vt;
for a narrower dense module `<linear>.W` (+ `<linear>.b`); metadata `method` and what the
method records (JSON; the baselines: `damping`, {linear: whitening load}).
"""
from __future__ import annotations

import contextlib
import json
import sys
from functools import partial
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cluster.storage import Storage

from ..model_io import ModelSource, build_skeleton, worker_location
from ..plan import Plan
from .base import Stage, StageContext
from .calibrate import InputStats, load_layer_stats

if TYPE_CHECKING:
    from ..methods.base import Method

FACTORS_PLAN = "factors/plan.json"


def factors_file(i: int) -> str:
    return f"factors/layer-{i:05d}.safetensors"


@dataclass(frozen=True)
class DecomposeJob:
    """What a unit needs (picklable): the model and run folder locations, the method (it
    factors each matrix) and the run config (its settings, e.g. compress.asvd_alpha)."""

    model: str
    run: str
    layers_name: str
    method: "Method"
    cfg: Any


def unit_device() -> str | None:
    """'cuda' when this process sees a GPU (a Ray task given one, or a GPU machine), else None."""
    return "cuda" if torch.cuda.is_available() else None


@dataclass(frozen=True)
class Evidence:
    """What a plan may be made from besides the model's shapes: the run folder (its
    calibration statistics) and, for a method that `needs_spectra`, every planned matrix's
    singular values by qualified name."""

    store: Storage
    layers_name: str
    n_layers: int
    spectra: dict[str, torch.Tensor]


def _layer_inputs(job: DecomposeJob, i: int, names: list[str], device: str | None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Layer i's weights of the named linears and its statistics, on `device`."""
    store = Storage(job.run)
    stats = load_layer_stats(store, i, job.method.statistics)
    weights = ModelSource(job.model).tensors([f"{job.layers_name}.{i}.{name}.weight" for name in names])
    weights = {name: weights[f"{job.layers_name}.{i}.{name}.weight"] for name in names}
    if device is not None:
        weights = {n: w.to(device) for n, w in weights.items()}
        stats = {key: {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in v.items()}
                 for key, v in stats.items()}
    return weights, stats


def layer_spectra(job: DecomposeJob, i: int) -> dict[str, torch.Tensor]:
    """The spectrum (method.spectrum) of the linears of layer i that calibrate saw and the
    method wants one of, by qualified name."""
    device = unit_device()
    names = sorted(InputStats.load(Storage(job.run), i)["gram"])
    weights, stats = _layer_inputs(job, i, names, device)
    out = {}
    with torch.device(device) if device else contextlib.nullcontext():
        for n in names:
            s = job.method.spectrum(n, weights[n], {k: v.get(n) for k, v in stats.items()}, job.cfg)
            if s is not None:
                out[f"{job.layers_name}.{i}.{n}"] = s.float().cpu()
    return out


def decompose_layer(job: DecomposeJob, i: int) -> int:
    """Compress the planned modules of layer i (on a GPU when this process has one) and
    commit its factors file; returns i."""
    store = Storage(job.run)
    plan = Plan.from_json(store.read_json(FACTORS_PLAN))
    device = unit_device()
    ranks = plan.layer_ranks(job.layers_name, i)
    weights, stats = _layer_inputs(job, i, list(ranks), device)
    with torch.device(device) if device else contextlib.nullcontext():  # identities etc. go there too
        modules, meta = job.method.compress_layer(weights, stats, ranks, job.cfg)
    out = {f"{name}.{part}": t.float().cpu().contiguous() for name, parts in modules.items() for part, t in parts.items()}
    store.save_tensors(factors_file(i), out, {"method": plan.method} | {k: json.dumps(v) for k, v in meta.items()})
    return i


def load_factor_file(store: Storage, rel: str) -> dict[str, dict[str, torch.Tensor]]:
    """{linear: {"U", "sigma", "Vt"}} from a file in the factors contract (factors/ or learned/)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in store.load_tensors(rel).items():
        name, part = key.rsplit(".", 1)
        out.setdefault(name, {})[part] = v
    return out


def load_layer_factors(store: Storage, i: int) -> dict[str, dict[str, torch.Tensor]]:
    """{linear: {"U", "sigma", "Vt"}} for layer i."""
    return load_factor_file(store, factors_file(i))


class Decompose(Stage):
    name = "decompose"
    contract = "1"
    outputs = ("factors",)
    fields = ("compress.method", "compress.ratio")

    def run(self, ctx: StageContext) -> None:
        if not ctx.resume:  # files of an earlier run with other inputs must not pass for this one's
            ctx.store.rm("factors")
        job = DecomposeJob(worker_location(ctx.cfg.model), ctx.store.worker_url(), ctx.layers_name, ctx.method, ctx.cfg)
        spectra: dict[str, torch.Tensor] = {}
        if ctx.method.needs_spectra:
            for part in ctx.executor.map(partial(layer_spectra, job), range(ctx.n_layers), "spectra", ctx.progress):
                spectra.update(part)
        evidence = Evidence(ctx.store, ctx.layers_name, ctx.n_layers, spectra)
        plan = ctx.method.decomposition_plan(ctx.cfg, build_skeleton(ctx.source.config, ctx.dtype), evidence)
        if ctx.resume and ctx.store.exists(FACTORS_PLAN) and ctx.store.read_json(FACTORS_PLAN) != plan.to_json():
            ctx.store.rm("factors")  # not the plan the committed layers were factored with
        ctx.store.write_json(FACTORS_PLAN, plan.to_json())
        todo = [i for i in range(ctx.n_layers) if not (ctx.resume and ctx.store.exists(factors_file(i)))]
        if len(todo) < ctx.n_layers:
            print(f"soco: decompose: {ctx.n_layers - len(todo)} of {ctx.n_layers} layers were committed before: "
                  "skipped", file=sys.stderr, flush=True)
        ctx.executor.map(partial(decompose_layer, job), todo, f"decompose ({ctx.method.name})", ctx.progress)

