"""Kernels of the sequential baselines: TIES on two rows (the merged task vector and the new one).

Continual TIES as FusionBench runs it (``opcm/ties_merging``; TIES: Yadav et al., NeurIPS 2023): the
whole merged task vector and the whole new task vector are flattened (tensors in sorted name order)
into two rows; each row keeps its entries whose magnitude is at least its ``(d - floor(d * k))``-th
smallest magnitude (``k`` = ``threshold`` / 100 when ``threshold`` > 1: the top ``threshold`` percent
of the whole model, not of each tensor); the elected sign of an entry is the sign of the sum of the
two trimmed rows (a zero sum takes the sign of the sum of all elected signs); the merged entry
aggregates (``sum``, ``mean`` of the nonzero, or ``max`` magnitude) the trimmed entries whose sign
agrees with the elected one.
"""

from __future__ import annotations

import torch


def trim_top(row: torch.Tensor, threshold: float) -> torch.Tensor:
    """``row`` with all but its largest-magnitude entries zeroed (``threshold``: share, or percent when > 1)."""
    k = threshold / 100 if threshold > 1 else threshold
    d = row.numel()
    kth = d - int(d * k)
    if kth < 1:  # keep everything
        return row.clone()
    cut = row.abs().kthvalue(kth).values
    return row * (row.abs() >= cut)


def ties_rows(rows: torch.Tensor, threshold: float = 20, merge_func: str = "sum") -> torch.Tensor:
    """TIES of the rows of ``rows`` (``n x d``): trim each row, elect signs by mass, disjoint aggregate."""
    trimmed = torch.stack([trim_top(r, threshold) for r in rows])
    sign = torch.sign(trimmed.sum(0))
    majority = torch.sign(sign.sum())
    sign[sign == 0] = majority
    keep = torch.where(sign[None] > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep
    if merge_func == "sum":
        return sel.sum(0)
    if merge_func == "mean":
        return sel.sum(0) / (sel != 0).sum(0).clamp(min=1)
    if merge_func == "max":
        return sel.abs().amax(0) * sign
    raise ValueError(f"merge_func must be sum, mean or max, got {merge_func!r}")
