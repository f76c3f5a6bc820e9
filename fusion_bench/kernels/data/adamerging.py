"""AdaMerging's tensor math: the merged parameters ``theta_0 + sum_i lambda_i tau_i`` and AdaMerging++'s
TIES-processed task vectors.

Papers: Yang et al., ICLR 2024, "AdaMerging: adaptive model merging for multi-task learning" (task-wise and
layer-wise lambdas; AdaMerging++ runs the same adaptation on task vectors processed by TIES-merging's trim and
sign election, Yadav et al., NeurIPS 2023).

AdaMerging++ variant (:func:`ties_task_vectors`), as the paper's code (``ties_merging_split``, K = 20, "dis-sum"):

1. **Trim**, per task over the whole flattened task vector (every merged tensor, names in sorted order): keep
   the entries with ``|tau_i| >= T_i``, ``T_i`` the k-th largest magnitude of ``tau_i`` with
   ``k = round(density * n)`` (ties at ``T_i`` all kept), the others become 0.
2. **Elect** the sign per entry: ``gamma = sgn(sum_i trimmed tau_i)``; where that sum is 0 the sign is the
   majority sign ``sgn(sum over all entries of gamma)`` of the whole model (the paper's
   ``resolve_zero_signs``).
3. **Select**: ``tau_i^++ = trimmed tau_i`` where ``sgn(trimmed tau_i) = gamma``, else 0. These N vectors
   (not their sum) are what the lambdas then scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fusion_bench.kernels.merging.ties import keep_count, kth_largest_abs


def merge_params(base: Mapping[str, torch.Tensor], vectors: Mapping[str, Sequence[torch.Tensor]], keys: Sequence[str],
                 lambdas: torch.Tensor) -> dict[str, torch.Tensor]:
    """``theta_0[k] + sum_i lambda_i[k] tau_i[k]`` for every key (``lambdas``: (tasks,) or (tasks, len(keys)))."""
    out = {}
    for j, k in enumerate(keys):
        lam = lambdas[:, j] if lambdas.ndim == 2 else lambdas
        out[k] = base[k] + sum(lam[i] * t for i, t in enumerate(vectors[k]))
    return out


def ties_task_vectors(vectors: Mapping[str, Sequence[torch.Tensor]], density: float) -> dict[str, list[torch.Tensor]]:
    """AdaMerging++'s task vectors: each task's ``tau_i`` trimmed globally to its top ``density`` magnitudes,
    then restricted to the entries agreeing with the elected sign (see the module docstring).

    Args:
        vectors: tensor name -> the N task vectors of that tensor (same shapes across tasks).
        density: share of each task vector's entries kept (0, 1].
    Returns:
        tensor name -> the N processed task vectors (new tensors).
    """
    keys = sorted(vectors)
    if not keys:
        return {}
    n_tasks = len(vectors[keys[0]])
    thresholds = []
    for i in range(n_tasks):
        flat = torch.cat([vectors[k][i].reshape(-1) for k in keys])
        k = keep_count(flat.numel(), density)
        thresholds.append(float("inf") if k == 0 else kth_largest_abs(flat, k))
        del flat
    trimmed = {k: [torch.where(v.abs() >= thresholds[i], v, torch.zeros_like(v)) for i, v in enumerate(vectors[k])]
               for k in keys}
    signs = {k: torch.sign(torch.stack(trimmed[k]).sum(0)) for k in keys}
    majority = torch.sign(sum(s.sum() for s in signs.values()))
    out = {}
    for k in keys:
        gamma = torch.where(signs[k] == 0, majority, signs[k])
        out[k] = [torch.where(torch.sign(t) == gamma, t, torch.zeros_like(t)) for t in trimmed[k]]
    return out
