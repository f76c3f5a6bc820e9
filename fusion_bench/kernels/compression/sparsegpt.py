"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh, "SparseGPT: Massive Language
Models Can Be Accurately Pruned in One-Shot", ICML 2023, arXiv 2301.00774).

For a linear layer ``y = x W^T`` (``W`` is (out, in)) and calibration inputs ``X`` (tokens x in), the layer
Hessian of the reconstruction error ``||W X^T - W' X^T||^2`` is ``H = 2 X^T X`` (accumulated here as the
reference code does, ``H = (2 / N) X^T X`` over ``N`` tokens; the scale does not change the result).

Variant implemented (Algorithm 1 of the paper, as in the authors' code):
- dead inputs (``H_jj = 0``) get ``H_jj = 1`` and their weights are zeroed;
- dampening: ``H += lambda I`` with ``lambda = percdamp * mean(diag(H))`` (``percdamp = 0.01``);
- ``U = chol(H^-1)`` (upper Cholesky factor of the inverse): row ``i`` of ``U`` divided by ``U_ii`` is the
  OBS update direction after the columns before ``i`` have been fixed, and ``U_ii^2 = [H_{F}^-1]_ii``;
- columns are visited in order, in blocks of ``blocksize`` (128); at the start of every block the mask of that
  block is selected adaptively from the current (already updated) weights: the ``floor(rows * B * sparsity)``
  entries with the smallest OBS error ``w^2 / U_cc^2`` over the whole block are pruned (exact count, stable
  order on ties); with N:M, at every ``M``-th column of the block the ``N`` smallest ``w^2 / U_cc^2`` of the
  next ``M`` columns of each row are pruned;
- each column ``i``: pruned entries become 0, the error ``e = (w_i - q_i) / U_ii`` is propagated to the
  remaining columns of the block, ``W[:, i:] -= e U[i, i:]``, and after the block to all later columns
  (lazy batch update), ``W[:, end:] -= E U[block, end:]``.
Computation in float32 (float64 inputs stay float64); the result is cast back by the caller.
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Running ``H = (2 / N) sum_t x_t x_t^T`` over calibration tokens (as SparseGPT's ``add_batch``)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.H = torch.zeros(columns, columns, device=device, dtype=dtype)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the inputs ``x`` (any leading shape, last dim = columns)."""
        x = x.reshape(-1, x.shape[-1]).to(self.H.dtype)
        t = x.shape[0]
        if t == 0:
            return
        self.H.mul_(self.n / (self.n + t))
        self.n += t
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.T, x)


def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                    blocksize: int = 128, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (out, in) with SparseGPT given the Hessian ``H`` (in, in).

    Args:
        weight: the layer weight; not modified.
        H: the Hessian ``2 X^T X / N`` of the layer inputs; not modified.
        sparsity: fraction pruned per block (unstructured); ignored when ``nm`` is given.
        nm: ``(N, M)`` semi-structured pattern (N of every M consecutive inputs pruned); ``blocksize`` must be
            a multiple of M and the input size too.
        blocksize: columns per lazy-update block.
        percdamp: dampening as a fraction of the mean diagonal of ``H``.
    Returns:
        ``(new_weight, mask)``: the reconstructed weight in the compute dtype and the boolean mask (True = pruned).
    """
    cd = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(cd).clone()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    if nm is not None:
        n, m = nm
        if cols % m or blocksize % m:
            raise ValueError(f"N:M={n}:{m} needs the input size ({cols}) and blocksize ({blocksize}) to be multiples of M")
    H = H.detach().to(device=W.device, dtype=cd).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            score = W1 ** 2 / d1.reshape(1, -1) ** 2
            k = int(score.numel() * sparsity)
            if k:
                idx = torch.sort(score.flatten(), stable=True).indices[:k]
                mask1.view(-1)[idx] = True
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                score = W1[:, i:i + nm[1]] ** 2 / d1[i:i + nm[1]].reshape(1, -1) ** 2
                idx = torch.sort(score, dim=1, stable=True).indices[:, :nm[0]]
                mask1[:, i:i + nm[1]].scatter_(1, idx, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, mask
