"""Karcher mean merging: the Riemannian mean of the weights' directions, times their mean norm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.checks import check_weights
from fusion_bench.config_schema import option
from fusion_bench.errors import ConfigError
from fusion_bench.kernels.merging.karcher import karcher_mean
from fusion_bench.methods.base import TensorwiseConfig, TensorwiseMerge, register_method


@dataclass
class KarcherConfig(TensorwiseConfig):
    weights: list[float] = option([], ge=0.0, le=1e3, help="w_i >= 0, one per model (empty: equal weights).")
    max_iter: int = option(10, ge=1, le=10**6, help="Maximum Riemannian gradient steps per tensor.")
    tol: float = option(1e-5, gt=0.0, le=1.0, help="Stop when the Riemannian gradient norm is below it.")

    def __post_init__(self) -> None:
        if self.max_iter < 1:
            raise ConfigError(f"method.max_iter={self.max_iter} must be at least 1.")
        if any(w < 0 for w in self.weights):
            raise ConfigError(f"method.weights={self.weights} must be non-negative.")


@register_method
class KarcherMean(TensorwiseMerge):
    """Karcher mean of the models, tensor by tensor, on the unit sphere (mergekit ``karcher``).

    Paper: Karcher (1977), Riemannian center of mass. Variant: :func:`fusion_bench.kernels.merging.karcher.karcher_mean`
    (directions averaged by Riemannian gradient descent with unit steps, result scaled by the
    weighted mean norm). The base model is not used.

    Args:
        config: :class:`KarcherConfig`.
    """

    name = "karcher_mean"
    config_class: ClassVar = KarcherConfig
    summary = "Karcher (Riemannian) mean of each tensor's direction on the sphere, times the mean norm."
    variant = ("Karcher 1977 as mergekit karcher: per tensor u = argmin sum_i w_i arccos(<u, t_i/|t_i|>)^2 by "
               "unit-step Riemannian gradient descent (max_iter, tol) from the normalised weighted mean; "
               "theta = u * sum_i w_i |t_i| / sum_i w_i.")

    def check_pool(self, names, has_pretrained):
        super().check_pool(names, has_pretrained)
        w = self.config.weights
        if w and len(w) != len(names):
            raise ConfigError(f"method.weights has {len(w)} values but the pool has {len(names)} models {names}.")
        check_weights(w, "method.weights", normalize=True, fix="leave method.weights empty for equal weights")

    def merge_tensor(self, key, base, tensors, names):
        c = self.config
        return karcher_mean(tensors, c.weights or None, max_iter=c.max_iter, tol=c.tol)
