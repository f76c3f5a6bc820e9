"""DARE kernels: random drop of delta entries with rescaling, then task arithmetic or TIES.

Paper: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch" (ICML 2024). DARE (Drop And REscale) sets each entry of a task vector
tau = theta_i - theta_0 to 0 independently with probability p and multiplies the kept entries by
1 / (1 - p), so that E[DARE(tau)] = tau.

Variant implemented: entry j is dropped when u_j < p, where u = ``torch.rand(tau.shape,
generator=g)`` (float32 uniforms on [0, 1)) and ``g`` is the caller's generator (methods seed it
per tensor and per model, so results do not depend on the order tensors are visited). p = 0
keeps everything unchanged (no random numbers are drawn). ``rescale=False`` keeps the kept
entries as they are (the "DropOnly" ablation of the paper).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusion_bench.kernels.merging.ties import DisjointMerge, SignElection, _chunked_sign_merge


def dare_mask(shape: torch.Size | Sequence[int], p: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean keep-mask: True where u_j >= p for u ~ U[0, 1) drawn from ``generator``."""
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float32) >= p


def dare(tau: torch.Tensor, p: float, generator: torch.Generator | None, rescale: bool = True) -> torch.Tensor:
    """Drop And REscale one task vector: keep entries with u_j >= p, scale them by 1/(1-p).

    Paper: Yu et al., ICML 2024, Eq. (1)-(2) (see the module docstring for the exact draw).

    Args:
        tau: the task vector (delta) theta_i - theta_0.
        p: drop probability in [0, 1]; p = 1 drops everything (then ``rescale`` must be False).
        generator: source of the uniforms (required when 0 < p).
        rescale: multiply kept entries by 1 / (1 - p).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"DARE drop probability p={p} is outside [0, 1]")
    if p == 0.0:
        return tau.clone()
    if rescale and p >= 1.0:
        raise ValueError("DARE with rescale needs p < 1 (1/(1-p) is infinite)")
    if generator is None:
        raise ValueError("DARE with p > 0 needs a seeded generator")
    keep = dare_mask(tau.shape, p, generator)
    out = tau * keep
    if rescale:
        out.div_(1.0 - p)
    return out


def dare_task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], p: float,
                         generators: Sequence[torch.Generator | None], scaling_factor: float = 0.3,
                         rescale: bool = True) -> torch.Tensor:
    """theta = theta_0 + lambda * sum_i DARE(theta_i - theta_0).

    Paper: Yu et al., ICML 2024 (DARE as a plug-in before task arithmetic, Ilharco et al. 2023).

    Args:
        base: theta_0.
        tensors: theta_i, same shape and dtype.
        p: drop probability.
        generators: one generator per model (same order as ``tensors``).
        scaling_factor: lambda.
        rescale: rescale kept entries by 1/(1-p).
    """
    out = base.clone()
    for t, g in zip(tensors, generators):
        out.add_(dare(t - base, p, g, rescale), alpha=scaling_factor)
    return out


def dare_ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], p: float,
              generators: Sequence[torch.Generator | None], scaling_factor: float = 0.3, rescale: bool = True,
              sign_election: SignElection = "mass", merge: DisjointMerge = "mean") -> torch.Tensor:
    """DARE on every task vector, then TIES sign election and disjoint merge (no top-k trim).

    Paper: Yu et al., ICML 2024, combined with TIES (Yadav et al., NeurIPS 2023) as mergekit's
    ``dare_ties``: tau~_i = DARE(tau_i); gamma = sgn(sum_i tau~_i) (or by count); merged = mean of
    the tau~_i whose sign equals gamma (0 where gamma = 0); theta = theta_0 + lambda * merged.

    Args:
        base: theta_0.
        tensors: theta_i, same shape and dtype.
        p: drop probability.
        generators: one generator per model.
        scaling_factor: lambda.
        rescale: rescale kept entries by 1/(1-p).
        sign_election: 'mass' or 'count'.
        merge: disjoint merge, 'mean', 'sum' or 'max'.
    """
    gens = list(generators)
    return _chunked_sign_merge(base, tensors, None, scaling_factor, sign_election, merge,
                               transform=lambda i, tau: dare(tau, p, gens[i], rescale))
