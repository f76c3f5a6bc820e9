"""Arcee Fusion: keep the fine-tuned entries whose importance is an outlier, the base elsewhere.

Reference: Arcee AI, "Arcee Fusion" (mergekit 0.1.5 ``arcee_fusion``; no paper). Exact variant, per tensor, all
arithmetic in the tensors' dtype:

- importance I = |theta_1 - theta_0| * KL, KL = sum_j p_j log(p_j / q_j) along the last dim (one value per row,
  kept as a column), p = softmax(theta_1) + 1e-8, q = softmax(theta_0) + 1e-8 along the last dim;
- threshold = Q2 + 1.5 (Q3 - Q1) (Tukey's upper fence) of I's entries, Q_k the entry at position
  floor(k/4 (n - 1)) of the ascending sort of I (n entries), or, when n > ``sample_size`` (10^6 in mergekit), of
  ``sample_size`` entries drawn uniformly with replacement;
- theta = theta_0 + (theta_1 - theta_0) m, m = 1 where I >= threshold, else 0, m in float32 (so, as in mergekit,
  half-precision inputs give a float32 result: theta_0 + (theta_1 - theta_0 rounded to the half type)).
"""

from __future__ import annotations

import torch

SAMPLE_SIZE = 1_000_000


def importance(tuned: torch.Tensor, base: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """|tuned - base| times the KL divergence of the rows' softmax distributions (one per row)."""
    p = torch.softmax(tuned, dim=-1) + eps
    q = torch.softmax(base, dim=-1) + eps
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (tuned - base).abs() * kl


def fence(scores: torch.Tensor, sample_size: int = SAMPLE_SIZE,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Q2 + 1.5 (Q3 - Q1) of ``scores`` (0-dim, the scores' dtype); quantiles by floor position in the sort."""
    flat = scores.reshape(-1)
    if flat.numel() > sample_size:
        idx = torch.randint(flat.numel(), (sample_size,), generator=generator)
        flat = flat[idx]
    s = torch.sort(flat).values
    pos = (torch.tensor([0.25, 0.5, 0.75]) * (s.numel() - 1)).long()
    q1, q2, q3 = s[pos]
    return q2 + 1.5 * (q3 - q1)


def arcee_fusion(base: torch.Tensor, tuned: torch.Tensor, sample_size: int = SAMPLE_SIZE,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """theta_0 + (theta_1 - theta_0) [I >= fence(I)].

    Args:
        base: theta_0.
        tuned: theta_1, same shape.
        sample_size: most entries the quantiles are taken over (a uniform sample with replacement beyond).
        generator: the sample's random generator (used only for tensors larger than ``sample_size``).
    """
    imp = importance(tuned, base)
    mask = (imp >= fence(imp, sample_size, generator)).float()
    return base + (tuned - base) * mask
