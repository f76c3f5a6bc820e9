"""Task arithmetic in a trust region: drop the task-vector entries where tasks conflict.

Paper: Sun et al., ICLR 2025, "Task Arithmetic in Trust Region: A Training-Free Model Merging Approach to
Navigate Knowledge Conflicts" (TATR). Variant (as the authors' FusionBench code):

- ``Omega = sum_i sum_{j != i} g_i * |tau_j|`` entry by entry, with ``g_i`` the mean absolute per-example
  gradient of task ``i``'s loss at the pretrained model (or, zero-shot, ``g_i = |tau_i|``);
- ``T`` = the value at 0-based position ``floor(n * q)`` (clamped to ``n - 1``) of Omega sorted ascending, over
  all ``n`` entries of the whole model (``q = threshold_quantile``, 0.99);
- mask ``M = Omega < T`` (strictly); ``theta = theta_0 + lambda * sum_i M * tau_i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def trust_region_omega(grads: Sequence[torch.Tensor], taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i sum_{j != i} grads[i] * |taus[j]|`` (computed as ``sum_i g_i * (S - |tau_i|)``, ``S = sum_j |tau_j|``)."""
    total = sum(t.abs() for t in taus)
    return sum(g * (total - t.abs()) for g, t in zip(grads, taus))


def trust_region_threshold(omega: torch.Tensor, quantile: float) -> float:
    """The value at 0-based position ``floor(n * quantile)`` (clamped to [0, n-1]) of ``omega`` sorted ascending."""
    flat = omega.reshape(-1)
    n = flat.numel()
    pos = max(0, min(int(n * quantile), n - 1))
    return float(flat.kthvalue(pos + 1).values)


def trust_region_merge(base: torch.Tensor, taus: Sequence[torch.Tensor], mask: torch.Tensor,
                       scaling_factor: float) -> torch.Tensor:
    """``base + scaling_factor * sum_i mask * taus[i]``."""
    return base + scaling_factor * (sum(taus) * mask)
