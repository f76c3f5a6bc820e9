"""Concrete (relaxed Bernoulli) masks of Concrete subspace learning.

Paper: Tang et al. 2023, "Concrete Subspace Learning based Interference Elimination for Multi-task Model Fusion".
One mask ``M`` over every merged parameter entry, shared by all task vectors, with logits ``l``:

- continuous sample (the Concrete / Gumbel-sigmoid relaxation, temperature ``T``):
  ``M = sigmoid((l + log u - log(1 - u)) / T)``, ``u ~ U(0, 1)`` (reparameterised: gradients reach ``l``);
- discrete sample: ``M = 1[u < sigmoid(l)]``;
- every tensor's mask is divided by its mean (as the authors' code), so the mask rescales rather than shrinks;
- merged parameters ``theta = theta_0 + M * sum_i lambda_i tau_i``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def sample_concrete_mask(logits: Mapping[str, torch.Tensor], temperature: float, generator: torch.Generator,
                         discrete: bool = False) -> dict[str, torch.Tensor]:
    """One mask per tensor, each normalised by its mean (see the module docstring). Uniform noise is drawn on the
    CPU from ``generator`` in the order of ``logits`` (so a seed gives the same mask on any device)."""
    eps = torch.finfo(torch.float32).eps
    out = {}
    for k, lg in logits.items():
        u = torch.rand(lg.shape, generator=generator).clamp(eps, 1 - eps).to(lg.device)
        if discrete:
            m = (u < torch.sigmoid(lg)).to(lg.dtype)
        else:
            m = torch.sigmoid((lg + torch.log(u) - torch.log1p(-u)) / temperature)
        mean = m.mean()
        out[k] = m / mean if float(mean.detach()) != 0.0 else m
    return out


def masked_merge(theta0: Mapping[str, torch.Tensor], vectors: Mapping[str, list[torch.Tensor]], keys: list[str],
                 lambdas: torch.Tensor, mask: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``theta_0[k] + mask[k] * sum_i lambda_i[k] tau_i[k]`` (``lambdas``: (tasks,) or (tasks, len(keys)))."""
    out = {}
    for j, k in enumerate(keys):
        lam = lambdas[:, j] if lambdas.ndim == 2 else lambdas
        out[k] = theta0[k] + mask[k] * sum(lam[i] * t for i, t in enumerate(vectors[k]))
    return out
