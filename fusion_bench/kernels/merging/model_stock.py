"""Model Stock kernel: interpolate the fine-tuned average towards the base by the task vectors' angle.

Paper: Jang, Yun and Han, "Model Stock: All we need is just a few fine-tuned models" (ECCV 2024).
Variant implemented (layer-wise, i.e. per tensor, Eq. 5 of the paper generalised to N models):

    tau_i = theta_i - theta_0
    cos   = mean over pairs i < j of <tau_i, tau_j> / (|tau_i| |tau_j|)
    t     = N cos / (1 + (N - 1) cos)
    theta = t * mean_i theta_i + (1 - t) * theta_0

Choices for cases the paper does not cover:

- N = 1: no angle exists; the kernel needs N >= 2 (``ValueError``; the method rejects such pools).
- A pair in which a task vector has zero norm contributes cosine 0 (no direction); when every task
  vector is zero, t = 0 and theta = theta_0 (which then equals every theta_i).
- The average cosine is clamped to [0, 1] before computing t: the paper's geometry assumes the
  fine-tuned weights are less than 90 degrees apart; a negative average would give t < 0 (or a zero
  denominator for cos = -1/(N-1)). So t is in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusion_bench.kernels.merging.ties import CHUNK


def cosine_matrix(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """N x N cosines of the flattened task vectors tau_i = tensors[i] - base (float64).

    Computed in chunks (Gram matrix accumulated in float64); a pair in which either task vector
    has zero norm gets cosine 0.
    """
    n = len(tensors)
    fb = base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    gram = torch.zeros((n, n), dtype=torch.float64)
    size = min(CHUNK, max(fb.numel(), 1))
    buf = torch.empty((n, size), dtype=torch.float64)
    for start in range(0, fb.numel(), size):
        stop = min(fb.numel(), start + size)
        c = buf[:, : stop - start]
        for i, f in enumerate(flats):
            c[i].copy_(f[start:stop])
            c[i].sub_(fb[start:stop])
        gram += c @ c.T
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(norms, norms)
    return torch.where(denom > 0, gram / torch.where(denom > 0, denom, 1.0), torch.zeros((), dtype=torch.float64))


def average_cosine(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> float:
    """Mean over pairs i < j of cos(tau_i, tau_j) (zero-norm pairs count as 0)."""
    n = len(tensors)
    cos = cosine_matrix(base, tensors)
    iu = torch.triu_indices(n, n, offset=1)
    return float(cos[iu[0], iu[1]].mean())


def model_stock_ratio(cos: float, n: int) -> float:
    """t = N cos / (1 + (N - 1) cos), with cos clamped to [0, 1]."""
    c = min(1.0, max(0.0, cos))
    return n * c / (1.0 + (n - 1) * c)


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Model Stock merge of one tensor; returns (merged tensor, t).

    Paper: Jang et al., ECCV 2024 (see the module docstring for N, zero norms and the clamp).

    Args:
        base: theta_0.
        tensors: theta_i of the N >= 2 models, same shape and dtype as ``base``.
    """
    n = len(tensors)
    if n < 2:
        raise ValueError("Model Stock needs at least two fine-tuned models")
    t = model_stock_ratio(average_cosine(base, tensors), n)
    avg = tensors[0].clone()
    for x in tensors[1:]:
        avg.add_(x)
    avg.div_(n)
    return avg.mul_(t).add_(base, alpha=1.0 - t), t
