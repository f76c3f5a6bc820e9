"""Checks on values a run produces or consumes: merge weights and merged tensors.

A merge must never write (or hand to evaluation) a non-finite tensor, and a weighted merge must not
silently blow up when its weights cancel out. These helpers raise the project's own errors with a
one-line message naming the tensor, the method and the likely cause.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fusion_bench.errors import CheckpointError, ConfigError

#: |sum w| at most this share of sum |w| counts as a (near) zero sum (weights that cancel out)
NEAR_ZERO_REL = 1e-6


def check_weights(weights: Sequence[float], where: str = "method.weights", *, normalize: bool = False,
                  fix: str = "set method.normalize=false") -> None:
    """Refuse non-finite weights and, when they are normalised, a (near) zero sum.

    A sum s is near zero when |s| <= 1e-6 * sum_i |w_i| (the weights cancel out): normalising would scale
    the merge by about 1/s (1e10 for weights of size 1 summing to 1e-10) or divide by zero. Small weights
    that do not cancel ([1e-10, 1e-10]) are fine.

    Args:
        weights: the weights.
        where: the config key, for messages.
        normalize: the weights are divided by their sum.
        fix: what the user can do besides changing the weights.
    """
    w = [float(x) for x in weights]
    for i, x in enumerate(w):
        if not math.isfinite(x):
            raise ConfigError(f"{where}[{i}]={x} is not a finite number; give finite weights.")
    if normalize and w:
        s = math.fsum(w)
        if abs(s) <= NEAR_ZERO_REL * math.fsum(abs(x) for x in w):
            scale = f"scale the merge by {1 / s:.3g}" if s else "divide by zero"
            raise ConfigError(f"{where}={w} sum to {s:.3g}, (near) zero: normalising would {scale}; give weights "
                              f"with a clearly non-zero sum or {fix}.")


def _hyper_text(method: Any) -> str:
    try:
        hp = method.hyperparameters()
    except Exception:  # pragma: no cover - a method without plain hyperparameters
        return ""
    nums = [f"{k}={v!r}" for k, v in hp.items()
            if (isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seed")
            or (isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v))]
    return f"; hyperparameters: {', '.join(nums)}" if nums else ""


def nonfinite_error(method: Any, key: str, dtype: torch.dtype) -> CheckpointError:
    """The error for a merged tensor with NaN/inf values (nothing is written)."""
    name = getattr(method, "name", type(method).__name__)
    dt = str(dtype).replace("torch.", "")
    fmax = f" (finite up to +-{torch.finfo(dtype).max:.3g})" if dtype.is_floating_point else ""
    return CheckpointError(
        f"Method '{name}' produced non-finite values (NaN/inf) in merged tensor '{key}' ({dt}); nothing was "
        f"written. Likely cause: a hyperparameter too large for these weights or for {dt}{fmax}"
        f"{_hyper_text(method)}; lower it (e.g. scaling_factor), or check for weights that cancel out, and rerun.")


def check_merged_tensor(method: Any, key: str, tensor: torch.Tensor) -> None:
    """Raise :func:`nonfinite_error` when a merged tensor holds NaN or inf."""
    from fusion_bench.methods.base import all_finite

    if not all_finite(tensor):
        raise nonfinite_error(method, key, tensor.dtype)


def check_result(result: Any, method: Any) -> None:
    """Check every floating tensor of a merged result (``FusionResult`` of kind ``merged``) is finite.

    Tensor-wise merges check each tensor as it is merged; this covers the other methods.
    """
    from fusion_bench.methods.base import TensorwiseMerge

    if getattr(result, "kind", None) != "merged" or result.model is None or isinstance(method, TensorwiseMerge):
        return
    with torch.no_grad():
        for key, t in result.model.state_dict().items():
            if isinstance(t, torch.Tensor) and not t.is_meta:  # meta: a streamed result, checked as written
                check_merged_tensor(method, key, t)
