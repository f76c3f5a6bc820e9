"""DOGE-TA, the data-free variant of "Modeling Multi-Task Model Merging as Adaptive Projective Gradient
Descent" (Wei et al., ICML 2025, arXiv 2501.01230; FusionBench ``DOGE_TA_Algorithm``).

Exact variant (FusionBench's data-free code, per 2-D weight with task vectors V_1..V_N, out x in):

- lambda_j = lamda / ||V_j||_F (0 for a zero task vector, where the reference divides by 0);
- shared subspace: r = floor(m / N) with m = min(out, in); the top-r left singular vectors of every V_j
  side by side fill an (out x m) matrix (remaining columns 0), whose top floor(m / subspace) left
  singular vectors U_k give the projector P = U_k U_k^T;
- a modification delta (out x in, from 0) minimises
  sum_j || rowsum( V_j * (V_j - sum_i lambda_i V_i - (sum_i lambda_i) delta) ) ||^2
  by Adam (torch defaults, lr 1e-4) for ``iterations`` steps, the gradient projected out of the shared
  subspace before each step: g <- g - P g;
- merged task vector: sum_j lambda_j (V_j + delta) * M_j, with M_j the global magnitude mask of task j:
  |V_j| >= its (floor(keep_ratio d) + 1)-th largest magnitude over the d entries of all merged tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def doge_lambdas(taus: Sequence[torch.Tensor], lamda: float) -> list[float]:
    """lambda_j = lamda / ||tau_j||_F per task (0 when tau_j is 0)."""
    out = []
    for t in taus:
        n = float(torch.linalg.vector_norm(t))
        out.append(lamda / n if n > 0.0 else 0.0)
    return out


def shared_projector(taus: Sequence[torch.Tensor], subspace: int) -> torch.Tensor:
    """P = U_k U_k^T (out x out) of the shared subspace of the task vectors' top left singular vectors."""
    out_dim, in_dim = taus[0].shape
    m = min(out_dim, in_dim)
    r = m // len(taus)
    stacked = taus[0].new_zeros(out_dim, m)
    for i, t in enumerate(taus):
        if r:
            u = torch.linalg.svd(t, full_matrices=False)[0]
            stacked[:, i * r:(i + 1) * r] = u[:, :r]
    uu = torch.linalg.svd(stacked, full_matrices=False)[0]
    k = m // subspace
    uk = uu[:, :k]
    return uk @ uk.T


def doge_loss(delta: torch.Tensor, taus: Sequence[torch.Tensor], lambdas: Sequence[float]) -> torch.Tensor:
    """sum_j || rowsum(V_j * (V_j - sum_i lambda_i V_i - (sum_i lambda_i) delta)) ||^2."""
    s = sum(lam * t for lam, t in zip(lambdas, taus))
    c = float(sum(lambdas))
    total = delta.new_zeros(())
    for t in taus:
        total = total + (t * (t - s - c * delta)).sum(dim=1).square().sum()
    return total


def doge_delta(taus: Sequence[torch.Tensor], lambdas: Sequence[float], projector: torch.Tensor, *,
               iterations: int = 400, lr: float = 1e-4) -> torch.Tensor:
    """The optimised modification delta of one 2-D weight (Adam on :func:`doge_loss`, projected gradient).

    The gradient is in closed form: -2 c sum_j rowsum(E_j)[:, None] * V_j with E_j the bracket of
    :func:`doge_loss` and c = sum_i lambda_i.
    """
    s = torch.zeros_like(taus[0])
    for lam, t in zip(lambdas, taus):
        s.add_(t, alpha=lam)
    c = float(sum(lambdas))
    delta = torch.nn.Parameter(torch.zeros_like(taus[0]))
    opt = torch.optim.Adam([delta], lr=lr)
    with torch.no_grad():
        for _ in range(iterations):
            d = delta.detach()
            resid = s + c * d
            grad = torch.zeros_like(d)
            for t in taus:
                row = (t * (t - resid)).sum(dim=1, keepdim=True)
                grad.addcmul_(row, t)
            grad.mul_(-2.0 * c)
            grad.sub_(projector @ grad)
            delta.grad = grad
            opt.step()
    return delta.detach()


def keep_count(total: int, keep_ratio: float) -> int:
    """Entries at or above the threshold in FusionBench's ``topk_values_mask``: floor(keep_ratio d) + 1
    (the (d - floor(keep_ratio d))-th smallest magnitude), at most d."""
    return min(int(total * keep_ratio) + 1, total)


def doge_merge(taus: Sequence[torch.Tensor], lambdas: Sequence[float], delta: torch.Tensor,
               thresholds: Sequence[float]) -> torch.Tensor:
    """sum_j lambda_j (V_j + delta) * [|V_j| >= thresholds_j]."""
    out = torch.zeros_like(delta)
    for lam, t, thr in zip(lambdas, taus, thresholds):
        out.add_(torch.where(t.abs() >= thr, t + delta, torch.zeros((), dtype=t.dtype)), alpha=lam)
    return out
