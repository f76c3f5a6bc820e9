"""DARE (Drop And REscale) before task arithmetic or TIES (Yu et al., ICML 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.errors import ConfigError
from fusion_bench.kernels.merging import dare as K
from fusion_bench.kernels.merging import ties as KT
from fusion_bench.methods.base import TensorwiseConfig, TensorwiseMerge, register_method
from fusion_bench.methods.merging.ties import TiesMerging, TiesMergingConfig
from fusion_bench.utils import seeded_generator


@dataclass
class DareSimpleAverageConfig(TensorwiseConfig):
    sparsity_ratio: float = option(
        0.5, ge=0.0, le=1.0, help="p, the probability of dropping each task-vector entry (FusionBench's name); in [0, 1), or "
        "[0, 1] with rescale=false.")
    rescale: bool = option(True, help="Multiply kept entries by 1/(1-p) (DARE); false: drop only.")
    seed: int = option(0, **SEED_RANGE, help="Random seed; each tensor of each model draws from a generator seeded with "
                       "(seed, tensor name, model name), so results do not depend on the visiting order.")

    def __post_init__(self) -> None:
        p = self.sparsity_ratio
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"method.sparsity_ratio={p} must be in [0, 1).")
        if self.rescale and p >= 1.0:
            raise ConfigError("method.sparsity_ratio=1 drops every entry and 1/(1-p) is infinite: use a value "
                              "below 1, or set method.rescale=false.")


@dataclass
class DareTaskArithmeticConfig(DareSimpleAverageConfig):
    scaling_factor: float = option(0.3, ge=-1e3, le=1e3, help="lambda: theta = theta_0 + lambda * sum_i DARE(tau_i).")


@dataclass
class DareTiesConfig(DareTaskArithmeticConfig):
    sign_election: str = option("mass", choices=("mass", "count"),
                                help="TIES sign election on the DARE'd task vectors: 'mass' (sum) or 'count'.")
    merge_func: str = option("mean", choices=("mean", "sum", "max"),
                             help="Disjoint merge of entries agreeing with the elected sign: 'mean' (TIES), "
                             "'sum' or 'max'.")


class _Dare(TensorwiseMerge):
    requires_pretrained = True

    def generators(self, key: str, names: list[str]):
        p = self.config.sparsity_ratio
        return [seeded_generator(self.config.seed, key, n) if p > 0 else None for n in names]

    # streaming engine row-block protocol: one generator per model for the whole tensor, drawn block
    # after block in row order (torch's CPU uniform stream is sequential, so blocks equal one draw)
    def begin_blocks(self, key, shape, names):
        return self.generators(key, names)

    def merge_block(self, key, base, tensors, names, ctx, rows):
        return self.merge_with(base, tensors, ctx.state)

    def merge_tensor(self, key, base, tensors, names):
        return self.merge_with(base, tensors, self.generators(key, names))

    def merge_with(self, base, tensors, generators):
        raise NotImplementedError


@register_method
class DareTaskArithmetic(_Dare):
    """DARE then task arithmetic.

    Paper: Yu et al., "Language Models are Super Mario" (ICML 2024), with task arithmetic (Ilharco
    et al., ICLR 2023). Variant: each entry of tau_i = theta_i - theta_0 dropped with probability p
    (u < p, u ~ U[0,1) from a generator seeded by (seed, tensor, model)), kept entries scaled by
    1/(1-p) when rescale; theta = theta_0 + lambda * sum_i DARE(tau_i).

    Args:
        config: :class:`DareTaskArithmeticConfig` (scaling_factor, sparsity_ratio, rescale, seed, exclude).
    """

    name = "dare_task_arithmetic"
    config_class: ClassVar = DareTaskArithmeticConfig
    summary = "DARE (random drop p, rescale 1/(1-p)) on each task vector, then task arithmetic."
    variant = ("Yu et al. 2024 (DARE) + Ilharco et al. 2023: tau~_i = m_i * tau_i / (1-p) with m_ij = [u_ij >= p], "
               "u ~ U[0,1) seeded per (seed, tensor, model) (no 1/(1-p) when rescale=false); "
               "theta = theta_0 + lambda * sum_i tau~_i.")

    def merge_with(self, base, tensors, generators):
        c = self.config
        return K.dare_task_arithmetic(base, tensors, c.sparsity_ratio, generators,
                                      scaling_factor=c.scaling_factor, rescale=c.rescale)


@register_method
class DareTies(_Dare):
    """DARE then TIES sign election and disjoint merge (no top-k trim), as mergekit's ``dare_ties``.

    Paper: Yu et al. (ICML 2024) + Yadav et al. (NeurIPS 2023). Variant: tau~_i = DARE(tau_i) as in
    ``dare_task_arithmetic``; gamma = sgn(sum_i tau~_i) (mass) or by count; merged = mean of the
    tau~_i entries whose sign equals gamma (0 where gamma = 0); theta = theta_0 + lambda * merged.

    Args:
        config: :class:`DareTiesConfig` (scaling_factor, sparsity_ratio, rescale, seed, sign_election,
            merge_func, exclude).
    """

    name = "dare_ties"
    config_class: ClassVar = DareTiesConfig
    summary = "DARE on each task vector, then TIES sign election and disjoint mean (mergekit dare_ties)."
    variant = ("Yu et al. 2024 (DARE) + Yadav et al. 2023 (TIES) as mergekit dare_ties: tau~_i = DARE(tau_i) "
               "(u < p dropped, 1/(1-p) rescale, seeded per tensor and model), no magnitude trim; sign elected by "
               "mass (or count); disjoint mean of agreeing entries (0 on a zero vote); theta = theta_0 + lambda * merged.")

    def merge_with(self, base, tensors, generators):
        c = self.config
        return K.dare_ties(base, tensors, c.sparsity_ratio, generators,
                           scaling_factor=c.scaling_factor, rescale=c.rescale,
                           sign_election=c.sign_election, merge=c.merge_func)


@register_method
class DareSimpleAverage(DareTaskArithmetic):
    """DARE then the simple average of the models (FusionBench's ``dare/simple_average``).

    Paper: Yu et al. (ICML 2024). Variant (FusionBench's ``DareSimpleAverage``): DARE task arithmetic
    with lambda = 1/N for the N fine-tuned models: theta = theta_0 + (1/N) sum_i DARE(tau_i).

    Args:
        config: :class:`DareSimpleAverageConfig` (sparsity_ratio, rescale, seed, exclude).
    """

    name = "dare_simple_average"
    config_class: ClassVar = DareSimpleAverageConfig
    summary = "DARE on each task vector, then their mean added to the base (FusionBench dare/simple_average)."
    variant = ("Yu et al. 2024 (DARE), FusionBench's DareSimpleAverage: theta = theta_0 + (1/N) sum_i DARE(tau_i) "
               "over the N fine-tuned models (u < p dropped, 1/(1-p) rescale, seeded per tensor and model).")

    def merge_with(self, base, tensors, generators):
        c = self.config
        return K.dare_task_arithmetic(base, tensors, c.sparsity_ratio, generators,
                                      scaling_factor=1.0 / len(tensors), rescale=c.rescale)


@dataclass
class DareTiesMergingConfig(TiesMergingConfig):
    sparsity_ratio: float = option(0.5, ge=0.0, le=1.0, help="p, the probability of dropping each task-vector entry "
                                   "before the TIES trim; in [0, 1), or [0, 1] with rescale=false.")
    rescale: bool = option(True, help="Multiply kept entries by 1/(1-p) (DARE); false: drop only.")
    seed: int = option(0, **SEED_RANGE, help="Random seed of the DARE masks (per seed, tensor name and model name).")

    def __post_init__(self) -> None:
        super().__post_init__()
        DareSimpleAverageConfig.__post_init__(self)


@register_method
class DareTiesMerging(TiesMerging):
    """DARE, then TIES with its magnitude trim (FusionBench's ``dare/ties_merging``).

    Paper: Yu et al. (ICML 2024) + Yadav et al. (NeurIPS 2023). Variant (FusionBench's
    ``DareTiesMerging``): tau~_i = DARE(tau_i) (as ``dare_task_arithmetic``), then TIES on the tau~_i
    exactly as ``ties_merging`` with the same options (trim to the top ``density`` magnitudes over
    the whole model or per tensor, sign election, disjoint merge); theta = theta_0 + lambda * merged.
    Unlike ``dare_ties`` (mergekit) the TIES trim is kept.

    Args:
        config: :class:`DareTiesMergingConfig` (the ``ties_merging`` options + sparsity_ratio, rescale, seed).
    """

    name = "dare_ties_merging"
    config_class: ClassVar = DareTiesMergingConfig
    summary = "DARE on each task vector, then TIES trim, sign election and disjoint merge (FusionBench dare/ties_merging)."
    variant = ("Yu et al. 2024 (DARE) + Yadav et al. 2023 (TIES), FusionBench's DareTiesMerging: tau~_i = DARE(tau_i) "
               "(u < p dropped, 1/(1-p) rescale, seeded per tensor and model); then ties_merging on the tau~_i: trim to "
               "its k largest magnitudes (keep_rule=round: exactly k, ties by lower flat index; fusionbench: |tau~_i| >= the "
               "k-th largest; trim_scope), sign by mass or count (zero_vote), "
               "disjoint merge_func; theta = theta_0 + lambda * merged.")
    merge_block = None  # whole tensors: the DARE masks are drawn once per tensor and model

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self.block_stats = None

    def generators(self, key: str, names: list[str]):
        p = self.config.sparsity_ratio
        return [seeded_generator(self.config.seed, key, n) if p > 0 else None for n in names]

    def _dare(self, key, tau, name):
        c = self.config
        return K.dare(tau, c.sparsity_ratio, self.generators(key, [name])[0], c.rescale)

    def _select_add(self, sel, i, key, tensor, base, name) -> bool:
        dtype = self._threshold_dtype
        tau = self._dare(key, tensor.to(dtype) - base.to(dtype), name).reshape(-1)
        if sel.stride == 1 and not bool(torch.isfinite(tau).all()):
            return False
        sel.add(i, tau[:: sel.stride])
        return True

    def _taus(self, key, base, tensors, names, dtype):
        return [self._dare(key, t.to(dtype) - base, n) for t, n in zip(tensors, names)]

    def merge_tensor(self, key, base, tensors, names):
        c = self.config
        if c.trim_scope == "global":
            thresholds = self._global_thresholds(names)
            ends = self._global_tie_ends(key, names)
            if base.dtype != self._threshold_dtype:
                base, tensors = base.to(self._threshold_dtype), [t.to(self._threshold_dtype) for t in tensors]
        taus = self._taus(key, base, tensors, names, base.dtype)
        if c.trim_scope == "tensor":
            cuts = [self._cut(t) for t in taus]
            thresholds, ends = [t for t, _ in cuts], [e for _, e in cuts]
        return KT._chunked_sign_merge(base, tensors, thresholds, c.scaling_factor, c.sign_election, c.merge_func,
                                      transform=lambda i, tau: taus[i], zero_sign=self._zero_sign, tie_ends=ends)
