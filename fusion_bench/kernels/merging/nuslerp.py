"""NuSLERP and Multi-SLERP: spherical interpolation of two or more tensors (or task vectors).

Variants implemented (mergekit 0.1.5's ``nuslerp`` and ``multislerp``, written from their documented
semantics):

- :func:`nuslerp`: SLERP of two tensors v0, v1 at t with the angle taken between their unit directions,
  either over the whole flattened tensor (``flatten``), per row (``row_wise``: along dim 0, i.e. per
  column of the stored matrix seen along its first axis) or along the last dim (rows of a matrix).
  Directions are v / max(|v|, 1e-7); cos is clamped to [-1, 1]; where 1 - cos^2 <= eps^2 (colinear) the
  linear interpolation (1 - t) v0 + t v1 is returned, elsewhere
  (sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta) on the raw (unnormalised) vectors.
- :func:`multislerp`: barycentric interpolation on the hypersphere (Goddard, "Multi-SLERP"): each
  flattened input's direction u_i = x_i / (|x_i| + eps); their weighted mean m (weights normalised to
  sum 1 by default) is normalised; the directions are projected to the tangent space at m, averaged with
  the weights, mapped back with the exponential map exp_m(v) = m cos|v| + v sin|v| / |v| (|v| + eps),
  and scaled by the weighted mean of the norms. One input is returned unchanged; a (near) zero mean
  direction falls back to the weighted sum for two inputs and is an error for more.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-7)


def nuslerp(v0: torch.Tensor, v1: torch.Tensor, t: float, row_wise: bool = False, flatten: bool = True,
            eps: float = 1e-8) -> torch.Tensor:
    """SLERP of ``v0`` (t = 0) and ``v1`` (t = 1) over the whole tensor, per row or along the last dim.

    Paper: Shoemake 1985; variant: mergekit 0.1.5 ``nuslerp`` (see the module docstring).

    Args:
        v0: the first tensor.
        v1: the second tensor (same shape).
        t: the interpolation parameter.
        row_wise: when not ``flatten``, interpolate the vectors along dim 0 (else along the last dim).
        flatten: one angle for the whole flattened tensor (wins over ``row_wise``).
        eps: colinearity threshold: linear interpolation where 1 - cos^2 <= eps^2.
    """
    shape = v0.shape
    transposed = False
    if flatten:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif row_wise and v0.dim() > 1:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
        transposed = True
    else:
        a, b = v0, v1
    cos = torch.sum(_unit_rows(a) * _unit_rows(b), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / sin
    out = torch.where(colinear, (1 - t) * a + t * b, out)
    if transposed:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def multislerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None = None,
               normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Barycentric SLERP of ``tensors`` (task vectors from ``base`` when given) with ``weights``.

    Reference: Goddard, "Multi-SLERP" (goddard.blog); variant: mergekit 0.1.5 ``multislerp`` (see the module
    docstring).

    Args:
        tensors: the inputs (same shape).
        weights: one weight per input.
        base: when given, interpolate theta_i - base and add base back.
        normalize_weights: divide the weights by their sum.
        eps: added to norms before dividing.
    Raises:
        ValueError: the weighted mean direction is (near) zero for three or more inputs.
    """
    if len(tensors) == 1:
        return tensors[0]
    x = torch.stack(list(tensors), dim=0)
    if base is not None:
        x = x - base
    n = x.shape[0]
    flat = x.reshape(n, -1)
    w = torch.tensor([float(v) for v in weights], dtype=x.dtype, device=x.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    unit = flat / (norms + eps)
    mean = (unit * w.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if n != 2:
            raise ValueError("the weighted mean of the inputs' directions is zero (antipodal inputs whose weights "
                             "cancel); change the weights")
        out = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])
        return out + base if base is not None else out
    mean = mean / mean_norm
    dots = (unit * mean).sum(-1, keepdim=True)
    tangent = ((unit - dots * mean) * w.view(-1, 1)).sum(0)
    tn = torch.linalg.vector_norm(tangent) + eps
    out = mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)
    out = (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return out + base if base is not None else out
