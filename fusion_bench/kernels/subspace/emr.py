"""EMR-Merging: Elect, Mask & Rescale.

Paper: Huang, Ye, Li, Lin, Chen, "EMR-Merging: Tuning-Free High-Performance Model Merging",
NeurIPS 2024 (official code: github harveyhuang18/EMR_Merging).

For task vectors tau_i = theta_i - theta_0:

1. **Elect**: gamma = sgn(sum_i tau_i); tau_uni = gamma * max_i {|tau_i| : sgn(tau_i) = gamma}
   (0 where no task vector agrees). Where the sum is exactly 0 the authors' code elects -1
   (``zero_sign='negative'``, default, as FusionBench); ``'zero'`` uses sgn(0) = 0 (nothing agrees).
2. **Mask**: m_i = (tau_i * gamma > 0) (the entries of tau_i that agree with the elected sign).
3. **Rescale**: lambda_i = A_i / B_i with, over the merged tensors p of the whole model,
   ``rescale='tensor_means'`` (the official code, FusionBench): A_i = sum_p mean|tau_i[p]|,
   B_i = sum_p mean|m_i[p] * tau_uni[p]|; ``rescale='model'`` (the paper's equation):
   A_i = sum of |tau_i| over all entries, B_i = sum of |m_i * tau_uni|.
   When B_i = 0 (m_i * tau_uni = 0 everywhere) lambda_i = 1 (any value gives the same model).
4. Task model: theta_i = theta_0 + lambda_i * m_i * tau_uni.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def elect(taus: Sequence[torch.Tensor], zero_sign: str = "negative") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(tau_uni, masks) of one tensor: the elected unified task vector and the per-task agreement masks."""
    total = torch.zeros_like(taus[0])
    for t in taus:
        total += t
    if zero_sign == "negative":
        gamma = torch.where(total > 0, 1.0, -1.0).to(total.dtype)
    elif zero_sign == "zero":
        gamma = total.sign()
    else:
        raise ValueError(f"unknown zero_sign {zero_sign!r}; use 'negative' or 'zero'")
    masks = [(t * gamma) > 0 for t in taus]
    mag = torch.zeros_like(total)
    for t, m in zip(taus, masks):
        mag = torch.maximum(mag, torch.where(m, t.abs(), torch.zeros((), dtype=t.dtype)))
    return mag * gamma, masks


def rescale_stats(taus: Sequence[torch.Tensor], uni: torch.Tensor, masks: Sequence[torch.Tensor],
                  rescale: str = "tensor_means") -> list[tuple[float, float]]:
    """Per task (A_i, B_i) contributions of one tensor to the rescaler lambda_i = sum A_i / sum B_i."""
    out = []
    for t, m in zip(taus, masks):
        a = t.abs()
        b = torch.where(m, uni.abs(), torch.zeros((), dtype=uni.dtype))
        if rescale == "tensor_means":
            out.append((float(a.mean()), float(b.mean())))
        elif rescale == "model":
            out.append((float(a.sum(dtype=torch.float64)), float(b.sum(dtype=torch.float64))))
        else:
            raise ValueError(f"unknown rescale {rescale!r}; use 'tensor_means' or 'model'")
    return out


def rescalers(stats: Sequence[tuple[float, float]]) -> float:
    """lambda = sum A / sum B over the (A, B) pairs of one task (1.0 when sum B is 0)."""
    a = sum(s[0] for s in stats)
    b = sum(s[1] for s in stats)
    return a / b if b > 0 else 1.0


def emr_task_tensor(base: torch.Tensor, uni: torch.Tensor, mask: torch.Tensor, rescaler: float) -> torch.Tensor:
    """theta_0 + lambda_i * m_i * tau_uni."""
    return base + rescaler * torch.where(mask, uni, torch.zeros((), dtype=uni.dtype))
