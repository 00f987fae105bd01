"""The pipeline's stages as Ray tasks and actors (the in-process versions live in pipeline/stages).

Each stage writes exactly the run-folder files its in-process twin writes, so stages of the
two paths mix freely (resume, sweeps) and results agree within float tolerance.

- calibrate: data-parallel. `LayerWorker` actors each embed a contiguous share of the
  calibration windows and keep its hidden states; layer by layer, every actor loads the
  same layer, runs its share through it and accumulates X^T X, sum|x| and row counts; one
  actor sums the shares (in a fixed order) and commits `calib/layer-XXXXX.safetensors`.
  The Gram matrices go actor to actor through the object store, never through the driver;
  at most two layers are in flight, so nothing grows with depth.
- decompose: one task per decoder layer. A task reads `plan.json`, the layer's weights from
  the model's shards and its `calib/` file, and commits `factors/layer-XXXXX.safetensors`
  itself; only strings go in and a few numbers come back. Per layer rather than per matrix:
  all layers of a model cost the same, so with layers >> workers the load balances; q/k/v
  (and gate/up) share one Gram matrix, read once; and the output stays one file per layer
  (the contract assemble and SoCo's learn stage read). Tasks request one GPU when the
  cluster has GPUs (the SVDs then run there), else one CPU, with at most
  `ray.max_in_flight` submitted at once.
- assemble: the shard layout is computed up front from tensor headers and the plan (the
  same greedy packing as pipeline.checkpoint.ShardWriter, hence byte-identical shards); each
  shard is a task that reads its tensors and the factors, builds the low-rank pairs and
  writes its file; the driver writes config, tokenizer and the index last, then publishes.
- evaluate: the same actors as calibrate, holding shares of the evaluation windows, run
  the checkpoint (and the dense model) layer by layer; summed NLL and token counts come back.

Every worker runs torch single-threaded (one task = one CPU slot).
"""
from __future__ import annotations

import gc
import json
import math
import os
import resource
import shutil
import struct
import tempfile
import time
from typing import Any, Callable, Iterable

import ray
import torch
from tqdm.auto import tqdm

from cluster.ray_runtime import calib_workers, ensure_ray, max_in_flight, task_options
from cluster.storage import Storage, local_path
from pipeline.model_io import worker_location

# --------------------------------------------------------------------------- worker side

#: pid -> peak resident memory (MiB) of every worker that reported back to this driver.
WORKER_PEAK_RSS_MB: dict[int, float] = {}


def _context() -> dict[str, Any]:
    """Driver settings the workers need to reach the same storage: fsspec's config (where a user
    puts an S3 endpoint and keys) and the soco cache folder."""
    import copy

    import fsspec
    return {"fsspec": copy.deepcopy(fsspec.config.conf),
            "env": {k: os.environ[k] for k in ("SOCO_CACHE",) if k in os.environ}}


def _init_worker(ctx: dict[str, Any] | None = None) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if ctx:
        import fsspec
        for protocol, options in ctx["fsspec"].items():
            fsspec.config.conf[protocol] = options
        os.environ.update(ctx["env"])


def _trim() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise).

    Without this a worker's resident memory grows with every layer it handles: each result
    Ray serialises leaves tens of MB of freed but retained heap (measured: a calibration
    actor went from 0.4 to 1.7 GB over 120 layers; with it, it stays flat).
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _source(location: str):
    """A fresh ModelSource (cheap; a cached one could go stale if the folder is rewritten)."""
    from pipeline.model_io import ModelSource
    return ModelSource(location)


def _note(result: dict) -> dict:
    pid, mb = result.get("pid"), result.get("peak_rss_mb")
    if pid is not None and mb is not None:
        WORKER_PEAK_RSS_MB[pid] = max(WORKER_PEAK_RSS_MB.get(pid, 0.0), mb)
    return result


@ray.remote
def decompose_task(ctx: dict, location: str, run_url: str, plan_rel: str, layers_name: str, i: int,
                   alpha: float) -> dict:
    """Factor decoder layer i: reads weights, plan and Gram from storage, commits its factors file."""
    from pipeline.plan import Plan
    from pipeline.stages.decompose import decompose_layer
    _init_worker(ctx)
    t0 = time.perf_counter()
    store = Storage(run_url)
    plan = Plan.from_json(store.read_json(plan_rel))
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else None
    decompose_layer(_source(location), store, plan, layers_name, i, alpha, device=device)
    _trim()
    return {"layer": i, "seconds": time.perf_counter() - t0, "pid": os.getpid(), "peak_rss_mb": _peak_rss_mb(),
            "device": device or "cpu"}


