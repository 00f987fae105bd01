"""SoCo's training objective: distillation to the dense model plus the count penalties.

The dense model's next-token distributions are cached as their top-k log-probabilities
(full logits are too large to keep). The KL is computed exactly between the two
distributions coarsened to k + 1 outcomes (the teacher's top-k tokens and one bucket for
the rest), which needs only the cached values and the student's full log-softmax.
"""
from __future__ import annotations

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


class SoCoObjective(nn.Module):
    """Wraps the scored model so that one forward returns (KL, soft parameter count, mean
    deviation of the scored matrices from their unscaled spectrum).

    The count and the deviation are summed from what each ScoredLinear recorded during its
    own forward, because under ZeRO-3 a module's parameters exist only while that module runs
    (the deviation is 0 when the modules do not measure it: `ScoredLinear.measures_deviation`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._scored = [m for m in model.modules() if isinstance(m, ScoredLinear)]

    def forward(self, input_ids: torch.Tensor, teacher_logp: torch.Tensor,
                teacher_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        # the teacher predicts the token after each position, as the student's logits do
        kl = topk_kl(logits, teacher_logp, teacher_idx)
        soft = torch.stack([m.last_soft_count for m in self._scored]).sum()
        measured = [m.last_deviation for m in self._scored if m.last_deviation is not None]
        deviation = torch.stack(measured).mean() if measured else kl.new_zeros(())
        return kl, soft, deviation
