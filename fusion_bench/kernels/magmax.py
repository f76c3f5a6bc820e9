"""MagMax kernel: per parameter, the task-vector entry of maximum magnitude across models.

Paper: Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning"
(ECCV 2024). Variant implemented (the merging step, Eq. 3 of the paper): for every entry j,
tau_max[j] = tau_{i*}[j] with i* = argmax_i |tau_i[j]|, and theta = theta_0 + lambda * tau_max.
**Ties in magnitude** (|tau_a[j]| = |tau_b[j]|, e.g. +x and -x) pick the larger signed value,
so the result does not depend on the order of the models.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def max_magnitude(taus: Iterable[torch.Tensor]) -> torch.Tensor:
    """Entry-wise the value of largest magnitude across ``taus`` (ties: the larger signed value)."""
    it = iter(taus)
    best = next(it).clone()
    best_abs = best.abs()
    for tau in it:
        a = tau.abs()
        better = (a > best_abs) | ((a == best_abs) & (tau > best))
        best = torch.where(better, tau, best)
        best_abs = torch.where(better, a, best_abs)
    return best


def magmax(base: torch.Tensor, tensors: Sequence[torch.Tensor], scaling_factor: float = 1.0) -> torch.Tensor:
    """theta = theta_0 + lambda * tau_max, tau_max = entry-wise max-magnitude task vector.

    Paper: Marczak et al., ECCV 2024 (see the module docstring for the tie rule).

    Args:
        base: theta_0.
        tensors: theta_i of the N models, same shape and dtype as ``base``.
        scaling_factor: lambda.
    """
    return max_magnitude(t - base for t in tensors).mul_(scaling_factor).add_(base)