@ray.remote
class LayerWorker:
    """Holds a share of the windows' hidden states and runs them through one layer at a time."""

    def __init__(self) -> None:
        _init_worker()
        self.lw = self.batches = self.windows = None
        self.stats = None

    def load(self, ctx: dict, location: str, compressed: bool, dtype_name: str, windows: torch.Tensor,
             batch_size: int) -> int:
        from pipeline.checkpoint import compressed_skeleton
        from pipeline.layerwise import LayerwiseModel
        from pipeline.model_io import DTYPE_MAP, ModelSource, build_skeleton
        self.release()
        _init_worker(ctx)
        source = ModelSource(location)
        dtype = DTYPE_MAP[dtype_name]
        model = compressed_skeleton(source.config, dtype) if compressed else build_skeleton(source.config, dtype)
        self.lw = LayerwiseModel(model, source, dtype)
        self.windows = windows
        self.batches = self.lw.embed(windows, batch_size)
        return len(self.lw.layers)

    @torch.no_grad()
    def calibrate(self, i: int) -> dict:
        """Run layer i on this share with InputStats hooks; return the raw sums."""
        from pipeline.stages.calibrate import InputStats
        _trim()  # the previous layer's result, serialised by Ray, left its buffers behind
        with self.lw.layer(i) as layer:
            stats = InputStats(layer)
            try:
                self.batches = self.lw.run_layer(layer, self.batches)
            finally:
                stats.remove()
        return {"gram": stats.gram, "abs_sum": stats.abs_sum, "rows": stats.rows, "alias": stats.alias}

    def save_stats(self, run_url: str, i: int, *parts: dict) -> dict:
        """Sum the shares' statistics of layer i (in share order) and commit its calib file."""
        from pipeline.stages.calibrate import InputStats, calib_file
        _trim()
        merged = InputStats.__new__(InputStats)  # the sums only, no hooks
        merged.gram, merged.abs_sum, merged.rows, merged.alias = {}, {}, {}, {}
        for p in parts:
            merged.alias.update(p["alias"])
            for key, g in p["gram"].items():
                if key in merged.gram:
                    merged.gram[key] += g
                    merged.abs_sum[key] += p["abs_sum"][key]
                    merged.rows[key] += p["rows"][key]
                else:
                    merged.gram[key] = g.clone()
                    merged.abs_sum[key] = p["abs_sum"][key].clone()
                    merged.rows[key] = p["rows"][key]
        tensors, meta = merged.tensors()
        Storage(run_url).save_tensors(calib_file(i), tensors, meta)
        return self._stamp({"layer": i})

    def forward(self, i: int) -> None:
        _trim()
        with self.lw.layer(i) as layer:
            self.batches = self.lw.run_layer(layer, self.batches)

    def final_hidden(self) -> torch.Tensor:
        return torch.cat([b.hidden for b in self.batches]) if self.batches else torch.empty(0)

    def save_calib_extras(self, run_url: str, windows: torch.Tensor, *hidden: torch.Tensor) -> None:
        """The extra files the in-process calibrate stage writes (windows, final hidden states), if any."""
        from pipeline.stages import calibrate as cal
        store = Storage(run_url)
        if getattr(cal, "WINDOWS_FILE", None):
            store.save_tensors(cal.WINDOWS_FILE, {"windows": windows})
        if getattr(cal, "FINAL_HIDDEN_FILE", None):
            store.save_tensors(cal.FINAL_HIDDEN_FILE, {"hidden": torch.cat([h for h in hidden if h.numel()])})

    def nll(self) -> tuple[float, int]:
        return self.lw.nll(self.batches, self.windows)

    def release(self) -> dict:
        """Drop the model and the hidden states; the process (and its imports) stays for the next stage."""
        self.lw = self.batches = self.windows = None
        gc.collect()
        _trim()
        return self._stamp({})

    def _stamp(self, d: dict) -> dict:
        return d | {"pid": os.getpid(), "peak_rss_mb": _peak_rss_mb()}


