"""SoCo's training objective: distillation to the dense model plus the count penalties.

The dense model's next-token distributions are cached as their top-k log-probabilities
(full logits are too large to keep). The KL is computed exactly between the two
distributions coarsened to k + 1 outcomes (the teacher's top-k tokens and one bucket for
the rest), which needs only the cached values and the student's full log-softmax.

Optionally the outputs of a few decoder layers are distilled too (`hidden_distance`): the
logits' top-k say little per token about the rest of the representation, so the scores can
fit the calibration windows' top tokens in ways that do not carry to other text; matching
the dense model's intermediate hidden states asks for more of the dense computation.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .scores import ScoredLinear


def topk_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_idx: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) on the teacher's top-k + tail buckets.

    student_logits [..., V]; teacher_logp, teacher_idx [..., k].
    """
    logq = torch.log_softmax(student_logits.float(), dim=-1)
    q_top = logq.gather(-1, teacher_idx.long())
    p_logp = teacher_logp.float()
    p = p_logp.exp()
    kl_top = (p * (p_logp - q_top)).sum(-1)
    p_tail = (1 - p.sum(-1)).clamp_min(1e-12)
    q_tail = (1 - q_top.exp().sum(-1)).clamp_min(1e-12)
    kl_tail = p_tail * (p_tail.log() - q_tail.log())
    return (kl_top + kl_tail).mean()


def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probabilities (float32) and token ids (int32) of the dense model's logits."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    vals, idx = logp.topk(k, dim=-1)
    return vals.contiguous(), idx.to(torch.int32).contiguous()


def distilled_layers(n_layers: int, count: int) -> list[int]:
    """`count` decoder layers spread evenly over depth, the last one always among them
    (0-based indices; 0 gives none)."""
    if not 0 <= count <= n_layers:
        raise ValueError(f"cannot distil {count} of {n_layers} decoder layers")
    return [(j + 1) * n_layers // count - 1 for j in range(count)]


def hidden_distance(student: Sequence[torch.Tensor], teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the distilled layers and the tokens of |h_s - h_t|^2 / |h_t|^2.

    student: one [..., T, d] tensor per distilled layer; teacher [..., n_layers, T, d].
    Each token's error is relative to its own norm, so the few tokens with huge residual
    activations (the first token's attention sink) weigh no more than the others.
    """
    per_layer = []
    for j, h in enumerate(student):
        t = teacher[..., j, :, :].to(h.dtype)
        per_layer.append(((h - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)).mean())
    return torch.stack(per_layer).mean()


class SoCoObjective(nn.Module):
    """Wraps the scored model so that one forward returns (KL, hidden-state distance, soft
    parameter count, mean deviation of the scored matrices from their unscaled spectrum, mean
    change of their U from the decomposed U).

    `distilled` are the decoder layers whose outputs are compared with the teacher's
    (`hidden_distance`; 0 when none are, or no teacher states are given). Their outputs are
    taken by forward hooks, keyed by layer, so a layer recomputed in the backward pass
    (activation checkpointing) only writes the same entry again.

    The count and the deviation are summed from what each ScoredLinear recorded during its
    own forward, because under ZeRO-3 a module's parameters exist only while that module runs
    (the deviation is 0 when the modules do not measure it: `ScoredLinear.measures_deviation`;
    U's change is 0 unless the modules hold U0 and U trains: `ScoredLinear.factor_change`).
    """

    def __init__(self, model: nn.Module, distilled: Sequence[nn.Module] = ()) -> None:
        super().__init__()
        self.model = model
        self._scored = [m for m in model.modules() if isinstance(m, ScoredLinear)]
        self._outputs: dict[int, torch.Tensor] = {}
        self._n_distilled = len(distilled)
        for j, layer in enumerate(distilled):
            layer.register_forward_hook(self._keeper(j))

    def _keeper(self, j: int):
        def keep(_mod: nn.Module, _args: tuple, out) -> None:
            self._outputs[j] = out[0] if isinstance(out, (tuple, list)) else out
        return keep

    def forward(self, input_ids: torch.Tensor, teacher_logp: torch.Tensor, teacher_idx: torch.Tensor,
                teacher_hidden: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        self._outputs.clear()
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        # the teacher predicts the token after each position, as the student's logits do
        kl = topk_kl(logits, teacher_logp, teacher_idx)
        if teacher_hidden is not None and self._n_distilled:
            hidden = hidden_distance([self._outputs[j] for j in range(self._n_distilled)], teacher_hidden)
        else:
            hidden = kl.new_zeros(())
        self._outputs.clear()  # the hooks' tensors belong to this forward only
        soft = torch.stack([m.last_soft_count for m in self._scored]).sum()
        measured = [m.last_deviation for m in self._scored if m.last_deviation is not None]
        deviation = torch.stack(measured).mean() if measured else kl.new_zeros(())
        moved = [m.last_factor_change for m in self._scored if m.last_factor_change is not None]
        factor_change = torch.stack(moved).mean() if moved else kl.new_zeros(())
        return kl, hidden, soft, deviation, factor_change
