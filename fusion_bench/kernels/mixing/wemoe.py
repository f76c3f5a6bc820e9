"""Weight-ensembling mixture of experts (WEMoE) and its sparse variant: the tensor math.

Tang, Shen, Du, Luong, Tao, "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts",
ICML 2024 (arXiv 2402.00433); sparse variant: Shen, Tang, Yang, ..., "Efficient and Effective
Weight-Ensembling Mixture of Experts for Multi-Task Model Merging" (E-WEMoE, arXiv 2410.21804).

- :func:`weight_ensemble`: the routed weights ``W(x) = W_0 + sum_i r_i(x) tau_i`` of one tensor, for
  one routing vector or one per sample (routing weights are raw router outputs: no softmax, no
  normalisation, as FusionBench's ``WeightEnsemblingMoE``).
- :func:`sample_routing`: a router's per-token outputs (batch, tokens, experts) averaged over the
  tokens (one routing vector per sample), and optionally over the batch (FusionBench's
  ``batch_reduce``, used during test-time adaptation).
- :func:`magnitude_prune`: a task vector with all but its largest-magnitude entries set to zero
  (E-WEMoE's sparse task vectors); keeps exactly ``round((1 - ratio) * n)`` entries.
- :func:`prediction_entropy`: the test-time adaptation objective, mean Shannon entropy of the
  softmax of a batch of logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def weight_ensemble(base: torch.Tensor, task_vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``base + sum_i weights[..., i] * task_vectors[i]`` in float32 (or float64 for float64 inputs).

    Args:
        base: the pretrained tensor, shape ``S``.
        task_vectors: the experts' task vectors stacked, shape ``(T, *S)`` (any float dtype; upcast).
        weights: routing weights, shape ``(T,)`` (one merged tensor, shape ``S``) or ``(B, T)`` (one per
            sample, shape ``(B, *S)``).
    """
    if task_vectors.shape[1:] != base.shape:
        raise ValueError(f"task vectors of shape {tuple(task_vectors.shape)} do not stack tensors of shape "
                         f"{tuple(base.shape)}")
    if weights.shape[-1] != task_vectors.shape[0] or weights.ndim not in (1, 2):
        raise ValueError(f"routing weights of shape {tuple(weights.shape)} for {task_vectors.shape[0]} experts")
    cd = torch.float64 if base.dtype == torch.float64 else torch.float32
    tv = task_vectors.to(cd).reshape(task_vectors.shape[0], -1)
    delta = weights.to(cd) @ tv  # (..., numel)
    return base.to(cd) + delta.reshape(*weights.shape[:-1], *base.shape)


def sample_routing(token_weights: torch.Tensor, batch_reduce: bool = False) -> torch.Tensor:
    """Per-sample routing weights from per-token router outputs.

    Args:
        token_weights: ``(B, L, T)`` router outputs for every token (batch first), or ``(T,)`` from an
            input-independent router (returned as is).
        batch_reduce: also average over the batch, giving one ``(T,)`` vector for the whole batch.
    Returns:
        ``(B, T)`` (mean over tokens), or ``(T,)`` when ``batch_reduce``.
    """
    if token_weights.ndim == 1:
        return token_weights
    if token_weights.ndim != 3:
        raise ValueError(f"token routing weights must be (batch, tokens, experts), got {tuple(token_weights.shape)}")
    w = token_weights.mean(dim=1)
    return w.mean(dim=0) if batch_reduce else w


def kept_count(numel: int, ratio: float) -> int:
    """Entries kept when pruning a fraction ``ratio`` of ``numel``: ``round((1 - ratio) * numel)``
    (half-up), at least 0 and at most ``numel``."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"prune ratio must be in [0, 1], got {ratio}")
    return max(0, min(numel, int(math.floor((1.0 - ratio) * numel + 0.5))))


def magnitude_prune(t: torch.Tensor, ratio: float) -> torch.Tensor:
    """``t`` with every entry set to zero except the ``round((1 - ratio) * numel)`` of largest magnitude.

    E-WEMoE prunes each task-vector tensor by magnitude (FusionBench: ``|t| > quantile(|t|, ratio)``, which
    keeps about the same fraction; here the count is exact, ties broken by ``torch.topk``).
    """
    n = t.numel()
    k = kept_count(n, ratio)
    if k == n:
        return t.clone()
    out = torch.zeros_like(t)
    if k == 0:
        return out
    flat = t.reshape(-1)
    idx = torch.topk(flat.abs().float(), k, sorted=False).indices
    out.reshape(-1)[idx] = flat[idx]
    return out


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the Shannon entropy (nats) of ``softmax(logits)``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def layer_position_encoding(layer_idx: int, dim: int) -> torch.Tensor:
    """Sinusoidal encoding of a layer index (E-WEMoE's shared router input suffix): ``[sin(p w_j), cos(p w_j)]``
    with ``w_j = 10000^(-2j/dim)``, ``j < dim // 2``."""
    j = torch.arange(dim // 2, dtype=torch.float64)
    rates = 1.0 / torch.pow(torch.tensor(10000.0, dtype=torch.float64), 2 * j / dim)
    return torch.cat([torch.sin(layer_idx * rates), torch.cos(layer_idx * rates)]).float()
