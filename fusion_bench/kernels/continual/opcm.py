"""OPCM kernel: project a new task vector away from the merged update so far (one weight matrix).

Paper: Tang et al., "Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable
Continual Model Merging" (arXiv 2501.09522). Variant implemented (the authors' FusionBench code,
``opcm/opcm``): with the SVD ``Delta = U diag(s) V^T`` (full matrices) of the previous merged task
vector of a linear layer, let ``r`` be the number of leading singular values before the cumulative
share ``sum(s[:i+1]) / sum(s)`` (singular values, not their squares) first exceeds ``alpha``. The new
task vector ``tau`` is written in that basis, ``P = U^T tau V``; the entries of the top-left ``r x r``
block and of the whole diagonal ``P[i, i]`` are set to zero; the projected task vector is ``U P V^T``.
A previous update that is exactly zero spans no subspace: ``tau`` is returned unchanged there (its SVD
basis would be arbitrary).
"""

from __future__ import annotations

import torch


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """The number of leading singular values before ``cumsum(s) / sum(s)`` first exceeds ``alpha``
    (0 when no share exceeds it, as ``argmax`` of an all-false mask gives in the reference code)."""
    total = s.sum()
    if not bool(total > 0):
        return 0
    above = (s.cumsum(0) / total) > alpha
    return int(above.to(torch.int8).argmax().item())


def opcm_project(merged_tv: torch.Tensor, task_tv: torch.Tensor, alpha: float) -> torch.Tensor:
    """The part of ``task_tv`` OPCM adds to the merged update of a weight matrix.

    Args:
        merged_tv: the previous merged task vector of the layer (``theta_merged - theta_0``), 2-D.
        task_tv: the new model's task vector of the layer, same shape.
        alpha: the energy threshold in [0, 1) that sets the protected block (see the module docstring).
    Returns:
        ``U P V^T`` with ``P = U^T task_tv V`` cleared on its diagonal and its top-left ``r x r`` block.
    """
    if merged_tv.dim() != 2 or merged_tv.shape != task_tv.shape:
        raise ValueError(f"opcm_project needs two matrices of one shape, got {tuple(merged_tv.shape)} and "
                         f"{tuple(task_tv.shape)}")
    if not bool(merged_tv.abs().amax() > 0):
        return task_tv.clone()
    u, s, vh = torch.linalg.svd(merged_tv, full_matrices=True)
    r = split_rank(s, alpha)
    p = u.T @ task_tv @ vh.T
    p.diagonal().zero_()
    p[:r, :r] = 0
    return u @ p @ vh
