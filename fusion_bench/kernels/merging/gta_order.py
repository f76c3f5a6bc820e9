"""The merge step of generalized task arithmetic in the tensors' own dtype, in mergekit 0.1.5's order of operations.

Same formula as :func:`fusion_bench.kernels.merging.sparsify.gta_merge` (theta_0 + lambda * sum_i w_i tau_i m_i
[/ sum_i w_i m_i]), evaluated the way mergekit evaluates it so that bfloat16/float16 results round alike:

1. the (sparsified) task vectors are stacked, and the weights are a tensor of the same dtype (so rounded to it);
2. every task vector is multiplied by its weight;
3. with consensus ``sum`` the elected sign is +1 where the sum over models of w_i tau_i is >= 0, else -1 (``count``:
   the sum of the signs); an entry takes part where its sign equals the elected one (zeros never do); the divisor
   is the sum of the participating weights (1 where none takes part); without consensus every entry takes part
   and the divisor is sum_i w_i (1 where |sum| < 1e-8);
4. the participating products are summed over the models; with ``normalize`` divided by the divisor;
5. multiplied by lambda (when lambda != 1) and added to theta_0, all in the dtype.

Paper: Ilharco et al. 2023 / Yadav et al. 2023 (TIES) as combined by mergekit's generalized task arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def gta_merge_ordered(base: torch.Tensor, taus: Sequence[torch.Tensor], weights: Sequence[float], *,
                      consensus: str = "none", normalize: bool = False, scaling_factor: float = 1.0) -> torch.Tensor:
    """theta_0 + lambda * merged task vectors, computed in ``base.dtype`` in mergekit's order (module docstring).

    Args:
        base: theta_0 (its dtype is the compute dtype).
        taus: the sparsified task vectors (same shape and dtype as ``base``).
        weights: w_i, one per task vector.
        consensus: 'none', 'sum' or 'count'.
        normalize: divide by the participating weights' sum.
        scaling_factor: lambda.
    """
    if not taus:
        return base
    deltas = torch.stack(list(taus), dim=0)
    w = torch.tensor([float(x) for x in weights], dtype=deltas.dtype, device=deltas.device)
    w = w.reshape(-1, *([1] * base.dim()))
    deltas.mul_(w)
    if consensus == "none":
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    elif consensus in ("sum", "count"):
        sign = deltas.sign()
        vote = deltas.sum(dim=0) if consensus == "sum" else sign.sum(dim=0)
        elected = (vote >= 0).to(deltas.dtype) * 2 - 1
        agree = sign == elected
        mixed = (deltas * agree).sum(dim=0)
        if normalize:  # (the divisor is only needed then)
            divisor = (w * agree).sum(dim=0)
            divisor[divisor == 0] = 1
    else:
        raise ValueError(f"unknown consensus {consensus!r}; use none, sum or count")
    if normalize:
        mixed /= divisor
    if scaling_factor != 1:
        mixed *= scaling_factor
    return base + mixed
