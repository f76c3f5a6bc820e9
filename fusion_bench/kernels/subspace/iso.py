"""Isotropic merging: Iso-C and Iso-CTS of one tensor (pure tensor math, no I/O).

Paper: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", 2025 (arXiv 2502.04959). Exact variant, as the authors' code (``src/utils/iso.py``) computes it,
for a 2-D tensor (m x n, k = min(m, n)) with task matrices Delta_i = theta_i - theta_0, T tasks:

- Iso-C: M = sum_i Delta_i = U diag(s) V^T (thin SVD); merged Delta = U (mean(s) I) V^T, i.e. every singular
  value of the task-arithmetic sum replaced by their mean (a flat spectrum).
- Iso-CTS: common size c = int(k * f) (f = common_space_fraction); the task-specific budget is made divisible by
  T: per task p = round((k - c) / T) (Python's round, half to even), c = k - T p. Common subspace: the top-c
  singular triplets (U_c, s_c, V_c) of M. Task i: the top-p singular triplets of
  Delta_i - U_c U_c^T Delta_i (its task matrix with the common left subspace projected out). The T task blocks
  and then the common block are concatenated into U (m x k), s (k), V^T (k x n); U and V^T are replaced by their
  nearest orthogonal matrices (polar factor P Q^T from their SVD P S Q^T) and every singular value by mean(s)
  (the mean over all k kept values, common and task-specific). Merged Delta = U_perp (mean(s) I) V_perp^T.
  Where the rounded budget T p exceeds k (only for tiny c, e.g. k = 7, T = 2, c = 0, where the authors' code
  would fail), p = k // T instead.
- Tensors that are not 2-D: the mean task vector (the authors average them).

The model is theta_0 + alpha * merged Delta. SVDs run in the inputs' dtype (float32, or float64 for float64
inputs); sign flips of singular vector pairs do not change the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusion_bench.kernels.subspace.tsv import nearest_orthogonal


def _mean(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum(deltas[1:], deltas[0].clone()) / len(deltas)


def _check_2d(deltas: Sequence[torch.Tensor], fn: str) -> None:
    if not deltas:
        raise ValueError(f"{fn} needs at least one task matrix")
    if deltas[0].dim() != 2:
        raise ValueError(f"{fn} needs 2-D task matrices, got shape {tuple(deltas[0].shape)}")


def iso_c_delta(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Iso-C merged task matrix: the sum of ``deltas`` with its singular values replaced by their mean."""
    _check_2d(deltas, "iso_c_delta")
    m = sum(deltas[1:], deltas[0].clone())
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u * s.mean()) @ vh


def iso_cts_split(k: int, num_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common size c, per-task size p) with c + num_tasks * p = k (see the module docstring)."""
    if num_tasks < 1:
        raise ValueError("iso_cts_split needs at least one task")
    c = int(k * common_space_fraction)
    p = round((k - c) / num_tasks)
    if p * num_tasks > k:
        p = k // num_tasks
    return k - p * num_tasks, p


def iso_cts_delta(deltas: Sequence[torch.Tensor], common_space_fraction: float = 0.8) -> torch.Tensor:
    """Iso-CTS merged task matrix of 2-D task matrices ``deltas`` (see the module docstring)."""
    _check_2d(deltas, "iso_cts_delta")
    k = min(deltas[0].shape)
    c, p = iso_cts_split(k, len(deltas), common_space_fraction)
    m = sum(deltas[1:], deltas[0].clone())
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    uc, sc, vhc = u[:, :c], s[:c], vh[:c, :]
    us, ss, vhs = [], [], []
    if p > 0:
        for d in deltas:
            d_ts = d - uc @ (uc.T @ d)
            ut, st, vht = torch.linalg.svd(d_ts, full_matrices=False)
            us.append(ut[:, :p])
            ss.append(st[:p])
            vhs.append(vht[:p, :])
    u_all = torch.cat([*us, uc], dim=1)
    s_all = torch.cat([*ss, sc])
    vh_all = torch.cat([*vhs, vhc], dim=0)
    u_perp = nearest_orthogonal(u_all)
    vh_perp = nearest_orthogonal(vh_all)
    return (u_perp * s_all.mean()) @ vh_perp


def iso_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], scaling_factor: float = 1.0, *,
              variant: str = "c", common_space_fraction: float = 0.8, use_svd: bool | None = None) -> torch.Tensor:
    """Iso-C (``variant='c'``) or Iso-CTS (``variant='cts'``) of one tensor: theta_0 + alpha * merged Delta
    (the isotropic merge for 2-D tensors, the mean task vector else).

    Args:
        base: theta_0 (float32 or float64).
        tensors: theta_i of the T models, same shape and dtype as ``base``.
        scaling_factor: alpha.
        variant: 'c' or 'cts'.
        common_space_fraction: f of Iso-CTS.
        use_svd: merge by SVD (default: when the tensor is 2-D); False averages the task vectors.
    """
    if variant not in ("c", "cts"):
        raise ValueError(f"unknown isotropic merging variant {variant!r}; use 'c' or 'cts'")
    deltas = [t - base for t in tensors]
    if use_svd is None:
        use_svd = base.dim() == 2
    if not use_svd:
        merged = _mean(deltas)
    elif variant == "c":
        merged = iso_c_delta(deltas)
    else:
        merged = iso_cts_delta(deltas, common_space_fraction)
    return base + scaling_factor * merged
