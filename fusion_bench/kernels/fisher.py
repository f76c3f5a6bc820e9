"""Fisher-weighted averaging of parameters (Matena & Raffel, NeurIPS 2022, "Merging models with Fisher
weighting"), diagonal variant: ``theta = sum_i F_i theta_i / sum_i F_i`` element by element."""

from __future__ import annotations

import torch


def fisher_weighted_average(tensors: list[torch.Tensor], fishers: list[torch.Tensor | None],
                            minimal_fisher_weight: float = 1e-6) -> torch.Tensor:
    """Element-wise Fisher-weighted average of one parameter across models.

    Matena & Raffel 2022, eq. (3) with the diagonal Fisher: ``theta = sum_i (F_i + eps) theta_i /
    sum_i (F_i + eps)``, ``eps = minimal_fisher_weight`` (keeps the division defined where every
    Fisher is zero; there the result is the simple average). When any model has no Fisher for this
    parameter (``None``), the result is the simple average of the tensors.

    Args:
        tensors: the models' values of the parameter (same shape).
        fishers: the models' diagonal Fisher of it (same shape, non-negative) or None.
        minimal_fisher_weight: eps added to every Fisher entry.
    """
    if any(f is None for f in fishers):
        return torch.stack(tensors).mean(0)
    num = torch.zeros_like(tensors[0])
    den = torch.zeros_like(tensors[0])
    for t, f in zip(tensors, fishers):
        w = f.to(t.dtype) + minimal_fisher_weight  # type: ignore[union-attr]
        num += w * t
        den += w
    return num / den
