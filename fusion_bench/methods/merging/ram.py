"""RAM and tensor-local RAM+ (Reinforced Agent Merging, arXiv 2601.13572; mergekit's ``ram`` and ``ramplus_tl``):
each parameter is the mean of the task vectors that changed it. Kernel: :mod:`fusion_bench.kernels.merging.ram`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.config_schema import option
from fusion_bench.kernels.merging import ram as K
from fusion_bench.methods.base import TensorwiseConfig, TensorwiseMerge, register_method


@dataclass
class RAMConfig(TensorwiseConfig):
    epsilon: float = option(1e-5, ge=0.0, le=1e3, help="An entry of a task vector counts as changed when its magnitude "
                            "exceeds epsilon (mergekit default 1e-5).")


@dataclass
class RAMPlusConfig(RAMConfig):
    r: float = option(0.1, ge=0.0, le=1e3, help="Strength of the rescaling of the entries only one model changes: "
                      "lambda_i = 1 + r clamp(rho_i, 0, alpha) (mergekit default 0.1).")
    alpha: float = option(0.2, ge=0.0, le=1e3, help="Cap on rho_i, the ratio of model i's shared to its unique "
                          "changed entries in the tensor (mergekit default 0.2).")


@register_method
class RAM(TensorwiseMerge):
    """RAM: theta_0 + at every entry the mean of the task vectors whose magnitude exceeds epsilon there.

    Paper: "Reinforced Agent Merging" (arXiv 2601.13572). Variant: mergekit 0.1.5 ``ram`` (per entry; 0 where no
    model changed it).

    Args:
        config: :class:`RAMConfig`.
    """

    name = "ram"
    config_class: ClassVar = RAMConfig
    requires_pretrained = True
    elementwise = True
    summary = "Average each parameter over the models whose task vector changed it (|tau| > epsilon)."
    variant = "mergekit 0.1.5 ram: theta_0 + mean_{i: |tau_i| > eps} tau_i per entry (0 where none)."

    def merge_tensor(self, key, base, tensors, names):
        return K.ram(base, tensors, self.config.epsilon)


@register_method
class RAMPlusTL(TensorwiseMerge):
    """RAM+ (tensor-local): RAM with each model's unique entries scaled by 1 + r clamp(shared/unique, 0, alpha).

    Paper: "Reinforced Agent Merging" (arXiv 2601.13572). Variant: mergekit 0.1.5 ``ramplus_tl``: the shared and
    unique counts are taken per tensor.

    Args:
        config: :class:`RAMPlusConfig`.
    """

    name = "ramplus_tl"
    config_class: ClassVar = RAMPlusConfig
    requires_pretrained = True
    summary = "RAM with the entries only one model changes rescaled by its shared/unique ratio in the tensor."
    variant = ("mergekit 0.1.5 ramplus_tl: unique entries of model i times 1 + r clamp(rho_i, 0, alpha), rho_i = "
               "shared_i / max(unique_i, eps) counted over the tensor; shared entries averaged.")

    def merge_tensor(self, key, base, tensors, names):
        c = self.config
        return K.ramplus_tl(base, tensors, c.r, c.alpha, c.epsilon)
