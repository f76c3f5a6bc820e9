"""Magnitude-difference pruning (FusionBench ``magnitude_diff_pruning``): prune the task vector of one
fine-tuned model row by row by magnitude. Kernel: :mod:`fusion_bench.kernels.merging.magnitude_diff`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.config_schema import option
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.kernels.merging import magnitude_diff as K
from fusion_bench.methods.base import TensorwiseConfig, TensorwiseMerge, register_method

#: substrings of embedding tensor names (not nn.Linear weights, so not pruned by default)
EMBEDDING_MARKERS = ("embed", "wte.", "wpe.", "shared.weight")


@dataclass
class MagnitudeDiffConfig(TensorwiseConfig):
    prune_ratio: float = option(0.5, ge=0.0, le=1.0, help="Fraction of each row of theta_ft - theta_0 set to 0 "
                                "(floor(cols * prune_ratio) entries per row; FusionBench default 0.5).")
    prune_type: str = option("minor", choices=("minor", "major"),
                             help="'minor': prune the smallest |diff| (magnitude pruning); 'major': the largest.")
    rescale: bool = option(False, help="Multiply the kept differences by 1/prune_ratio (FusionBench rescale=true).")
    rescale_factor: float = option(0.0, ge=0.0, le=1e3, help="When > 0, multiply the kept differences by it "
                                   "(FusionBench rescale=<number>); overrides rescale.")
    extract_names: list[str] = option([], help="Regexes (re.match from the start) of the pruned tensors; empty: "
                                      "2-D '*.weight' tensors except embeddings (FusionBench: the nn.Linear weights).")
    unselected: str = option("pretrained", choices=("pretrained", "finetuned"),
                             help="Value of tensors not pruned: 'pretrained' (FusionBench: only the pruned "
                             "differences are added to the base) or 'finetuned'.")
    model: str = option("", help="Name of the fine-tuned model in the pool; empty: the pool must hold exactly one model "
                        "besides _pretrained_.")

    def __post_init__(self) -> None:
        for i, p in enumerate(self.extract_names):
            try:
                re.compile(p)
            except re.error as e:
                raise ConfigError(f"method.extract_names[{i}]={p!r} is not a valid regex ({e}).") from None
        if self.rescale and self.rescale_factor == 0.0 and self.prune_ratio == 0.0:
            raise ConfigError("method.rescale=true divides by method.prune_ratio, which is 0; set prune_ratio > 0 "
                              "or rescale_factor.")


@register_method
class MagnitudeDiffPruning(TensorwiseMerge):
    """theta_0 + rowwise magnitude-pruned (theta_ft - theta_0) for one fine-tuned model.

    Reference: FusionBench ``MagnitudeDiffPruningAlgorithm`` (magnitude pruning, Han et al. 2015, of the
    task vector); exact rule in :mod:`fusion_bench.kernels.merging.magnitude_diff`.

    Args:
        config: :class:`MagnitudeDiffConfig`.
    """

    name = "magnitude_diff_pruning"
    config_class: ClassVar = MagnitudeDiffConfig
    requires_pretrained = True
    summary = "Prune a fine-tuned model's task vector row by row by magnitude (keep 1 - prune_ratio)."
    variant = ("FusionBench magnitude_diff_pruning: per row of d = theta_ft - theta_0 zero the floor(cols*prune_ratio) "
               "smallest (minor) / largest (major) |d| (stable sort), times the rescale factor; theta = theta_0 + d "
               "for selected tensors, theta_0 (or theta_ft) for the others.")

    def check_pool(self, names, has_pretrained):
        if not has_pretrained:
            raise ModelMismatchError("magnitude_diff_pruning needs the base model as '_pretrained_' in the pool.")
        if self.config.model:
            if self.config.model not in names:
                raise ConfigError(f"method.model='{self.config.model}' is not in the pool {names}; name one of them.")
        elif len(names) != 1:
            raise ModelMismatchError(f"magnitude_diff_pruning prunes one fine-tuned model; the pool has {len(names)}: "
                                     f"{names}. Name one with method.model=... or select it with modelpool.select=[...].")

    def selected(self, key: str, dim: int) -> bool:
        if self.config.extract_names:
            return any(re.match(p, key) for p in self.config.extract_names)
        return dim == 2 and key.endswith(".weight") and not any(m in key for m in EMBEDDING_MARKERS)

    def prepare(self, base, sources, names, keys):
        for key in keys:
            shape = tuple(base.meta(key).shape)
            if len(shape) < 2 and self.selected(key, len(shape)):
                raise ConfigError(f"method.extract_names selects tensor '{key}' of shape {list(shape)}; row-wise "
                                  "pruning needs 2-D tensors: narrow the regexes.")

    def _tensor(self, tensors, names):
        return tensors[names.index(self.config.model)] if self.config.model else tensors[0]

    def merge_tensor(self, key, base, tensors, names):
        c = self.config
        if not self.selected(key, base.dim()):
            return base if c.unselected == "pretrained" else self._tensor(tensors, names)
        diff = K.prune_rows(self._tensor(tensors, names) - base, c.prune_ratio, c.prune_type)
        factor = c.rescale_factor if c.rescale_factor > 0.0 else (1.0 / c.prune_ratio if c.rescale else 1.0)
        if factor != 1.0:
            diff = diff * factor
        return base + diff
