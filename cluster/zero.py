"""DeepSpeed ZeRO training launched through Ray Train.

`launch(fn, config, num_workers, use_gpu)` runs `fn(config)` on `num_workers` Ray Train
workers (a TorchTrainer: torch.distributed is initialised for them, gloo on CPU, NCCL on
GPU). `engine(...)` wraps a model whose only trainable tensors are small into a
DeepSpeed engine with ZeRO stage 2 or 3: with stage 3 the frozen factors are partitioned
across ranks and gathered module by module during forward and backward.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from typing import Any, Callable

import torch
from torch import nn

from .ray_runtime import RaySettings, connect


def _select_accelerator() -> None:
    """Tell DeepSpeed which accelerator to use before it is imported (it guesses, and warns,
    otherwise); called by every function here that imports it, not at import of this module."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")


#: torch 2.13 deprecates two collectives that DeepSpeed's ZeRO calls at every step. The
#: warning is not shown once but at every call (any `warnings.catch_warnings` block resets
#: Python's once-per-place record), four lines a step in a learn log; it is DeepSpeed's to
#: mend, so only these two messages are silenced.
DEPRECATED_COLLECTIVES = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


def _silence_deprecated_collectives() -> None:
    """Ignore torch's deprecation warning for the collectives DeepSpeed calls (above), in this
    process (every ZeRO rank calls init_distributed)."""
    warnings.filterwarnings("ignore", message=DEPRECATED_COLLECTIVES, category=FutureWarning)


def ds_config(zero_stage: int, micro_batch: int, world_size: int) -> dict[str, Any]:
    if zero_stage not in (2, 3):
        raise ValueError(f"zero_stage must be 2 or 3, got {zero_stage}")
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world_size,
        "gradient_accumulation_steps": 1,
        # with one rank there is nothing to scatter: DeepSpeed's reduce-scatter would still
        # interleave every gradient into a fresh buffer (a copy of all of them per step), where
        # its all-reduce path reduces the contiguous gradient bucket in place
        "zero_optimization": {"stage": zero_stage, "reduce_scatter": world_size > 1},
        # a plain torch optimizer over the scores: no fused Adam op to compile
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def init_distributed() -> int:
    """The process group DeepSpeed needs (Ray Train made it already; a single process outside
    Ray Train gets a one-rank group on loopback); returns the world size."""
    _select_accelerator()
    _silence_deprecated_collectives()
    import deepspeed
    import torch.distributed as dist
    launched = all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"))
    if not dist.is_initialized() and not launched:
        # our own one-rank group on a fresh loopback port, given to torch directly: putting the
        # port into os.environ would hand it to every process this one starts later, whose own
        # group would then find it taken
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl",
                                init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it; no port, harmless to inherit
    # also when torch's group exists (Ray Train): DeepSpeed's comm layer must wrap it, or
    # zero.Init would see a world of one
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    return dist.get_world_size()


