"""The teacher cache: the dense model's targets on the calibration windows.

teacher/topk.safetensors holds `logp` (float32) and `idx` (int32), [windows, tokens, k];
row t predicts token t+1 of its window, as the student's logits at t do.
teacher/hidden.safetensors (only with soco.hidden_layers) holds `hidden` (bfloat16),
[windows, distilled layers, tokens, d]: the outputs of the decoder layers that
soco.objective.distilled_layers picks, with their indices as metadata `layers` (JSON).
"""
from __future__ import annotations

import json

import torch
from tqdm.auto import tqdm

from cluster.storage import Storage
from soco.objective import teacher_topk

from ...layerwise import Batch, LayerwiseModel
from ...model_io import ModelSource, build_skeleton
from ..calibrate import FINAL_HIDDEN_FILE, WINDOWS_FILE
from ..shares import WindowShare

TEACHER_FILE = "teacher/topk.safetensors"
HIDDEN_FILE = "teacher/hidden.safetensors"
#: the stored precision of the hidden-state targets: half the bytes of float32, and bfloat16
#: keeps float32's range (a residual stream's outlier activations overflow float16)
HIDDEN_DTYPE = torch.bfloat16


@torch.no_grad()
def cache_teacher(source: ModelSource, store: Storage, k: int, dtype: torch.dtype) -> None:
    """Top-k log-probabilities of the dense model on the calibration windows, from the final
    hidden states that calibrate saved (only the norm and head run here)."""
    hidden = store.load_tensors(FINAL_HIDDEN_FILE)["hidden"]
    lw = LayerwiseModel(build_skeleton(source.config, dtype), source, dtype)
    logp = torch.empty(*hidden.shape[:2], k, dtype=torch.float32)
    idx = torch.empty(*hidden.shape[:2], k, dtype=torch.int32)

    def keep(row: int, logits: torch.Tensor) -> None:
        logp[row], idx[row] = teacher_topk(logits, k)

    lw.map_logits([Batch(hidden)], keep)
    store.save_tensors(TEACHER_FILE, {"logp": logp, "idx": idx})


@torch.no_grad()
def cache_hidden(location: str, dtype_name: str, store: Storage, layers: list[int], batch_size: int,
                 progress: bool = True) -> None:
    """The dense model's outputs of decoder `layers` on the calibration windows: one more
    layer-by-layer pass of the dense model, as calibrate's (pipeline/stages/shares.py), stopped
    at the deepest layer asked for."""
    windows = store.load_tensors(WINDOWS_FILE)["windows"]
    share = WindowShare()
    share.load(location, False, dtype_name, windows, batch_size)
    kept = []
    for i in tqdm(range(max(layers) + 1), desc="learn: teacher hidden states", unit="layer", disable=not progress):
        share.forward(i)
        if i in layers:
            kept.append(share.final_hidden().to(HIDDEN_DTYPE))
    store.save_tensors(HIDDEN_FILE, {"hidden": torch.stack(kept, dim=1)}, {"layers": json.dumps(layers)})


def load_hidden(store: Storage) -> tuple[list[int], torch.Tensor]:
    """The decoder layers whose dense outputs `cache_hidden` kept, and those outputs
    [windows, layers, tokens, d] (bfloat16): the trainer distils exactly these layers."""
    return json.loads(store.tensor_metadata(HIDDEN_FILE)["layers"]), store.load_tensors(HIDDEN_FILE)["hidden"]
