"""The teacher cache: the dense model's targets on the calibration windows.

teacher/topk.safetensors holds `logp` (float32) and `idx` (int32), [windows, tokens, k];
row t predicts token t+1 of its window, as the student's logits at t do.
teacher/hidden.safetensors (only with soco.hidden_layers) holds `hidden` (bfloat16),
[windows, distilled layers, tokens, d]: the outputs of the decoder layers that
soco.objective.distilled_layers picks, with their indices as metadata `layers` (JSON).
Each file's metadata `inputs` is the digest of what it was computed from
(learning/teacher_reuse.py: a later run with the same inputs takes the file).
"""
from __future__ import annotations

import json

import torch
from tqdm.auto import tqdm

from cluster.executor import Executor
from cluster.storage import Storage
from soco.objective import teacher_topk

from ...layerwise import Batch, LayerwiseModel
from ...model_io import ModelSource, build_skeleton
from ..calibrate import FINAL_HIDDEN_FILE, WINDOWS_FILE
from ..shares import WindowShare, join_shares, split_windows

TEACHER_FILE = "teacher/topk.safetensors"
HIDDEN_FILE = "teacher/hidden.safetensors"
#: the stored precision of the hidden-state targets: half the bytes of float32, and bfloat16
#: keeps float32's range (a residual stream's outlier activations overflow float16)
HIDDEN_DTYPE = torch.bfloat16
#: the metadata key of every teacher file's input digest (learning/teacher_reuse.py)
INPUTS_KEY = "inputs"


@torch.no_grad()
def cache_teacher(source: ModelSource, store: Storage, k: int, dtype: torch.dtype, inputs: str) -> None:
    """Top-k log-probabilities of the dense model on the calibration windows, from the final
    hidden states that calibrate saved (only the norm and head run here); `inputs` is their
    digest (teacher_reuse.teacher_inputs)."""
    hidden = store.load_tensors(FINAL_HIDDEN_FILE)["hidden"]
    lw = LayerwiseModel(build_skeleton(source.config, dtype), source, dtype)
    logp = torch.empty(*hidden.shape[:2], k, dtype=torch.float32)
    idx = torch.empty(*hidden.shape[:2], k, dtype=torch.int32)

    def keep(row: int, logits: torch.Tensor) -> None:
        logp[row], idx[row] = teacher_topk(logits, k)

    lw.map_logits([Batch(hidden)], keep)
    store.save_tensors(TEACHER_FILE, {"logp": logp, "idx": idx}, {INPUTS_KEY: inputs})


class HiddenShare(WindowShare):
    """A share of the calibration windows, advanced through the dense model layer by layer
    (as calibrate's shares are), that keeps its outputs of the distilled layers."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[torch.Tensor] = []

    @torch.no_grad()
    def advance(self, i: int, keep: bool) -> None:
        """Run the share through layer i; keep its output if layer i is distilled."""
        self.forward(i)
        if keep:
            self.kept.append(self.final_hidden().to(HIDDEN_DTYPE))

    def stacked(self) -> torch.Tensor:
        """This share's kept outputs, [share, distilled layers, tokens, d] (empty for an empty share)."""
        return torch.stack(self.kept, dim=1) if self.batches else torch.empty(0)

    def commit(self, run_url: str, layers: list[int], inputs: str, *parts: torch.Tensor) -> None:
        """Every share's kept outputs, in window order, as the targets file."""
        Storage(run_url).save_tensors(HIDDEN_FILE, {"hidden": join_shares(parts)},
                                      {"layers": json.dumps(layers), INPUTS_KEY: inputs})


def cache_hidden(executor: Executor, location: str, dtype_name: str, store: Storage, layers: list[int],
                 batch_size: int, inputs: str, progress: bool = True) -> None:
    """The dense model's outputs of decoder `layers` on the calibration windows: one more
    layer-by-layer pass of the dense model over shares of the windows, on the executor's
    workers as calibrate's is (one share in process), stopped at the deepest layer asked for.
    The shares' outputs go worker to worker into the file, never through the driver."""
    windows = store.load_tensors(WINDOWS_FILE)["windows"]
    n = executor.width(windows.shape[0])
    with executor.group(HiddenShare, n) as shares:
        shares.get(shares.each("load", [(location, False, dtype_name, part, batch_size)
                                        for part in split_windows(windows, n)]))
        desc = "learn: teacher hidden states" + (f" ({n} workers)" if n > 1 else "")
        for i in tqdm(range(max(layers) + 1), desc=desc, unit="layer", disable=not progress):
            shares.get(shares.all("advance", i, i in layers))
        shares.get(shares.one(0, "commit", store.worker_url(), layers, inputs, *shares.all("stacked")))


def load_hidden(store: Storage) -> tuple[list[int], torch.Tensor]:
    """The decoder layers whose dense outputs `cache_hidden` kept, and those outputs
    [windows, layers, tokens, d] (bfloat16): the trainer distils exactly these layers."""
    return json.loads(store.tensor_metadata(HIDDEN_FILE)["layers"]), store.load_tensors(HIDDEN_FILE)["hidden"]
