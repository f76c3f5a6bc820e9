"""CART: centered task arithmetic with low-rank task matrices.

Paper: Choi, Kim, Lee, Hong, "Revisiting Weight Averaging for Model Merging" (arXiv 2412.12153, 2024/2025).

Variant implemented (:func:`cart_merge`), for fine-tuned tensors theta_1..theta_N of one layer:

1. theta_avg = (1/N) sum_i theta_i (the weight average; the pretrained model is not used).
2. Centered task vectors c_i = theta_i - theta_avg.
3. For a 2-D tensor (a weight matrix) of shape (m, n): c_i is replaced by its best rank-k
   approximation (truncated SVD, Eckart-Young) with k = max(1, floor(rank_fraction * min(m, n)))
   (the authors' code keeps ``max(1, int(ratio * min(m, n)))`` singular triplets).
4. theta = theta_avg + lambda * sum_i SVD_k(c_i).

Tensors that are not matrices (biases, norms, 1-D / 0-D / >2-D tensors) are not low-rank
approximated; their centered vectors sum to exactly 0, so they get theta_avg (the paper's
treatment: full centered vectors, whose sum is the weight average).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def cart_rank(shape: Sequence[int], rank_fraction: float) -> int:
    """Singular triplets kept for a matrix of ``shape``: max(1, floor(rank_fraction * min(m, n))), at most min(m, n)."""
    full = min(int(shape[0]), int(shape[1]))
    return max(1, min(full, math.floor(rank_fraction * full * (1 + 1e-12))))


def low_rank(x: torch.Tensor, k: int) -> torch.Tensor:
    """Best rank-``k`` approximation of the matrix ``x`` (truncated SVD)."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def cart_merge(tensors: Sequence[torch.Tensor], *, rank_fraction: float = 0.08,
               scaling_factor: float = 1.0) -> torch.Tensor:
    """CART merge of one tensor: theta_avg + lambda * sum_i SVD_k(theta_i - theta_avg).

    Args:
        tensors: theta_i of the N fine-tuned models (float32/float64, same shape).
        rank_fraction: fraction of the full rank min(m, n) kept per centered task matrix (k >= 1).
        scaling_factor: lambda.
    Returns:
        The merged tensor; theta_avg for tensors that are not 2-D.
    """
    avg = torch.stack(list(tensors)).mean(0)
    if avg.ndim != 2 or len(tensors) == 1:
        return avg
    k = cart_rank(avg.shape, rank_fraction)
    acc = torch.zeros_like(avg)
    for t in tensors:
        acc += low_rank(t - avg, k)
    return avg + scaling_factor * acc
