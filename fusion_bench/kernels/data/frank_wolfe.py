"""Frank-Wolfe merging's linear minimisation oracle and step size.

Paper: Chen et al. 2025, "FW-Merging: Scaling Model Merging with Frank-Wolfe Optimization". Variant (as the
authors' FusionBench code): the oracle scores a candidate checkpoint ``c`` by ``sum_p cos(g_p, theta_c,p)`` over
parameter tensors ``p`` (the cosine of the loss gradient with the candidate's *weights*, not its task vector) and
picks the minimum (``granularity=task``), or picks per tensor (``granularity=layer``). A tensor whose gradient or
weights are all zero scores 0 (its cosine is undefined). Step size ``gamma_t = 2 / (t + 2) * step_size``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """``<a, b> / (|a| |b|)`` of the flattened tensors (0 when either is all zeros)."""
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(torch.dot(a.reshape(-1).double(), b.reshape(-1).double())) / (na * nb)


def fw_select(grads: Mapping[str, torch.Tensor], candidates: Mapping[str, Mapping[str, torch.Tensor]],
              granularity: str = "task", exclude: Mapping[str, set[str]] | None = None
              ) -> tuple[dict[str, str], dict[str, float]]:
    """The oracle: for every tensor name, the chosen candidate.

    Args:
        grads: tensor name -> loss gradient at the current point.
        candidates: candidate name -> its tensors (at least the names in ``grads``).
        granularity: ``task`` (one candidate for all tensors, min of the summed cosines) or ``layer`` (per tensor).
        exclude: tensor name -> candidates not allowed for it (soft variant: already picked this iteration); in
            ``task`` granularity a candidate is excluded when it is excluded for the first tensor.
    Returns:
        (tensor name -> candidate name, candidate name -> summed cosine score). Ties go to the first candidate.
    """
    keys = list(grads)
    exclude = exclude or {}
    cos = {c: {k: cosine(grads[k], w[k]) for k in keys} for c, w in candidates.items()}
    scores = {c: sum(v.values()) for c, v in cos.items()}
    if granularity == "task":
        allowed = [c for c in candidates if c not in exclude.get(keys[0], set())] or list(candidates)
        best = min(allowed, key=lambda c: scores[c])
        return {k: best for k in keys}, scores
    if granularity != "layer":
        raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}")
    out = {}
    for k in keys:
        allowed = [c for c in candidates if c not in exclude.get(k, set())] or list(candidates)
        out[k] = min(allowed, key=lambda c: cos[c][k])
    return out, scores


def fw_step_size(t: int, step_size: float) -> float:
    """``2 / (t + 2) * step_size`` for iteration ``t`` (0-based)."""
    return 2.0 / (t + 2) * step_size
