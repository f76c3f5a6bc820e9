"""Magnitude pruning of the difference between a fine-tuned and its pretrained weight (FusionBench
``MagnitudeDiffPruningAlgorithm``, magnitude pruning as in Han et al. 2015 applied to the task vector).

Exact variant (FusionBench's ``unstructured_magnitude_prune_`` on theta_ft - theta_0): per row of the
difference (last dimension), the floor(cols * prune_ratio) entries of smallest |diff| ('minor') or largest
|diff| ('major') are set to 0, ties broken by a stable sort (lower column index pruned first); the kept
entries may be multiplied by a rescale factor; theta = theta_0 + that.
"""

from __future__ import annotations

import torch


def prune_rows(diff: torch.Tensor, prune_ratio: float, prune_type: str = "minor") -> torch.Tensor:
    """``diff`` (2-D or more; rows are all but the last dimension) with floor(cols * prune_ratio) entries of
    each row zeroed: the smallest magnitudes ('minor') or the largest ('major')."""
    if prune_type not in ("minor", "major"):
        raise ValueError(f"prune_type must be 'minor' or 'major', got {prune_type!r}")
    if diff.dim() < 2:
        raise ValueError("prune_rows needs a tensor with at least 2 dimensions (rows x columns)")
    flat = diff.reshape(-1, diff.shape[-1])
    k = int(flat.shape[1] * prune_ratio)
    if k <= 0:
        return diff.clone()
    metric = flat.abs() if prune_type == "minor" else -flat.abs()
    idx = torch.sort(metric, dim=-1, stable=True).indices[:, :k]
    out = flat.clone()
    out.scatter_(1, idx, 0.0)
    return out.reshape(diff.shape)
