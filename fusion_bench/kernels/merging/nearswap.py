"""NearSwap: take the other model's value where it is close to the base, interpolate where it is far.

Reference: alchemonaut, "QuartetAnemoi-70B-t0.0001" (model card; mergekit 0.1.5 ``nearswap``). Exact variant,
elementwise in the tensors' dtype: w = clamp(t / max(|theta_0 - theta_1|, 1e-6), 0, 1),
theta = w theta_1 + (1 - w) theta_0 (entries within distance t of the base take theta_1 exactly).
"""

from __future__ import annotations

import torch


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """w theta_1 + (1 - w) theta_0, w = clamp(t / max(|theta_0 - theta_1|, 1e-6), 0, 1).

    Args:
        base: theta_0.
        other: theta_1, same shape.
        t: the similarity threshold (distance at which the weight is 1).
    """
    w = (t / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return w * other + (1 - w) * base
