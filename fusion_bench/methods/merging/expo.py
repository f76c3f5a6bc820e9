"""ExPO, weak-to-strong extrapolation (Zheng et al., 2024): theta_aligned + alpha (theta_aligned - theta_sft).
Kernel: :mod:`fusion_bench.kernels.merging.expo`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.config_schema import option
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.kernels.merging import expo as K
from fusion_bench.methods.base import TensorwiseConfig, TensorwiseMerge, register_method


@dataclass
class ExPOConfig(TensorwiseConfig):
    alpha: float = option(0.3, ge=0.0, le=1e3, help="Extrapolation factor alpha: theta = theta_aligned + alpha "
                          "(theta_aligned - theta_sft); 0 returns the aligned model (FusionBench "
                          "extrapolation_factor, 0.1 in its config; the paper tunes it, 0.1-0.5).")
    model: str = option("", help="Name of the aligned model in the pool; empty: the pool must hold exactly one model "
                        "besides _pretrained_.")


@register_method
class ExPO(TensorwiseMerge):
    """ExPO: extrapolate from the SFT model (``_pretrained_``) through the one aligned model of the pool.

    Paper: Zheng et al., 2024, "Weak-to-Strong Extrapolation Expedites Alignment" (arXiv 2404.16792).

    Args:
        config: :class:`ExPOConfig`.
    """

    name = "expo"
    config_class: ClassVar = ExPOConfig
    requires_pretrained = True
    elementwise = True
    summary = "Weak-to-strong extrapolation: theta_aligned + alpha (theta_aligned - theta_sft)."
    variant = ("Zheng et al. 2024 (ExPO): theta = theta_1 + alpha (theta_1 - theta_0), theta_0 = _pretrained_ (SFT), "
               "theta_1 = the pool's one other model or method.model (aligned).")

    def check_pool(self, names, has_pretrained):
        if not has_pretrained:
            raise ModelMismatchError("expo needs the SFT model as '_pretrained_' in the model pool.")
        if self.config.model:
            if self.config.model not in names:
                raise ConfigError(f"method.model='{self.config.model}' is not in the pool {names}; name one of them.")
        elif len(names) != 1:
            raise ModelMismatchError(f"expo extrapolates from '_pretrained_' (SFT) through exactly one aligned model; the pool has {len(names)}: "
                                     f"{names}. Name one with method.model=... or select it with modelpool.select=[...].")

    def _tensor(self, tensors, names):
        return tensors[names.index(self.config.model)] if self.config.model else tensors[0]

    def merge_tensor(self, key, base, tensors, names):
        return K.expo(base, self._tensor(tensors, names), self.config.alpha)
