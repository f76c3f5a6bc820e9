"""Karcher (Riemannian / Frechet) mean of tensors on the unit sphere, rescaled by the mean norm."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def karcher_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *,
                 max_iter: int = 10, tol: float = 1e-5, eps: float = 1e-12) -> torch.Tensor:
    """Weighted Karcher mean of the directions of ``tensors``, times their weighted mean norm.

    Paper: Karcher, "Riemannian center of mass and mollifier smoothing" (1977), the mean that
    minimises sum_i w_i d(u, x_i)^2 with d the great-circle distance; used for model merging by
    mergekit's ``karcher`` method. Variant: x_i = t_i / ||t_i|| (flattened; tensors with norm <= eps
    are left out of the direction); u_0 = normalise(sum_i w_i x_i) (x_0 if that is 0); then at most
    ``max_iter`` Riemannian gradient steps of size 1: v_i = log_u(x_i) = (x_i - c_i u) theta_i /
    sin(theta_i) with c_i = <u, x_i> clamped to [-1, 1], theta_i = arccos(c_i) (v_i = x_i - c_i u when
    theta_i < 1e-7), g = sum_i w_i v_i / sum_i w_i; stop when ||g|| < tol, else
    u = normalise(cos(||g||) u + sin(||g||) g / ||g||). Result: u * sum_i w_i ||t_i|| / sum_i w_i
    (all norms, zeros included). All zero inputs give zeros.

    Args:
        tensors: same-shape float tensors.
        weights: w_i >= 0 (default: equal).
        max_iter: maximum number of gradient steps.
        tol: stop when the gradient norm is below it.
        eps: norms at or below it count as zero.
    """
    n = len(tensors)
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    wsum = sum(w)
    if wsum <= 0:
        raise ValueError("karcher_mean needs weights with a positive sum")
    shape = tensors[0].shape
    flat = [t.reshape(-1) for t in tensors]
    norms = [float(f.norm()) for f in flat]
    mean_norm = sum(wi * ni for wi, ni in zip(w, norms)) / wsum
    live = [(wi, f / ni) for wi, f, ni in zip(w, flat, norms) if ni > eps and wi > 0]
    if not live:
        return torch.zeros_like(tensors[0])
    lw = sum(wi for wi, _ in live)
    u = torch.zeros_like(live[0][1])
    for wi, x in live:
        u.add_(x, alpha=wi)
    un = float(u.norm())
    u = live[0][1].clone() if un <= eps else u / un
    for _ in range(max_iter):
        g = torch.zeros_like(u)
        for wi, x in live:
            c = max(-1.0, min(1.0, float(torch.dot(u, x))))
            theta = math.acos(c)
            v = x - c * u
            if theta >= 1e-7:
                v = v * (theta / math.sin(theta))
            g.add_(v, alpha=wi / lw)
        gn = float(g.norm())
        if gn < tol:
            break
        u = math.cos(gn) * u + (math.sin(gn) / gn) * g
        u = u / u.norm()
    return (u * mean_norm).reshape(shape)
