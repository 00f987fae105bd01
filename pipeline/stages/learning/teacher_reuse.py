"""Teacher targets an earlier run committed for the same inputs, taken instead of computed again.

The teacher files (teacher/topk, teacher/hidden, teacher/generated) depend on the dense
model, the calibration windows and a few `soco` fields, never on the ratio or on how the
scores train. Without this, a sweep over ratios, or the learn stage run again with another
step size, pays the dense passes again, and the sampling of generated windows (23 minutes
for SmolLM2-135M on this machine's two cores). Each file records a digest of what it depends
on (metadata `inputs`, `teacher_inputs`); before computing one, the learn stage looks for a
file with that digest among the ones earlier runs committed (`StageContext.earlier`: this
run folder's last commit of the stage, then the donors', such as the run of a sweep that
calibrated the same model and data). A file is taken only when its checksum is the one its
run committed, as adopted stages are (pipeline/manifest.py); files of an interrupted,
uncommitted run are computed again.
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Sequence

from cluster.storage import Storage

from ..calibrate import WINDOWS_FILE
from .generated import GENERATED_FILE
from .teacher import HIDDEN_FILE, INPUTS_KEY, TEACHER_FILE

if TYPE_CHECKING:
    from ...config import Config

TEACHER_DIR = "teacher"


def teacher_inputs(cfg: Config, store: Storage, layers: list[int]) -> dict[str, str]:
    """{teacher file: digest of everything its contents depend on}, for the files `cfg`
    computes. The calibration windows enter by their file's checksum; data.batch_size enters
    where it changes the result (the order in which generation draws its random numbers)."""
    s = cfg.soco
    common = {"model": cfg.model, "dtype": cfg.run.dtype, "windows": store.sha256(WINDOWS_FILE)}
    wanted: dict[str, dict[str, Any]] = {TEACHER_FILE: {**common, "topk": s.topk}}
    if s.hidden_layers:
        wanted[HIDDEN_FILE] = {**common, "layers": layers, "batch_size": cfg.data.batch_size}
    if s.generated_windows:
        wanted[GENERATED_FILE] = {**common, "layers": layers, "topk": s.topk, "count": s.generated_windows,
                                  "prompt": s.generate_prompt, "temperature": s.generate_temperature,
                                  "seed": s.seed, "holdout_samples": s.holdout_samples,
                                  "batch_size": cfg.data.batch_size}
    return {rel: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:16]
            for rel, v in wanted.items()}


def _holds(folder: Storage, rel: str, digest: str, checksum: str) -> bool:
    """Whether `folder` has `rel` computed for `digest`, with the checksum its run committed."""
    try:
        return folder.tensor_metadata(rel).get(INPUTS_KEY) == digest and folder.sha256(rel) == checksum
    except (OSError, ValueError):  # missing, or not a safetensors file any more
        return False


def reuse_teacher(store: Storage, wanted: dict[str, str], earlier: Sequence[tuple[str, dict[str, str]]]) -> list[str]:
    """Leave in `store`'s teacher/ exactly the `wanted` files that an earlier commit holds
    for the same inputs (this folder's own are kept, a donor's copied in: hard links on a
    local disk); everything else there is removed, to be computed. `earlier`: [(run folder
    URL, {file: SHA-256 its run committed})]. Returns the files taken."""
    found: dict[str, Storage] = {}
    for rel, digest in wanted.items():
        for url, files in earlier:
            folder = Storage(url)
            if rel in files and _holds(folder, rel, digest, files[rel]):
                found[rel] = folder
                break
    for rel in store.files(TEACHER_DIR):
        if rel not in found or found[rel].url() != store.url():
            store.rm(rel)
    for rel, folder in found.items():
        if folder.url() != store.url():
            store.copy_in(folder, rel)
    return sorted(found)
