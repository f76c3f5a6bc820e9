"""Simple average, weighted average, linear interpolation and task arithmetic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.checks import check_weights
from fusion_bench.config_schema import option
from fusion_bench.errors import ConfigError, did_you_mean
from fusion_bench.kernels.merging import averaging as K
from fusion_bench.methods.base import TensorwiseConfig, TensorwiseMerge, register_method


@register_method
class SimpleAverage(TensorwiseMerge):
    elementwise = True  # row blocks allowed in the streaming engine
    name = "simple_average"
    summary = "Uniform average of the fine-tuned models' weights (model soup)."
    variant = ("Wortsman et al. 2022, uniform soup: theta = mean_i theta_i over the models to fuse "
               "(the base model is not included).")
    min_models = 1

    def merge_tensor(self, key, base, tensors, names):
        return K.simple_average(tensors)


@dataclass
class WeightedAverageConfig(TensorwiseConfig):
    weights: list[float] = option([], ge=-1e3, le=1e3, help="One weight per model to fuse, in the pool's order (empty: uniform).")
    normalize: bool = option(True, help="Divide the weights by their sum.")


@register_method
class WeightedAverage(TensorwiseMerge):
    elementwise = True  # row blocks allowed in the streaming engine
    name = "weighted_average"
    config_class: ClassVar = WeightedAverageConfig
    summary = "Weighted average of the models' weights with given weights."
    variant = "theta = sum_i w_i theta_i, with w normalised to sum to one when normalize=true."

    def check_pool(self, names, has_pretrained):
        super().check_pool(names, has_pretrained)
        w = self.config.weights
        if w and len(w) != len(names):
            raise ConfigError(f"method.weights has {len(w)} values but the pool has {len(names)} models {names}; "
                              "give one weight per model.")
        check_weights(w, "method.weights", normalize=self.config.normalize)

    def merge_tensor(self, key, base, tensors, names):
        w = self.config.weights or [1.0] * len(tensors)
        return K.weighted_average(tensors, w, normalize=self.config.normalize)


@dataclass
class LinearInterpolationConfig(TensorwiseConfig):
    t: float = option(0.5, ge=-10.0, le=10.0, help="Interpolation weight: 0 gives the first model, 1 the second.")
    models: list[str] = option([], help="The two models [a, b] to interpolate (names; '_pretrained_' allowed). "
                               "Empty: the two models of the pool.")


def select_pair(method: str, models: list[str], names: list[str], has_pretrained: bool) -> list[str]:
    """The two models [a, b] a two-model method combines: ``method.models`` if set, else the pool's two.

    Raises ConfigError naming ``method.models`` when the pool or the names do not give exactly two models.
    """
    pair = list(models)
    if not pair:
        if len(names) != 2:
            raise ConfigError(f"{method} combines two models, the pool has {names}; set method.models=[a,b].")
        return list(names)
    if len(pair) != 2:
        raise ConfigError(f"method.models must name exactly two models, got {pair}.")
    valid = names + (["_pretrained_"] if has_pretrained else [])
    for p in pair:
        if p not in valid:
            raise ConfigError(f"method.models names unknown model '{p}'.{did_you_mean(p, valid)}")
    return pair


@register_method
class LinearInterpolation(TensorwiseMerge):
    elementwise = True  # row blocks allowed in the streaming engine
    permutation_invariant = False  # t weighs the first model against the second (symmetric only at t=0.5)
    name = "linear_interpolation"
    config_class: ClassVar = LinearInterpolationConfig
    summary = "Linear interpolation (1-t) a + t b of two models."
    variant = "theta = (1 - t) theta_a + t theta_b, element-wise (t outside [0, 1] extrapolates)."

    def _pair(self, names, has_pretrained):
        return select_pair(self.name, self.config.models, names, has_pretrained)

    def check_pool(self, names, has_pretrained):
        self._pair(names, has_pretrained)

    def merge_tensor(self, key, base, tensors, names):
        by_name = dict(zip(names, tensors))
        if base is not None:
            by_name["_pretrained_"] = base
        a, b = self._pair(names, base is not None)
        return K.lerp(by_name[a], by_name[b], self.config.t)


@dataclass
class TaskArithmeticConfig(TensorwiseConfig):
    scaling_factor: float = option(0.3, ge=-1e3, le=1e3, help="lambda: the task vectors' sum is scaled by it and added to the base.")


@register_method
class TaskArithmetic(TensorwiseMerge):
    elementwise = True  # row blocks allowed in the streaming engine
    name = "task_arithmetic"
    config_class: ClassVar = TaskArithmeticConfig
    requires_pretrained = True
    summary = "Add the scaled sum of task vectors (fine-tuned minus base) to the base model."
    variant = "Ilharco et al. 2023: theta = theta_0 + lambda * sum_i (theta_i - theta_0)."

    def merge_tensor(self, key, base, tensors, names):
        return K.task_arithmetic(base, tensors, self.config.scaling_factor)
