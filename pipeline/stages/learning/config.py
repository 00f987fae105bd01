"""SoCo's config section (`soco:` in a run config), its schedule nested as `soco.schedule`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from soco.schedule import ScheduleConfig
from soco.scores import GATES

from ...errors import UserError

#: metadata of a field that changes how a run executes, never what it computes: such fields
#: stay out of the stage keys (pipeline/manifest.py), so changing them reuses committed work.
EXECUTION_ONLY = {"execution_only": True}
#: metadata of a field added after run folders existed whose default computes what the tool
#: computed before it: at that default it stays out of the stage keys, so a folder made by an
#: earlier version (or a stage interrupted under one) keeps its committed work after an upgrade.
#: Give it to every new result-changing field whose default leaves results as they were.
KEY_WHEN_CHANGED = {"key_when_changed": True}
#: the stages soco.factor_from and soco.generated_from may name (soco.schedule.Stage, lower case)
FACTOR_STAGES = ("coarse", "refine", "sparsify")
#: the trained parts that are factors (soco.factor_lr, soco.factor_rank, soco.factor_vt): held fixed before soco.factor_from
FACTOR_PARTS = ("U", "u_up", "u_down", "vt_delta")


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
    # what a component pays of its cost before the cut: `magnitude` = the soft gate of its score
    # (above); `hard_concrete` = P(z > 0) of a sampled hard-concrete gate z of its own, with a
    # trained log alpha, so the count is paid per whole component (soco/scores.py)
    gate: str = "magnitude"
    gate_lr: float = 0.2  # Adam learning rate of the hard-concrete gates' log alpha
    channel_scales: bool = False  # also train a scale per input and output channel of each matrix
    scale_lr: float = 0.01  # Adam learning rate of the channel scales
    # Adam learning rate of every matrix's output factor U (its components' output directions),
    # trained with the scores by the same distillation: a correction beyond the diagonal that the
    # stored format already holds (U is stored anyway). 0 = U stays frozen (svd-llm's).
    factor_lr: float = 0.0
    # the stage from which U trains (coarse | refine | sparsify): before it U is held fixed and
    # its gradient is not computed (Adam counts its steps but skips their update). From
    # `sparsify` U adapts to the pruned network only, where its gain was measured (README).
    factor_from: str = "coarse"
    # 0 = U itself trains (every candidate's output direction, with its gradient and Adam moments:
    # a full fine-tune's state at 70B); r > 0 = U stays as decomposed and a rank-r change of it
    # trains instead, U + up @ down (LoRA's form; soco.scores.trained_u): r(m + k) numbers per
    # matrix where U is m x k, and a change with less room to fit the calibration windows
    factor_rank: int = 0
    # whether U's Adam counts the steps it sat idle before factor_from in its bias correction.
    # true (every figure measured before it existed): U's first trained steps are larger than
    # factor_lr (about twice over the first 50 after the 130 steps of coarse and refine);
    # false: its steps are factor_lr's from the first, as a fresh Adam's (cluster.zero.IdleAwareAdam)
    factor_counts_idle_steps: bool = True
    # also train every matrix's Vt (its components' input directions) with U, at factor_lr and
    # from factor_from on: both sides of each kept component adapt, as in SVD-LLM's update of
    # both factors. Trained as a change in units of each row's norm (soco.scores.trained_vt),
    # a tensor of Vt's size with its gradient and Adam moments.
    factor_vt: bool = False
    # weight of U's distance from its decomposed value (svd-llm's output directions) in the loss,
    # while U trains: sum_i (s_i sigma_i)^2 |u_i - u0_i|^2 / sum_i sigma_i^2 per matrix
    # (soco.scores.ScoredLinear.factor_change), averaged over the matrices; 0 = off. It holds a
    # copy of every candidate's U (a buffer, whole on every rank).
    factor_anchor: float = 0.0
    # distil the outputs of this many decoder layers too (spread over depth, the last among
    # them: soco.objective.distilled_layers), by their per-token relative squared error to the
    # dense model's; 0 = the logits alone. Costs one more dense pass over the calibration
    # windows (the targets, teacher/hidden.safetensors) and holds its targets in memory.
    hidden_layers: int = 0
    hidden_weight: float = 1.0  # weight of that hidden-state distance beside the KL
    # training windows sampled from the dense model itself, beside the real ones: each continues
    # the first generate_prompt tokens of a training window at generate_temperature, and the
    # dense model's targets on it are cached (pipeline/stages/learning/generated.py). 0 = none.
    # The whole dense model is loaded into one process for it (models that fit its memory).
    generated_windows: int = field(default=0, metadata=KEY_WHEN_CHANGED)
    # tokens of a real training window that begin each generated one
    generate_prompt: int = field(default=16, metadata=KEY_WHEN_CHANGED)
    generate_temperature: float = field(default=1.0, metadata=KEY_WHEN_CHANGED)  # their sampling temperature
    # the stage (coarse | refine | sparsify) from which steps draw generated windows too; before
    # it they draw only real ones (the scores are chosen on real text, the hard network trains
    # on both)
    generated_from: str = field(default="coarse", metadata=KEY_WHEN_CHANGED)
    batch_size: int = 2  # calibration windows per step (split across workers)
    holdout_samples: int = 8  # last calibration windows, kept out of training for early stopping
    topk: int = 64  # teacher log-probabilities cached per token
    max_steps: int = 300  # hard cap over all three stages
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # stages, caps, patience, weights
    eval_every: int = 5  # steps between held-out KL evaluations
    checkpoint_every: int = field(default=20, metadata=EXECUTION_ONLY)  # steps between score checkpoints
    keep_checkpoints: int = field(default=1, metadata=EXECUTION_ONLY)  # the last N periodic ones stay; 0 = all
    prune_by: str = "fisher"  # sparsification prunes the least important per parameter: fisher | score (|s|)
    fisher_decay: float = 0.9  # EMA decay of the Fisher importance estimate (soco/importance.py)
    average_decay: float = 0.9  # EMA of the pruned network's scores, evaluated and saved (soco/averaging.py); 0 = off
    min_rank_fraction: float = 0.1  # every matrix keeps at least this share of its uniform rank
    zero_stage: int = 3  # DeepSpeed ZeRO stage: 2 or 3
    activation_checkpointing: bool = field(default=False, metadata=EXECUTION_ONLY)  # recompute layers in backward
    workers: int = 1  # Ray Train workers (data-parallel ranks)
    threads_per_worker: int = field(default=0, metadata=EXECUTION_ONLY)  # torch threads per worker; 0 = cores / workers
    launcher: str = field(default="ray", metadata=EXECUTION_ONLY)  # ray (Ray Train TorchTrainer) | local (this process, one rank)
    seed: int = 0

    def learning_rates(self) -> dict[str, float]:
        """What trains in every scored matrix (its ScoredLinear attribute) and at which Adam
        learning rate: the one place that says it (the trained tensors, their optimiser groups
        and the checkpoints follow from it)."""
        rates = {"score": self.lr}
        if self.channel_scales:
            rates |= {"in_scale": self.scale_lr, "out_scale": self.scale_lr}
        if self.factor_lr > 0:
            rates |= {"u_up": self.factor_lr, "u_down": self.factor_lr} if self.factor_rank else {"U": self.factor_lr}
            if self.factor_vt:
                rates["vt_delta"] = self.factor_lr
        if self.gate == "hard_concrete":
            rates["log_alpha"] = self.gate_lr
        return rates

    def validate(self, cfg: Any) -> None:
        """Checks that types alone do not catch; `cfg` is the whole run config."""
        ratio = cfg.compress.ratio
        if self.coarse_ratio is not None and (isinstance(self.coarse_ratio, bool)
                                              or not isinstance(self.coarse_ratio, (int, float))
                                              or not self.coarse_ratio < ratio):
            raise UserError(f"soco.coarse_ratio must be null or a number below compress.ratio ({ratio}), "
                            f"got {self.coarse_ratio!r}")
        if self.zero_stage not in (2, 3):
            raise UserError(f"soco.zero_stage must be 2 or 3, got {self.zero_stage}")
        if self.prune_by not in ("fisher", "score"):
            raise UserError(f"soco.prune_by must be 'fisher' or 'score', got '{self.prune_by}'")
        if not 0.0 <= self.fisher_decay < 1.0:
            raise UserError(f"soco.fisher_decay must be in [0, 1), got {self.fisher_decay}")
        if not 0.0 <= self.average_decay < 1.0:
            raise UserError(f"soco.average_decay must be in [0, 1) (0 = off), got {self.average_decay}")
        if isinstance(self.factor_lr, bool) or not isinstance(self.factor_lr, (int, float)) or self.factor_lr < 0:
            raise UserError(f"soco.factor_lr must be a number of at least 0 (0 = U frozen), got {self.factor_lr!r}")
        if isinstance(self.factor_rank, bool) or not isinstance(self.factor_rank, int) or self.factor_rank < 0:
            raise UserError(f"soco.factor_rank must be an integer of at least 0 (0 = U itself trains), "
                            f"got {self.factor_rank!r}")
        if self.factor_rank and not self.factor_lr > 0:
            raise UserError("soco.factor_rank trains a low-rank change of U at soco.factor_lr: set soco.factor_lr above 0")
        if self.factor_vt and not self.factor_lr > 0:
            raise UserError("soco.factor_vt trains Vt at soco.factor_lr: set soco.factor_lr above 0")
        if isinstance(self.factor_anchor, bool) or not isinstance(self.factor_anchor, (int, float)) \
                or self.factor_anchor < 0:
            raise UserError(f"soco.factor_anchor must be a number of at least 0 (0 = off), got {self.factor_anchor!r}")
        if self.factor_anchor > 0 and not self.factor_lr > 0:
            raise UserError("soco.factor_anchor pulls a trained U toward its decomposed value: set soco.factor_lr above 0")
        if self.generated_from not in FACTOR_STAGES:
            raise UserError(f"soco.generated_from must be one of {', '.join(FACTOR_STAGES)}, "
                            f"got {self.generated_from!r}")
        if self.factor_from not in FACTOR_STAGES:
            raise UserError(f"soco.factor_from must be one of {', '.join(FACTOR_STAGES)}, got {self.factor_from!r}")
        if self.schedule.patience < 1:
            raise UserError(f"soco.schedule.patience must be at least 1, got {self.schedule.patience}")
        for key in ("budget_weight", "sparsity_weight", "deviation_weight", "sparsify_patience"):
            if getattr(self.schedule, key) < 0:
                raise UserError(f"soco.schedule.{key} must be at least 0, got {getattr(self.schedule, key)}")
        if not 0.0 <= self.schedule.hard_lr_end <= 1.0:
            raise UserError(f"soco.schedule.hard_lr_end must be in [0, 1] (1 = constant), got {self.schedule.hard_lr_end}")
        if self.hidden_layers < 0:
            raise UserError(f"soco.hidden_layers must be at least 0 (0 = off), got {self.hidden_layers}")
        if self.hidden_weight < 0:
            raise UserError(f"soco.hidden_weight must be at least 0, got {self.hidden_weight}")
        if isinstance(self.generated_windows, bool) or not isinstance(self.generated_windows, int) \
                or self.generated_windows < 0:
            raise UserError(f"soco.generated_windows must be an integer of at least 0 (0 = none), "
                            f"got {self.generated_windows!r}")
        if isinstance(self.generate_prompt, bool) or not isinstance(self.generate_prompt, int) \
                or self.generate_prompt < 1 or (self.generated_windows and self.generate_prompt >= cfg.data.seq_len):
            raise UserError(f"soco.generate_prompt must be an integer from 1 to data.seq_len - 1 "
                            f"({cfg.data.seq_len - 1}), got {self.generate_prompt!r}")
        if isinstance(self.generate_temperature, bool) or not isinstance(self.generate_temperature, (int, float)) \
                or not self.generate_temperature > 0:
            raise UserError(f"soco.generate_temperature must be a number above 0, got {self.generate_temperature!r}")
        if self.gate not in GATES:
            raise UserError(f"soco.gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if not self.gate_lr > 0:
            raise UserError(f"soco.gate_lr must be above 0, got {self.gate_lr}")
        if not 0.0 < self.gate_power <= 1.0:
            raise UserError(f"soco.gate_power must be in (0, 1], got {self.gate_power}")
        if self.launcher not in ("ray", "local"):
            raise UserError(f"soco.launcher must be 'ray' or 'local', got '{self.launcher}'")
        if self.keep_checkpoints < 0:
            raise UserError(f"soco.keep_checkpoints must be at least 0 (0 keeps every one), got {self.keep_checkpoints}")
        for key in ("batch_size", "workers", "topk", "eval_every", "checkpoint_every", "max_steps"):
            if getattr(self, key) < 1:
                raise UserError(f"soco.{key} must be at least 1, got {getattr(self, key)}")
        if self.batch_size % self.workers:
            raise UserError(f"soco.batch_size ({self.batch_size}) must be a multiple of soco.workers ({self.workers})")
        if self.launcher == "local" and self.workers != 1:
            raise UserError("soco.launcher 'local' runs one rank: set soco.workers=1 or soco.launcher=ray")
        if cfg.compress.method == "soco" and self.holdout_samples >= cfg.data.calib_samples:
            raise UserError(f"soco.holdout_samples ({self.holdout_samples}) must be below data.calib_samples "
                            f"({cfg.data.calib_samples})")
