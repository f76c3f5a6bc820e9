"""MagMax: keep the largest-magnitude task-vector entry per parameter (Marczak et al., ECCV 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.config_schema import option
from fusion_bench.kernels.merging import magmax as K
from fusion_bench.methods.base import TensorwiseConfig, TensorwiseMerge, register_method


@dataclass
class MagMaxConfig(TensorwiseConfig):
    scaling_factor: float = option(1.0, ge=-1e3, le=1e3, help="lambda: theta = theta_0 + lambda * tau_max.")


@register_method
class MagMax(TensorwiseMerge):
    """MagMax merging.

    Paper: Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning",
    ECCV 2024. Variant: per entry j, tau_max[j] = tau_i[j] of the model with the largest |tau_i[j]|
    (ties in magnitude: the larger signed value, so the model order does not matter);
    theta = theta_0 + lambda * tau_max.

    Args:
        config: :class:`MagMaxConfig` (scaling_factor, exclude).
    """

    name = "magmax"
    config_class: ClassVar = MagMaxConfig
    requires_pretrained = True
    elementwise = True  # row blocks allowed in the streaming engine
    summary = "MagMax: per parameter, the task-vector entry of largest magnitude across models."
    variant = ("Marczak et al. 2024 (MagMax): tau_max[j] = tau_{i*}[j], i* = argmax_i |tau_i[j]| (magnitude ties: the "
               "larger signed value); theta = theta_0 + lambda * tau_max.")

    def merge_tensor(self, key, base, tensors, names):
        return K.magmax(base, tensors, self.config.scaling_factor)
