"""Task Singular Vectors: TSV-Merge and TSV-Compress of one tensor (pure tensor math, no I/O).

Paper: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025
(arXiv 2412.00081). Exact variant, as the authors' code computes it (TSV-M: ``compute_and_sum_svd_mem_reduction``;
TSV-C: ``compress_tv``):

- Task matrices Delta_i = theta_i - theta_0 of a 2-D tensor (m x n, k = min(m, n)); thin SVD
  Delta_i = U_i diag(s_i) V_i^T.
- Per-task rank r = int(k * (1 / T)) (T = number of tasks), the authors' expression: k // T except where the
  float product rounds just below an integer (e.g. k = T = 49 gives 0).
- TSV-M: concatenate the top-r parts of every task, U = [U_1,r ... U_T,r] (m x T r), s = [s_1,r ... s_T,r],
  V^T = [V_1,r^T; ...; V_T,r^T] (T r x n); replace U and V^T by their nearest orthogonal matrices
  (polar factor: P Q^T from the SVD P S Q^T of the concatenation, the "whitening" of the paper), and
  reconstruct Delta = U_perp diag(s) V_perp^T. The authors pad U to m x k with zero columns (and V^T with zero
  rows); the polar factor of the compact concatenation is the same on the non-zero blocks whenever the
  concatenation has full column rank, and the padded columns meet a zero singular value.
- Tensors that are not 2-D: the mean task vector (the authors average them).
- TSV-C: task i keeps the top-r SVD of its task matrix: Delta_i ~ U_i,r diag(s_i,r) V_i,r^T.

The SVDs run in the inputs' dtype (float32, or float64 for float64 inputs). Sign flips of singular vector
pairs do not change any result (the polar factor commutes with diagonal +-1 factors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def per_task_rank(k: int, num_tasks: int) -> int:
    """Singular components kept per task: ``int(k * (1 / num_tasks))`` (the authors' expression)."""
    if num_tasks < 1:
        raise ValueError("per_task_rank needs at least one task")
    return int(k * (1.0 / num_tasks))


def fraction_rank(k: int, fraction: float) -> int:
    """``int(k * fraction)``: the rank TSV-C keeps for a rank fraction (the authors' ``int(s.shape[0] * sv_reduction)``)."""
    return int(k * fraction)


def nearest_orthogonal(x: torch.Tensor) -> torch.Tensor:
    """The polar factor P Q^T of ``x`` (P S Q^T its thin SVD): the matrix with orthonormal columns (or rows)
    nearest to ``x`` in Frobenius norm."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``rank`` thin SVD factors (U_r (m x r), s_r (r,), V_r^T (r x n)) of a 2-D tensor."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank, :]


def tsv_merge_delta(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TSV-M merged task matrix of 2-D task matrices ``deltas`` (see the module docstring).

    Returns zeros when the per-task rank is 0 (fewer singular values than tasks), as the authors' code does.
    """
    if not deltas:
        raise ValueError("tsv_merge_delta needs at least one task matrix")
    d0 = deltas[0]
    if d0.dim() != 2:
        raise ValueError(f"tsv_merge_delta needs 2-D task matrices, got shape {tuple(d0.shape)}")
    r = per_task_rank(min(d0.shape), len(deltas))
    if r == 0:
        return torch.zeros_like(d0)
    parts = [truncated_svd(d, r) for d in deltas]
    u = torch.cat([p[0] for p in parts], dim=1)
    s = torch.cat([p[1] for p in parts])
    vh = torch.cat([p[2] for p in parts], dim=0)
    u_perp = nearest_orthogonal(u)
    vh_perp = nearest_orthogonal(vh)
    return (u_perp * s) @ vh_perp


def tsv_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], scaling_factor: float = 1.0,
              use_svd: bool | None = None) -> torch.Tensor:
    """TSV-M of one tensor: theta_0 + alpha * (TSV merged task matrix for 2-D tensors, mean task vector else).

    Args:
        base: theta_0 (float32 or float64).
        tensors: theta_i of the T models, same shape and dtype as ``base``.
        scaling_factor: alpha (1.0 in the paper).
        use_svd: merge by SVD (default: when the tensor is 2-D); False averages the task vectors.
    """
    deltas = [t - base for t in tensors]
    if use_svd is None:
        use_svd = base.dim() == 2
    if use_svd:
        merged = tsv_merge_delta(deltas)
    else:
        merged = sum(deltas[1:], deltas[0].clone()) / len(deltas)
    return base + scaling_factor * merged


def tsv_compress_delta(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """TSV-C reconstruction of one task matrix from its top-``rank`` singular components (zeros for rank 0)."""
    if delta.dim() != 2:
        raise ValueError(f"tsv_compress_delta needs a 2-D task matrix, got shape {tuple(delta.shape)}")
    if rank <= 0:
        return torch.zeros_like(delta)
    u, s, vh = truncated_svd(delta, rank)
    return (u * s) @ vh


def low_rank_elements(shape: Sequence[int], rank: int) -> int:
    """Stored elements of a rank-``rank`` factorisation of an m x n matrix: r * (m + n + 1)."""
    m, n = shape
    return rank * (m + n + 1)
