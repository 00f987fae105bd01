"""Run configuration: a typed schema, YAML loading and `--set key=value` overrides.

Unknown or misspelled keys are errors that name the key (and the closest valid one), so
a typo never silently falls back to a default. Besides the fixed sections, every registered
method with a config section adds one (`soco:`, pipeline/stages/learning/config.py); `cfg.soco`
reads it. All checks beyond types live in `validate()`.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.ray_runtime import RaySettings

from . import methods
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
    method: str = "svd-llm"  # a registered method (pipeline/methods): svd, asvd, svd-llm, soco, lorap, and each of the first four +mgaa
    ratio: float = 0.4  # fraction of the decoder's linear parameters removed
    asvd_alpha: float = 0.5


@dataclass
class RunConfig:
    dtype: str = "float32"  # compute and checkpoint dtype: float32 | bfloat16 | float16
    threads: int = 0  # torch threads; 0 = all cores
    shard_size_mb: float = 200.0  # checkpoint shard size (MiB)
    eval_dense: bool = True  # also measure the dense model's perplexity for the report
    calib_resume_s: float = 60.0  # seconds between calibration's saved resume points; 0 = after every layer


@dataclass
class EvaluateConfig:
    """Zero-shot accuracy beside perplexity (pipeline/zeroshot.py: lm-eval on local validation data)."""

    tasks: list = field(default_factory=list)  # e.g. [piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, boolq]
    limit: int = 0  # the first N documents of each task; 0 = all
    batch_size: int = 8  # requests per forward pass


@dataclass
class RayConfig:
    """Which executor runs the stages (cluster/executor.py) and where. Results do not depend on these."""

    enabled: bool = True  # run the stages as Ray tasks and actors; false = all in this process
    address: str = ""  # "" = $RAY_ADDRESS if set, else a local Ray started in-process
    num_cpus: int = 0  # local Ray only: CPUs it may use; 0 = all cores
    object_store_mb: int = 512  # local Ray only: object store size
    max_in_flight: int = 0  # decompose / shard tasks submitted at once; 0 = 2 x parallel slots

    def settings(self) -> RaySettings:
        """The connection settings cluster/ray_runtime.py takes."""
        return RaySettings(self.address, self.num_cpus, self.object_store_mb)
    calib_workers: int = 0  # actors sharing the calibration / evaluation windows; 0 = one per slot


@dataclass
class Config:
    model: str = "bundled:smollm2-135m"  # bundled:NAME, a local HF folder or an fsspec URL
    output: str = "runs/default"  # run folder: local path or fsspec URL
    data: DataConfig = field(default_factory=DataConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    run: RunConfig = field(default_factory=RunConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    #: the registered methods' sections by name (`soco`), each its method's dataclass
    sections: dict[str, Any] = field(default_factory=dict, repr=False)

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections") or {}
        if name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or method section '{name}'")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("sections")
        return d | {k: dataclasses.asdict(v) for k, v in self.sections.items()}

    @property
    def method(self) -> "methods.Method":
        """The registered method `compress.method` names."""
        return methods.get(self.compress.method)


DTYPES = ("float32", "bfloat16", "float16")
FIXED = [f.name for f in dataclasses.fields(Config) if f.name != "sections"]


def _closest(key: str, options: list[str]) -> str:
    near = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean '{near[0]}'?)" if near else ""


def _nested_home(cls: type, key: str, prefix: str) -> str:
    """' (did you mean 'soco.schedule.patience'?)' when `key` is a field of a nested section
    of `cls` (a key that moved into a subsection), else ''."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and key in {g.name for g in dataclasses.fields(tp)}:
            return f" (did you mean '{prefix}{f.name}.{key}'?)"
    return ""


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)$")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-1 (no dot in the mantissa) as a string
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise UserError(f"config key '{where}' must be {tp.__name__}, got {value!r}")
        return value
    return value


