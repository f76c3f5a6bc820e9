"""WUDI-Merging: per linear layer, the merged task vector minimising the interference it causes on each
task's input subspace (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors", arXiv 2503.08099).

Exact variant (the paper's Eq. for linear layers, as in the official code and FusionBench ``WUDIMerging``):
for a 2-D weight with task vectors tau_1..tau_N (out x in),

    L(tau_m) = sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2

minimised by Adam (torch defaults: betas (0.9, 0.999), eps 1e-8, no weight decay; lr 1e-5) for
``iterations`` steps from tau_m = sum_i tau_i. A task vector that is exactly zero has a zero term (the
references divide 0 by 0 there). Tensors that are not 2-D get the mean task vector.

The gradient is computed in closed form, grad = 2 (tau_m A - B) with A = sum_i tau_i^T tau_i / ||tau_i||^2
(in x in) and B = sum_i tau_i tau_i^T tau_i / ||tau_i||^2, both formed once; each step then costs one
(out x in) @ (in x in) product instead of 2N products of the autograd loop (the same gradient up to float
rounding). When 2 N out < in the product goes through the stacked task vectors instead of A.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def wudi_objective(tau_m: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """L(tau_m) = sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 (zero task vectors contribute 0)."""
    total = tau_m.new_zeros(())
    for t in taus:
        n2 = (t * t).sum()
        if n2 > 0:
            total = total + ((tau_m - t) @ t.T).square().sum() / n2
    return total


def wudi_merge_matrix(taus: Sequence[torch.Tensor], *, iterations: int = 400, lr: float = 1e-5) -> torch.Tensor:
    """The WUDI merged task vector of one 2-D weight (see the module docstring).

    Args:
        taus: the task vectors theta_i - theta_0, each (out, in), same dtype (float32 or float64).
        iterations: Adam steps.
        lr: Adam learning rate.
    Returns:
        tau_m, (out, in), in the task vectors' dtype.
    """
    if not taus:
        raise ValueError("wudi_merge_matrix needs at least one task vector")
    if any(t.dim() != 2 for t in taus):
        raise ValueError("wudi_merge_matrix merges 2-D tensors; use the mean task vector for others")
    out_dim, in_dim = taus[0].shape
    n = len(taus)
    weights = []
    for t in taus:
        n2 = float((t * t).sum())
        weights.append(1.0 / n2 if n2 > 0.0 else 0.0)
    init = torch.zeros_like(taus[0])
    for t in taus:
        init.add_(t)
    param = torch.nn.Parameter(init)
    if iterations == 0 or all(w == 0.0 for w in weights):
        return param.detach()
    factored = 2 * n * out_dim < in_dim
    b_mat = taus[0].new_zeros(out_dim, in_dim)
    for w, t in zip(weights, taus):
        if w:  # (t t^T) t = t (t^T t): multiply through the smaller Gram matrix (an embedding's t t^T is
            # vocab x vocab: 9.6 GB for a 49152-token vocabulary)
            b_mat.add_(t @ (t.T @ t) if out_dim >= in_dim else (t @ t.T) @ t, alpha=w)
    if factored:  # tau_m A = sum_i w_i (tau_m tau_i^T) tau_i through the stacked task vectors
        stack = torch.cat(list(taus))  # (n out, in)
        wrow = torch.cat([torch.full((out_dim,), w, dtype=t.dtype) for w, t in zip(weights, taus)])
    else:
        a_mat = torch.zeros(in_dim, in_dim, dtype=taus[0].dtype)
        for w, t in zip(weights, taus):
            if w:
                a_mat.addmm_(t.T, t, alpha=w)
    opt = torch.optim.Adam([param], lr=lr, weight_decay=0.0)
    with torch.no_grad():
        for _ in range(iterations):
            x = param.detach()
            grad = ((x @ stack.T) * wrow) @ stack if factored else x @ a_mat
            grad.sub_(b_mat).mul_(2.0)
            param.grad = grad
            opt.step()
    return param.detach()
