"""Assemble: write the compressed model as a sharded Hugging Face checkpoint and publish it whole.

Units: checkpoint shards. The shard plan (pipeline/checkpoint.py `shard_plan`) is computed
up front from the source's tensor headers and the final plan; each shard is then written by
one unit, which reads its source tensors and the run's factors (one layer at a time) and
builds the method's modules. The merge writes config, tokenizer and the index last, then
publishes: locally the folder is staged beside the run folder and renamed into place; on an
object store the shards go straight to `checkpoint/` and the index, written last, marks it
complete.

Input: the final plan and per-layer factors the method names (`Method.final_plan`,
`Method.layer_factors`: `factors/` for the baselines, `learned/` for SoCo).
Output: `checkpoint/` (layout in pipeline/checkpoint.py).
"""
from __future__ import annotations

import shutil
import tempfile
from functools import partial

from cluster.storage import Storage

from ..checkpoint import ShardJob, shard_names, shard_plan, write_metadata, write_shard
from ..model_io import worker_location
from ..modules import KINDS
from .base import Stage, StageContext

CHECKPOINT = "checkpoint"


def _write(job: ShardJob, item: tuple) -> str:
    return write_shard(job, *item)


class Assemble(Stage):
    name = "assemble"
    contract = "1"
    outputs = (CHECKPOINT,)
    fields = ("run.dtype", "run.shard_size_mb")

    def run(self, ctx: StageContext) -> None:
        method, store = ctx.method, ctx.store
        final = method.final_plan(store)
        specs = method.module_specs(final)
        shards, total = shard_plan(ctx.source, specs, ctx.layers_name, ctx.n_layers, ctx.dtype,
                                   int(ctx.cfg.run.shard_size_mb * 2**20))
        if store.local:
            for old in store.listdir():  # staging left by a run that was killed (this run holds the lease)
                if old.startswith("soco-ckpt-"):
                    store.rm(old)
            staging = tempfile.mkdtemp(prefix="soco-ckpt-", dir=store.path())
            out = Storage(staging)
        else:
            staging = None
            store.rm(CHECKPOINT)  # as Storage.put_dir does: the index, written last, marks a complete checkpoint
            out = Storage(store.url(CHECKPOINT))
        try:
            job = ShardJob(worker_location(ctx.cfg.model), store.worker_url(), out.worker_url(), ctx.dtype_name,
                           method.layer_factors)
            checksums = ctx.executor.map(partial(_write, job), list(zip(shard_names(len(shards)), shards)),
                                         "assemble", ctx.progress)
            entry: dict = {"method": method.name, "ratio": final.ratio}
            for name, (kind, spec) in specs.items():  # each kind's modules under its own key
                entry.setdefault(KINDS[kind].entry_key, {})[name] = spec
            write_metadata(out, ctx.source, entry, ctx.dtype, shards, total, checksums)
            # the shards were hashed as they were written (the index records them): the
            # manifest takes these rather than reading the checkpoint again
            ctx.checksums.update({f"{CHECKPOINT}/{n}": c for n, c in zip(shard_names(len(shards)), checksums)})
            if staging is not None:
                store.put_dir(staging, CHECKPOINT)
                staging = None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
