"""Arcee Fusion (mergekit's ``arcee_fusion``): the fine-tuned model's entries where their importance is an outlier,
the base elsewhere. Kernel: :mod:`fusion_bench.kernels.merging.arcee_fusion`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.kernels.merging import arcee_fusion as K
from fusion_bench.methods.base import TensorwiseConfig, TensorwiseMerge, register_method
from fusion_bench.utils import seeded_generator


@dataclass
class ArceeFusionConfig(TensorwiseConfig):
    model: str = option("", help="Name of the fine-tuned model in the pool; empty: the pool must hold exactly one model "
                        "besides _pretrained_.")
    sample_size: int = option(K.SAMPLE_SIZE, ge=4, le=2**40, help="Most entries the importance quantiles are taken "
                              "over; a larger tensor's quantiles come from this many entries drawn uniformly with "
                              "replacement (mergekit: 10^6).")
    seed: int = option(0, **SEED_RANGE, help="Seed of the quantile sample of large tensors (a generator per tensor, "
                       "seeded by (seed, tensor name)).")


@register_method
class ArceeFusion(TensorwiseMerge):
    """Arcee Fusion: theta_0 + (theta_1 - theta_0) where |theta_1 - theta_0| KL(row) >= Q2 + 1.5 IQR.

    Reference: Arcee AI, "Arcee Fusion" (mergekit 0.1.5). The variant is the kernel's docstring.

    Args:
        config: :class:`ArceeFusionConfig`.
    """

    name = "arcee_fusion"
    config_class: ClassVar = ArceeFusionConfig
    requires_pretrained = True
    summary = "Keep the fine-tuned entries whose importance (|delta| x row KL of softmaxes) is an upper outlier."
    variant = ("mergekit 0.1.5 arcee_fusion: importance |theta_1 - theta_0| * KL(softmax(theta_1) || softmax(theta_0)) "
               "per row, threshold median + 1.5 IQR (floor-position quantiles, sampled beyond sample_size entries), "
               "theta_1 where importance >= threshold, theta_0 elsewhere.")

    def check_pool(self, names, has_pretrained):
        if not has_pretrained:
            raise ModelMismatchError("arcee_fusion needs the base model as '_pretrained_' in the model pool.")
        if self.config.model:
            if self.config.model not in names:
                raise ConfigError(f"method.model='{self.config.model}' is not in the pool {names}; name one of them.")
        elif len(names) != 1:
            raise ModelMismatchError(f"arcee_fusion fuses exactly one model into '_pretrained_'; the pool has "
                                     f"{len(names)}: {names}. Name one with method.model=... or select it with "
                                     "modelpool.select=[...].")

    def merge_tensor(self, key, base, tensors, names):
        t = tensors[names.index(self.config.model)] if self.config.model else tensors[0]
        g = seeded_generator(self.config.seed, key) if t.numel() > self.config.sample_size else None
        return K.arcee_fusion(base, t, self.config.sample_size, g)
