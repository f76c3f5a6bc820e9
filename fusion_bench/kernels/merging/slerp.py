"""Spherical linear interpolation (SLERP) of two tensors.

Paper: Shoemake, "Animating rotation with quaternion curves" (SIGGRAPH 1985); used for model
merging per tensor as in mergekit's ``slerp``. Variant implemented: the angle Omega between the
two flattened tensors is computed from their unit directions, cos(Omega) = <a, b> / (|a| |b|)
(in float64), and the raw (not normalised) tensors are interpolated with

    slerp(a, b; t) = sin((1 - t) Omega) / sin(Omega) * a + sin(t Omega) / sin(Omega) * b.

Fallback: when |cos(Omega)| > 1 - ``COLINEAR_EPS`` (= 0.9995, mergekit's DOT_THRESHOLD; this
covers both (nearly) parallel and (nearly) opposite tensors, where sin(Omega) ~ 0), or when either
tensor has zero norm (no direction), the linear interpolation (1 - t) a + t b is returned.
"""

from __future__ import annotations

import math

import torch

#: |cos(Omega)| above 1 - COLINEAR_EPS falls back to linear interpolation
COLINEAR_EPS = 5e-4


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, colinear_eps: float = COLINEAR_EPS) -> torch.Tensor:
    """SLERP of two same-shape tensors at ``t`` (t=0 gives a, t=1 gives b).

    Paper: Shoemake 1985, per tensor as mergekit (see the module docstring for the fallback).

    Args:
        a: the first tensor.
        b: the second tensor.
        t: interpolation parameter.
        colinear_eps: linear interpolation when |cos(Omega)| > 1 - colinear_eps.
    """
    a64 = a.reshape(-1).double()
    b64 = b.reshape(-1).double()
    na = float(torch.linalg.vector_norm(a64))
    nb = float(torch.linalg.vector_norm(b64))
    if na == 0.0 or nb == 0.0:
        return a + (b - a) * t
    cos = float(torch.dot(a64, b64)) / (na * nb)
    cos = max(-1.0, min(1.0, cos))
    if abs(cos) > 1.0 - colinear_eps:
        return a + (b - a) * t
    omega = math.acos(cos)
    s = math.sin(omega)
    wa = math.sin((1.0 - t) * omega) / s
    wb = math.sin(t * omega) / s
    return torch.add(a * wa, b, alpha=wb)