def _build(cls: type, data: Any, prefix: str, names: list[str] | None = None) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = names or [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            hint = _nested_home(cls, str(key), prefix) or _closest(str(key), names)
            raise UserError(f"unknown config key '{where}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{where}.")
        else:
            kwargs[key] = _coerce(value, tp, where)
    return cls(**kwargs)


def _build_config(data: dict[str, Any]) -> Config:
    """The fixed sections, then one section per registered method that declares one."""
    if not isinstance(data, dict):
        raise UserError(f"config must be a mapping of keys to values, got {data!r}")
    sections = methods.sections()
    cfg = _build(Config, {k: v for k, v in data.items() if k not in sections}, "", FIXED + list(sections))
    cfg.sections = {name: _build(cls, data.get(name) or {}, f"{name}.") for name, cls in sections.items()}
    return cfg


def validate(cfg: Config) -> Config:
    """Check values that types alone do not catch (every check of the config lives here or in
    a method section's own `validate(cfg)`, which this calls)."""
    cfg.method  # noqa: B018 - an unknown method is refused here, naming the registered ones
    for section in cfg.sections.values():
        if hasattr(section, "validate"):
            section.validate(cfg)
    if not 0.0 < cfg.compress.ratio < 1.0:
        raise UserError(f"compress.ratio must be strictly between 0 and 1, got {cfg.compress.ratio}")
    for key in ("calib_samples", "seq_len", "batch_size"):
        if getattr(cfg.data, key) < 1:
            raise UserError(f"data.{key} must be at least 1, got {getattr(cfg.data, key)}")
    if cfg.data.eval_samples < 0:
        raise UserError(f"data.eval_samples must be >= 0, got {cfg.data.eval_samples}")
    if cfg.run.dtype not in DTYPES:
        raise UserError(f"run.dtype must be one of {', '.join(DTYPES)}, got '{cfg.run.dtype}'")
    from .zeroshot import parse_tasks
    cfg.evaluate.tasks = parse_tasks(cfg.evaluate.tasks if isinstance(cfg.evaluate.tasks, (list, str)) else
                                     str(cfg.evaluate.tasks))
    if cfg.evaluate.limit < 0 or cfg.evaluate.batch_size < 1:
        raise UserError("evaluate.limit must be >= 0 and evaluate.batch_size >= 1")
    if cfg.run.calib_resume_s < 0:
        raise UserError(f"run.calib_resume_s must be >= 0, got {cfg.run.calib_resume_s}")
    if not cfg.run.shard_size_mb > 0:
        raise UserError(f"run.shard_size_mb must be positive, got {cfg.run.shard_size_mb}")
    for key in ("max_in_flight", "calib_workers"):
        if getattr(cfg.ray, key) < 0:
            raise UserError(f"ray.{key} must be >= 0, got {getattr(cfg.ray, key)}")
    cfg.ray.settings().check()
    if not cfg.output:
        raise UserError("output must name a run folder")
    return cfg


def from_dict(data: dict[str, Any]) -> Config:
    return validate(_build_config(data or {}))


def value_at(cfg: Config, path: str) -> Any:
    """The value of a dotted config path; a section as a dict of its fields, leaving out the
    ones marked execution-only (`metadata={"execution_only": True}`), which change how a run
    executes and never what it computes, and the ones marked `key_when_changed` that hold their
    default (which computes what the tool did before they existed)."""
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return _result_fields(node)


def _result_fields(node: Any) -> Any:
    if not dataclasses.is_dataclass(node):
        return node
    return {f.name: _result_fields(getattr(node, f.name)) for f in dataclasses.fields(node)
            if not f.metadata.get("execution_only")
            and not (f.metadata.get("key_when_changed") and getattr(node, f.name) == _default(f))}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def execution_only(path: str) -> bool:
    """Whether the dotted config path (`soco.checkpoint_every`) names a field marked
    execution-only, one that never changes what a run computes; False for any other path."""
    first, *rest = path.split(".")
    node: Any = methods.sections().get(first)
    if node is None:
        node, rest = Config, [first, *rest]
    for part in rest:
        f = {g.name: g for g in dataclasses.fields(node)}.get(part) if dataclasses.is_dataclass(node) else None
        if f is None:
            return False
        if f.metadata.get("execution_only"):
            return True
        node = typing.get_type_hints(node)[part]
    return False


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


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: {}); anything else is one line naming it."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must be a mapping of keys to values")
    return data


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or the defaults when path is None) and apply overrides."""
    data = read_yaml_mapping(path) if path is not None else {}
    return from_dict(apply_overrides(data, overrides or []))
