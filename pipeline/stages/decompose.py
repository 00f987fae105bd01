"""Decompose: factor every planned linear with the configured method.

Input: the dense weights (from the model's shards), `calib/layer-*.safetensors`, the plan.
Output contract, one file per layer, `factors/layer-00012.safetensors`:
  `<linear>.U` (m x k), `<linear>.sigma` (k), `<linear>.Vt` (k x n), float32, with
  W ~ U diag(sigma) Vt; metadata `method` and `damping` (JSON {linear: whitening load}).
"""
from __future__ import annotations

import contextlib
import json

import torch
from tqdm.auto import tqdm

from cluster.storage import Storage
from soco.decompose import decompose

from ..model_io import ModelSource
from ..plan import Plan
from .calibrate import load_layer_stats


def factors_file(i: int) -> str:
    return f"factors/layer-{i:05d}.safetensors"


def decompose_layer(source: ModelSource, store: Storage, plan: Plan, layers_name: str, i: int,
                    alpha: float = 0.5, device: str | None = None) -> None:
    """Factor the linears of layer i (on `device`, e.g. a Ray task's GPU) and commit its factors file."""
    ranks = plan.layer_ranks(layers_name, i)
    grams, means = load_layer_stats(store, i)
    weights = source.tensors([f"{layers_name}.{i}.{name}.weight" for name in ranks])
    out, damping = {}, {}
    for name, k in ranks.items():
        W, g, mu = weights[f"{layers_name}.{i}.{name}.weight"], grams.get(name), means.get(name)
        if device is not None:
            W, g, mu = (None if t is None else t.to(device) for t in (W, g, mu))
        with torch.device(device) if device else contextlib.nullcontext():  # identities etc. go there too
            f = decompose("svd-llm" if plan.method == "soco" else plan.method, W, g, mu, k=k, alpha=alpha)
        out[f"{name}.U"], out[f"{name}.sigma"], out[f"{name}.Vt"] = (
            f.U.float().cpu().contiguous(), f.sigma.float().cpu().contiguous(), f.Vt.float().cpu().contiguous())
        damping[name] = f.damping
    store.save_tensors(factors_file(i), out, {"method": plan.method, "damping": json.dumps(damping)})


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


def run_decompose(source: ModelSource, store: Storage, plan: Plan, layers_name: str, n_layers: int,
                  alpha: float = 0.5, progress: bool = True) -> None:
    for i in tqdm(range(n_layers), desc=f"decompose ({plan.method})", unit="layer", disable=not progress):
        decompose_layer(source, store, plan, layers_name, i, alpha)
