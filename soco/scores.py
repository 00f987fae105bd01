"""SoCo's learnable spectrum: W' = U diag(s * sigma) Vt with frozen U, sigma, Vt.

Each component i of a compressed matrix has a score s_i (initialised to 1) and a gate
g_i in [0, 1] that says how much it is "paid for": the differentiable parameter count of
the model is sum_i g_i * (m + n). Until the final cut the gate is

    g(s) = min(1, |s|)^p      (p = soco.gate_power)

which is 1 for every component whose score is at least 1 (so kept components can grow
above 1 to compensate for pruned ones without costing more) and falls to 0 at s = 0
(linearly for the default p = 1). Once the cut is made (`apply_cut`) the gates are hard: 1 for the kept components,
0 for the pruned ones, so the count is exactly what will be saved.

With `gate = "hard_concrete"` (soco.gate) the gate is separate from the score's magnitude:
each component has a hard-concrete gate z in [0, 1] (Louizos et al., "Learning Sparse Neural
Networks through L0 Regularization", 2018) with a trained log alpha, sampled at every
training step, and pays P(z > 0) of its cost: the expected count of the components that are
on, paid per whole component however the score scales it. The matrix is
U diag(s * z * sigma) Vt; held-out evaluations and the fold use z's deterministic value.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def soft_gate(s: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Soft gate min(1, |s|)^power: 0 at s=0, 1 for |s| >= 1.

    power 1 is linear in |s| (an L1 relaxation of the count: a half-scaled component costs
    half). power < 1 is concave, closer to the exact L0 count: a partly-scaled component
    costs more than its share, so the relaxed solution should be nearer to 0-or-kept and
    the final cut to hard gates lose less. Measured on SmolLM2 at r=0.2, p = 0.5 did worse
    (the coarse stage overshot the damage; README), so p = 1 is the default. |s| is floored
    at 1e-6 so that the gradient stays finite at 0.
    """
    g = s.abs().clamp(max=1.0)
    return g if power == 1.0 else g.clamp(min=1e-6) ** power


#: hard-concrete stretch interval (GAMMA, ZETA) and temperature BETA, the paper's values
HC_BETA, HC_GAMMA, HC_ZETA = 2.0 / 3.0, -0.1, 1.1
#: initial log alpha: a gate open with probability 0.99 (z = 1 at 80% of the samples)
HC_INIT = 3.0
GATES = ("magnitude", "hard_concrete")


def hard_concrete_open(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0) of hard-concrete gates: the expected share of each component's cost paid."""
    return torch.sigmoid(log_alpha - HC_BETA * math.log(-HC_GAMMA / HC_ZETA))


