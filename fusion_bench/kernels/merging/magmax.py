"""MagMax kernel: per parameter, the task-vector entry of maximum magnitude across models.

Paper: Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning"
(ECCV 2024). Variant implemented (the merging step, Eq. 3 of the paper): for every entry j,
tau_max[j] = tau_{i*}[j] with i* = argmax_i |tau_i[j]|, and theta = theta_0 + lambda * tau_max.
**Ties in magnitude** (|tau_a[j]| = |tau_b[j]|, e.g. +x and -x) pick the larger signed value,
so the result does not depend on the order of the models.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from fusion_bench.kernels.merging.ties import CHUNK, parallel_ranges


def max_magnitude(taus: Iterable[torch.Tensor]) -> torch.Tensor:
    """Entry-wise the value of largest magnitude across ``taus`` (ties: the larger signed value)."""
    it = iter(taus)
    best = next(it).clone()
    best_abs = best.abs()
    for tau in it:
        a = tau.abs()
        better = (a > best_abs) | ((a == best_abs) & (tau > best))
        best = torch.where(better, tau, best)
        best_abs = torch.where(better, a, best_abs)
    return best


def magmax(base: torch.Tensor, tensors: Sequence[torch.Tensor], scaling_factor: float = 1.0) -> torch.Tensor:
    """theta = theta_0 + lambda * tau_max, tau_max = entry-wise max-magnitude task vector.

    Paper: Marczak et al., ECCV 2024 (see the module docstring for the tie rule). Same arithmetic
    as :func:`max_magnitude`, in serial cache-sized chunks split across Python threads (see
    :func:`fusion_bench.kernels.merging.ties.parallel_ranges`).

    Args:
        base: theta_0.
        tensors: theta_i of the N models, same shape and dtype as ``base``.
        scaling_factor: lambda.
    """
    fb = base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    out = torch.empty_like(fb)

    def run(lo: int, hi: int) -> None:
        size = min(CHUNK, max(hi - lo, 1))
        best, best_abs, tau, a = (torch.empty(size, dtype=fb.dtype) for _ in range(4))
        better, tie = torch.empty(size, dtype=torch.bool), torch.empty(size, dtype=torch.bool)
        for start in range(lo, hi, size):
            c = min(size, hi - start)
            b = fb[start:start + c]
            bt, ba, tt, aa, m, q = best[:c], best_abs[:c], tau[:c], a[:c], better[:c], tie[:c]
            torch.sub(flats[0][start:start + c], b, out=bt)
            torch.abs(bt, out=ba)
            for f in flats[1:]:
                torch.sub(f[start:start + c], b, out=tt)
                torch.abs(tt, out=aa)
                torch.gt(aa, ba, out=m)
                torch.eq(aa, ba, out=q)
                q.logical_and_(tt > bt)  # equal magnitude: the larger signed value
                m.logical_or_(q)
                torch.where(m, tt, bt, out=bt)
                torch.where(m, aa, ba, out=ba)
            torch.add(b, bt, alpha=scaling_factor, out=out[start:start + c])

    parallel_ranges(fb.numel(), run)
    return out.reshape(base.shape)
