"""DOP kernel: merge one weight matrix of the merged model with the next model by dual projections.

Paper: Yang, Tang, Shen, Guo, Wang, Cao, Zhang, "Continual Model Merging without Data: Dual
Projections for Balancing Stability and Plasticity" (NeurIPS 2025). Variant implemented (the
authors' FusionBench code, ``dop/dop``, whose defaults the method uses):

- for each of the two models ``i`` (the merged model so far, ``i = 0``, and the new model, ``i = 1``),
  the SVD of its task vector ``W_i - W_0 = U diag(s) V^T`` (full matrices) is truncated to the
  ``k = searchsorted(cumsum(s) / sum(s), epsilon)`` leading triplets (singular values, not squares);
- the loss of model ``i`` at ``W`` is ``||diag(s_k) U_k^T (W - W_i)||_F^2`` (``u``) plus
  ``||(W - W_i) V_k diag(s_k)||_F^2`` (``v``), or one of the two (``proj_space``);
- ``W`` starts at ``(W_0' + W_1') / 2`` (the two models' weights) and takes ``steps`` Adam steps (torch
  defaults, learning rate ``lr``) on ``c_0 L_0 + c_1 L_1``. With MGDA, each step normalises each
  gradient by its loss, takes the two-point min-norm weights of Sener & Koltun (2018)
  (``gamma`` clamped to 0.999 / 0.001 at the ends), and, with EMA, smooths them as
  ``c <- beta c + (1 - beta) gamma`` from ``c = (alpha, 1 - alpha)``; without MGDA ``c = (alpha, 1 - alpha)``.

Two guards the reference code lacks (it divides by zero there): a task vector that is exactly zero has
``k = 0`` (no subspace), and a loss of exactly zero normalises its (zero) gradient by 1.
"""

from __future__ import annotations

import torch


def dop_subspace(tv: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_k, s_k, V_k)``: the leading SVD triplets of ``tv`` whose cumulative share of ``sum(s)`` stays
    below ``epsilon`` (``k = searchsorted(cumsum(s) / sum(s), epsilon)``, as the reference code)."""
    u, s, vh = torch.linalg.svd(tv, full_matrices=True)
    total = s.sum()
    if not bool(total > 0):
        k = 0
    else:
        k = int(torch.searchsorted(s.cumsum(0) / total, torch.tensor(min(epsilon, 1.0), dtype=s.dtype)).item())
    return u[:, :k], s[:k], vh[:k].T


def min_norm_2(g1: torch.Tensor, g2: torch.Tensor) -> float:
    """Weight ``gamma`` of ``g1`` in ``min_gamma ||gamma g1 + (1 - gamma) g2||`` (Sener & Koltun 2018,
    their two-point rule: 0.999 when <g1,g2> >= <g1,g1>, 0.001 when <g1,g2> >= <g2,g2>)."""
    v11 = float((g1 * g1).sum())
    v12 = float((g1 * g2).sum())
    v22 = float((g2 * g2).sum())
    if v12 >= v11:
        return 0.999
    if v12 >= v22:
        return 0.001
    return -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12))


def dop_merge_weight(w0: torch.Tensor, w_merged: torch.Tensor, w_new: torch.Tensor, *, lr: float = 1e-4,
                     steps: int = 200, mgda: bool = True, ema: bool = True, alpha: float = 0.8,
                     ema_beta: float = 0.999, epsilon: float = 0.99999, proj_space: str = "uv") -> torch.Tensor:
    """DOP's merged weight of one linear layer (see the module docstring).

    Args:
        w0: the pretrained weight.
        w_merged: the merged model's weight so far (model 0: stability).
        w_new: the new model's weight (model 1: plasticity).
        lr, steps: Adam's learning rate and number of steps.
        mgda: weigh the two losses by MGDA's min-norm rule (else by ``alpha``, ``1 - alpha``).
        ema, ema_beta: smooth MGDA's weights from ``(alpha, 1 - alpha)`` with this decay.
        alpha: the weight of the merged model's loss (initial EMA value with MGDA).
        epsilon: the share of ``sum(s)`` that sets each subspace's rank.
        proj_space: ``uv`` (both projections), ``u`` or ``v``.
    Returns:
        The merged weight (detached, ``w0``'s dtype).
    """
    targets = [w_merged.detach(), w_new.detach()]
    # each loss is a quadratic form: L_i = <D, A_i D + D B_i>, grad = 2 (A_i D + D B_i), D = W - W_i, with
    # A_i = U diag(s^2) U^T (u) and B_i = V diag(s^2) V^T (v): closed-form gradients, no autograd graph
    forms = []
    for t in targets:
        u, s, v = dop_subspace(t - w0, epsilon)
        a = (u * s.square()) @ u.T if "u" in proj_space else None
        b = (v * s.square()) @ v.T if "v" in proj_space else None
        forms.append((t, a, b))
    w = torch.nn.Parameter((targets[0] + targets[1]) / 2)
    opt = torch.optim.Adam([w], lr=lr)
    coef = [alpha, 1.0 - alpha]
    with torch.no_grad():
        for _ in range(steps):
            losses, grads = [], []
            for t, a, b in forms:
                d = w - t
                q = torch.zeros_like(d)
                if a is not None:
                    q += a @ d
                if b is not None:
                    q += d @ b
                losses.append(float((d * q).sum()))
                grads.append(2 * q)
            if mgda:
                normed = [g / (v if v != 0 else 1.0) for g, v in zip(grads, losses)]
                gamma = min_norm_2(normed[0], normed[1])
                sol = [gamma, 1.0 - gamma]
                if ema:
                    coef = [ema_beta * c + (1 - ema_beta) * g for c, g in zip(coef, sol)]
                    sol = coef
            else:
                sol = coef
            w.grad = sol[0] * grads[0] + sol[1] * grads[1]
            opt.step()
    return w.detach()