def partitioned_init(zero_stage: int, micro_batch: int, dtype: torch.dtype):
    """Context in which the parameters of modules constructed inside are partitioned across
    the ranks as soon as each module is built (ZeRO-3's `zero.Init`), so that no rank ever
    holds the whole model: what a 70B model needs. A no-op context for ZeRO-2."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    _select_accelerator()
    import deepspeed
    world = init_distributed()
    return deepspeed.zero.Init(config_dict_or_path=init_config(zero_stage, micro_batch, world, dtype), dtype=None)


def init_config(zero_stage: int, micro_batch: int, world_size: int, dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed config for `zero.Init`, carrying the parameters' dtype itself.

    Passing `dtype=` to `zero.Init` is not reliable: DeepSpeed 0.19's fallback expression
    takes bfloat16 on any CPU without mkldnn fp16 support whatever dtype is asked for, so the
    factors came out bf16 beside fp32 activations on some machines. With `dtype=None` it reads
    the precision from the config (neither bf16 nor fp16 enabled: float32). The memory-efficient
    linear (config default) stays on: it keeps a gathered factor out of autograd's saved
    tensors, so ZeRO-3 can release it after the module's forward.
    """
    cfg = ds_config(zero_stage, micro_batch, world_size)
    if dtype == torch.bfloat16:
        cfg["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        cfg["fp16"] = {"enabled": True}
    elif dtype != torch.float32:
        raise ValueError(f"unsupported dtype for ZeRO-3 parameters: {dtype}")
    return cfg


#: the param-group key that marks a group idle for a step (IdleAwareAdam)
IDLE = "idle"
#: the param-group key that says whether an idle step counts in Adam's step (IdleAwareAdam; default true)
COUNTS_IDLE = "counts_idle"


class IdleAwareAdam(torch.optim.Adam):
    """torch's Adam, except that a param group whose `IDLE` key is true only counts the step.

    DeepSpeed hands Adam a zero gradient for a group whose parameters took no part in the
    backward (soco.factor_from: U trains from a later stage on), and Adam then runs its whole
    update over them for nothing: for U, tens of millions of numbers every step. With a zero
    gradient and no weight decay that update leaves the moments at zero and the parameters
    as they are; only the step count moves, and it enters Adam's bias correction once the
    group trains. So an idle group gets exactly that: its state made as Adam makes it, and
    the step counted, bit for bit what the full update would have left.
    """

    def step(self, closure=None):
        groups = self.param_groups
        idle = [g for g in groups if g.get(IDLE)]
        for group in idle:
            if group["weight_decay"]:
                raise ValueError("an idle param group must have no weight decay (its update would not be zero)")
            self._init_group(group, [], [], [], [], [], [])  # Adam's own lazy state, where missing
            if group.get(COUNTS_IDLE, True):
                for p in group["params"]:
                    if p.grad is not None:
                        self.state[p]["step"] += 1
        if len(idle) == len(groups):
            return closure() if closure is not None else None
        self.param_groups = [g for g in groups if not g.get(IDLE)]
        try:
            return super().step(closure)
        finally:
            self.param_groups = groups


def engine(model: nn.Module, param_groups: list[dict[str, Any]], zero_stage: int, micro_batch: int):
    """A DeepSpeed engine over `model` optimising the param groups ({"params", "lr"}) with torch's
    Adam (IdleAwareAdam: set a group's `IDLE` key, through `eng.optimizer.param_groups`, while
    its parameters get no gradient). Parameters built under `partitioned_init` stay
    partitioned; the rest are partitioned here."""
    _select_accelerator()
    import deepspeed
    world = init_distributed()
    # foreach: the same arithmetic, op for op, as the per-tensor loop torch picks on the CPU
    # (bit for bit the same values), without its temporaries the size of each flat partition
    opt = IdleAwareAdam(param_groups, foreach=True)
    eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(zero_stage, micro_batch, world),
                                        dist_init_required=False)
    place_buffers(model, eng.device)
    return eng


def place_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Move every buffer of `model` that is elsewhere onto `device`, as `module.to` would.

    Under ZeRO-2 the engine moves the whole module to its device. Under ZeRO-3 it leaves that
    to `zero.Init`, which puts on the device what is created inside it (parameters, and buffers
    made by torch.ones, arange, ...) but not a buffer copied from a tensor that already existed:
    ScoredLinear.U0, a clone of the decomposed U read from disk, stayed on the host, and the
    forward mixed devices (seen on an H200 over NCCL). A no-op on the CPU."""
    device = torch.device(device)
    for mod in model.modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf.device != device:
                setattr(mod, name, buf.to(device))


def gathered(params: list[nn.Parameter], modify: bool = False):
    """Context in which ZeRO-3-partitioned params hold their full values (no-op otherwise);
    with `modify`, rank 0's writes are broadcast to every rank on exit."""
    _select_accelerator()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def full_grad(param: nn.Parameter) -> torch.Tensor:
    """The whole gradient of `param` after the engine's backward and before its step, however
    ZeRO partitions it (a collective under stage 3: every rank must call it)."""
    _select_accelerator()
    from deepspeed.utils import safe_get_full_grad
    g = safe_get_full_grad(param)
    if g is None:
        raise RuntimeError("no gradient for a trained parameter: call between backward and step")
    return g


#: the per-parameter state of torch's Adam (besides its step count)
ADAM_STATE = ("exp_avg", "exp_avg_sq")


