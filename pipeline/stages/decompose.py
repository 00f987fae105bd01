"""Decompose: factor every planned linear as the method says.

Units: decoder layers. A unit reads the plan, the layer's weights from the model's shards and
its `calib/` statistics, and commits its own factors file; only locations go in and a number
comes back. Per layer rather than per matrix: all layers of a model cost the same, so with
layers >> workers the load balances; q/k/v (and gate/up) share one Gram matrix, read once;
and the output stays one file per layer. On a Ray cluster with GPUs each unit gets one and
the SVDs run there.

Input: the dense weights, `calib/layer-*.safetensors`, the plan the method made, committed
first as `factors/plan.json` ({"method", "ratio", "ranks", "shapes"}, pipeline/plan.py).
Output contract, one file per layer, `factors/layer-00012.safetensors`:
  `<linear>.U` (m x k), `<linear>.sigma` (k), `<linear>.Vt` (k x n), float32, with
  W ~ U diag(sigma) Vt; metadata `method` and `damping` (JSON {linear: whitening load}).
"""
from __future__ import annotations

import contextlib
import json
from functools import partial
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cluster.storage import Storage

from ..model_io import ModelSource, build_skeleton, worker_location
from ..plan import Plan
from .base import Stage, StageContext
from .calibrate import load_layer_stats

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


def decompose_layer(job: DecomposeJob, i: int) -> int:
    """Factor the linears of layer i and commit its factors file; returns i."""
    store = Storage(job.run)
    plan = Plan.from_json(store.read_json(FACTORS_PLAN))
    source = ModelSource(job.model)
    device = unit_device()
    ranks = plan.layer_ranks(job.layers_name, i)
    stats = load_layer_stats(store, i, job.method.statistics)
    weights = source.tensors([f"{job.layers_name}.{i}.{name}.weight" for name in ranks])
    out, damping = {}, {}
    for name, k in ranks.items():
        W = weights[f"{job.layers_name}.{i}.{name}.weight"]
        mine = {key: per_linear.get(name) for key, per_linear in stats.items()}
        if device is not None:
            W = W.to(device)
            mine = {key: None if t is None else t.to(device) for key, t in mine.items()}
        with torch.device(device) if device else contextlib.nullcontext():  # identities etc. go there too
            f = job.method.factorise(W, mine, k, job.cfg)
        out[f"{name}.U"], out[f"{name}.sigma"], out[f"{name}.Vt"] = (
            f.U.float().cpu().contiguous(), f.sigma.float().cpu().contiguous(), f.Vt.float().cpu().contiguous())
        damping[name] = f.damping
    store.save_tensors(factors_file(i), out, {"method": plan.method, "damping": json.dumps(damping)})
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
    fields = ("compress.method", "compress.ratio")

    def run(self, ctx: StageContext) -> None:
        plan = ctx.method.decomposition_plan(ctx.cfg, build_skeleton(ctx.source.config, ctx.dtype))
        ctx.store.write_json(FACTORS_PLAN, plan.to_json())
        job = DecomposeJob(worker_location(ctx.cfg.model), ctx.store.worker_url(), ctx.layers_name, ctx.method, ctx.cfg)
        ctx.executor.map(partial(decompose_layer, job), range(ctx.n_layers), f"decompose ({ctx.method.name})", ctx.progress)

