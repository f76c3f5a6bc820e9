"""RegMean: merge linear layers by regression on their inputs (Jin et al., ICLR 2023, "Dataless knowledge
fusion by merging weights of language models").

For ``y = x W^T`` (``nn.Linear`` storage: ``W`` is (out, in)) and Gram matrices ``G_i = X_i^T X_i``:
``W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T`` with ``G~_i = alpha G_i + (1 - alpha) diag(G_i)``. The
sums can be accumulated one model at a time (:func:`regmean_accumulate`), then solved once
(:func:`regmean_solve`).
"""

from __future__ import annotations

import torch


def reduce_non_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * G + (1 - alpha) * diag(G)``: off-diagonal entries scaled by ``alpha``, diagonal kept."""
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def regmean_accumulate(g_sum: torch.Tensor, rhs: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor,
                       alpha: float) -> None:
    """In place (float64 sums): ``g_sum += G~``, ``rhs += G~ W^T`` for one model's ``weight`` (out, in) and
    ``gram`` (in, in)."""
    gt = reduce_non_diagonal(gram.to(torch.float64), alpha)
    g_sum.add_(gt)
    rhs.add_(gt @ weight.to(torch.float64).T)


def regmean_solve(g_sum: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``W = ((sum G~)^-1 sum G~ W_i^T)^T`` (out, in), float64. ``torch.linalg.solve``; a singular sum
    (e.g. an input feature that is always zero) falls back to the pseudo-inverse (least-norm solution)."""
    try:
        sol = torch.linalg.solve(g_sum, rhs)
    except RuntimeError:
        sol = torch.linalg.pinv(g_sum) @ rhs
    return sol.T.contiguous()


def regmean_linear(weights: list[torch.Tensor], grams: list[torch.Tensor], alpha: float = 0.9) -> torch.Tensor:
    """Merged weight of one linear layer from the models' weights and input Gram matrices.

    Jin et al. 2023, eq. (2) with the off-diagonal reduction of section 3.2 (``alpha`` =
    ``reduce_non_diagonal_ratio``; 1 is the exact regression, 0 uses only the diagonal). To merge a
    bias too, append it as a last column of ``W_i`` and give the Gram matrices of ``[x, 1]``.

    Args:
        weights: the models' weights, shape (out_features, in_features).
        grams: the models' ``X_i^T X_i``, shape (in_features, in_features).
        alpha: the off-diagonal scale.
    Returns:
        the merged weight (out_features, in_features) in the dtype of ``weights[0]``.
    """
    d_in, d_out = weights[0].shape[1], weights[0].shape[0]
    g_sum = torch.zeros(d_in, d_in, dtype=torch.float64, device=weights[0].device)
    rhs = torch.zeros(d_in, d_out, dtype=torch.float64, device=weights[0].device)
    for w, g in zip(weights, grams):
        regmean_accumulate(g_sum, rhs, w, g, alpha)
    return regmean_solve(g_sum, rhs).to(weights[0].dtype)
