"""SCE: select (by variance across models), calculate (per-model weights), erase (minority signs), merge.

Paper: Wan et al., "FuseChat: Knowledge Fusion of Chat Models" (arXiv 2408.07990), SCE merging.
Variant implemented (mergekit 0.1.5 ``sce``, written from its documented semantics), per tensor with
task vectors tau_i = theta_i - theta_0:

1. select: when ``select_topk`` < 1, keep the k = int(nnz(var) * select_topk) entries of largest
   variance across the models (population variance; torch.topk decides among equal variances), in
   every task vector; ``select_topk`` <= 0 keeps nothing;
2. calculate: w_i = mean(tau~_i^2) / sum_j mean(tau~_j^2) (uniform 1/N when that sum is below 1e-6);
3. erase: elected sign +1 where sum_i tau~_i >= 0, else -1; an entry takes part where its sign equals the
   elected one (zeros never do);
4. merge: theta_0 + sum_i w_i m_i tau~_i / max(sum_i w_i m_i, 1e-6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sce_select_mask(tvs: torch.Tensor, select_topk: float) -> torch.Tensor:
    """1 where an entry is among the k of largest variance across the models (dim 0 of ``tvs``), else 0."""
    if select_topk <= 0:
        return torch.zeros_like(tvs[0])
    if select_topk >= 1:
        return torch.ones_like(tvs[0])
    var = torch.var(tvs, dim=0, correction=0)
    k = int(torch.count_nonzero(var) * select_topk)
    mask = torch.zeros_like(var)
    if k == 0:
        return mask
    _, idx = torch.topk(var.abs().reshape(-1), k=k, largest=True)
    mask.view(-1)[idx] = 1
    return mask


def sce_weights(tvs: torch.Tensor) -> torch.Tensor:
    """Per-model weights: mean squared task vector entry, normalised to sum 1 (uniform when ~0)."""
    w = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    s = torch.sum(w).item()
    if abs(s) < 1e-6:
        return torch.ones_like(w) / w.shape[0]
    return w / s


def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """SCE merge of ``tensors`` around ``base``.

    Paper: Wan et al. 2024 (FuseChat); variant: mergekit 0.1.5 ``sce`` (see the module docstring).

    Args:
        base: theta_0.
        tensors: the fine-tuned tensors.
        select_topk: fraction of the non-zero-variance entries kept by the selection step.
    """
    if not tensors:
        return base
    tvs = torch.stack([t - base for t in tensors], dim=0)
    if select_topk < 1:
        tvs = tvs * sce_select_mask(tvs, select_topk).unsqueeze(0)
    elected = torch.where(tvs.sum(dim=0) >= 0, 1.0, -1.0).to(tvs.dtype)
    agree = tvs.sign() == elected
    w = sce_weights(tvs)
    w = w.reshape(-1, *([1] * (tvs.dim() - 1)))
    ew = w * agree
    return base + (tvs * ew).sum(dim=0) / torch.sum(ew, dim=0).clamp(min=1e-6)
