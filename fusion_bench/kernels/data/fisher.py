"""Fisher-weighted averaging of parameters (Matena & Raffel, NeurIPS 2022, "Merging models with Fisher
weighting"), diagonal variant: ``theta = sum_i (F_i + eps) theta_i / sum_i (F_i + eps)`` entry by entry.

Accumulated one model at a time (:func:`fisher_accumulate`, then :func:`fisher_finish`), so that
merging N models holds three model-sized sums instead of N models and N Fishers.
"""

from __future__ import annotations

import torch


def fisher_accumulate(num: torch.Tensor, den: torch.Tensor, theta: torch.Tensor, fisher: torch.Tensor,
                      minimal_fisher_weight: float = 1e-6) -> None:
    """In place: ``num += (F + eps) theta``, ``den += F + eps`` (``eps = minimal_fisher_weight``).

    Args:
        num, den: running sums (float32 or float64, the shape of ``theta``).
        theta: one model's parameter.
        fisher: its diagonal Fisher (same shape, non-negative).
        minimal_fisher_weight: eps added to every Fisher entry (keeps the division defined; where
            every Fisher is zero the result is the simple average).
    """
    w = fisher.to(num.dtype) + minimal_fisher_weight
    num.add_(w * theta.to(num.dtype))
    den.add_(w)


def fisher_finish(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``sum_i (F_i + eps) theta_i / sum_i (F_i + eps)`` from the sums of :func:`fisher_accumulate`."""
    return num / den


def fisher_weighted_average(tensors: list[torch.Tensor], fishers: list[torch.Tensor],
                            minimal_fisher_weight: float = 1e-6) -> torch.Tensor:
    """The same average from lists (one tensor and one Fisher per model)."""
    num = torch.zeros_like(tensors[0], dtype=torch.float32)
    den = torch.zeros_like(num)
    for t, f in zip(tensors, fishers):
        fisher_accumulate(num, den, t, f, minimal_fisher_weight)
    return fisher_finish(num, den)
