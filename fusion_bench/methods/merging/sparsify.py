"""Generalized task arithmetic: sparsify task vectors, weight, optional sign consensus, sum, normalise.

One method covers mergekit's task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,
breadcrumbs_ties, della and della_linear (with mergekit's defaults given in
:data:`MERGEKIT_PRESETS`); :mod:`fusion_bench.methods.merging.breadcrumbs` and
:mod:`fusion_bench.methods.merging.della` register the paper methods on top of it. Every variant runs in
the streaming engine in row blocks (magnitude thresholds come from a per-model pre-pass over the
whole tensor; random masks from per-tensor generators whose streams continue block to block).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fusion_bench.checks import check_weights
from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.errors import ConfigError
from fusion_bench.kernels.merging import sparsify as K
from fusion_bench.methods.base import TensorwiseConfig, TensorwiseMerge, register_method
from fusion_bench.utils import seeded_generator

#: mergekit method name -> (sparsification, consensus, default normalize, default rescale)
MERGEKIT_PRESETS: dict[str, tuple[str, str, bool, bool]] = {
    "task_arithmetic": ("none", "none", False, False),
    "ties": ("magnitude", "sum", True, False),
    "dare_ties": ("random", "sum", False, True),
    "dare_linear": ("random", "none", False, True),
    "breadcrumbs": ("breadcrumbs", "none", False, False),
    "breadcrumbs_ties": ("breadcrumbs", "sum", False, False),
    "della": ("della", "sum", True, True),
    "della_linear": ("della", "none", False, True),
}


@dataclass
class GTAConfig(TensorwiseConfig):
    sparsification: str = option("none", choices=K.SPARSIFICATIONS,
                                 help="How each task vector is sparsified: none, magnitude (TIES trim), breadcrumbs "
                                 "(drop outliers and small entries), random (DARE), della (magnitude-ranked "
                                 "random drop).")
    consensus: str = option("none", choices=K.CONSENSUS,
                            help="Sign consensus: none, sum (TIES: sign of the weighted sum) or count (sign of "
                            "the sum of signs).")
    density: float = option(1.0, ge=0.0, le=1.0, help="Fraction of each task vector kept (expected fraction for random methods).")
    weights: list[float] = option([], ge=-1e3, le=1e3, help="w_i, one per model in the pool's order (empty: 1 for every model).")
    normalize: bool = option(False, help="Divide the merged delta by the sum of the participating weights.")
    rescale: bool = option(False, help="Random methods: divide kept entries by their keep probability.")
    gamma: float = option(0.01, ge=0.0, lt=1.0, help="breadcrumbs: fraction of the largest magnitudes removed.")
    epsilon: float = option(0.15, ge=0.0, lt=1.0, help="della: keep probabilities range over density +- epsilon by magnitude rank.")
    scaling_factor: float = option(1.0, ge=-1e3, le=1e3, help="lambda: theta = theta_0 + lambda * merged delta.")
    seed: int = option(0, **SEED_RANGE, help="Seed of the random sparsifications; generators are seeded per (seed, tensor, model).")

    def __post_init__(self) -> None:
        if not 0.0 <= self.density <= 1.0:
            raise ConfigError(f"method.density={self.density} must be in [0, 1].")
        if not 0.0 <= self.gamma < 1.0:
            raise ConfigError(f"method.gamma={self.gamma} must be in [0, 1).")
        if self.sparsification == "della" and self.density < 1.0 and not (
                0.0 < self.density - self.epsilon and self.density + self.epsilon <= 1.0):
            raise ConfigError(f"method.epsilon={self.epsilon} with density={self.density}: keep probabilities "
                              "density +- epsilon must lie in (0, 1]; lower epsilon.")


#: (key, names) -> (weights, densities) for that tensor; set by the mergekit front-end
TensorParams = Callable[[str, list[str]], tuple[list[float], list[float]]]


@register_method
class GeneralizedTaskArithmetic(TensorwiseMerge):
    """Generalized task arithmetic: theta_0 + lambda * consensus-merge of weighted sparsified task vectors.

    Papers: task arithmetic (Ilharco et al. 2023), TIES (Yadav et al. 2023), DARE (Yu et al. 2024),
    Model Breadcrumbs (Davari & Belilovsky 2023), DELLA (Deep et al. 2024), combined as in mergekit's
    generalized task arithmetic. Exact variants: :mod:`fusion_bench.kernels.merging.sparsify`.

    Args:
        config: :class:`GTAConfig`.
    """

    name = "generalized_task_arithmetic"
    config_class: ClassVar = GTAConfig
    requires_pretrained = True
    summary = "Sparsify (magnitude/breadcrumbs/DARE/DELLA), weight, sign consensus, sum (mergekit's family)."
    variant = ("mergekit generalized task arithmetic: tau~_i = sparsify(theta_i - theta_0) (magnitude: |tau| >= "
               "k-th largest, k = floor(density n), ties kept; breadcrumbs: band without the gamma outliers; "
               "random: u >= 1 - density; della: row-rank keep probability), / keep probability when rescale; "
               "consensus sum/count elects +1 where the vote >= 0; delta = sum_i w_i tau~_i m_i [/ sum_i w_i m_i]; "
               "theta = theta_0 + lambda delta.")

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self.tensor_params: TensorParams | None = None

    def check_pool(self, names, has_pretrained):
        super().check_pool(names, has_pretrained)
        w = self.config.weights
        if w and len(w) != len(names):
            raise ConfigError(f"method.weights has {len(w)} values but the pool has {len(names)} models {names}; "
                              "give one weight per model.")
        # without consensus the merged delta is divided by sum_i w_i: refuse a (near) zero sum
        check_weights(w, "method.weights", normalize=self.config.normalize and self.config.consensus == "none")

    # -- parameters ------------------------------------------------------------------------------
    def params(self, key: str, names: list[str]) -> tuple[list[float], list[float]]:
        if self.tensor_params is not None:
            return self.tensor_params(key, names)
        c = self.config
        return (list(c.weights) if c.weights else [1.0] * len(names)), [c.density] * len(names)

    def _random(self) -> bool:
        return self.config.sparsification in ("random", "della")

    def _generator(self, key: str, name: str, density: float) -> torch.Generator | None:
        if not self._random() or density >= 1.0:
            return None
        return seeded_generator(self.config.seed, key, name)

    def _merge(self, key: str, base: torch.Tensor, tensors: list[torch.Tensor], names: list[str],
               thresholds: list[Any] | None, generators: list[torch.Generator | None] | None) -> torch.Tensor:
        c = self.config
        weights, dens = self.params(key, names)
        if c.consensus == "none" and (c.sparsification == "none" or all(d >= 1.0 for d in dens)):
            # plain weighted task arithmetic: sum_i w_i theta_i - (sum_i w_i) theta_0 (no per-model delta)
            acc = torch.zeros_like(base)
            for w, t in zip(weights, tensors):
                acc.add_(t, alpha=float(w))
            wsum = float(sum(weights))
            acc.sub_(base, alpha=wsum)
            if c.normalize:
                acc.div_(wsum if abs(wsum) >= 1e-8 else 1.0)
            return base + c.scaling_factor * acc
        taus = []
        for i, t in enumerate(tensors):
            tau = t - base
            if c.sparsification in ("magnitude", "breadcrumbs") and dens[i] < 1.0:
                thr = thresholds[i] if thresholds is not None else \
                    K.magnitude_thresholds(tau, None, c.sparsification, dens[i], c.gamma)
                tau = K.sparsify(tau, c.sparsification, dens[i], thresholds=thr)
            elif self._random():
                g = generators[i] if generators is not None else self._generator(key, names[i], dens[i])
                tau = K.sparsify(tau, c.sparsification, dens[i], rescale=c.rescale, generator=g, epsilon=c.epsilon)
            taus.append(tau)
        return K.gta_merge(base, taus, weights, consensus=c.consensus, normalize=c.normalize,
                           scaling_factor=c.scaling_factor)

    def merge_tensor(self, key, base, tensors, names):
        return self._merge(key, base, tensors, names, None, None)

    # -- streaming block protocol (fusion_bench.engine.streaming) ----------------------------------
    def needs_block_stats(self) -> bool:
        return self.config.sparsification in ("magnitude", "breadcrumbs")

    def block_stats(self, key: str, base: torch.Tensor, tensor: torch.Tensor, name: str) -> tuple[float, float] | None:
        """The kept magnitude band of one model's whole task vector (streamed, one model at a time)."""
        if not self.needs_block_stats():
            return None
        # the density of this model: params() is per model name
        names = list(self._block_names) if getattr(self, "_block_names", None) else [name]
        _, dens = self.params(key, names)
        d = dens[names.index(name)]
        if d >= 1.0:
            return None
        return K.magnitude_thresholds(tensor, base, self.config.sparsification, d, self.config.gamma)

    def begin_blocks(self, key: str, shape: tuple[int, ...], names: list[str]) -> list[torch.Generator | None]:
        self._block_names = list(names)
        _, dens = self.params(key, names)
        return [self._generator(key, n, d) for n, d in zip(names, dens)]

    def merge_block(self, key, base, tensors, names, ctx, rows):
        stats = ctx.stats if self.needs_block_stats() else None
        return self._merge(key, base, tensors, names, stats, ctx.state)
