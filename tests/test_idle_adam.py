"""IdleAwareAdam (cluster/zero.py): a param group marked idle costs no Adam update, yet the run
is bit for bit what torch's Adam gives when that group's gradient is zero (DeepSpeed hands
Adam zeros for parameters that took no part in the backward: U before soco.factor_from)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cluster import zero


def _params(seed: int = 0) -> tuple[nn.Parameter, nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(7, 5, generator=g)), nn.Parameter(torch.randn(11, generator=g))


def _grads(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(7, 5, generator=g), torch.randn(11, generator=g)


@pytest.mark.parametrize("foreach", [False, True])
def test_an_idle_group_leaves_what_adam_with_a_zero_gradient_leaves(foreach):
    """Against torch's per-tensor Adam, with either implementation: the engine's (foreach)
    takes the same steps bit for bit, only without the per-tensor temporaries."""
    a, b = _params()
    ref_a, ref_b = _params()
    opt = zero.IdleAwareAdam([{"params": [a], "lr": 1e-2}, {"params": [b], "lr": 3e-3}], foreach=foreach)
    ref = torch.optim.Adam([{"params": [ref_a], "lr": 1e-2}, {"params": [ref_b], "lr": 3e-3}], foreach=False)
    for step in range(8):
        idle = step < 5  # b trains from step 5 on, as U does from a later stage
        ga, gb = _grads(step)
        a.grad, b.grad = ga.clone(), gb.clone()
        ref_a.grad, ref_b.grad = ga.clone(), torch.zeros_like(gb) if idle else gb.clone()
        opt.param_groups[1][zero.IDLE] = idle
        opt.step()
        ref.step()
        assert torch.equal(a, ref_a) and torch.equal(b, ref_b), step
        for p, q in ((a, ref_a), (b, ref_b)):
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][key], ref.state[q][key]), (step, key)
    assert float(opt.state[b]["step"]) == 8 and not torch.equal(b, _params()[1])  # counted, then trained


def test_an_idle_group_is_not_updated_whatever_its_gradient():
    """The update is skipped, not computed: a nonzero gradient while idle moves nothing."""
    a, b = _params()
    b0 = b.detach().clone()
    opt = zero.IdleAwareAdam([{"params": [a], "lr": 1e-2}, {"params": [b], "lr": 1e-2, zero.IDLE: True}])
    for step in range(3):
        a.grad, b.grad = _grads(step)
        opt.step()
    assert torch.equal(b, b0) and not torch.equal(a, _params()[0])
    assert float(opt.state[b]["step"]) == 3
    assert not opt.state[b]["exp_avg"].any() and not opt.state[b]["exp_avg_sq"].any()
    assert len(opt.param_groups) == 2  # the groups are put back after each step


def test_an_idle_group_with_weight_decay_is_refused():
    a, b = _params()
    opt = zero.IdleAwareAdam([{"params": [a]}, {"params": [b], "weight_decay": 0.1, zero.IDLE: True}])
    a.grad, b.grad = _grads(0)
    with pytest.raises(ValueError, match="weight decay"):
        opt.step()


class _TwoParts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _params()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.a).sum() + (x[:, 0] * self.b).sum()) ** 2


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_the_idle_mark_reaches_adam_through_the_deepspeed_engine(zero_stage):
    """The trainer marks the group through the engine's param groups; ZeRO 2 and 3 step Adam
    group by group, each time with the flat partitions in place of the parameters."""
    model = _TwoParts()
    b0 = model.b.detach().clone()
    eng = zero.engine(model, [{"params": [model.a], "lr": 1e-2}, {"params": [model.b], "lr": 1e-2}], zero_stage, 1)
    x = torch.randn(11, 7, generator=torch.Generator().manual_seed(3))

    def step(idle: bool) -> None:
        eng.optimizer.param_groups[1][zero.IDLE] = idle
        loss = eng(x)
        eng.backward(loss)
        eng.step()

    def b_now() -> torch.Tensor:
        with zero.gathered([model.b]):
            return model.b.detach().clone()

    for _ in range(3):
        step(idle=True)  # b has a gradient here, yet Adam leaves it as it was
    assert torch.equal(b_now(), b0)
    inner, flats = zero._inner_state(eng)
    assert [float(inner.state[f]["step"]) for f in flats] == [3.0, 3.0]
    assert not inner.state[flats[1]]["exp_avg"].any()
    step(idle=False)
    assert not torch.equal(b_now(), b0)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_one_rank_engine_without_reduce_scatter_takes_the_same_steps(zero_stage, monkeypatch):
    """With one rank the engine skips DeepSpeed's reduce-scatter (nothing to scatter; it
    copied every gradient into a fresh buffer) and runs Adam foreach: the parameters end bit
    for bit where DeepSpeed's reduce-scatter and torch's per-tensor Adam leave them."""
    def run() -> list[torch.Tensor]:
        model = _TwoParts()
        eng = zero.engine(model, [{"params": [model.a], "lr": 1e-2}, {"params": [model.b], "lr": 3e-3}], zero_stage, 1)
        for i in range(4):
            eng.backward(eng(torch.randn(11, 7, generator=torch.Generator().manual_seed(10 + i))))
            eng.step()
        with zero.gathered([model.a, model.b]):
            return [model.a.detach().clone(), model.b.detach().clone()]

    assert not zero.ds_config(zero_stage, 1, 1)["zero_optimization"]["reduce_scatter"]
    assert zero.ds_config(zero_stage, 1, 2)["zero_optimization"]["reduce_scatter"]
    ours = run()
    config, adam = zero.ds_config, zero.IdleAwareAdam
    monkeypatch.setattr(zero, "ds_config", lambda *a: {**config(*a), "zero_optimization": {"stage": zero_stage}})
    monkeypatch.setattr(zero, "IdleAwareAdam", lambda groups, **kw: adam(groups, foreach=False))
    before = run()
    assert all(torch.equal(x, y) for x, y in zip(ours, before))
    assert not torch.equal(ours[0], _params()[0])  # it trained


def test_an_idle_group_that_does_not_count_starts_as_a_fresh_adam():
    """With COUNTS_IDLE false the idle steps leave the step count at 0: the group then trains
    exactly as a fresh Adam would, each step of lr per coordinate under a steady gradient;
    counted idle steps (the default) make those steps larger once the first few are past."""
    moved = {}
    for counts in (False, True):
        a, b = _params()
        b0 = b.detach().clone()
        fresh = nn.Parameter(b0.clone())
        ref = torch.optim.Adam([fresh], lr=1e-3)
        opt = zero.IdleAwareAdam([{"params": [a], "lr": 1e-2},
                                  {"params": [b], "lr": 1e-3, zero.IDLE: True, zero.COUNTS_IDLE: counts}])
        for step in range(40):
            a.grad, b.grad = _grads(step)
            opt.step()
        assert float(opt.state[b]["step"]) == (40 if counts else 0) and torch.equal(b, b0)
        opt.param_groups[1][zero.IDLE] = False
        steady = _grads(40)[1]
        for step in range(20):
            a.grad, b.grad = _grads(41 + step)[0], steady.clone()
            fresh.grad = steady.clone()
            opt.step()
            ref.step()
            assert torch.equal(b, fresh) != counts, step
        moved[counts] = float((b0 - b).div(steady.sign()).mean())
    assert moved[False] == pytest.approx(20 * 1e-3, rel=1e-3)
    assert moved[True] > 1.1 * moved[False]