@ray.remote
def shard_task(ctx: dict, location: str, run_url: str, dtype_name: str, entries: list[tuple], out_url: str,
               fname: str, load_factors: Callable[[Storage, int], dict]) -> dict:
    """Build one checkpoint shard from the source weights and the run's factors
    (`load_factors(store, i)` -> {linear: {U, sigma, Vt}}), and write it."""
    from pipeline.checkpoint import lowrank_from_factors
    from pipeline.model_io import DTYPE_MAP
    _init_worker(ctx)
    source, store, dtype = _source(location), Storage(run_url), DTYPE_MAP[dtype_name]
    owners = sorted({(e[2], e[3], e[4]) for e in entries if e[0] == "lowrank"})  # (layer, owner, bias name)
    copies = [e[1] for e in entries if e[0] == "copy"]
    biases = [b for _, _, b in owners if b and source.has(b)]
    tensors = source.tensors(copies + biases)
    factors: dict[int, dict] = {}
    modules: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for i, owner, bias in owners:
        if i not in factors:
            factors = {i: load_factors(store, i)}  # one layer's factors at a time
        mod = lowrank_from_factors(factors[i][owner], tensors.get(bias) if bias else None, dtype)
        modules[(i, owner)] = mod.state_dict()
    out = {}
    for e in entries:
        if e[0] == "copy":
            t = tensors[e[1]]
            out[e[1]] = t.to(dtype) if t.is_floating_point() else t
        else:
            out[e[1]] = modules[(e[2], e[3])][e[5]]
    Storage(out_url).save_tensors(fname, out, {"format": "pt"})
    n = len(out)
    del out, tensors, modules, factors
    _trim()
    return {"file": fname, "tensors": n, "pid": os.getpid(), "peak_rss_mb": _peak_rss_mb()}


@ray.remote
def warmup_task() -> int:
    """Import what the stage tasks import, so a benchmark can time warm workers."""
    import pipeline.checkpoint  # noqa: F401
    import pipeline.stages.decompose  # noqa: F401
    _init_worker()
    time.sleep(0.2)  # keep this worker busy so the next warm-up lands on another one
    return os.getpid()


# --------------------------------------------------------------------------- driver side

def _bounded(submit: Callable[[Any], ray.ObjectRef], items: Iterable[Any], limit: int, desc: str,
             progress: bool) -> list[dict]:
    """Run submit(item) for every item with at most `limit` tasks in flight; results in completion order."""
    items = list(items)
    pending: list[ray.ObjectRef] = []
    results: list[dict] = []
    bar = tqdm(total=len(items), desc=desc, unit="task", disable=not progress)

    def collect() -> None:
        nonlocal pending
        done, pending = ray.wait(pending, num_returns=1)
        for r in ray.get(done):
            results.append(_note(r))
        bar.update(len(done))

    try:
        for item in items:
            while len(pending) >= limit:
                collect()
            pending.append(submit(item))
        while pending:
            collect()
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise
    finally:
        bar.close()
    return results


def ray_decompose(cfg, store: Storage, plan_rel: str, layers_name: str, n_layers: int,
                  progress: bool = True) -> list[dict]:
    """Decompose every layer as a Ray task; the plan (committed at `plan_rel`) gives the method and ranks."""
    ensure_ray(cfg.ray)
    fn = decompose_task.options(**task_options())
    ctx, loc, url, alpha = _context(), worker_location(cfg.model), store.worker_url(), cfg.compress.asvd_alpha
    return _bounded(lambda i: fn.remote(ctx, loc, url, plan_rel, layers_name, i, alpha), range(n_layers),
                    max_in_flight(cfg.ray),
                    f"decompose ({cfg.compress.method}, ray)", progress)


_POOL: dict[str, Any] = {"job": None, "actors": []}


def _pool(n: int) -> list:
    """n LayerWorker actors, kept between stages and runs of this driver (start-up ~3 s each).

    They reserve no CPU (Ray's default for a live actor), so decompose and shard tasks run
    beside idle ones; at most one per CPU is asked for, spread over the cluster's nodes.
    """
    job = ray.get_runtime_context().get_job_id()
    if _POOL["job"] != job:  # a new ray.init: the old handles are gone
        _POOL.update(job=job, actors=[])
    actors = _POOL["actors"]
    while len(actors) < n:
        actors.append(LayerWorker.options(num_cpus=0, scheduling_strategy="SPREAD").remote())
    return actors[:n]


def drop_pool() -> None:
    """Stop the pooled actors (they also go with the Ray session)."""
    for a in _POOL["actors"]:
        try:
            ray.kill(a)
        except Exception:  # noqa: BLE001 - already gone
            pass
    _POOL["actors"] = []


