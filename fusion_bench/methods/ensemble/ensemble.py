"""Output ensembles: simple (mean), weighted and max-confidence ("max model predictor").

Every member is kept and run; the ensemble combines their outputs (logits) per example. The
members are the pool's models to fuse (``_pretrained_`` is not a member). Ensembles load whole
models, which is inherent to the method; the report's extra parameters are (M - 1) x the
parameters of one member.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.checks import check_weights
from fusion_bench.config_schema import option
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.methods.base import FusionMethod, FusionResult, MethodConfig, register_method
from fusion_bench.models.ensemble import Ensemble


@dataclass
class EnsembleConfig(MethodConfig):
    devices: list[str] | str | None = option(
        None, help="Place the members round-robin on these devices (member i on devices[i % K]): a list "
        "([cuda:0,cuda:1]), auto (every visible GPU) or a number of GPUs; a missing GPU falls back to the CPU. "
        "null: the run's devices option, else where the pool loads them.")


class _OutputEnsemble(FusionMethod):
    family = "ensemble"
    mode: ClassVar[str] = "mean"

    def weights(self, names: list[str]) -> list[float] | None:
        return None

    def run(self, modelpool) -> FusionResult:
        t0 = time.perf_counter()
        names = modelpool.model_names
        if not names:
            raise ModelMismatchError(f"Method '{self.name}' needs at least one model besides '_pretrained_'.")
        weights = self.weights(names)
        members = {n: modelpool.load_model(n) for n in names}
        model = Ensemble(members, mode=self.mode, weights=weights)
        placed = None
        if getattr(self.config, "devices", None) not in (None, [], ()):
            from fusion_bench.engine.devices import resolve_devices

            placed = [str(d) for d in model.place(resolve_devices("auto", self.config.devices, key="method.devices"))]
        first = members[names[0]]
        one = sum(p.numel() for p in first.parameters())
        total = sum(p.numel() for m in members.values() for p in m.parameters())
        extra = {"members": names, "extra_parameters": (len(names) - 1) * one,
                 "parameters": {"total": total, "per_member": one}}
        if weights is not None:
            extra["weights"] = weights
        if placed is not None:
            extra["member_devices"] = placed
        return FusionResult("ensemble", model=model, metadata=self._metadata(t0, **extra))


@register_method
class SimpleEnsemble(_OutputEnsemble):
    """Average of the members' outputs.

    Paper: the classic output ensemble (e.g. Dietterich, "Ensemble methods in machine learning",
    2000), as FusionBench's ``simple_ensemble``. Variant: z(x) = (1/M) sum_m z_m(x) on the members'
    logits (not probabilities).

    Args:
        config: :class:`EnsembleConfig` (devices).
    """

    name = "simple_ensemble"
    config_class: ClassVar = EnsembleConfig
    summary = "Ensemble: the average of the members' outputs (logits)."
    variant = "z(x) = (1/M) sum_m z_m(x): uniform mean of the members' logits."
    mode = "mean"


@dataclass
class WeightedEnsembleConfig(EnsembleConfig):
    weights: list[float] = option([], ge=-1e3, le=1e3, help="One weight per member, in the pool's order (empty: uniform).")
    normalize: bool = option(True, help="Divide the weights by their sum.")


@register_method
class WeightedEnsemble(_OutputEnsemble):
    """Weighted sum of the members' outputs with given weights.

    Paper: weighted output averaging, as FusionBench's ``weighted_ensemble``. Variant:
    z(x) = sum_m w_m z_m(x) on logits, w divided by sum(w) when ``normalize``.

    Args:
        config: :class:`WeightedEnsembleConfig` (weights, normalize, devices).
    """

    name = "weighted_ensemble"
    config_class: ClassVar = WeightedEnsembleConfig
    summary = "Ensemble: a weighted sum of the members' outputs (logits) with given weights."
    variant = "z(x) = sum_m w_m z_m(x) on logits; w normalised to sum to one when normalize=true (empty: uniform)."
    mode = "weighted"

    def weights(self, names: list[str]) -> list[float]:
        w = list(self.config.weights) or [1.0] * len(names)
        if len(w) != len(names):
            raise ConfigError(f"method.weights has {len(w)} values but the pool has {len(names)} models {names}; "
                              "give one weight per model.")
        check_weights(w, "method.weights", normalize=self.config.normalize)
        if self.config.normalize:
            s = sum(w)
            w = [x / s for x in w]
        return w


@register_method
class MaxModelPredictor(_OutputEnsemble):
    """Per example, the output of the most confident member.

    Paper: FusionBench's ``max_model_predictor`` (Tang et al., 2024). Variant: for each example,
    the member m* = argmax_m max_c softmax(z_m(x))_c is chosen and its logits are returned (ties:
    the first member in pool order).

    Args:
        config: :class:`EnsembleConfig` (devices).
    """

    name = "max_model_predictor"
    config_class: ClassVar = EnsembleConfig
    summary = "Ensemble: per example, the member with the highest maximum softmax probability."
    variant = ("Per example x: z(x) = z_{m*}(x), m* = argmax_m max_c softmax(z_m(x))_c (first member on ties).")
    mode = "max_confidence"
    permutation_invariant = False  # exact ties in confidence pick the first member
