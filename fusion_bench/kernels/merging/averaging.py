"""Averaging kernels: simple and weighted averages, linear interpolation, task arithmetic."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def simple_average(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Uniform average of N tensors, theta = (1/N) sum_i theta_i.

    Paper: Model soups (Wortsman et al., ICML 2022), the "uniform soup".
    """
    out = tensors[0].clone()
    for t in tensors[1:]:
        out.add_(t)
    return out.div_(len(tensors))


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = False) -> torch.Tensor:
    """Weighted sum theta = sum_i w_i theta_i (weights divided by their sum when ``normalize``).

    Paper: Matena & Raffel, "Merging models with Fisher-weighted averaging" (NeurIPS 2022) use
    scalar weights as the isotropic special case; here the weights are given, not estimated.
    """
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    out = torch.zeros_like(tensors[0])
    for wi, t in zip(w.tolist(), tensors):
        out.add_(t, alpha=wi)
    return out


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Linear interpolation (1 - t) a + t b (t=0 gives a, t=1 gives b)."""
    return a + (b - a) * t


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], scaling_factor: float | Sequence[float]) -> torch.Tensor:
    """theta = theta_0 + lambda * sum_i (theta_i - theta_0).

    Paper: Ilharco et al., "Editing models with task arithmetic" (ICLR 2023): task vectors
    tau_i = theta_i - theta_0 are added with one scaling coefficient lambda (or one per task).
    """
    if isinstance(scaling_factor, (int, float)):
        scales = [float(scaling_factor)] * len(tensors)
    else:
        scales = [float(s) for s in scaling_factor]
    out = base.clone()
    for s, t in zip(scales, tensors):
        out.add_(t - base, alpha=s)
    return out