class _Workers:
    """LayerWorker actors from the pool, each holding a contiguous share of the windows."""

    def __init__(self, n: int) -> None:
        self.actors = _pool(n)

    def load(self, location: str, compressed: bool, dtype_name: str, windows: torch.Tensor, batch_size: int) -> int:
        shares, ctx = torch.tensor_split(windows, len(self.actors)), _context()
        return ray.get([a.load.remote(ctx, location, compressed, dtype_name, s.contiguous(), batch_size)
                        for a, s in zip(self.actors, shares)])[0]

    def forward_all(self, n_layers: int, desc: str, progress: bool) -> float:
        refs = [[a.forward.remote(i) for a in self.actors] for i in range(n_layers)]  # actors run in order
        for r in tqdm(refs, desc=desc, unit="layer", disable=not progress):
            ray.get(r)
        parts = ray.get([a.nll.remote() for a in self.actors])
        total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
        return math.exp(total / count)

    def __enter__(self) -> "_Workers":
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        if exc_type is not None:  # an actor may have died or hold half a stage: start afresh next time
            drop_pool()
            return
        for info in ray.get([a.release.remote() for a in self.actors]):
            _note(info)


def ray_calibrate(cfg, calib: torch.Tensor, store: Storage, progress: bool = True) -> None:
    """Data-parallel calibration: calib/layer-*.safetensors equal to the in-process stage's (float tolerance)."""
    ensure_ray(cfg.ray)
    n = calib_workers(cfg.ray, calib.shape[0])
    url = store.worker_url()
    with _Workers(n) as w:
        n_layers = w.load(worker_location(cfg.model), False, cfg.run.dtype, calib, cfg.data.batch_size)
        head = w.actors[0]
        in_flight: list[ray.ObjectRef] = []
        for i in tqdm(range(n_layers), desc=f"calibrate (ray, {n} workers)", unit="layer", disable=not progress):
            parts = [a.calibrate.remote(i) for a in w.actors]
            in_flight.append(head.save_stats.remote(url, i, *parts))
            del parts
            if len(in_flight) > 1:  # at most two layers' statistics alive at once
                _note(ray.get(in_flight.pop(0)))
        for r in ray.get(in_flight):
            _note(r)
        hidden = [a.final_hidden.remote() for a in w.actors]
        ray.get(head.save_calib_extras.remote(url, calib, *hidden))


def ray_perplexities(cfg, store: Storage, windows: torch.Tensor, progress: bool = True) -> tuple[float, float | None]:
    """Perplexity of the run's checkpoint (and of the dense model when run.eval_dense), data-parallel."""
    ensure_ray(cfg.ray)
    n = calib_workers(cfg.ray, windows.shape[0])
    bs = cfg.data.batch_size
    with _Workers(n) as w:
        n_layers = w.load(store.worker_url() + "/checkpoint", True, cfg.run.dtype, windows, bs)
        ppl_c = w.forward_all(n_layers, f"evaluate compressed (ray, {n} workers)", progress)
        ppl_d = None
        if cfg.run.eval_dense:
            n_layers = w.load(worker_location(cfg.model), False, cfg.run.dtype, windows, bs)
            ppl_d = w.forward_all(n_layers, f"evaluate dense (ray, {n} workers)", progress)
    return ppl_c, ppl_d


# --------------------------------------------------------------------------- assemble

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U64": 8, "U32": 4, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8}


