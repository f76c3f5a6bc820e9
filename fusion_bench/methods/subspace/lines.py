"""LiNeS (Wang et al., ICLR 2025) as a plug-in on any tensor-wise merge: the base method's merged task
vector is scaled per tensor by lambda(l) = alpha + beta l/(L-1) of the tensor's residual block.
Kernel: :mod:`fusion_bench.kernels.subspace.lines`.

:class:`BaseMergePlugin` (the base method built from ``base_method``/``base_options``, its pool check and
pre-pass delegated) is shared with :mod:`fusion_bench.methods.subspace.svc`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fusion_bench.config_schema import build_config, option
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.kernels.subspace import lines as K
from fusion_bench.methods.base import TensorwiseConfig, TensorwiseMerge, get_method_class, register_method


def build_base_method(owner: str, base_method: str, base_options: dict[str, Any],
                      defaults: dict[str, Any] | None = None) -> TensorwiseMerge:
    """The tensor-wise merge a plug-in wraps; refuses methods that are not tensor-wise or do not use the base."""
    from fusion_bench.errors import RegistryError

    try:
        cls = get_method_class(base_method)
    except RegistryError as e:
        raise ConfigError(f"method.base_method: {e}") from None
    if not issubclass(cls, TensorwiseMerge) or cls.uses_data:
        raise ConfigError(f"method.base_method='{base_method}' is not a data-free tensor-wise merge; {owner} wraps "
                          "one (e.g. task_arithmetic, ties_merging, dare_task_arithmetic, wudi_merging).")
    if not cls.requires_pretrained:
        raise ConfigError(f"method.base_method='{base_method}' does not use the pretrained model; {owner} needs a "
                          "merge of task vectors (e.g. task_arithmetic, ties_merging).")
    opts = dict(base_options)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    for k, v in (defaults or {}).items():
        if k in fields and k not in opts:
            opts[k] = v
    cfg = build_config(cls.config_class, opts, prefix="method.base_options", ignore=("name",))
    return cls(cfg)


@dataclass
class PluginConfig(TensorwiseConfig):
    base_method: str = option("task_arithmetic", help="Name of a registered tensor-wise merge that uses the "
                              "pretrained model; its merged task vector is post-processed.")
    base_options: dict[str, Any] = option({}, help="Options of base_method (e.g. {scaling_factor: 0.3}).")


class BaseMergePlugin(TensorwiseMerge):
    """A tensor-wise merge that post-processes the merge of another one (``base_method``)."""

    requires_pretrained = True
    #: options the base method gets unless base_options sets them (when it has such a field)
    base_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self.base = build_base_method(self.name, self.config.base_method, self.config.base_options,
                                      self.base_defaults)

    def check_pool(self, names, has_pretrained):
        super().check_pool(names, has_pretrained)
        self.base.check_pool(names, has_pretrained)

    def prepare(self, base, sources, names, keys):
        self.base.prepare(base, sources, names, keys)

    def base_merge(self, key, base, tensors, names) -> torch.Tensor:
        """The base method's merged tensor (compute dtype)."""
        return self.base.merge_tensor(key, base, tensors, names).to(base.dtype)


@dataclass
class LiNeSConfig(PluginConfig):
    alpha: float | None = option(None, ge=-1e3, le=1e3,
                                 help="lambda of the shallowest block and of tensors outside numbered blocks; null: "
                                 "the paper's multi-task value (||sum_i tau_i||_1 / ||tau_merged||_1) / N.")
    beta: float = option(0.5, ge=-1e3, le=1e3,
                         help="lambda(deepest) - lambda(shallowest); the paper tunes it on validation data over "
                         "[0, 1] (single-task editing uses beta = 1 - alpha).")
    layer_pattern: str = option("", help="Regex whose first group is the block number of a tensor name; empty: "
                                "layers.N., layer.N., h.N., resblocks.N., blocks.N., block.N. (leftmost match).")

    def __post_init__(self) -> None:
        try:
            K.compile_layer_pattern(self.layer_pattern)
        except (re.error, ValueError) as e:
            raise ConfigError(f"method.layer_pattern={self.layer_pattern!r} is not a regex with a group "
                              f"capturing the layer number ({e}); e.g. 'layers\\.(\\d+)\\.'.") from None


@register_method
class LiNeS(BaseMergePlugin):
    """LiNeS: theta_0 + lambda(l) * tau_merged per tensor, lambda(l) = alpha + beta l/(L-1).

    Paper: Wang et al., ICLR 2025 (arXiv 2410.17146), multi-task merging variant of the official code:
    tau_merged is the base method's merged task vector (scaling_factor 1 unless base_options sets it),
    tensors outside numbered blocks get alpha, alpha defaults to (||sum_i tau_i||_1/||tau_merged||_1)/N.

    Args:
        config: :class:`LiNeSConfig`.
    """

    name = "lines"
    config_class: ClassVar = LiNeSConfig
    base_defaults: ClassVar = {"scaling_factor": 1.0}
    summary = "Layer-increasing scaling alpha + beta l/(L-1) of any tensor-wise merge's task vector."
    variant = ("Wang et al. 2025 (LiNeS), multi-task: theta = theta_0 + lambda(l) (merge(theta) - theta_0), "
               "lambda(l) = alpha + beta l/(L-1) for block l (0-based) of L, alpha outside blocks; alpha default "
               "(||sum_i tau_i||_1 / ||tau_merged||_1) / N over the whole model; base scaling_factor 1.")
    conformance_config: ClassVar = {"layer_pattern": r"^fc(\d+)\."}

    def prepare(self, base, sources, names, keys):
        super().prepare(base, sources, names, keys)
        rx = K.compile_layer_pattern(self.config.layer_pattern)
        self._rx = rx
        self._n_layers = K.num_layers(keys, rx)
        if self._n_layers == 0:
            pat = self.config.layer_pattern or "layers.N. / layer.N. / h.N. / resblocks.N. / blocks.N. / block.N."
            raise ModelMismatchError(f"lines: no tensor name has a layer number ({pat}), e.g. '{keys[0] if keys else ''}'"
                                     "; set method.layer_pattern to a regex capturing it.")
        self._alpha = self.config.alpha
        if self._alpha is None:
            l1_sum = 0.0
            l1_merged = 0.0
            order = sorted(range(len(names)), key=lambda i: names[i])
            for key in keys:
                b = base.get(key)
                cd = self.compute_dtype(b.dtype)
                b = b.to(cd)
                ts = [sources[i].get(key).to(cd) for i in range(len(names))]
                merged = self.base_merge(key, b, ts, names) - b
                summed = torch.zeros_like(b)
                for i in order:
                    summed.add_(ts[i] - b)
                l1_sum += float(summed.abs().sum(dtype=torch.float64))
                l1_merged += float(merged.abs().sum(dtype=torch.float64))
            self._alpha = K.auto_alpha(l1_sum, l1_merged, len(names))

    def merge_tensor(self, key, base, tensors, names):
        if getattr(self, "_alpha", None) is None:
            raise RuntimeError("lines: prepare() must run before merging (the engines call it).")
        lam = K.lines_scale(K.layer_index(key, self._rx), self._n_layers, self._alpha, self.config.beta)
        return base + lam * (self.base_merge(key, base, tensors, names) - base)

    def hyperparameters(self):
        hp = super().hyperparameters()
        if getattr(self, "_alpha", None) is not None:
            hp["alpha_used"] = self._alpha
        return hp
