"""SoCo's three-stage schedule and its switching rules.

Loss at every step: KL(teacher || student) + budget + sparsity, where with
`excess = soft_count / target - 1`:

1. COARSE compression: budget = lambda * relu(excess) and sparsity = mu * soft_count /
   target. Every gate is pushed down in proportion to its parameter cost while the KL
   keeps the useful ones. Switch to REFINE when the soft count reaches the target
   (excess <= tolerance), or after `coarse_max_steps` (then the final cut enforces it).
2. REFINEMENT: sparsity off; budget = lambda * |excess| holds the count at the target
   from both sides (an overshoot below it revives the best partly-pruned components)
   while the scores learn to compensate (gates saturate at 1, so kept scores can grow
   above 1 at no cost). Switch to SPARSIFY after `refine_steps`, or earlier when the
   held-out KL has not improved for `patience` evaluations.
3. Fine-grained SPARSIFY: gradual pruning to exact zeros. At every step of the first
   `sparsify_ramp` steps the caller prunes, among the components still alive, the least
   important per parameter (soco/importance.py: the Fisher estimate of the loss that
   removing a component costs, over its m + n parameters) until the kept parameters fall
   to `prune_target`: a cubic
   schedule from all candidates to exactly the budget (many of the weakest early, few at
   the end), so the network adapts to each cut before the next and the ranking is re-read
   from the scores as they adapt. A pruned component's output is exactly zero and it never
   returns (its mask is 0). The last ramp step makes the final cut (the budget, every
   matrix keeping its minimum rank); then the hard network that will be saved trains on
   until its held-out KL has not improved for `sparsify_patience` evaluations (`patience`
   unless set; or `sparsify_steps` in the stage), and the caller keeps the scores of its
   best held-out evaluation (of the average of its iterates since the cut,
   soco/averaging.py, by default). No budget or sparsity term in this stage: the pruning
   schedule holds the count. With `hard_lr_end` below 1 the learning rates of that
   training follow a cosine from their value at the cut down to `hard_lr_end` times it at
   the stage's cap (`lr_factor`). Then DONE.

After DONE the caller folds the kept components' scores into the factors.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import IntEnum

import torch


class Stage(IntEnum):
    COARSE = 1
    REFINE = 2
    SPARSIFY = 3
    DONE = 4


@dataclass
class ScheduleConfig:
    budget_weight: float = 5.0  # lambda: weight of relu(soft/target - 1)
    sparsity_weight: float = 0.5  # mu: weight of soft/target in stage 1
    tolerance: float = 0.0  # stage 1 ends when soft <= target * (1 + tolerance)
    coarse_max_steps: int = 200
    refine_steps: int = 100  # cap; refinement normally ends on the held-out KL (patience)
    sparsify_steps: int = 100  # cap: the hard network's training usually stops earlier, on the held-out KL
    sparsify_ramp: int = 40  # steps of gradual pruning down to the budget; the rest train the hard network
    patience: int = 2  # held-out evaluations without improvement that end refinement, and the hard training
    sparsify_patience: int = 0  # the same for the hard training alone (0: `patience`); its held-out KL is noisy
    deviation_weight: float = 0.0  # rho: weight of the scores' deviation from the unscaled spectrum, from refinement on
    hard_lr_end: float = 1.0  # learning-rate multiplier the hard training decays to by the sparsify cap (cosine; 1 = constant)


@dataclass
class ScheduleState:
    stage: Stage = Stage.COARSE
    step: int = 0  # optimisation steps taken
    stage_start: int = 0
    best_holdout: float = float("inf")
    bad_evals: int = 0
    boundaries: list[int] = field(default_factory=list)  # steps at which stages 2, 3, DONE began
    frozen_at: int = -1  # the step that made the final cut, set by after_step (-1: not yet)
    frozen_best: float = float("inf")  # best held-out KL of the frozen network ...
    best_step: int = -1  # ... and the step whose scores gave it (-1: none yet)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stage"] = int(self.stage)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ScheduleState":
        d = dict(d)
        d["stage"] = Stage(d["stage"])
        return cls(**d)


class ThreeStageSchedule:
    """Holds the stage and decides the loss terms and the switches; pure arithmetic."""

    def __init__(self, cfg: ScheduleConfig, state: ScheduleState | None = None) -> None:
        self.cfg = cfg
        self.state = state or ScheduleState()

    @property
    def stage(self) -> Stage:
        return self.state.stage

    def prune_target(self, candidates: float, budget: float) -> float | None:
        """Parameters the network may keep after this step's pruning, or None when this step
        prunes nothing: budget + (candidates - budget) (1 - t/R)^3 at step t = 1..R of the
        SPARSIFY ramp (R = `sparsify_ramp`), which is exactly the budget at t = R."""
        if self.stage != Stage.SPARSIFY:
            return None
        t = self.state.step - self.state.stage_start + 1
        ramp = max(1, self.cfg.sparsify_ramp)
        if t > ramp:
            return None
        return budget + (candidates - budget) * (1.0 - t / ramp) ** 3

    def lr_factor(self) -> float:
        """Multiplier of the learning rates for the coming step: 1 until the final cut, then
        end + (1 - end)(1 + cos(pi t)) / 2 with t the share of the hard training's room (the
        cut to the sparsify stage's cap) already taken, end = `hard_lr_end`.

        Why: at a constant step Adam keeps the hard network's scores and U moving at the
        noise level of a 2-window batch, so its held-out KL wanders around a level instead of
        settling; a step that shrinks toward the cap lets the last iterates settle into what
        the earlier ones found. It depends on the schedule's state alone, so a resumed run
        takes the steps an uninterrupted one would."""
        s, end = self.state, self.cfg.hard_lr_end
        if end == 1.0 or s.stage != Stage.SPARSIFY or s.frozen_at < 0:
            return 1.0
        room = max(1, s.stage_start + self.cfg.sparsify_steps - s.frozen_at)
        t = min(1.0, (s.step - s.frozen_at) / room)
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * t))

    def penalty(self, soft: torch.Tensor, target: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(budget term, sparsity term) for this stage."""
        if self.stage >= Stage.SPARSIFY:  # the pruning schedule holds the count
            return soft.new_zeros(()), soft.new_zeros(())
        excess = soft / target - 1.0
        if self.stage == Stage.COARSE:
            budget = self.cfg.budget_weight * torch.relu(excess)
        else:
            budget = self.cfg.budget_weight * excess.abs()
        if self.stage == Stage.COARSE:
            sparsity = self.cfg.sparsity_weight * soft / target
        else:
            sparsity = soft.new_zeros(())
        return budget, sparsity

    def regulariser(self, deviation: torch.Tensor) -> torch.Tensor:
        """rho * the scored matrices' mean deviation from their unscaled spectrum
        (ScoredLinear.deviation), from refinement on: the coarse stage must be free to push
        scores to 0, and the fits that overfit the few calibration windows come after it."""
        if self.stage == Stage.COARSE or self.cfg.deviation_weight == 0:
            return deviation.new_zeros(())
        return self.cfg.deviation_weight * deviation

    def _switch(self, to: Stage) -> None:
        self.state.stage = to
        self.state.stage_start = self.state.step
        self.state.boundaries.append(self.state.step)
        self.state.best_holdout, self.state.bad_evals = float("inf"), 0

    def after_step(self, soft_count: float, target: float) -> Stage:
        """Count the step just taken and apply the switching rules; returns the stage now."""
        s = self.state
        s.step += 1
        in_stage = s.step - s.stage_start
        if s.stage == Stage.SPARSIFY and in_stage == max(1, self.cfg.sparsify_ramp):
            s.frozen_at = s.step  # the step just taken made the final cut (prune_target == budget)
        if s.stage == Stage.COARSE and (soft_count <= target * (1 + self.cfg.tolerance)
                                        or in_stage >= self.cfg.coarse_max_steps):
            self._switch(Stage.REFINE)
        elif s.stage == Stage.REFINE and in_stage >= self.cfg.refine_steps:
            self._switch(Stage.SPARSIFY)
        elif s.stage == Stage.SPARSIFY and in_stage >= self.cfg.sparsify_steps:
            self._switch(Stage.DONE)
        return s.stage

    def after_holdout(self, kl: float) -> bool:
        """Held-out KL rules: early stopping of refinement, and of the hard network's training
        once the final cut is made (`frozen_at`); returns True when `kl` is the hard network's
        best so far, whose scores the caller keeps."""
        s = self.state
        if s.stage == Stage.REFINE:
            if kl < s.best_holdout - 1e-4:
                s.best_holdout, s.bad_evals = kl, 0
            else:
                s.bad_evals += 1
                if s.bad_evals >= self.cfg.patience:
                    self._switch(Stage.SPARSIFY)
            return False
        if s.stage not in (Stage.SPARSIFY, Stage.DONE) or s.frozen_at < 0:
            return False
        best = kl < s.frozen_best
        s.bad_evals = 0 if kl < s.frozen_best - 1e-4 else s.bad_evals + 1
        if best:
            s.frozen_best, s.best_step = kl, s.step
        if s.stage == Stage.SPARSIFY and s.bad_evals >= (self.cfg.sparsify_patience or self.cfg.patience):
            self._switch(Stage.DONE)
        return best
