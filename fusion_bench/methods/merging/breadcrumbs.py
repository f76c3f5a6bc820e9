"""Model Breadcrumbs (Davari & Belilovsky, 2023): task vectors without outliers and small entries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.config_schema import option
from fusion_bench.kernels.merging import sparsify as K
from fusion_bench.methods.base import register_method
from fusion_bench.methods.merging.sparsify import GeneralizedTaskArithmetic, GTAConfig


@dataclass
class BreadcrumbsConfig(GTAConfig):
    sparsification: str = option("breadcrumbs", choices=("breadcrumbs",),
                                 help="Fixed: drop the gamma largest and the smallest magnitudes of each tensor.")
    density: float = option(0.9, ge=0.0, le=1.0, help="Fraction of each task vector's entries kept per tensor (paper: 1 - beta - gamma "
                            "with beta the bottom fraction).")
    gamma: float = option(0.01, ge=0.0, lt=1.0, help="Fraction of the largest magnitudes (outliers) removed per tensor.")
    scaling_factor: float = option(0.3, ge=-1e3, le=1e3, help="lambda: theta = theta_0 + lambda * sum_i w_i mask_i tau_i.")
    consensus: str = option("none", choices=K.CONSENSUS,
                            help="'none' (paper; mergekit breadcrumbs) or 'sum' (mergekit breadcrumbs_ties).")


@register_method
class ModelBreadcrumbs(GeneralizedTaskArithmetic):
    """Model Breadcrumbs: mask each tensor's task vector to a magnitude band, then task arithmetic.

    Paper: Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
    Masks" (2023). Variant: per tensor, the n_top = floor(gamma n) largest |tau| and the smallest are
    removed so that exactly floor(density n) stay (ranks [n_top, n_top + floor(density n)) by magnitude,
    ties in magnitude ranked by lower flat index first);
    theta = theta_0 + lambda * sum_i w_i mask_i tau_i (consensus=sum adds TIES sign election, as
    mergekit's breadcrumbs_ties).

    Args:
        config: :class:`BreadcrumbsConfig`.
    """

    name = "model_breadcrumbs"
    config_class: ClassVar = BreadcrumbsConfig
    summary = "Model Breadcrumbs: per-tensor magnitude band (drop outliers and small entries), then task arithmetic."
    variant = ("Davari & Belilovsky 2023: per tensor keep exactly the magnitude ranks [n_top, n_top + floor(density n)) "
               "(n_top = floor(gamma n) outliers removed; ties in magnitude: lower flat index ranks first); theta = theta_0 + lambda sum_i w_i "
               "mask_i tau_i (optional TIES sign consensus).")
