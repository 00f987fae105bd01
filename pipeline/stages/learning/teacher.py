"""The teacher cache: the dense model's top-k log-probabilities on the calibration windows.

teacher/topk.safetensors holds `logp` (float32) and `idx` (int32), [windows, tokens, k];
row t predicts token t+1 of its window, as the student's logits at t do.
"""
from __future__ import annotations

import torch

from cluster.storage import Storage
from soco.objective import teacher_topk

from ...layerwise import Batch, LayerwiseModel
from ...model_io import ModelSource, build_skeleton
from ..calibrate import FINAL_HIDDEN_FILE

TEACHER_FILE = "teacher/topk.safetensors"


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
