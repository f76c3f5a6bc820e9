"""SparseLo: pruning with low-rank compensation of the pruned residual (FusionBench's ``sparselo`` family).

FusionBench 0.2.33 (``fusion_bench.method.sparselo``) replaces every linear layer of the decoder by a
"LoSparse" layer ``y = x (S + B A)^T`` where ``S`` is the pruned (sparse) weight and ``B A`` a rank-``r`` term;
the idea is that of LoSparse (Li et al., "LoSparse: Structured Compression of Large Language Models based on
Low-Rank and Sparse Approximation", ICML 2023): the low-rank part keeps what pruning removes. Two of its variants
are implemented here (our own code, from that description):

- ``one_shot`` (FusionBench ``SparseLoForLlama``): ``mask`` from magnitude, random or Wanda scores (any of the
  masks of :mod:`fusion_bench.kernels.compression.pruning`); ``S = W * (1 - mask)``; the pruned residual
  ``R = W - S = W * mask`` is approximated by its rank-``r`` truncated SVD ``R_r = U_r diag(s_r) V_r^T``, stored as
  ``B = U_r diag(s_r)`` (out, r) and ``A = V_r^T`` (r, in).
- ``iterative`` (FusionBench ``IterativeSparseLoForLlama``): starting from ``S = W * (1 - mask)``, for
  ``r_k`` in ``linspace(1, r, num_iterations)`` (integers): ``D = W - S``, SVD ``D = U diag(s) V^T``; stop when
  ``sum(s[:r_k]) / sum(s) > 0.99``; else ``S += keep * (U[:, r_k:] diag(s[r_k:]) V[:, r_k:]^T)`` (the part of
  ``D`` beyond rank ``r_k`` moved into the kept entries), so that the residual ``W - S`` becomes closer to low rank
  while ``S`` keeps its sparsity pattern; finally ``B A`` is the rank-``r`` SVD of ``W - S``.

FusionBench's PCP variant (a gradient search of a robust-PCA objective) is not implemented.
"""

from __future__ import annotations

import numpy as np
import torch


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B A`` the best rank-``rank`` approximation of ``matrix`` (Eckart-Young):
    ``B = U_r diag(s_r)``, ``A = V_r^T``; float32 (float64 stays float64)."""
    cd = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    u, s, vh = torch.linalg.svd(matrix.to(cd), full_matrices=False)
    r = max(0, min(int(rank), s.shape[0]))
    return u[:, :r] * s[:r], vh[:r]


def sparselo_one_shot(weight: torch.Tensor, mask: torch.Tensor, rank: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-shot SparseLo of ``weight`` (out, in) with ``mask`` (True = pruned): ``(S, B, A)`` with ``S`` the
    sparse weight and ``B A`` the rank-``rank`` SVD of the pruned residual ``W * mask``."""
    cd = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(cd)
    m = mask.to(w.device)
    S = w.masked_fill(m, 0)
    B, A = truncated_svd(w - S, rank)
    return S, B, A


def sparselo_iterative(weight: torch.Tensor, mask: torch.Tensor, rank: int, num_iterations: int = 10,
                       stop_ratio: float = 0.99) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Iterative SparseLo (see the module docstring): ``(S, B, A, iterations_run)``."""
    cd = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(cd)
    keep = ~mask.to(w.device)
    S = w.masked_fill(~keep, 0)
    done = 0
    for r_k in np.linspace(1, rank, num_iterations, dtype=np.int64):
        D = w - S
        u, s, vh = torch.linalg.svd(D, full_matrices=False)
        r = int(min(s.shape[0] - 1, int(r_k)))
        ratio = float(s[:r].sum() / s.sum()) if float(s.sum()) > 0 else 1.0
        tail = (u[:, r:] * s[r:]) @ vh[r:]
        S = S + keep * tail
        done += 1
        if ratio > stop_ratio:
            break
    B, A = truncated_svd(w - S, rank)
    return S, B, A, done
