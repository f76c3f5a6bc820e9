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
    rescale_norm: str = option("probability", choices=("probability", "l1"),
                               help="With rescale: 'probability' divides each kept entry by its keep probability (DARE, "
                               "DELLA papers); 'l1' scales each sparsified task vector back to its L1 norm (mergekit "
                               "0.1.5, for every sparsification).")
    tie_break: str = option("index", choices=("index", "all", "mergekit"),
                            help="magnitude/breadcrumbs among entries of equal magnitude: 'index' keeps exactly the "
                            "rule's number of entries, lower flat index first; 'all' keeps every entry tied at the "
                            "lower bound (and drops every one tied at the upper); 'mergekit' keeps exactly mergekit's "
                            "k entries, chosen among ties by torch's default sort as mergekit does.")
    task_vector_dtype: str | None = option(None, choices=(None, "float32", "bfloat16", "float16"),
                                           help="Round each task vector theta_i - theta_0 to this dtype before "
                                           "sparsifying (mergekit forms it in its 'dtype'); None: exact.")

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
#: (key, names) -> {"gamma": [per model], "epsilon": [per model], "lambda": float} for that tensor (any subset)
TensorExtras = Callable[[str, list[str]], dict[str, Any]]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    variant = ("mergekit generalized task arithmetic: tau~_i = sparsify(theta_i - theta_0) (magnitude: exactly the "
               "k = floor(density n) largest |tau|; breadcrumbs: exactly floor(density n) entries below the "
               "floor(gamma n) outliers; ties in magnitude by lower flat index (tie_break); "
               "random: u >= 1 - density; della: row-rank keep probability), / keep probability when rescale; "
               "consensus sum/count elects +1 where the vote >= 0; delta = sum_i w_i tau~_i m_i [/ sum_i w_i m_i]; "
               "theta = theta_0 + lambda delta.")

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self.tensor_params: TensorParams | None = None
        self.tensor_extras: TensorExtras | None = None

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

    def extras(self, key: str, names: list[str]) -> tuple[list[float], list[float], float]:
        """(gamma per model, epsilon per model, lambda) for tensor ``key``."""
        c = self.config
        e = self.tensor_extras(key, names) if self.tensor_extras is not None else {}
        return (list(e.get("gamma", [c.gamma] * len(names))), list(e.get("epsilon", [c.epsilon] * len(names))),
                float(e.get("lambda", c.scaling_factor)))

    def _random(self) -> bool:
        return self.config.sparsification in ("random", "della")

    def _generator(self, key: str, name: str, density: float) -> torch.Generator | None:
        if not self._random() or density >= 1.0:
            return None
        return seeded_generator(self.config.seed, key, name)

    def _tau(self, t: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        tau = t - base
        dt = _DTYPES.get(self.config.task_vector_dtype or "")
        if dt is not None and dt != tau.dtype:
            tau = tau.to(dt).to(t.dtype)
        return tau

    def _l1(self) -> bool:
        return self.config.rescale and self.config.rescale_norm == "l1"

    def _sparsify(self, key: str, tau: torch.Tensor, name: str, density: float, gamma: float, epsilon: float,
                  stat: dict[str, Any] | None, generator: torch.Generator | None, offset: int) -> torch.Tensor:
        """One model's sparsified task vector (or row block of it, starting at flat index ``offset``)."""
        c = self.config
        if c.sparsification == "none" or density >= 1.0:
            return tau
        if c.sparsification in ("magnitude", "breadcrumbs"):
            if stat is None:
                stat = self._stat(key, tau, name, density, gamma, epsilon)
            if "ord_band" in stat:  # from row-block histograms: ordinals among ties counted block by block
                out = tau * K.ordinal_band_mask(tau, stat["ord_band"], stat["seen"])
            elif c.tie_break == "mergekit":
                lo, hi, ties = stat["kept"]
                out = tau * K.kept_mask(tau, lo, hi, ties, offset)
            elif c.tie_break == "index":
                out = tau * K.rank_band_mask(tau, stat["rank_band"], offset)
            else:
                out = K.sparsify(tau, c.sparsification, density, thresholds=stat["band"])
            return out.mul_(stat["scale"]) if stat.get("scale") is not None else out
        if generator is None:
            generator = self._generator(key, name, density)
        if self._l1():
            if stat is None:  # the whole tensor: the L1 factor of this very draw
                g0 = generator.get_state()
                stat = self._stat(key, tau, name, density, gamma, epsilon)
                generator.set_state(g0)
            out = K.sparsify(tau, c.sparsification, density, rescale=False, generator=generator, epsilon=epsilon)
            return out.mul_(stat["scale"]) if stat.get("scale") is not None else out
        return K.sparsify(tau, c.sparsification, density, rescale=c.rescale, generator=generator, epsilon=epsilon)

    def _stat(self, key: str, tau: torch.Tensor, name: str, density: float, gamma: float, epsilon: float
              ) -> dict[str, Any] | None:
        """Whole-tensor facts one model's sparsification needs: the kept band or set, the L1 rescale factor."""
        c = self.config
        if c.sparsification == "none" or density >= 1.0:
            return None
        out: dict[str, Any] = {}
        if c.sparsification in ("magnitude", "breadcrumbs"):
            if c.tie_break == "mergekit":
                out["kept"] = K.mergekit_kept(tau, c.sparsification, density, gamma)
                kept = K.kept_mask(tau, *out["kept"])
            elif c.tie_break == "index":
                out["rank_band"] = K.magnitude_band(tau, c.sparsification, density, gamma)
                kept = K.rank_band_mask(tau, out["rank_band"]) if self._l1() else None
            else:
                out["band"] = K.magnitude_thresholds(tau, None, c.sparsification, density, gamma)
                kept = K.band_mask(tau, *out["band"]) if self._l1() else None
        elif self._l1():
            g = self._generator(key, name, density)  # a fresh generator: the same draw as the merge pass
            kept = K.sparsify(tau, c.sparsification, density, rescale=False, generator=g, epsilon=epsilon) != 0
            kept |= (tau == 0)  # zeros are kept or not alike
        else:
            return None
        if self._l1():
            out["scale"] = K.l1_rescale_factor(tau, kept)
        return out

    def _merge(self, key: str, base: torch.Tensor, tensors: list[torch.Tensor], names: list[str],
               stats: list[Any] | None, generators: list[torch.Generator | None] | None,
               offset: int = 0) -> torch.Tensor:
        c = self.config
        weights, dens = self.params(key, names)
        gammas, epss, lam = self.extras(key, names)
        if c.consensus == "none" and (c.sparsification == "none" or all(d >= 1.0 for d in dens)) \
                and c.task_vector_dtype is None:
            # plain weighted task arithmetic: sum_i w_i theta_i - (sum_i w_i) theta_0 (no per-model delta)
            acc = torch.zeros_like(base)
            for w, t in zip(weights, tensors):
                acc.add_(t, alpha=float(w))
            wsum = float(sum(weights))
            acc.sub_(base, alpha=wsum)
            if c.normalize:
                acc.div_(wsum if abs(wsum) >= 1e-8 else 1.0)
            return base + lam * acc
        taus = []
        for i, t in enumerate(tensors):
            tau = self._tau(t, base)
            st = stats[i] if stats is not None else None
            g = generators[i] if generators is not None else None
            taus.append(self._sparsify(key, tau, names[i], dens[i], gammas[i], epss[i], st, g, offset))
        return K.gta_merge(base, taus, weights, consensus=c.consensus, normalize=c.normalize, scaling_factor=lam)

    def merge_tensor(self, key, base, tensors, names):
        return self._merge(key, base, tensors, names, None, None)

    # -- streaming block protocol (fusion_bench.engine.streaming) ----------------------------------
    def needs_block_stats(self) -> bool:
        return self.config.sparsification in ("magnitude", "breadcrumbs") or (self._random() and self._l1())

    def block_stats(self, key: str, base: torch.Tensor, tensor: torch.Tensor, name: str) -> dict[str, Any] | None:
        """Whole-tensor facts of one model's task vector (streamed, one model at a time)."""
        if not self.needs_block_stats():
            return None
        names = list(self._block_names) if getattr(self, "_block_names", None) else [name]
        _, dens = self.params(key, names)
        gammas, epss, _ = self.extras(key, names)
        i = names.index(name)
        cd = self.compute_dtype(base.dtype)  # the engine passes the checkpoint dtype; merge_block gets cd
        return self._stat(key, self._tau(tensor.to(cd), base.to(cd)), name, dens[i], gammas[i], epss[i])

    # statistics from row blocks (bounded memory): the lower-index trim of a bfloat16-valued task vector is
    # decided by its magnitude histogram, which the blocks' histograms add up to
    def stats_from_blocks(self, key: str, dtype: torch.dtype) -> bool:
        c = self.config
        bf16_tau = self.compute_dtype(dtype) == torch.bfloat16 or c.task_vector_dtype == "bfloat16"
        return (c.tie_break == "index" and c.sparsification in ("magnitude", "breadcrumbs") and not self._l1()
                and bf16_tau)

    def block_stats_partial(self, key: str, base: torch.Tensor, tensor: torch.Tensor, name: str) -> torch.Tensor:
        cd = self.compute_dtype(base.dtype)
        return K.bf16_magnitude_histogram(self._tau(tensor.to(cd), base.to(cd)))

    def add_block_stats(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.add_(b)

    def combine_block_stats(self, key: str, counts: torch.Tensor, name: str) -> dict[str, Any] | None:
        names = list(self._block_names) if getattr(self, "_block_names", None) else [name]
        _, dens = self.params(key, names)
        gammas, _, _ = self.extras(key, names)
        i = names.index(name)
        if dens[i] >= 1.0:
            return None
        n = int(counts.sum())
        if self.config.sparsification == "magnitude":
            r0, r1 = 0, K.magnitude_k(n, dens[i])
        else:
            n_top, n_keep = K.breadcrumbs_counts(n, dens[i], gammas[i])
            r0, r1 = n_top, n_top + n_keep
        band = K.ordinal_band(counts, r0, r1)
        return {"ord_band": band, "seen": [0] * len(band[2])}

    def begin_blocks(self, key: str, shape: tuple[int, ...], names: list[str]) -> list[torch.Generator | None]:
        self._block_names = list(names)
        _, dens = self.params(key, names)
        return [self._generator(key, n, d) for n, d in zip(names, dens)]

    def merge_block(self, key, base, tensors, names, ctx, rows):
        stats = ctx.stats if self.needs_block_stats() else None
        row_elems = 1
        for d in base.shape[1:]:
            row_elems *= d
        return self._merge(key, base, tensors, names, stats, ctx.state, offset=rows[0] * row_elems)
