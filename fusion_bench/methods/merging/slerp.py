"""Spherical linear interpolation of two models, tensor by tensor (Shoemake 1985; as in mergekit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.config_schema import option
from fusion_bench.errors import ConfigError
from fusion_bench.kernels.merging import slerp as K
from fusion_bench.methods.base import TensorwiseConfig, TensorwiseMerge, register_method
from fusion_bench.methods.merging.averaging import select_pair


@dataclass
class SlerpConfig(TensorwiseConfig):
    t: float = option(0.5, ge=-10.0, le=10.0, help="Interpolation parameter: 0 gives the first model, 1 the second.")
    models: list[str] = option([], help="The two models [a, b] to interpolate (names; '_pretrained_' allowed). "
                               "Empty: the two models of the pool.")
    colinear_eps: float = option(
        K.COLINEAR_EPS, ge=0.0, lt=1.0, help="Linear interpolation instead when |cos(angle)| > 1 - colinear_eps (nearly "
        "parallel or opposite tensors) or a tensor has zero norm.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.colinear_eps < 1.0:
            raise ConfigError(f"method.colinear_eps={self.colinear_eps} must be in [0, 1).")


@register_method
class Slerp(TensorwiseMerge):
    """SLERP of two models.

    Paper: Shoemake, "Animating rotation with quaternion curves" (SIGGRAPH 1985), applied per tensor
    as mergekit's ``slerp``. Variant: Omega = arccos(<a, b> / (|a||b|)) of the flattened tensors;
    theta = sin((1-t) Omega)/sin(Omega) a + sin(t Omega)/sin(Omega) b on the raw tensors; linear
    interpolation when |cos Omega| > 1 - colinear_eps (default 5e-4) or a tensor has zero norm.

    Args:
        config: :class:`SlerpConfig` (t, models, colinear_eps, exclude).
    """

    name = "slerp"
    config_class: ClassVar = SlerpConfig
    permutation_invariant = False  # t weighs the first model against the second
    summary = "Spherical linear interpolation of two models, per tensor."
    variant = ("Shoemake 1985, per tensor as mergekit: Omega = angle between the flattened tensors a, b; "
               "theta = [sin((1-t)Omega) a + sin(t Omega) b] / sin(Omega); linear interpolation when "
               "|cos Omega| > 1 - colinear_eps (default 5e-4, mergekit's 0.9995) or a tensor has zero norm.")

    def _pair(self, names: list[str], has_pretrained: bool) -> list[str]:
        return select_pair(self.name, self.config.models, names, has_pretrained)

    def check_pool(self, names, has_pretrained):
        super().check_pool(names, has_pretrained)
        self._pair(names, has_pretrained)

    def merge_tensor(self, key, base, tensors, names):
        by_name = dict(zip(names, tensors))
        if base is not None:
            by_name["_pretrained_"] = base
        a, b = self._pair(names, base is not None)
        return K.slerp(by_name[a], by_name[b], self.config.t, self.config.colinear_eps)
