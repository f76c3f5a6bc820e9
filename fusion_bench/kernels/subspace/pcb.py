"""PCB-Merging: Parameter Competition Balancing.

Paper: Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024 (official code:
github duguodong7/pcb-merging, ``pcb-merging.py``).

The official code works on the **flattened whole-model** task vectors tau_i (one row of d entries per
task): its clipping quantiles, min-max normalisations and drop threshold are statistics of the
whole row, so a per-tensor computation is not equivalent. Here the whole-model statistics are
computed first (the method's ``prepare`` pass, one tensor at a time) and each tensor is then merged
with them (:func:`pcb_merge`); :func:`pcb_stats` computes them for tensors held in memory.

With ``sorted_i`` the ascending sort of a row and ``q(d, r) = int(d * r)`` (Python's truncation of
the float product, negative indices wrap as in Python):

1. Clip magnitudes: lo_i = sorted(|tau_i|)[q(d, c)], hi_i = sorted(|tau_i|)[q(d, 1 - c) - 1] with
   c = ``clip_ratio`` (1e-4 in the code); a_i = clamp(|tau_i|, lo_i, hi_i); clipped vectors
   tau~_i = sgn(tau_i) * a_i.
2. Intra-balancing: exp(N * ((a_i - lo_i) / (hi_i - lo_i))^2) (min-max normalised within the task).
3. Inter-balancing: tanh(tau_i * sum_j tau_j) (the unclipped task vectors).
4. Score s_i = intra * inter; drop: t_i = sorted(s_i)[q(d, 1 - r)] (r = ``pcb_ratio``), M_i = max s_i,
   w_i = (max(s_i, t_i) - t_i) / (M_i - t_i): the top r of the scores keep positive weights.
5. theta = theta_0 + lambda * sum_i w_i tau~_i / max(sum_i w_i, 1e-12).

Degenerate rows (hi_i = lo_i, or M_i = t_i) give NaN in the official code (0/0); here the
normalised value is 0 there (so an all-zero task vector contributes nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def sorted_index(d: int, frac: float) -> int:
    """int(d * frac) as the official code computes it (float product, truncated)."""
    return int(d * frac)


def wrap(j: int, d: int) -> int:
    """A Python list index j of a length-d row as a non-negative position."""
    return j + d if j < 0 else j


@dataclass
class PCBStats:
    """Whole-model statistics of one task: clip range [lo, hi] and score threshold / maximum."""

    lo: float
    hi: float
    threshold: float = 0.0
    maximum: float = 0.0


def _norm(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    if hi > lo:
        return (x - lo) / (hi - lo)
    return torch.zeros_like(x)


def clipped_abs(tau: torch.Tensor, st: PCBStats) -> torch.Tensor:
    return tau.abs().clamp(st.lo, st.hi)


def pcb_scores(taus: Sequence[torch.Tensor], stats: Sequence[PCBStats]) -> list[torch.Tensor]:
    """Balanced scores s_i = exp(N * norm(a_i)^2) * tanh(tau_i * sum_j tau_j) of one tensor."""
    n = len(taus)
    total = torch.zeros_like(taus[0])
    for t in taus:
        total += t
    out = []
    for t, st in zip(taus, stats):
        intra = torch.exp(n * _norm(clipped_abs(t, st), st.lo, st.hi) ** 2)
        out.append(intra * torch.tanh(t * total))
    return out


def pcb_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], stats: Sequence[PCBStats], *,
              scaling_factor: float = 1.0) -> torch.Tensor:
    """Merge one tensor with whole-model ``stats`` (see the module docstring)."""
    taus = [t - base for t in tensors]
    scores = pcb_scores(taus, stats)
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for t, s, st in zip(taus, scores, stats):
        w = _norm(s.clamp_min(st.threshold), st.threshold, st.maximum)
        num += torch.sign(t) * clipped_abs(t, st) * w
        den += w
    return base + scaling_factor * (num / den.clamp_min(1e-12))


def pcb_stats(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, pcb_ratio: float = 0.1,
              clip_ratio: float = 1e-4) -> list[PCBStats]:
    """The statistics of :func:`pcb_merge` when ``base``/``tensors`` hold the whole model (flattened)."""
    taus = [(t - base).reshape(-1) for t in tensors]
    d = taus[0].numel()
    stats = []
    for t in taus:
        a = t.abs().sort().values
        stats.append(PCBStats(float(a[wrap(sorted_index(d, clip_ratio), d)]),
                              float(a[wrap(sorted_index(d, 1 - clip_ratio) - 1, d)])))
    for st, s in zip(stats, pcb_scores(taus, stats)):
        ss = s.sort().values
        st.threshold = float(ss[wrap(sorted_index(d, 1 - pcb_ratio), d)])
        st.maximum = float(ss[-1])
    return stats
