"""RAM, Reinforced Agent Merging: average each parameter over the models that changed it (arXiv 2601.13572).

Exact variant (mergekit 0.1.5 ``ram`` / ``ramplus_tl``), per tensor, in the tensors' dtype: tau_i = theta_i -
theta_0; model i contributes at an entry where |tau_i| > epsilon; c = number of contributors there;

- ``ram``: theta = theta_0 + sum_i tau_i [contributes] ([c = 1] + [c > 1] / c), i.e. the mean of the
  contributing task vectors (0 where none contributes);
- ``ramplus_tl`` (tensor-local RAM+): the entries only model i changes are scaled by
  lambda_i = 1 + r clamp(rho_i, 0, alpha), rho_i = (entries i shares with others) / max(entries only i
  changes, epsilon), counted over the tensor; shared entries are averaged as in ``ram``. The lambdas are
  float32, so half-precision inputs give a float32 sum (as mergekit).
"""

from __future__ import annotations

import torch


def _masks(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float):
    tv = torch.stack([t - base for t in tensors]).reshape(len(tensors), -1)
    nz = tv.abs() > epsilon
    counts = nz.sum(dim=0, keepdim=True)
    return tv, nz, counts, counts > 1, counts == 1


def ram(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    """theta_0 + the mean of the task vectors that exceed ``epsilon`` in magnitude, entry by entry.

    Args:
        base: theta_0.
        tensors: theta_1..theta_N, each the shape of ``base``.
        epsilon: an entry of tau_i counts as changed when |tau_i| > epsilon.
    """
    if not tensors:
        return base
    tv, nz, counts, shared, unique = _masks(tensors, base, epsilon)
    z = tv * nz
    merged = (z * unique + z * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape(base.shape)


def ramplus_tl(base: torch.Tensor, tensors: list[torch.Tensor], r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> torch.Tensor:
    """RAM with the entries only model i changes scaled by 1 + r clamp(shared_i / unique_i, 0, alpha).

    Args:
        base: theta_0.
        tensors: theta_1..theta_N.
        r: the rescaling strength.
        alpha: the cap on the shared-to-unique ratio.
        epsilon: the change threshold (also the floor of the unique count).
    """
    if not tensors:
        return base
    tv, nz, counts, shared, unique = _masks(tensors, base, epsilon)
    rho = (nz & shared).sum(dim=1) / (nz & unique).sum(dim=1).clamp(min=epsilon)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    z = tv * nz
    merged = (z * unique * lam.unsqueeze(-1) + z * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape(base.shape)