def _inner_state(eng) -> tuple[Any, list[torch.Tensor]]:
    """The torch optimizer DeepSpeed drives and the flat fp32 partitions it steps (ZeRO-3 puts
    them into the optimizer's param groups only during a step, so they are read from the
    ZeRO optimizer itself: its stage 3 and stage 1/2 names)."""
    zopt = eng.optimizer
    flats = getattr(zopt, "fp32_partitioned_groups_flat", None)
    if flats is None:
        flats = zopt.single_partition_of_fp32_groups
    return zopt.optimizer, list(flats)


def _relink(eng) -> None:
    """ZeRO-1/2: point each parameter at its slice of Adam's state as the state is now. DeepSpeed
    links them once, after the first group's first step, when a later group's state may not
    exist yet (Adam creates it at that group's first step with a gradient)."""
    if hasattr(eng.optimizer, "_lazy_init_hp_params_optimizer_state"):
        eng.optimizer._hp_optimizer_states_linked = False
        eng.optimizer._lazy_init_hp_params_optimizer_state()


def optimizer_state(eng, groups: list[dict[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Adam's moments of each named parameter, whole however ZeRO partitions them (a collective:
    every rank must call it), as `<name>.exp_avg` / `<name>.exp_avg_sq`, and each parameter
    group's step count (`groups` in the optimiser's order) as `optimizer.step`.

    A group Adam has not stepped yet (its parameters have had no gradient: they train from a
    later stage) counts 0 steps and has no moments; nothing at all before the first step."""
    from deepspeed.utils import safe_get_full_optimizer_state
    inner, flats = _inner_state(eng)
    steps = [float(inner.state[f]["step"]) if "step" in inner.state.get(f, {}) else 0.0 for f in flats]
    if not any(steps):
        return {}
    _relink(eng)
    out = {f"{n}.{k}": safe_get_full_optimizer_state(p, k).detach().clone().reshape(p.ds_shape if hasattr(p, "ds_shape")
                                                                                     else p.shape)
           for named, step in zip(groups, steps) if step for n, p in named.items() for k in ADAM_STATE}
    out["optimizer.step"] = torch.tensor(steps, dtype=torch.float32)
    return out


def load_optimizer_state(eng, groups: list[dict[str, nn.Parameter]], saved: dict[str, torch.Tensor]) -> bool:
    """Put Adam's moments and step counts saved by `optimizer_state` back (every rank calls it,
    with the same values); False, changing nothing, when `saved` holds none or does not fit
    these groups. One saved step count (an older checkpoint) is every group's."""
    from deepspeed.utils import safe_set_full_optimizer_state
    inner, flats = _inner_state(eng)
    if "optimizer.step" not in saved:
        return False
    steps = saved["optimizer.step"].flatten().to(torch.float32)
    if steps.numel() == 1:
        steps = steps.repeat(len(flats))
    if steps.numel() != len(flats) or len(groups) != len(flats) or any(
            f"{n}.{k}" not in saved for named, step in zip(groups, steps) if step > 0 for n in named for k in ADAM_STATE):
        return False
    for f, step in zip(flats, steps):  # the state Adam would have made at its first step, then filled below
        if step > 0:
            inner.state[f] = {"step": step.clone(), "exp_avg": torch.zeros_like(f), "exp_avg_sq": torch.zeros_like(f)}
    _relink(eng)
    for named, step in zip(groups, steps):
        for n, p in (named.items() if step > 0 else ()):
            for k in ADAM_STATE:
                safe_set_full_optimizer_state(p, saved[f"{n}.{k}"].to(flats[0].device, torch.float32), k)
    return True


def finish(destroy: bool = True) -> None:
    """Barrier, then tear down the process group (avoids rare aborts at exit of ZeRO-3 ranks).

    An in-process run keeps its one-rank group (destroy=False): DeepSpeed caches groups at
    module level, and a later engine in the same process must find them valid.
    """
    import torch.distributed as dist
    if dist.is_initialized() and destroy:
        import deepspeed
        deepspeed.comm.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn: Callable[[dict], None], config: dict[str, Any], num_workers: int, settings: RaySettings,
           use_gpu: bool | None = None, cpus_per_worker: int = 1) -> None:
    """Run fn(config) on `num_workers` Ray Train workers of the Ray that `settings` name
    (connected through cluster.ray_runtime, the one place that starts Ray) and wait; raise if
    any fails."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    connect(settings)
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= num_workers
    trainer = TorchTrainer(
        fn, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="soco-train-"), name="learn"),
    )
    trainer.fit()
