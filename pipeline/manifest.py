"""The run manifest: resolved config, and for each stage whether it is committed and for
which inputs.

Each stage has a key, a hash of exactly the config values it depends on (calibration
depends on the model and the data, not on the ratio). A stage whose key matches a
committed entry is skipped; otherwise it and every later stage run again. This one rule
gives resume after a failure and cheap sweeps: a second ratio in the same run folder
reuses the calibration.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from cluster.storage import Storage

from .config import Config

STAGES = ("calibrate", "decompose", "learn", "assemble", "evaluate")


def stage_keys(cfg: Config) -> dict[str, str]:
    d, c, r = cfg.data, cfg.compress, cfg.run
    parts: dict[str, Any] = {
        "calibrate": ["contract-2", cfg.model, d.source, d.text_field, d.calib_samples, d.seq_len, r.dtype],
        "decompose": [c.method, c.ratio, c.asvd_alpha, cfg.soco.coarse_ratio if c.method == "soco" else None],
        "learn": ({k: v for k, v in vars(cfg.soco).items() if k not in ("threads_per_worker", "launcher", "activation_checkpointing")}
                  if c.method == "soco" else None),
        "assemble": [r.dtype, r.shard_size_mb],
        "evaluate": [d.eval_samples, d.seq_len, r.eval_dense],
    }
    keys, chain = {}, ""
    for stage in STAGES:
        chain = hashlib.sha256((chain + json.dumps(parts[stage])).encode()).hexdigest()[:16]
        keys[stage] = chain
    return keys


class Manifest:
    """manifest.json of a run folder, rewritten atomically after every change."""

    def __init__(self, store: Storage, cfg: Config) -> None:
        self.store, self.cfg = store, cfg
        self.keys = stage_keys(cfg)
        old = store.read_json("manifest.json") if store.exists("manifest.json") else {}
        self.stages: dict[str, dict[str, Any]] = old.get("stages", {})
        self.data: dict[str, Any] = {"soco_version": "0.1.0", "config": cfg.to_dict(), "status": "running",
                                     "stages": self.stages}

    def done(self, stage: str) -> bool:
        e = self.stages.get(stage)
        return bool(e and e.get("status") == "done" and e.get("key") == self.keys[stage])

    def start(self, stage: str) -> float:
        self.stages[stage] = {"status": "running", "key": self.keys[stage], "started": time.time()}
        self.save()
        return time.perf_counter()

    def finish(self, stage: str, t0: float, **extra: Any) -> None:
        self.stages[stage].update(status="done", seconds=round(time.perf_counter() - t0, 3), **extra)
        self.save()

    def invalidate_from(self, stage: str) -> None:
        for s in STAGES[STAGES.index(stage):]:
            self.stages.pop(s, None)

    def set_status(self, status: str, error: str | None = None) -> None:
        self.data["status"] = status
        if error:
            self.data["error"] = error
        else:
            self.data.pop("error", None)
        self.save()

    def save(self) -> None:
        self.store.write_json("manifest.json", self.data)
