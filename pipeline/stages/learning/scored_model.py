"""The scored model (every planned linear a ScoredLinear over its factors) and its score checkpoints.

A score checkpoint (scores/*.safetensors) holds the trained tensors as `<module>.score`
(and `.in_scale`/`.out_scale` with channel scales, `.U` when soco.factor_lr trains it, or
`.u_up`/`.u_down` when soco.factor_rank trains a low-rank change of it instead,
`.vt_delta` with soco.factor_vt, `.log_alpha` with hard-concrete gates), `<module>.mask`, the Fisher importance
and the iterate average (soco/importance.py, soco/averaging.py), with the schedule state and
the training curve as JSON metadata (`state`, `curve`).
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch
from torch import nn

from cluster.storage import Storage
from soco.schedule import ScheduleState, Stage
from soco.scores import ScoredLinear, scored_modules

from ...layerwise import LayerwiseModel
from ...model_io import ModelSource, build_skeleton, find_layers, materialise
from ..decompose import load_layer_factors

FINAL_SCORES = "scores/final.safetensors"
BEST_SCORES = "scores/best.safetensors"
#: the trained parts the effective score is read from (soco.scores.effective_score)
SCORE_PARTS = ("score", "log_alpha")


def build_scored_model(source: ModelSource, store: Storage, dtype: torch.dtype = torch.float32,
                       partitioned: Callable[[], AbstractContextManager] | None = None,
                       trains_vt: bool = False, anchors_u: bool = False, u_rank: int = 0,
                       seed: int = 0) -> nn.Module:
    """The model with every planned linear replaced by a ScoredLinear over its factors.

    Built one layer at a time: the dense layer is read, its linears swapped for the
    factors, and the dense weights dropped, so peak memory is the factored model plus
    one dense layer. With `partitioned` (a context factory: cluster.zero.partitioned_init)
    the factors are partitioned across the ZeRO-3 ranks as each matrix is built, so a rank
    holds its share of the factored model plus one dense layer. `trains_vt` (soco.factor_vt)
    gives every matrix the trained change of its Vt; `anchors_u` (soco.factor_anchor) a copy
    of its decomposed U (whole on every rank: a buffer, not partitioned); `u_rank`
    (soco.factor_rank) a trained rank-`u_rank` change of its U, whose random start is drawn from
    `seed` and the matrix's place in the model, so that every rank draws the same.
    """
    model = build_skeleton(source.config, dtype)
    lw = LayerwiseModel(model, source, dtype)
    lw.load_non_layer()
    layers_name, layers = find_layers(model)
    built = 0
    for i, layer in enumerate(layers):
        factors = load_layer_factors(store, i)
        materialise(model, layer, f"{layers_name}.{i}", source, dtype)
        for name, f in factors.items():
            lin = layer.get_submodule(name)
            bias = None if lin.bias is None else lin.bias.detach()
            with partitioned() if partitioned else contextlib.nullcontext():
                scored = ScoredLinear(f["U"].to(dtype), f["sigma"].to(dtype), f["Vt"].to(dtype), bias, trains_vt,
                                      anchors_u, u_rank, seed * 1_000_003 + built)
            layer.set_submodule(name, scored)
            built += 1
    for p in model.parameters():
        p.requires_grad_(False)
    for m in scored_modules(model).values():
        m.score.requires_grad_(True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def trained_tensors(mods: dict[str, ScoredLinear], parts: Iterable[str]) -> dict[str, nn.Parameter]:
    """The given trained parts (SocoConfig.learning_rates) of the scored modules by checkpoint
    name, `<module>.<part>`."""
    parts = tuple(parts)
    return {f"{n}.{p}": getattr(m, p) for n, m in mods.items() for p in parts}


def save_scores(store: Storage, rel: str, tensors: dict[str, torch.Tensor], state: ScheduleState,
                curve: list[dict]) -> None:
    """A score checkpoint: trained tensors as `<module>.score` (and `.in_scale`/`.out_scale`)."""
    store.save_tensors(rel, tensors, {"state": json.dumps(state.to_dict()), "curve": json.dumps(curve)})


def load_scores(store: Storage, rel: str) -> tuple[dict[str, torch.Tensor], ScheduleState, list[dict]]:
    t = store.load_tensors(rel)
    meta = store.tensor_metadata(rel)
    return t, ScheduleState.from_dict(json.loads(meta["state"])), json.loads(meta["curve"])


def periodic_checkpoints(store: Storage) -> list[str]:
    """The periodic checkpoints (scores/step-NNNNNN.safetensors), oldest first."""
    return [f"scores/{n}" for n in sorted(store.listdir("scores"))
            if n.startswith("step-") and n.endswith(".safetensors")]


def latest_checkpoint(store: Storage) -> str | None:
    """The last periodic checkpoint written before the schedule ended, if any: where an
    interrupted learn stage goes on from, and a finished one under a longer cap (one written
    as the schedule ended could not go on: folders from before the trainer stopped writing
    such checkpoints may hold one)."""
    for rel in reversed(periodic_checkpoints(store)):
        if ScheduleState.from_dict(json.loads(store.tensor_metadata(rel)["state"])).stage != Stage.DONE:
            return rel
    return None


def drop_old_checkpoints(store: Storage, keep: int) -> None:
    """Delete all but the last `keep` periodic checkpoints (0 keeps them all). With U trained
    each one holds every candidate's U and its Adam moments (~1 GB at 135M, a full
    fine-tune's state at 70B), so keeping every one fills a disk; resuming needs the last."""
    if keep > 0:
        for rel in periodic_checkpoints(store)[:-keep]:
            store.rm(rel)


def saved_keep(saved: dict[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Indices of the components a score checkpoint's masks keep, per matrix."""
    return {n: torch.nonzero(saved[f"{n}.mask"] > 0).flatten() for n in names}