def _headers(source) -> dict[str, tuple[str, list[int]]]:
    """{tensor: (dtype, shape)} from the shards' headers only (a remote shard is not downloaded)."""
    import fsspec
    out = {}
    for shard in sorted(set(source.weight_map.values())):
        url = f"{source.location}/{shard}"
        opener = open(local_path(url), "rb") if not source.remote else \
            fsspec.open(url, "rb", **(source.storage_options or {})).open()
        with opener as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        out.update({k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return out


def shard_layout(source, ranks_by_layer: Callable[[int], dict[str, int]], layers_name: str, n_layers: int,
                 dtype: torch.dtype, shard_bytes: int) -> tuple[list[list[tuple]], int]:
    """The checkpoint's shards as lists of entries, in pipeline.checkpoint.write_checkpoint's order
    and with ShardWriter's packing; and the total size in bytes.

    Entries: ("copy", name) a source tensor cast to dtype; ("lowrank", name, layer, owner,
    bias name or "", key) one tensor of a low-rank pair (key: down.weight, up.weight, up.bias).
    """
    heads = _headers(source)
    size_of_dtype = torch.empty(0, dtype=dtype).element_size()

    def nbytes_copy(name: str) -> int:
        dt, shape = heads[name]
        n = 1
        for s in shape:
            n *= s
        floating = dt.startswith(("F", "BF"))
        return n * (size_of_dtype if floating else _ITEMSIZE[dt])

    order: list[tuple[tuple, int]] = []
    prefix0 = layers_name + "."
    for name in sorted(source.weight_map):
        if not name.startswith(prefix0):
            order.append((("copy", name), nbytes_copy(name)))
    for i in range(n_layers):
        prefix = f"{layers_name}.{i}."
        ranks = ranks_by_layer(i)
        for full in sorted(n for n in source.weight_map if n.startswith(prefix)):
            owner, leaf = full[len(prefix):].rsplit(".", 1)
            if owner in ranks:
                if leaf == "weight":
                    m, n = heads[full][1]
                    k = ranks[owner]
                    bias = f"{prefix}{owner}.bias" if source.has(f"{prefix}{owner}.bias") else ""
                    keys = [("down.weight", k * n), ("up.weight", m * k)] + ([("up.bias", m)] if bias else [])
                    for key, numel in keys:
                        order.append((("lowrank", f"{prefix}{owner}.{key}", i, owner, bias, key),
                                      numel * size_of_dtype))
                continue
            order.append((("copy", full), nbytes_copy(full)))
    shards: list[list[tuple]] = []
    pending: list[tuple] = []
    pending_bytes = total = 0
    for entry, nb in order:  # ShardWriter.add / _flush / close
        if pending and pending_bytes + nb > shard_bytes:
            shards.append(pending)
            pending, pending_bytes = [], 0
        pending.append(entry)
        pending_bytes += nb
        total += nb
    if pending or not shards:
        shards.append(pending)
    return shards, total


def ray_write_checkpoint(cfg, source, plan, soco: dict[str, Any], load_factors: Callable[[Storage, int], dict],
                         store: Storage, rel: str, dtype: torch.dtype, progress: bool = True) -> None:
    """pipeline.checkpoint.write_checkpoint with one Ray task per shard: the same files, published at once.

    `plan` gives the ranks, `soco` the config.json entry, `load_factors(store, i)` a layer's
    factors (a module-level function: it travels to the tasks by reference).
    """
    from pipeline.checkpoint import FORMAT
    from pipeline.model_io import build_skeleton, find_layers
    ensure_ray(cfg.ray)
    layers_name, layers = find_layers(build_skeleton(source.config, dtype))
    n_layers = len(layers)
    shards, total = shard_layout(source, lambda i: plan.layer_ranks(layers_name, i), layers_name, n_layers, dtype,
                                 int(cfg.run.shard_size_mb * 2**20))
    n = len(shards)
    names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    if store.local:
        staging = tempfile.mkdtemp(prefix="soco-ckpt-", dir=store.path())
        out = Storage(staging)
    else:
        staging = None
        store.rm(rel)  # as Storage.put_dir does: the index, written last, marks a complete checkpoint
        out = Storage(store.url(rel))
    try:
        ctx, loc, url, dname = _context(), worker_location(cfg.model), store.worker_url(), str(dtype).replace("torch.", "")
        fn = shard_task.options(**task_options())
        _bounded(lambda k: fn.remote(ctx, loc, url, dname, shards[k], out.worker_url(), names[k], load_factors), range(n),
                 max_in_flight(cfg.ray), "assemble (ray, shards)", progress)
        c = source.config.to_dict()
        c["soco"] = soco | {"format": FORMAT}
        c["torch_dtype"] = c["dtype"] = str(dtype).replace("torch.", "")
        with tempfile.TemporaryDirectory(prefix="soco-meta-") as tmp:
            source.tokenizer().save_pretrained(tmp)
            for f in sorted(os.listdir(tmp)):
                with open(os.path.join(tmp, f), "rb") as fh:
                    out.write_bytes(f, fh.read())
        out.write_bytes("config.json", json.dumps(c, indent=2).encode())
        weight_map = {e[1]: names[k] for k, entries in enumerate(shards) for e in entries}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        out.write_bytes("model.safetensors.index.json", json.dumps(index, indent=2).encode())
        if staging is not None:
            store.put_dir(staging, rel)
            staging = None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def warm_workers(n: int) -> list[int]:
    """Start n workers and import the stage code in them (benchmarks time warm workers)."""
    return ray.get([warmup_task.remote() for _ in range(n)])


__all__ = ["ray_calibrate", "ray_decompose", "ray_write_checkpoint", "ray_perplexities", "shard_layout",
           "WORKER_PEAK_RSS_MB", "warm_workers"]
