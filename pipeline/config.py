"""Run configuration: a typed schema, YAML loading and `--set key=value` overrides.

Unknown or misspelled keys are errors that name the key (and the closest valid one), so
a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from soco.decompose import METHODS

from .errors import UserError


@dataclass
class DataConfig:
    """Where text comes from and how it is cut into windows.

    The token stream is split in two halves: calibration windows come from the start of
    the first half, evaluation windows from the start of the second, never mixed.
    """

    source: str = "bundled:wiki"  # bundled:NAME, or a .txt/.jsonl/.parquet path or fsspec URL
    text_field: str = "text"  # column of JSONL/Parquet rows holding the text
    calib_samples: int = 64  # N calibration windows
    seq_len: int = 512  # L tokens per window (calibration and evaluation)
    eval_samples: int = 32  # evaluation windows; 0 means all of the held-out half
    batch_size: int = 8  # windows per forward pass


@dataclass
class CompressConfig:
    method: str = "svd-llm"  # svd | asvd | svd-llm | soco
    ratio: float = 0.4  # fraction of the decoder's linear parameters removed
    asvd_alpha: float = 0.5


@dataclass
class SocoConfig:
    """SoCo's learned spectrum (used when compress.method is `soco`); see soco/schedule.py."""

    # Removal ratio of the svd-llm pre-truncation that gives the candidate components: below
    # compress.ratio; negative keeps more than the dense count (each matrix capped at full
    # rank); null = 1 - 2 * (1 - ratio): candidates worth twice the budget's parameters.
    coarse_ratio: float | None = None
    lr: float = 0.05  # Adam learning rate of the scores in the coarse stage
    refine_lr_factor: float = 0.4  # the learning rates are multiplied by this after the coarse stage
    gate_power: float = 1.0  # soft gate min(1,|s|)^p of the parameter count: 1 = L1-like, < 1 = closer to L0
    channel_scales: bool = False  # also train a scale per input and output channel of each matrix
    scale_lr: float = 0.01  # Adam learning rate of the channel scales
    batch_size: int = 2  # calibration windows per step (split across workers)
    holdout_samples: int = 8  # last calibration windows, kept out of training for early stopping
    topk: int = 64  # teacher log-probabilities cached per token
    max_steps: int = 300  # hard cap over all three stages
    coarse_max_steps: int = 200
    refine_steps: int = 100  # cap: refinement normally ends on the held-out KL (patience); at r=0.4 a cap of 30 cut it while still improving
    sparsify_steps: int = 100  # cap; the hard network's training stops on the held-out KL (patience)
    sparsify_ramp: int = 40  # of which the first ones prune gradually down to the budget (r=0.2: 20 steps 59.8 ppl, 40 steps 58.3)
    patience: int = 2
    budget_weight: float = 5.0
    sparsity_weight: float = 0.5
    eval_every: int = 5  # steps between held-out KL evaluations
    checkpoint_every: int = 20  # steps between score checkpoints
    prune_by: str = "fisher"  # sparsification prunes the least important per parameter: fisher | score (|s|)
    fisher_decay: float = 0.9  # EMA decay of the Fisher importance estimate (soco/importance.py)
    average_decay: float = 0.9  # EMA of the pruned network's scores, evaluated and saved (soco/averaging.py); 0 = off
    min_rank_fraction: float = 0.1  # every matrix keeps at least this share of its uniform rank
    zero_stage: int = 3  # DeepSpeed ZeRO stage: 2 or 3
    activation_checkpointing: bool = False  # recompute each decoder layer in backward (large models)
    workers: int = 1  # Ray Train workers (data-parallel ranks)
    threads_per_worker: int = 0  # torch threads per worker; 0 = cores / workers
    launcher: str = "ray"  # ray (Ray Train TorchTrainer) | local (this process, one rank)
    seed: int = 0


@dataclass
class RunConfig:
    dtype: str = "float32"  # compute and checkpoint dtype: float32 | bfloat16 | float16
    threads: int = 0  # torch threads; 0 = all cores
    shard_size_mb: float = 200.0  # checkpoint shard size (MiB)
    eval_dense: bool = True  # also measure the dense model's perplexity for the report


@dataclass
class RayConfig:
    """Where the stages run (cluster/ray_runtime.py). Results do not depend on these."""

    enabled: bool = True  # run the stages as Ray tasks and actors; false = all in this process
    address: str = ""  # "" = $RAY_ADDRESS if set, else a local Ray started in-process
    num_cpus: int = 0  # local Ray only: CPUs it may use; 0 = all cores
    object_store_mb: int = 512  # local Ray only: object store size
    max_in_flight: int = 0  # decompose / shard tasks submitted at once; 0 = 2 x parallel slots
    calib_workers: int = 0  # actors sharing the calibration / evaluation windows; 0 = one per slot


