"""TALL masks and consensus masks of task vectors.

Paper: Wang, Dimitriadis, Ortiz-Jimenez, Fleuret, Frossard, "Localizing Task Information for Improved
Model Merging and Compression", ICML 2024 (the official code: github nik-dim/tall_masks).

For task vectors tau_t = theta_t - theta_0 and a multi-task vector tau_MTL (task arithmetic:
sum_t tau_t; or the TIES-merged vector):

- **TALL mask** of task t: m_t = |tau_t| > lambda_t * |tau_MTL - tau_t| (the paper writes >=;
  the authors' code uses the strict > implemented here, which only differs on exact ties).
  The task's model is theta_0 + m_t * tau_MTL.
- **Consensus mask**: the entries active in at least k TALL masks, sum_t m_t >= k (k=2 removes
  "catastrophic" (0 tasks) and "selfish" (1 task) weights; k=0 keeps everything).
- **Consensus merging**: theta = theta_0 + alpha * (consensus mask * tau_MTL).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def tall_masks(taus: Sequence[torch.Tensor], mtl: torch.Tensor, lambdas: Sequence[float]) -> list[torch.Tensor]:
    """TALL masks m_t = |tau_t| > lambda_t * |tau_MTL - tau_t| (bool tensors, one per task)."""
    return [t.abs() > lam * (mtl - t).abs() for t, lam in zip(taus, lambdas)]


def consensus_mask(masks: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """Entries active in at least ``k`` of ``masks`` (bool)."""
    count = torch.zeros(masks[0].shape, dtype=torch.int32)
    for m in masks:
        count += m.to(torch.int32)
    return count >= k


def task_arithmetic_mtl(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """tau_MTL of task arithmetic: sum_t (theta_t - theta_0) (unscaled, as the TALL-mask code builds it)."""
    acc = torch.zeros_like(base)
    for t in tensors:
        acc += t - base
    return acc


def tall_mask_model(base: torch.Tensor, mtl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """theta_0 + m_t * tau_MTL."""
    return base + torch.where(mask, mtl, torch.zeros((), dtype=mtl.dtype))


def consensus_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, lambdas: Sequence[float], k: int = 2,
                    scaling_factor: float = 1.0, mtl: torch.Tensor | None = None) -> torch.Tensor:
    """Consensus merging of one tensor: theta_0 + alpha * (consensus(TALL masks) * tau_MTL).

    Args:
        base: theta_0. tensors: theta_t. lambdas: lambda_t per task.
        k: minimum number of TALL masks an entry must be active in.
        scaling_factor: alpha.
        mtl: tau_MTL (default: the task-arithmetic sum of task vectors).
    """
    taus = [t - base for t in tensors]
    if mtl is None:
        mtl = task_arithmetic_mtl(base, tensors)
    keep = consensus_mask(tall_masks(taus, mtl, lambdas), k)
    return base + scaling_factor * torch.where(keep, mtl, torch.zeros((), dtype=mtl.dtype))
