"""Model Stock: move the fine-tuned average towards the base by the task vectors' angle (ECCV 2024)."""

from __future__ import annotations

from typing import ClassVar

from fusion_bench.kernels.merging import model_stock as K
from fusion_bench.methods.base import TensorwiseConfig, TensorwiseMerge, register_method


@register_method
class ModelStock(TensorwiseMerge):
    """Model Stock, layer-wise (per tensor).

    Paper: Jang, Yun and Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024.
    Variant: cos = mean pairwise cosine of the task vectors tau_i = theta_i - theta_0 of the tensor,
    t = N cos / (1 + (N-1) cos), theta = t * mean_i theta_i + (1-t) * theta_0. Needs N >= 2 models;
    zero-norm task vectors give cosine 0; cos is clamped to [0, 1] (see :mod:`fusion_bench.kernels.merging.model_stock`).

    Args:
        config: :class:`fusion_bench.methods.base.TensorwiseConfig` (exclude).
    """

    name = "model_stock"
    config_class: ClassVar = TensorwiseConfig
    requires_pretrained = True
    min_models = 2
    summary = "Model Stock: per tensor, interpolate the fine-tuned average and the base by the task vectors' angle."
    variant = ("Jang et al. 2024 (Model Stock), layer-wise: cos = mean_{i<j} cos(tau_i, tau_j) per tensor (0 for a "
               "zero-norm task vector, clamped to [0, 1]); t = N cos / (1 + (N-1) cos); "
               "theta = t * mean_i theta_i + (1-t) theta_0. N >= 2.")

    def merge_tensor(self, key, base, tensors, names):
        merged, _ = K.model_stock(base, tensors)
        return merged
