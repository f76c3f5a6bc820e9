"""RegMean: merge linear layers by regression on their inputs (Jin et al., ICLR 2023, "Dataless knowledge
fusion by merging weights of language models")."""

from __future__ import annotations

import torch


def reduce_non_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * G + (1 - alpha) * diag(G)``: off-diagonal entries scaled by ``alpha``, diagonal kept."""
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def regmean_linear(weights: list[torch.Tensor], grams: list[torch.Tensor], alpha: float = 0.9) -> torch.Tensor:
    """Merged weight of one linear layer ``y = x W^T`` from the models' weights and input Gram matrices.

    Jin et al. 2023, eq. (2) with the off-diagonal reduction of section 3.2: minimise
    ``sum_i ||X_i W^T - X_i W_i^T||^2`` with ``G~_i = alpha G_i + (1 - alpha) diag(G_i)`` in place of
    ``G_i = X_i^T X_i``, i.e. ``W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T``. Solved in float64 with
    ``torch.linalg.solve``; a singular sum falls back to the pseudo-inverse (least-norm solution).
    To merge a bias too, append it as a last column of ``W_i`` and give the Gram matrices of the
    inputs extended by a constant 1 (``[x, 1]``).

    Args:
        weights: the models' weights, shape (out_features, in_features) as stored by ``nn.Linear``.
        grams: the models' ``X_i^T X_i``, shape (in_features, in_features).
        alpha: the off-diagonal scale (``reduce_non_diagonal_ratio``); 1 is the exact regression,
            0 uses only the diagonal (then RegMean is a per-input-feature weighted average).
    Returns:
        the merged weight (out_features, in_features) in the dtype of ``weights[0]``.
    """
    g_sum = torch.zeros_like(grams[0], dtype=torch.float64)
    rhs = torch.zeros(weights[0].shape[1], weights[0].shape[0], dtype=torch.float64, device=weights[0].device)
    for w, g in zip(weights, grams):
        gt = reduce_non_diagonal(g.to(torch.float64), alpha)
        g_sum += gt
        rhs += gt @ w.to(torch.float64).T
    try:
        sol = torch.linalg.solve(g_sum, rhs)
    except RuntimeError:  # singular (e.g. an input feature that is always zero)
        sol = torch.linalg.pinv(g_sum) @ rhs
    return sol.T.to(weights[0].dtype).contiguous()
