"""The run manifest: resolved config, and for each stage whether it is committed and for
which inputs.

Each committed stage also records the SHA-256 of every file it committed; a resumed run
verifies them and runs a stage again whose files are damaged or missing (saying so).

Each stage has a key, a hash of exactly what it depends on: its contract version, the config
fields it declares, the fields the method adds for it, and the key of the stage before it
(so a change upstream reruns everything after). Calibration depends on the model and the
data, not on the ratio. A stage whose key matches a committed entry is skipped; otherwise it
and every later stage run again. This one rule gives resume after a failure and cheap
sweeps: a second ratio in the same run folder reuses the calibration. One refinement: a
stage may declare `extendable` fields (SoCo's learn: its step caps); when only those were
raised since its entry was written, it goes on from its checkpoints (`extension`).
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Sequence

from cluster.storage import Storage

from .config import Config, from_dict, value_at
from .errors import UserError
from .stages.base import Stage


def stage_keys(cfg: Config, stages: Sequence[Stage]) -> dict[str, str]:
    """{stage name: key} for the stages of a run, in order."""
    method = cfg.method
    keys, chain = {}, ""
    for stage in stages:
        fields = tuple(stage.fields) + tuple(method.key_fields(stage.name))
        parts = {"contract": stage.contract, "fields": {f: value_at(cfg, f) for f in fields},
                 "extra": stage.key_extra(method)}
        chain = hashlib.sha256((chain + json.dumps(parts, sort_keys=True)).encode()).hexdigest()[:16]
        keys[stage.name] = chain
    return keys


def committed_files(entry: dict[str, Any] | None) -> dict[str, str]:
    """{file: SHA-256} a stage's manifest entry committed; empty unless it is done."""
    return dict(entry.get("files") or {}) if entry and entry.get("status") == "done" else {}


def donor_entry(donor: Storage, stage: str) -> dict[str, Any] | None:
    """The stage's entry in another run folder's manifest (None: no such entry, or no readable manifest)."""
    try:
        return donor.read_json("manifest.json").get("stages", {}).get(stage) if donor.exists("manifest.json") \
            else None
    except ValueError:
        return None


class Manifest:
    """manifest.json of a run folder, rewritten atomically after every change."""

    def __init__(self, store: Storage, cfg: Config, stages: Sequence[Stage]) -> None:
        self.store, self.cfg = store, cfg
        self.names = [s.name for s in stages]
        self.stage_list = list(stages)
        self.keys = stage_keys(cfg, stages)
        try:
            old = store.read_json("manifest.json") if store.exists("manifest.json") else {}
        except ValueError:
            raise UserError(f"{store.url('manifest.json')} is damaged (not JSON): remove the run folder "
                            "or choose another output") from None
        self.previous_config: dict[str, Any] = old.get("config", {})  # of the run that wrote the folder before
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

    def finish(self, stage: str, t0: float, outputs: Sequence[str] = (), known: dict[str, str] | None = None) -> None:
        """Commit the stage: its time, and the checksum of every file of its `outputs` (taken
        from `known` for the files whose checksum the stage computed as it wrote them)."""
        seconds = round(time.perf_counter() - t0, 3)
        known = known or {}
        files = {rel: known.get(rel) or self.store.sha256(rel) for out in outputs for rel in self.store.files(out)}
        self.stages[stage].update(status="done", seconds=seconds, files=files)
        self.save()

    def damaged(self, stage: str) -> list[str]:
        """The committed files of a done stage that are missing or no longer have their checksum."""
        bad = []
        for rel, digest in (self.stages.get(stage, {}).get("files") or {}).items():
            try:
                if self.store.sha256(rel) != digest:
                    bad.append(rel)
            except FileNotFoundError:
                bad.append(rel)
        return bad

    def adopt(self, stage: str, donor: Storage, outputs: Sequence[str]) -> bool:
        """Take a stage committed in another run folder with the same key (a sweep's runs that
        share a model and data share one calibration): copy its files, after checking them
        against the checksums the donor recorded, and commit it here. False (nothing changed)
        when the donor has no such intact stage, or recorded no checksum for some file of its
        `outputs` (written by a version without checksums: nothing to verify it by)."""
        entry = donor_entry(donor, stage)
        if not entry or entry.get("status") != "done" or entry.get("key") != self.keys[stage]:
            return False
        files = entry.get("files") or {}
        present = [rel for out in outputs for rel in donor.files(out)]
        if not present or sorted(present) != sorted(files):
            return False
        try:
            if any(donor.sha256(rel) != digest for rel, digest in files.items()):
                return False
        except FileNotFoundError:
            return False
        for rel in files:
            self.store.copy_in(donor, rel)
        self.stages[stage] = {"status": "done", "key": entry["key"], "seconds": 0.0, "files": dict(files),
                              "adopted_from": donor.url()}
        self.save()
        return True

    def extension(self, stage: Stage, entry: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """The `stage.extendable` fields that were raised since the run that wrote `entry`
        (the stage's entry before this invocation, finished or not), {path: (old, new)}, when
        that is all that changed of the stage's inputs (its key with the old values equals the
        entry's) and the stage says its old run is the start of the new one; else empty."""
        if not stage.extendable or not entry.get("key") or not self.previous_config:
            return {}
        data, raised = self.cfg.to_dict(), {}
        for path in stage.extendable:
            *parents, leaf = path.split(".")
            old_node, node = self.previous_config, data
            for p in parents:
                old_node, node = (old_node or {}).get(p), node[p]
            if not isinstance(old_node, dict) or leaf not in old_node:
                return {}
            if old_node[leaf] != node[leaf]:
                raised[path] = (old_node[leaf], node[leaf])
            node[leaf] = old_node[leaf]
        if not raised:
            return {}
        try:
            old_cfg = from_dict(data)
        except UserError:
            return {}
        if stage_keys(old_cfg, self.stage_list)[stage.name] != entry["key"] or not stage.continues(old_cfg, self.cfg):
            return {}
        return raised

    def invalidate_from(self, stage: str) -> None:
        """Forget this stage and every later one (and entries of stages this run does not have)."""
        later = self.names[self.names.index(stage):]
        for s in list(self.stages):
            if s in later or s not in self.names:
                self.stages.pop(s)

    def set_status(self, status: str, error: str | None = None) -> None:
        self.data["status"] = status
        if error:
            self.data["error"] = error
        else:
            self.data.pop("error", None)
        self.save()

    def save(self) -> None:
        self.store.write_json("manifest.json", self.data)