@dataclass
class Config:
    model: str = "bundled:smollm2-135m"  # bundled:NAME, a local HF folder or an fsspec URL
    output: str = "runs/default"  # run folder: local path or fsspec URL
    data: DataConfig = field(default_factory=DataConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    soco: SocoConfig = field(default_factory=SocoConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DTYPES = ("float32", "bfloat16", "float16")
ALL_METHODS = METHODS + ("soco",)


def _closest(key: str, options: list[str]) -> str:
    near = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean '{near[0]}'?)" if near else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise UserError(f"config key '{where}' must be {tp.__name__}, got {value!r}")
        return value
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise UserError(f"unknown config key '{where}'{_closest(str(key), names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{where}.")
        else:
            kwargs[key] = _coerce(value, tp, where)
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Check values that types alone do not catch."""
    if cfg.compress.method not in ALL_METHODS:
        raise UserError(f"compress.method must be one of {', '.join(ALL_METHODS)}, got '{cfg.compress.method}'")
    sc = cfg.soco
    if sc.coarse_ratio is not None and (isinstance(sc.coarse_ratio, bool) or not isinstance(sc.coarse_ratio, (int, float))
                                       or not sc.coarse_ratio < cfg.compress.ratio):
        raise UserError(f"soco.coarse_ratio must be null or a number below compress.ratio ({cfg.compress.ratio}), "
                        f"got {sc.coarse_ratio!r}")
    if sc.zero_stage not in (2, 3):
        raise UserError(f"soco.zero_stage must be 2 or 3, got {sc.zero_stage}")
    if sc.prune_by not in ("fisher", "score"):
        raise UserError(f"soco.prune_by must be 'fisher' or 'score', got '{sc.prune_by}'")
    if not 0.0 <= sc.fisher_decay < 1.0:
        raise UserError(f"soco.fisher_decay must be in [0, 1), got {sc.fisher_decay}")
    if not 0.0 <= sc.average_decay < 1.0:
        raise UserError(f"soco.average_decay must be in [0, 1) (0 = off), got {sc.average_decay}")
    if not 0.0 < sc.gate_power <= 1.0:
        raise UserError(f"soco.gate_power must be in (0, 1], got {sc.gate_power}")
    if sc.launcher not in ("ray", "local"):
        raise UserError(f"soco.launcher must be 'ray' or 'local', got '{sc.launcher}'")
    for key in ("batch_size", "workers", "topk", "eval_every", "checkpoint_every", "max_steps"):
        if getattr(sc, key) < 1:
            raise UserError(f"soco.{key} must be at least 1, got {getattr(sc, key)}")
    if sc.batch_size % sc.workers:
        raise UserError(f"soco.batch_size ({sc.batch_size}) must be a multiple of soco.workers ({sc.workers})")
    if sc.launcher == "local" and sc.workers != 1:
        raise UserError("soco.launcher 'local' runs one rank: set soco.workers=1 or soco.launcher=ray")
    if cfg.compress.method == "soco" and sc.holdout_samples >= cfg.data.calib_samples:
        raise UserError(f"soco.holdout_samples ({sc.holdout_samples}) must be below data.calib_samples "
                        f"({cfg.data.calib_samples})")
    if not 0.0 < cfg.compress.ratio < 1.0:
        raise UserError(f"compress.ratio must be strictly between 0 and 1, got {cfg.compress.ratio}")
    for key in ("calib_samples", "seq_len", "batch_size"):
        if getattr(cfg.data, key) < 1:
            raise UserError(f"data.{key} must be at least 1, got {getattr(cfg.data, key)}")
    if cfg.data.eval_samples < 0:
        raise UserError(f"data.eval_samples must be >= 0, got {cfg.data.eval_samples}")
    if cfg.run.dtype not in DTYPES:
        raise UserError(f"run.dtype must be one of {', '.join(DTYPES)}, got '{cfg.run.dtype}'")
    if not cfg.run.shard_size_mb > 0:
        raise UserError(f"run.shard_size_mb must be positive, got {cfg.run.shard_size_mb}")
    if not cfg.output:
        raise UserError("output must name a run folder")
    return cfg


def from_dict(data: dict[str, Any]) -> Config:
    return validate(_build(Config, data or {}, ""))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings; values are parsed as YAML scalars (0.4, true, text)."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: '{p}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise UserError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
    return data


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or the defaults when path is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise UserError(f"config {path} must be a mapping of keys to values")
    return from_dict(apply_overrides(data, overrides or []))