def hard_concrete_sample(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Gates z = clamp(sigmoid((logit u + log alpha) / BETA) (ZETA - GAMMA) + GAMMA, 0, 1) for
    uniform noise u: exactly 0 or 1 with positive probability, differentiable in between."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / HC_BETA)
    return (s * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)


def hard_concrete_mean(log_alpha: torch.Tensor) -> torch.Tensor:
    """The gates' deterministic value (the paper's test-time estimate), used for held-out
    evaluation and folded into the saved factors."""
    return (torch.sigmoid(log_alpha) * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)


def effective_score(score: torch.Tensor, log_alpha: torch.Tensor | None) -> torch.Tensor:
    """What multiplies sigma in the saved matrix: s, times the gate's deterministic value
    when the gates are hard-concrete (`log_alpha` given)."""
    return score if log_alpha is None else score * hard_concrete_mean(log_alpha)


def trained_vt(Vt: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """Vt + diag(|row|) delta: the trained input factor, its change counted in units of each
    row's norm (Vt itself when nothing trained it, `delta` None).

    Vt's rows are whitened directions mapped back through the inverse Cholesky factor, so their
    sizes differ by orders of magnitude between matrices and components (SmolLM2: rms 0.001 in
    down_proj, 0.1 in a first-layer o_proj), while U's columns are unit vectors. An Adam step
    moves every entry by about the learning rate, so on Vt itself one rate would be a 10% change
    of some rows and 0.1% of others; on `delta` it is the same relative change of every row, as
    it is of every column of U.
    """
    if delta is None:
        return Vt
    Vt = Vt.to(delta.dtype)
    return Vt + Vt.norm(dim=1, keepdim=True) * delta


def trained_u(U: torch.Tensor, up: torch.Tensor | None, down: torch.Tensor | None) -> torch.Tensor:
    """U + up @ down: the output factor with its trained low-rank change (soco.factor_rank), or
    U itself when no such change trained (`up` None). `down` may be a slice of the components'
    columns, as `U` then is."""
    if up is None or down is None:
        return U
    return U.to(up.dtype) + up @ down


def low_rank_start(out_features: int, rank: int, components: int, generator: torch.Generator, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The low-rank change's starting (up, down): up zero, so that U is exactly as decomposed,
    and down Gaussian with variance 1 / rank (LoRA's start), drawn from `generator` so that
    every rank of a data-parallel run builds the same one. With up's entries moved by about
    the learning rate per Adam step, U's entries then move by about as much as when U itself
    trains."""
    down = torch.randn(rank, components, generator=generator) / math.sqrt(rank)
    return torch.zeros(out_features, rank, dtype=dtype), down.to(dtype)


class ScoredLinear(nn.Module):
    """y = out * (((in * x) Vt^T) * (s * sigma * mask)) U^T (+ b); `score` trains, and the
    channel scales `in`/`out` (initially 1) train only when SoCo's channel scales are on,
    U with soco.factor_lr (or, with soco.factor_rank, a low-rank change `u_up @ u_down` of it:
    trained_u) and Vt's change `vt_delta` (trained_vt) with soco.factor_vt
    (s times the hard-concrete gates' z with `gate = "hard_concrete"`; `log_alpha` trains).

    `mask` (a buffer) marks the components pruned (0): they contribute exactly nothing.
    Once pruning starts the gates are hard (the mask itself), so the count is exact, and the
    pruned components leave the computation: forward multiplies only the kept columns of U
    and rows of Vt (`kept`), so a step costs what the kept components cost, not what the
    candidates did.
    """

    def __init__(self, U: torch.Tensor, sigma: torch.Tensor, Vt: torch.Tensor, bias: torch.Tensor | None = None,
                 trains_vt: bool = False, anchors_u: bool = False, u_rank: int = 0, u_seed: int = 0) -> None:
        super().__init__()
        self.out_features, self.rank = U.shape
        self.in_features = Vt.shape[1]
        self.U = nn.Parameter(U.contiguous(), requires_grad=False)
        self.sigma = nn.Parameter(sigma.contiguous(), requires_grad=False)
        self.Vt = nn.Parameter(Vt.contiguous(), requires_grad=False)
        self.bias = nn.Parameter(bias.contiguous(), requires_grad=False) if bias is not None else None
        self.score = nn.Parameter(torch.ones(self.rank, dtype=U.dtype))
        # Optional diagonal corrections of the input and output channels (n + m numbers, trained
        # only when enabled): they fold into V' and U, so the stored format does not change.
        self.in_scale = nn.Parameter(torch.ones(self.in_features, dtype=U.dtype), requires_grad=False)
        self.out_scale = nn.Parameter(torch.ones(self.out_features, dtype=U.dtype), requires_grad=False)
        # hard-concrete gates' log alpha (trained only with soco.gate = hard_concrete)
        self.log_alpha = nn.Parameter(torch.full((self.rank,), HC_INIT, dtype=U.dtype), requires_grad=False)
        # the trained change of Vt (trained_vt), only with soco.factor_vt: a tensor of Vt's size,
        # which the default does not allocate (None)
        self.register_parameter("vt_delta", nn.Parameter(torch.zeros_like(Vt), requires_grad=False)
                                if trains_vt else None)
        # the trained low-rank change of U (trained_u), only with soco.factor_rank: up (m x r, from 0)
        # and down (r x rank, drawn from u_seed), r(m + rank) numbers where U itself is m x rank; None by default
        up, down = (low_rank_start(self.out_features, u_rank, self.rank, torch.Generator().manual_seed(u_seed), U.dtype)
                    if u_rank else (None, None))
        self.register_parameter("u_up", None if up is None else nn.Parameter(up, requires_grad=False))
        self.register_parameter("u_down", None if down is None else nn.Parameter(down, requires_grad=False))
        self.register_buffer("mask", torch.ones(self.rank, dtype=U.dtype))
        # U as decomposed (svd-llm's output directions), which factor_change measures U's
        # distance from; only with soco.factor_anchor (None otherwise). Not saved: it is the
        # decompose stage's U, read again whenever the model is built.
        self.register_buffer("U0", U.detach().clone().contiguous() if anchors_u else None, persistent=False)
        # indices of the unpruned components once a cut is made (None: all of them); not saved,
        # it follows from the mask
        self.register_buffer("kept", None, persistent=False)
        self.hard = False  # True once pruning has started (apply_cut): gates are the mask
        self.gate_power = 1.0  # exponent of the soft gate (soft_gate), set from soco.gate_power
        self.gate = "magnitude"  # or "hard_concrete" (GATES), set from soco.gate
        # whether the factors' gradients are computed (when U, or U and vt_delta, train at all):
        # off, they enter the forward detached and their gradients are not computed (soco.factor_from)
        self.factor_trains = True
        self.last_soft_count: torch.Tensor | None = None  # set by forward, read by the objective
        self.last_deviation: torch.Tensor | None = None  # likewise (deviation())
        self.last_factor_change: torch.Tensor | None = None  # likewise (factor_change(), while U trains)
        self.measures_deviation = True  # off when nothing pays for it (soco.schedule.deviation_weight 0)

    @property
    def cost(self) -> int:
        """Parameters one component costs: a column of U and a row of Vt."""
        return self.out_features + self.in_features

    def gates(self) -> torch.Tensor:
        """The share of each component's cost that is paid: min(1, |s|)^p (or P(z > 0) with
        hard-concrete gates), 0/1 after the cut."""
        if self.hard:
            return self.mask
        if self.gate == "hard_concrete":
            return hard_concrete_open(self.log_alpha) * self.mask
        return soft_gate(self.score, self.gate_power) * self.mask

    def effective_score(self) -> torch.Tensor:
        """s, times the hard-concrete gates' deterministic value when they are on."""
        return effective_score(self.score, self.log_alpha if self.gate == "hard_concrete" else None)

    def scale(self) -> torch.Tensor:
        """What multiplies sigma in this forward: s, times a fresh sample of the hard-concrete
        gates while they train (a forward that records gradients, before the cut), else
        times their deterministic value (held-out evaluations, which run without gradients,
        and the hard network)."""
        if self.gate == "hard_concrete" and not self.hard and torch.is_grad_enabled():
            u = torch.rand(self.rank, dtype=self.log_alpha.dtype).clamp(1e-6, 1 - 1e-6).to(self.log_alpha.device)
            return self.score * hard_concrete_sample(self.log_alpha, u)
        return self.effective_score()

    def deviation(self) -> torch.Tensor:
        """How far the kept components' scaled spectrum is from the unscaled one, relative to
        the candidates' energy: sum_i mask_i sigma_i^2 (s_i - 1)^2 / sum_i sigma_i^2.

        In the whitened coordinates U and V are orthonormal, so this is the squared change the
        scores make to the matrix's whitened output (its error against the unscaled
        truncation, which is the best fit to the calibration activations), over that output's
        size. The penalty on it (soco.schedule.deviation_weight) is regularisation toward the
        svd-llm solution: the scores leave it only where the distillation loss pays for it.
        """
        energy = self.sigma.detach() ** 2
        return (self.mask * energy * (self.effective_score() - 1.0) ** 2).sum() / energy.sum().clamp_min(1e-30)

    def factor_change(self, U: torch.Tensor | None = None) -> torch.Tensor:
        """How far U has moved from its decomposed value U0, as a change of the matrix's whitened
        output relative to the candidates' energy: sum_i mask_i (s_i sigma_i)^2 |u_i - u0_i|^2 /
        sum_i sigma_i^2, with s and sigma held fixed (no gradient: the penalty must not push
        the scores down to make U's change cheaper).

        In the whitened coordinates V's rows are orthonormal, so this is exactly
        |U diag(s sigma) Vt - U0 diag(s sigma) Vt|_F^2 over the energy: the part of the matrix's
        change that U's training made. The penalty on it (soco.factor_anchor) pulls U toward
        svd-llm's directions, as weight decay toward the starting point does in fine-tuning from
        little data (U fits the 56 training windows far better than held-out text).

        `U` is U's kept columns as the forward already sliced them (all columns before a cut,
        with the low-rank change of soco.factor_rank), so that the forward does not compute them
        twice; by default they are computed here.
        """
        if self.U0 is None:
            raise RuntimeError("factor_change needs U0: build the module with anchors_u=True")
        energy = self.sigma.detach() ** 2
        weight = self.mask * (self.effective_score().detach() * self.sigma.detach()) ** 2
        if self.kept is not None:  # the pruned components are left out of the computation here too
            weight = weight[self.kept]
        if U is None:
            U = self.output_factor(self.kept)
        return (weight * (U - self.U0).pow(2).sum(0)).sum() / energy.sum().clamp_min(1e-30)

    def narrow_anchor(self, kept: torch.Tensor) -> None:
        """Keep U0's columns of the `kept` components only (at a cut, before `self.kept` takes
        the new ones: until then U0 holds the columns of `self.kept`, or all before a cut).
        The anchor never looks at a pruned component again, so the rest is memory and a slice
        per step spent."""
        if self.U0 is None:
            return
        if self.kept is None:
            columns = kept
        else:
            if not bool(torch.isin(kept, self.kept).all()):
                raise RuntimeError("a cut brought back a component that an earlier cut pruned")
            columns = torch.searchsorted(self.kept, kept)
        self.U0 = self.U0[:, columns.to(self.U0.device)].contiguous()

    def output_factor(self, columns: torch.Tensor | None = None) -> torch.Tensor:
        """U (its `columns`, or all) with the trained low-rank change with soco.factor_rank; U and
        that change are detached while the factors are held fixed (factor_trains off)."""
        down = self.u_down if self.u_down is None or columns is None else self.u_down[:, columns]
        U = trained_u(self.U if columns is None else self.U[:, columns], self.u_up, down)
        return U if self.factor_trains else U.detach()

    def input_factor(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Vt (its `rows`, or all), shifted by the trained change with soco.factor_vt; that change
        is detached while the factors are held fixed (factor_trains off)."""
        Vt = self.Vt if rows is None else self.Vt[rows]
        if self.vt_delta is None:
            return Vt
        delta = self.vt_delta if rows is None else self.vt_delta[rows]
        return trained_vt(Vt, delta if self.factor_trains else delta.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The soft count is computed here, while (under ZeRO-3) this module's parameters are gathered.
        self.last_soft_count = self.gates().sum() * self.cost
        self.last_deviation = self.deviation() if self.measures_deviation else None
        if self.kept is None:
            U, Vt, multiplier = self.output_factor(), self.input_factor(), self.scale() * self.sigma * self.mask
        else:  # the pruned components are left out, not multiplied by 0 (their mask)
            U, Vt = self.output_factor(self.kept), self.input_factor(self.kept)
            multiplier = (self.scale() * self.sigma)[self.kept]
        # U's distance from U0 (soco.factor_anchor), only where a step trains U: an evaluation
        # without gradients has no use for it
        anchored = self.U0 is not None and self.factor_trains and torch.is_grad_enabled()
        self.last_factor_change = self.factor_change(U) if anchored else None
        h = torch.nn.functional.linear(x * self.in_scale, Vt)
        h = h * multiplier
        y = torch.nn.functional.linear(h, U) * self.out_scale
        return y if self.bias is None else y + self.bias

    def folded(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) of the kept components with s*sigma folded in: up @ down == U diag(s sigma) Vt.

        The same fold as the learned files (`fold`), its magnitudes split as sqrt on both sides.
        """
        U, sigma, Vt = fold(self.output_factor().detach(), (self.sigma * self.mask).detach(), self.input_factor().detach(),
                            self.effective_score().detach(), keep, self.in_scale.detach(), self.out_scale.detach())
        root = sigma.sqrt()
        return (U * root[None, :]).contiguous(), (root[:, None] * Vt).contiguous()


def fold(U: torch.Tensor, sigma: torch.Tensor, Vt: torch.Tensor, score: torch.Tensor, keep: torch.Tensor,
         in_scale: torch.Tensor | None = None, out_scale: torch.Tensor | None = None,
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept components of out * U diag(s * sigma) Vt * in as plain factors (U', sigma', Vt').

    s * sigma is folded into sigma', its sign into U' so that sigma' stays a magnitude (the
    factors contract); the channel scales fold into U' (out) and Vt' (in), so the stored
    format is the same with or without them. `keep` indexes the components kept.
    """
    w = (score * sigma)[keep]
    U_kept = U[:, keep] if out_scale is None else out_scale[:, None] * U[:, keep]
    Vt_kept = Vt[keep] if in_scale is None else Vt[keep] * in_scale[None, :]
    return ((U_kept * torch.sign(w)[None, :]).contiguous(), w.abs().contiguous(), Vt_kept.contiguous())


def scored_modules(model: nn.Module) -> dict[str, ScoredLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ScoredLinear)}


def soft_count(model: nn.Module) -> torch.Tensor:
    """Differentiable parameter count of all scored matrices (from their gates)."""
    mods = list(scored_modules(model).values())
    return torch.stack([m.gates().sum() * m.cost for m in mods]).sum()


def exact_count(model: nn.Module) -> int:
    """Parameters of the components not removed by the cut (all of them before it)."""
    return sum(int((m.mask > 0).sum()) * m.cost for m in scored_modules(model).values())


def apply_cut(mods: dict[str, ScoredLinear], keep: dict[str, torch.Tensor]) -> None:
    """Prune every component not in `keep` (indices per matrix): gates turn hard, and the
    pruned components leave the forward's computation."""
    for name, m in mods.items():
        mask = torch.zeros_like(m.mask)
        mask[keep[name].to(mask.device)] = 1
        kept = torch.nonzero(mask > 0).flatten()
        m.narrow_anchor(kept)  # first: it reads the old `kept`, and refuses a cut that brings one back
        m.mask.copy_(mask)
        m.kept = kept
        m.hard = True


def active_params(mods: dict[str, ScoredLinear]) -> int:
    """Parameters of the components the forward computes with (all candidates before a cut):
    the multiply-adds per token of the scored matrices."""
    return sum((m.rank if m.kept is None else int(m.kept.numel())) * m.cost for m in mods.values())
