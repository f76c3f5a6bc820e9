"""Rank-one mixture of experts: the tensor math.

RankOne-MoE (Enneng Yang et al., 2024; reference code github.com/EnnengYang/RankOne-MoE), as
implemented by FusionBench 0.2's ``rankone_moe`` (``fusion_bench.models.rankone_moe``): every task vector
``tau_i`` of an MLP weight matrix is split by its SVD into rank-one experts ``s_ij u_ij v_ij^T``
(the ``k`` largest singular values of each task), pooled over the tasks; a router gives one weight per
expert and the routed weight is ``W(x) = W_0 + sum_ij w_ij(x) s_ij u_ij v_ij^T``. Optional top-k
selection is FusionBench's soft top-k: ``w * sigmoid(100 (w - t))`` with ``t`` the k-th largest weight.

- :func:`rank_one_experts`: ``(U, SVh)`` with rows ``u_j`` and ``s_j v_j`` of the top ``k`` singular triplets.
- :func:`soft_top_k`: the soft selection mask applied to routing weights (per sample).
- :func:`rank_one_merge`: ``W_0 + sum_e w_e u_e (s_e v_e)^T`` for one or a batch of routing vectors.
"""

from __future__ import annotations

import torch


def rank_one_experts(tau: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` leading rank-one pieces of a matrix.

    Args:
        tau: a task vector matrix ``(out, in)``.
        k: pieces kept (at most ``min(out, in)``).
    Returns:
        ``U`` of shape ``(k, out)`` (left singular vectors as rows) and ``SVh`` of shape ``(k, in)`` (rows
        ``s_j v_j``), so that ``sum_j U[j]^T SVh[j]`` is the best rank-``k`` approximation of ``tau``.
    """
    if tau.ndim != 2:
        raise ValueError(f"rank-one experts need a matrix, got shape {tuple(tau.shape)}")
    if not 1 <= k <= min(tau.shape):
        raise ValueError(f"k={k} must be in [1, {min(tau.shape)}] for a {tuple(tau.shape)} matrix")
    cd = torch.float64 if tau.dtype == torch.float64 else torch.float32
    u, s, vh = torch.linalg.svd(tau.to(cd), full_matrices=False)
    return u[:, :k].T.contiguous(), (s[:k, None] * vh[:k]).contiguous()


def soft_top_k(weights: torch.Tensor, k: int, sharpness: float = 100.0) -> torch.Tensor:
    """``w * sigmoid(sharpness * (w - t))`` with ``t`` the ``k``-th largest entry of ``w`` along the last axis
    (FusionBench's ``top_k_soft``; ``k <= 0`` or ``k >= len``: ``w`` unchanged)."""
    n = weights.shape[-1]
    if k <= 0 or k >= n:
        return weights
    t = torch.topk(weights, k, dim=-1).values.min(dim=-1, keepdim=True).values
    return weights * torch.sigmoid(sharpness * (weights - t))


def rank_one_merge(base: torch.Tensor, u: torch.Tensor, svh: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``base + sum_e weights[..., e] * outer(u[e], svh[e])``.

    Args:
        base: ``(out, in)``.
        u: ``(E, out)``; svh: ``(E, in)`` (the pooled experts of every task, task-major).
        weights: ``(E,)`` or ``(B, E)``.
    Returns:
        ``(out, in)`` or ``(B, out, in)``.
    """
    cd = torch.float64 if base.dtype == torch.float64 else torch.float32
    u, svh, w = u.to(cd), svh.to(cd), weights.to(cd)
    if w.ndim == 1:
        return base.to(cd) + (u.T * w) @ svh
    return base.to(cd) + torch.einsum("be,eo,ei->boi", w, u, svh)
