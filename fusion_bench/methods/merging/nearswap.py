"""NearSwap (mergekit's ``nearswap``): the other model's value where it is within t of the base, a weighted
interpolation beyond. Kernel: :mod:`fusion_bench.kernels.merging.nearswap`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.config_schema import option
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.kernels.merging import nearswap as K
from fusion_bench.methods.base import TensorwiseConfig, TensorwiseMerge, register_method


@dataclass
class NearSwapConfig(TensorwiseConfig):
    t: float = option(1e-4, ge=0.0, le=1e3, help="Similarity threshold: w = clamp(t / |theta_0 - theta_1|, 0, 1); "
                      "entries within t of the base take the other model's value (mergekit requires it; the "
                      "reference model uses 1e-4).")
    model: str = option("", help="Name of the other model in the pool; empty: the pool must hold exactly one model "
                        "besides _pretrained_.")


@register_method
class NearSwap(TensorwiseMerge):
    """NearSwap: w theta_1 + (1 - w) theta_0, w = clamp(t / max(|theta_0 - theta_1|, 1e-6), 0, 1).

    Reference: alchemonaut, QuartetAnemoi-70B-t0.0001 (mergekit 0.1.5 ``nearswap``).

    Args:
        config: :class:`NearSwapConfig`.
    """

    name = "nearswap"
    config_class: ClassVar = NearSwapConfig
    requires_pretrained = True
    elementwise = True
    summary = "Swap in the other model's entries close to the base; interpolate by t / distance elsewhere."
    variant = "mergekit 0.1.5 nearswap: w = clamp(t / max(|theta_0 - theta_1|, 1e-6), 0, 1), w theta_1 + (1 - w) theta_0."

    def check_pool(self, names, has_pretrained):
        if not has_pretrained:
            raise ModelMismatchError("nearswap needs the base model as '_pretrained_' in the model pool.")
        if self.config.model:
            if self.config.model not in names:
                raise ConfigError(f"method.model='{self.config.model}' is not in the pool {names}; name one of them.")
        elif len(names) != 1:
            raise ModelMismatchError(f"nearswap swaps exactly one model into '_pretrained_'; the pool has {len(names)}: "
                                     f"{names}. Name one with method.model=... or select it with modelpool.select=[...].")

    def merge_tensor(self, key, base, tensors, names):
        t = tensors[names.index(self.config.model)] if self.config.model else tensors[0]
        return K.nearswap(base, t, self.config.t)
