"""CART: centered arithmetic with rank-reduced task vectors (Choi et al., 2024/2025)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.config_schema import option
from fusion_bench.kernels.subspace import cart as K
from fusion_bench.methods.base import TensorwiseConfig, TensorwiseMerge, register_method


@dataclass
class CARTConfig(TensorwiseConfig):
    rank_fraction: float = option(
        0.08, gt=0.0, le=1.0,
        help="Fraction of the full rank min(m, n) kept per centered task matrix: k = max(1, floor(rank_fraction * "
        "min(m, n))) (the paper finds about 8% best; 1.0 gives the plain weight average).")
    scaling_factor: float = option(
        1.0, ge=-1e3, le=1e3,
        help="lambda: theta = theta_avg + lambda * sum_i SVD_k(theta_i - theta_avg) (the paper tunes it on "
        "validation data).")


@register_method
class CART(TensorwiseMerge):
    """CART: weight average plus the low-rank parts of the task vectors centered on it.

    Paper: Choi, Kim, Lee, Hong, "Revisiting Weight Averaging for Model Merging" (arXiv 2412.12153).
    Variant: see :mod:`fusion_bench.kernels.subspace.cart` (per 2-D tensor, truncated SVD of each
    theta_i - theta_avg to k = max(1, floor(rank_fraction * min(m, n))) triplets; other tensors get
    theta_avg). The pretrained model is not needed (ignored when present). Cost per matrix: N thin SVDs.

    Args:
        config: :class:`CARTConfig` (rank_fraction, scaling_factor, exclude).
    """

    name = "cart"
    config_class: ClassVar = CARTConfig
    requires_pretrained = False
    summary = "CART: weight average + lambda * sum of low-rank centered task matrices."
    variant = ("Choi et al. 2024 (CART): theta_avg = mean_i theta_i; per 2-D tensor theta = theta_avg + lambda * "
               "sum_i SVD_k(theta_i - theta_avg), k = max(1, floor(rank_fraction * min(m, n))); tensors that are "
               "not 2-D get theta_avg (their centered vectors sum to 0).")

    def merge_tensor(self, key, base, tensors, names):
        return K.cart_merge(tensors, rank_fraction=self.config.rank_fraction,
                            scaling_factor=self.config.scaling_factor)
