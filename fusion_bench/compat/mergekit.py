"""mergekit compatibility: run a mergekit merge YAML with fusion_bench's streaming engine.

    fusion_bench mergekit config.yml OUT_DIR [--dry-run] [--max-shard-size 5GB] [--block-elements N]

Accepted keys: ``models`` (each ``model`` + ``parameters``), ``base_model``, ``merge_method``,
``parameters`` (global), ``dtype``, ``out_dtype``, ``tokenizer_source`` / ``tokenizer.source``,
``slices`` (``passthrough``; for the other methods, several sources per slice when the layers stay in
place: per-slice parameters and depth t, as mergekit). Parameters may be scalars, layer gradients (lists of numbers,
interpolated over the layers: t = i / (L - 1) for layer i of L, t = 0 outside the layers, as
mergekit >= 0.1.2) or lists of ``{filter, value}`` (the first entry
whose filter is absent, ``*`` or a substring of the tensor name wins). A model's own parameters win
over the global ones.

Method mapping (see docs/mergekit.md for the variants and the differences):

=================  ==========================================================================
mergekit           fusion_bench
=================  ==========================================================================
linear             :class:`MergekitLinear` (weighted average; ``normalize`` default true)
task_arithmetic    ``generalized_task_arithmetic`` sparsification none, no consensus
ties               ... magnitude (exactly k = max(1, int(density n)) per tensor, mergekit's sort), consensus sum
dare_ties          ... random (DARE, L1-norm rescale), consensus sum
dare_linear        ... random, no consensus
breadcrumbs(_ties) ... breadcrumbs (exactly int(density n), per-model gamma), [consensus sum]
della(_linear)     ... della (MagPrune per row, per-model epsilon, L1 rescale), [consensus sum, normalize]
slerp              :class:`MergekitSlerp` (fusion_bench's SLERP kernel, per-tensor ``t``)
karcher            :class:`MergekitKarcher` (max_iter, tol; base_model optional, an input when given)
passthrough        ``passthrough`` (slices of layer ranges, ``scale``, head from the last slice)
model_stock        :class:`MergekitModelStock` (mergekit's clamp and singularity rule, filter_wise)
nuslerp            :class:`MergekitNuSlerp` (two models, t = w_2 / (w_1 + w_2), flatten / row-wise, optional base)
multislerp         :class:`MergekitMultiSlerp` (barycentric SLERP, normalize_weights, eps, optional base)
sce                :class:`MergekitSCE` (select_topk by variance, mean-square weights, sign erase)
arcee_fusion       ``arcee_fusion`` (importance outliers by a Tukey fence; one model besides the base)
nearswap           ``nearswap`` (t / distance weights; ``t`` per tensor; one model besides the base)
ram, ramplus_tl    ``ram``, ``ramplus_tl`` (mean of the changed task vectors; RAM+ unique-entry lambdas)
=================  ==========================================================================

Model references may carry a LoRA (``MODEL+LORA`` or ``{model, lora}``): the adapter is applied first, as mergekit
does (:mod:`fusion_bench.compat.lora_apply`). ``modules: {default: ...}`` (the one module of a causal LM),
``chat_template`` (text or ``auto``) and the tokenizer settings (``tokenizer_source`` / ``tokenizer: {source: union|base|
MODEL, tokens, pad_to_multiple_of}``: the output vocabulary is built and every model's embedding rows are aligned
to it by token, :mod:`fusion_bench.compat.mergekit_vocab`) are accepted; multi-module architectures are refused
in one line.

Every generalized task arithmetic method takes ``lambda`` (per tensor) and computes, as mergekit, in ``dtype``
(else the checkpoint dtype) in mergekit's order of operations (:class:`MergekitGTA`); so do every other method but
``linear`` and ``slerp``, which compute in float32 (float64 for float64 inputs). The output is written in ``out_dtype`` (else ``dtype``, else the base
model's dtype). Random masks come from
fusion_bench's per-tensor seeded generators, not mergekit's global RNG, so DARE/DELLA merges are
equal in distribution, not bit for bit.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from fusion_bench.checks import check_weights
from fusion_bench.errors import ConfigError, did_you_mean
from fusion_bench.methods.base import TensorwiseConfig, TensorwiseMerge
from fusion_bench.methods.merging.sparsify import GeneralizedTaskArithmetic

TOP_KEYS = {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "tokenizer", "slices", "name", "modules", "chat_template"}
UNSUPPORTED_KEYS: dict[str, str] = {}
#: the one module of the single-module architectures fusion_bench merges (mergekit names it 'default')
MODULE_KEYS = {"models", "slices", "parameters"}
GTA_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
               "della_linear")
SUPPORTED = (*GTA_METHODS, "linear", "slerp", "karcher", "passthrough", "model_stock", "nuslerp", "multislerp", "sce",
             "arcee_fusion", "nearswap", "ram", "ramplus_tl")
#: methods whose base_model is optional (without it the models themselves are interpolated)
BASE_OPTIONAL = ("nuslerp", "multislerp")
#: methods for which mergekit treats base_model as one of the merged inputs (slerp: the t = 0 end)
BASE_IS_INPUT = ("linear", "karcher", "slerp")
LAYER_RX = re.compile(r"\.layers\.(\d+)\.")

# The parameters mergekit (0.1.x, merge_methods/*.py) defines for each method: (parameters read only from the
# global ``parameters``, tensor parameters read per model then from the global ``parameters``). Anything else
# is refused: mergekit would ignore it, so a misspelt key would silently change the merge.
_GTA_GLOBAL = ("int8_mask", "normalize", "rescale", "lambda")
METHOD_PARAMETERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("normalize",), ("weight",)),
    "task_arithmetic": (_GTA_GLOBAL, ("weight", "density")),
    "ties": (_GTA_GLOBAL, ("weight", "density")),
    "dare_ties": (_GTA_GLOBAL, ("weight", "density")),
    "dare_linear": (_GTA_GLOBAL, ("weight", "density")),
    "breadcrumbs": (_GTA_GLOBAL, ("weight", "density", "gamma")),
    "breadcrumbs_ties": (_GTA_GLOBAL, ("weight", "density", "gamma")),
    "della": (_GTA_GLOBAL, ("weight", "density", "epsilon")),
    "della_linear": (_GTA_GLOBAL, ("weight", "density", "epsilon")),
    "slerp": (("t",), ()),
    "karcher": (("max_iter", "tol"), ()),
    "passthrough": ((), ("scale",)),
    "model_stock": (("filter_wise",), ()),
    "nuslerp": (("nuslerp_row_wise", "nuslerp_flatten"), ("weight",)),
    "multislerp": (("normalize_weights", "eps"), ("weight",)),
    "sce": (("int8_mask", "select_topk"), ()),
    "arcee_fusion": ((), ()),
    "nearswap": (("t",), ()),
    "ram": (("epsilon",), ()),
    "ramplus_tl": (("r", "alpha", "epsilon"), ()),
}
#: valid values of numeric parameters: (low, low inclusive, high, high inclusive, why)
PARAMETER_RANGES: dict[str, tuple[float, bool, float, bool, str]] = {
    "weight": (-math.inf, False, math.inf, False, "any finite number"),
    "density": (0.0, False, 1.0, True, "the fraction of each task vector kept; mergekit keeps everything at "
                "density >= 1 and cannot trim to nothing at 0"),
    "gamma": (0.0, True, 1.0, False, "the fraction of the largest magnitudes removed"),
    "epsilon": (0.0, True, 0.5, False, "keep probabilities density +- epsilon must lie in (0, 1)"),
    "lambda": (-1e3, True, 1e3, True, "the scale of the merged task vector, as fusion_bench's scaling_factor"),
    "scale": (-1e3, True, 1e3, True, "the factor a passthrough tensor is multiplied by"),
    "t": (-10.0, True, 10.0, True, "the interpolation parameter, as fusion_bench's slerp t"),
    "select_topk": (0.0, True, 1.0, True, "the fraction of the entries of largest variance kept"),
    "eps": (0.0, True, 1.0, True, "the small constant added to norms"),
}
#: ranges that differ by method (the same name means another thing there)
METHOD_RANGES: dict[str, dict[str, tuple[float, bool, float, bool, str]]] = {
    "ram": {"epsilon": (0.0, True, 1e3, True, "the magnitude above which a task vector entry counts as changed")},
    "ramplus_tl": {"epsilon": (0.0, True, 1e3, True, "the magnitude above which a task vector entry counts as "
                               "changed"),
                   "r": (0.0, True, 1e3, True, "the strength of the unique-entry rescaling"),
                   "alpha": (0.0, True, 1e3, True, "the cap on the shared-to-unique ratio")},
    "nearswap": {"t": (0.0, True, 1e3, True, "the distance within which the other model's value is taken")},
}
_BOOL_PARAMETERS = ("int8_mask", "normalize", "rescale", "filter_wise", "nuslerp_row_wise", "nuslerp_flatten",
                    "normalize_weights")
#: global parameters mergekit also reads from a slice's ``parameters`` that fusion_bench evaluates per tensor
SLICE_GLOBAL_PARAMETERS = ("t", "lambda", "select_topk", "eps", "nuslerp_row_wise", "nuslerp_flatten",
                           "normalize_weights", "epsilon", "r", "alpha")


def _range_text(lo: float, lo_in: bool, hi: float, hi_in: bool) -> str:
    return f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def _check_leaves(name: str, setting: Any, where: str, method: str = "") -> None:
    """Check every number in a parameter setting (scalar, gradient or filters) against its range; the
    ranges are intervals, so values interpolated in a gradient are in range too."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, (list, tuple)):
        for i, e in enumerate(setting):
            if isinstance(e, Mapping):
                _check_leaves(name, e.get("value"), f"{where}[{i}].value", method)
            else:
                _check_leaves(name, e, f"{where}[{i}]", method)
        return
    if name in _BOOL_PARAMETERS:
        if not isinstance(setting, bool):
            raise ConfigError(f"mergekit parameter {where}={setting!r} must be true or false.")
        return
    ranges = {**PARAMETER_RANGES, **METHOD_RANGES.get(method, {})}
    if name not in ranges:
        return
    if isinstance(setting, bool) or not isinstance(setting, (int, float)):
        raise ConfigError(f"mergekit parameter {where}={setting!r} is not a number.")
    v = float(setting)
    if not math.isfinite(v):
        raise ConfigError(f"mergekit parameter {where}={v} is not a finite number; give a finite value.")
    lo, lo_in, hi, hi_in, why = ranges[name]
    if (v < lo or (v == lo and not lo_in)) or (v > hi or (v == hi and not hi_in)):
        raise ConfigError(f"mergekit parameter {where}={setting!r} is out of range: {name} must be in "
                          f"{_range_text(lo, lo_in, hi, hi_in)} ({why}).")


def validate_parameters(method_name: str, global_params: Mapping[str, Any],
                        model_params: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse unknown parameter names (naming the closest valid one for ``method_name``), parameters given
    where mergekit does not read them, and values that are not finite or out of range. Called before any
    tensor is read.

    Args:
        method_name: the mergekit merge_method.
        global_params: the top-level ``parameters``.
        model_params: where (e.g. ``models[0].parameters``) -> that model's or slice source's parameters.
    """
    global_only, tensor = METHOD_PARAMETERS[method_name]
    valid = (*global_only, *tensor)
    if not isinstance(global_params, Mapping):
        raise ConfigError(f"mergekit 'parameters' must be a mapping of parameter names to values, got {global_params!r}.")
    for k, v in global_params.items():
        if k not in valid:
            raise ConfigError(f"Unknown mergekit parameter 'parameters.{k}' for merge_method {method_name}."
                              f"{did_you_mean(str(k), valid) if valid else ' It takes no parameters.'}")
        _check_leaves(k, v, f"parameters.{k}", method_name)
    for where, params in model_params.items():
        if not isinstance(params, Mapping):
            raise ConfigError(f"mergekit {where} must be a mapping of parameter names to values, got {params!r}.")
        slice_level = bool(re.fullmatch(r"slices\[\d+\]\.parameters|modules\.default\.parameters", where))
        for k, v in params.items():
            if k in global_only and slice_level and k in SLICE_GLOBAL_PARAMETERS:
                _check_leaves(k, v, f"{where}.{k}", method_name)
                continue
            if k in global_only:
                raise ConfigError(f"mergekit parameter '{where}.{k}' is read by mergekit only from the top-level "
                                  f"'parameters' for {method_name} (a per-model value would be ignored); move it there.")
            if k not in tensor:
                hint = did_you_mean(str(k), valid) if valid else " It takes no parameters."
                raise ConfigError(f"Unknown mergekit parameter '{where}.{k}' for merge_method {method_name}.{hint}")
            _check_leaves(k, v, f"{where}.{k}", method_name)


# ----------------------------------------------------------------------------------------------
# parameter settings (scalars, gradients, filters)
# ----------------------------------------------------------------------------------------------
def evaluate_setting(tensor: str, setting: Any, t: float, where: str = "parameter") -> Any:
    """Value of a mergekit parameter setting for tensor ``tensor`` at depth ``t`` in [0, 1]."""
    if isinstance(setting, (bool, int, float, str)) or setting is None:
        return setting
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, (list, tuple)):
        if not setting:
            raise ConfigError(f"{where} is an empty list; give a value, a gradient [a, b, ...] or filters.")
        if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            x = t * (len(setting) - 1)
            i0 = int(x)
            i1 = min(len(setting) - 1, i0 + 1)
            f = x - i0
            return (1 - f) * setting[i0] + f * setting[i1]
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        for i, cond in enumerate(setting):
            if not isinstance(cond, Mapping) or "value" not in cond:
                raise ConfigError(f"{where}[{i}]={cond!r}: a conditional parameter needs 'value' (and optionally "
                                  "'filter').")
            extra = set(cond) - {"value", "filter"}
            if extra:
                raise ConfigError(f"{where}[{i}] has unknown key(s) {sorted(extra)}; use 'filter' and 'value'.")
            flt = cond.get("filter")
            if flt is None or flt == "*" or flt in tensor:
                return evaluate_setting(tensor, cond["value"], t, f"{where}[{i}].value")
        return None
    raise ConfigError(f"{where}={setting!r} is not a number, a gradient list or a list of filters.")


def depth_t(key: str, num_layers: int) -> float:
    """mergekit's t: i / (L - 1) in layer i (1 when L = 1), 0 outside the layers (embeddings, and, since
    mergekit 0.1.2, the final norm and output head too)."""
    m = LAYER_RX.search(key)
    if m:
        return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0
    return 0.0


@dataclass
class ModelEntry:
    name: str
    path: str
    parameters: dict[str, Any]


class ParameterResolver:
    """Per-tensor, per-model parameter values (model parameters, then global, then the default)."""

    def __init__(self, entries: list[ModelEntry], global_params: dict[str, Any], num_layers: int):
        self.by_name = {e.name: e for e in entries}
        self.global_params = global_params
        self.module_params: dict[str, Any] = {}  # modules.default.parameters: between the model's and the global
        self.num_layers = num_layers

    def value(self, name: str, key: str, model: str | None, default: Any = None, required: bool = False) -> Any:
        t = depth_t(key, self.num_layers)
        if model is not None and model in self.by_name:
            p = self.by_name[model].parameters
            if name in p:
                v = evaluate_setting(key, p[name], t, f"models[{model}].parameters.{name}")
                if v is not None:
                    return v
        for where, params in (("modules.default.parameters", self.module_params), ("parameters", self.global_params)):
            if name in params:
                v = evaluate_setting(key, params[name], t, f"{where}.{name}")
                if v is not None:
                    return v
        if required:
            who = f" for model '{model}'" if model is not None else ""
            raise ConfigError(f"mergekit parameter '{name}' is missing{who} (tensor '{key}'); add "
                              f"parameters: {{{name}: ...}} to {'that model or ' if who else ''}the global parameters.")
        return default

    def gta_params(self, key: str, names: list[str]) -> tuple[list[float], list[float]]:
        return ([float(self.value("weight", key, n, required=True)) for n in names],
                [float(self.value("density", key, n, default=1.0)) for n in names])

    def gta_extras(self, key: str, names: list[str]) -> dict[str, Any]:
        """gamma and epsilon per model, lambda (global, evaluated per tensor) for tensor ``key``."""
        return {"gamma": [float(self.value("gamma", key, n, default=0.01)) for n in names],
                "epsilon": [float(self.value("epsilon", key, n, default=0.15)) for n in names],
                "lambda": float(self.value("lambda", key, None, default=1.0))}


@dataclass
class SliceDef:
    """One output slice of a multi-source ``slices`` merge whose layers stay in place: layers [start, end)."""
    start: int
    end: int
    source_params: dict[str, dict[str, Any]]  # model path -> that source's parameters
    params: dict[str, Any]
    index: int


class SliceParameterResolver(ParameterResolver):
    """mergekit's parameter lookup for ``slices`` with several sources: in layer i of the slice [start, end)
    holding it, t = (i - start) / (end - start - 1) (1 for a one-layer slice), and a parameter is read from
    that slice's source of the model, then the slice's ``parameters``, then the global ones; tensors before
    the layers use the first slice, those after the layers (final norm, output head) the last, with t = 0."""

    def __init__(self, entries: list[ModelEntry], global_params: dict[str, Any], num_layers: int,
                 slices: list[SliceDef]):
        super().__init__(entries, global_params, num_layers)
        self.slices = slices

    def _where(self, key: str) -> tuple[SliceDef, float]:
        m = LAYER_RX.search(key)
        if m is None:
            from fusion_bench.methods.merging.passthrough import _before_layers

            return (self.slices[0] if _before_layers(key) else self.slices[-1]), 0.0
        i = int(m.group(1))
        for sl in self.slices:
            if sl.start <= i < sl.end:
                n = sl.end - sl.start
                return sl, ((i - sl.start) / (n - 1) if n > 1 else 1.0)
        raise ConfigError(f"tensor '{key}' is in layer {i}, which no slice covers; cover every layer in 'slices'.")

    def value(self, name: str, key: str, model: str | None, default: Any = None, required: bool = False) -> Any:
        sl, t = self._where(key)
        scopes = []
        if model is not None and model in self.by_name:
            scopes.append((f"slices[{sl.index}].sources[{self.by_name[model].path}].parameters",
                           sl.source_params.get(self.by_name[model].path) or {}))
        scopes += [(f"slices[{sl.index}].parameters", sl.params), ("modules.default.parameters", self.module_params),
                   ("parameters", self.global_params)]
        for where, params in scopes:
            if name in params:
                v = evaluate_setting(key, params[name], t, f"{where}.{name}")
                if v is not None:
                    return v
        if required:
            raise ConfigError(f"mergekit parameter '{name}' is missing for model '{model}' (tensor '{key}'); add "
                              f"parameters: {{{name}: ...}} to that slice source, the slice or the global parameters.")
        return default


def _slices_in_place(cfg: Mapping[str, Any], method_name: str, base_path: str | None
                     ) -> tuple[list[dict[str, Any]], list[SliceDef]]:
    """``slices`` with several sources for a merge method (mergekit merges, in output layer j of slice s, layer
    range_m[0] + (j - first layer of s) of every source m) as ``models`` + per-slice parameters. Supported when
    the layers stay in place: every slice has the same source models, all with the slice's layer range, and the
    slices tile [0, L) in order; anything else is refused naming the slice."""
    raw = cfg.get("slices") or []
    if not isinstance(raw, list) or not raw:
        raise ConfigError("'slices' must be a list of {sources: [...]} mappings.")
    defs: list[SliceDef] = []
    models: list[str] | None = None
    expect = 0
    for i, sl in enumerate(raw):
        srcs = sl.get("sources") or []
        if not srcs:
            raise ConfigError(f"slices[{i}] has no sources; give each slice its sources.")
        paths, ranges, sparams = [], set(), {}
        for j, src in enumerate(srcs):
            path = _model_ref(src.get("model"), f"slices[{i}].sources[{j}].model")
            lr = src.get("layer_range")
            if not isinstance(lr, (list, tuple)) or len(lr) != 2 or not all(isinstance(x, int) for x in lr):
                raise ConfigError(f"slices[{i}].sources[{j}].layer_range must be [start, end] (integers).")
            if path in sparams:
                raise ConfigError(f"slices[{i}] lists model '{path}' twice; give each model once per slice.")
            paths.append(path)
            ranges.add(tuple(lr))
            sparams[path] = dict(src.get("parameters") or {})
        if len(ranges) != 1:
            raise ConfigError(f"slices[{i}]: the sources' layer ranges differ ({sorted(ranges)}); with "
                              f"merge_method={method_name} fusion_bench merges slices whose sources share one layer "
                              "range (layers kept in place).")
        (start, end), = ranges
        if start != expect or end <= start:
            raise ConfigError(f"slices[{i}] has layer_range [{start}, {end}] but the slices must tile the layers in "
                              f"order from 0 (next expected start {expect}); moving, repeating or dropping layers is "
                              f"supported only by merge_method=passthrough.")
        expect = end
        if models is None:
            models = paths
        elif sorted(paths) != sorted(models):
            raise ConfigError(f"slices[{i}] merges models {paths}, slices[0] merges {models}; with "
                              f"merge_method={method_name} every slice must merge the same models.")
        if base_path is not None and base_path not in paths:
            raise ConfigError(f"slices[{i}] does not list base_model '{base_path}' among its sources; mergekit merges "
                              "only a slice's sources: add the base model to every slice.")
        defs.append(SliceDef(start, end, sparams, dict(sl.get("parameters") or {}), i))
    n_layers = _num_layers(models[0]) if Path(models[0]).exists() else expect
    if expect != n_layers:
        raise ConfigError(f"the slices cover layers [0, {expect}) but the models have {n_layers}; cover every layer "
                          "(dropping layers is supported only by merge_method=passthrough).")
    return [{"model": m} for m in models], defs


# ----------------------------------------------------------------------------------------------
# methods with per-tensor parameters
# ----------------------------------------------------------------------------------------------
class MergekitLinear(TensorwiseMerge):
    """mergekit ``linear``: theta = sum_i w_i theta_i [/ sum_i w_i], w_i evaluated per tensor.

    Paper: Wortsman et al. 2022 (model soups) with per-model weights. Variant: mergekit linear,
    ``normalize`` true by default (divisor sum_i w_i; a (near) zero sum is refused).

    Args:
        resolver: the parameter resolver of the YAML.
        normalize: divide by the weights' sum.
    """

    name = "mergekit_linear"
    config_class: ClassVar = TensorwiseConfig
    variant = "mergekit linear: sum_i w_i theta_i / sum_i w_i (normalize) with per-tensor weights."
    elementwise = True

    def __init__(self, resolver: ParameterResolver, normalize: bool = True):
        super().__init__()
        self.resolver = resolver
        self.normalize = normalize

    def weights(self, key: str, names: list[str]) -> list[float]:
        """The weights of tensor ``key``; refused when normalised and their sum is (near) zero (mergekit would
        divide by it)."""
        w = [float(self.resolver.value("weight", key, n, required=True)) for n in names]
        check_weights(w, f"the weights of tensor '{key}'", normalize=self.normalize,
                      fix="set parameters.normalize: false")
        return w

    def merge_tensor(self, key, base, tensors, names):
        w = self.weights(key, names)
        out = torch.zeros_like(tensors[0])
        for wi, t in zip(w, tensors):
            out.add_(t, alpha=wi)
        if self.normalize:
            out.div_(sum(w))
        return out


class MergekitSlerp(TensorwiseMerge):
    """mergekit ``slerp``: spherical interpolation from the base (t = 0) to the other model (t = 1).

    Paper: Shoemake 1985. Variant: :func:`fusion_bench.kernels.merging.slerp.slerp` with ``t`` evaluated
    per tensor (filters, gradients) from the YAML.

    Args:
        resolver: the parameter resolver of the YAML.
    """

    name = "mergekit_slerp"
    config_class: ClassVar = TensorwiseConfig
    variant = "mergekit slerp: slerp(base, other, t) per tensor, t from filters/gradients."
    requires_pretrained = True
    min_models = 1
    max_models = 1

    def __init__(self, resolver: ParameterResolver):
        super().__init__()
        self.resolver = resolver

    def merge_tensor(self, key, base, tensors, names):
        from fusion_bench.kernels.merging.slerp import slerp

        t = self.resolver.value("t", key, None, required=True)
        return slerp(base, tensors[0], float(t))


class _MergekitDtype:
    """Compute in mergekit's dtype: the config's ``dtype``, else the checkpoint's (mergekit runs its kernels on the
    tensors as loaded and cast to ``dtype``)."""

    mk_dtype: torch.dtype | None = None
    #: the dtype the kernel's result is kept in before the output cast (mergekit writes a float32 result of a
    #: half-precision merge as float32 when out_dtype is not given); None: the input dtype, as TensorwiseMerge
    mk_result_dtype: torch.dtype | None = None

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.mk_dtype or dtype

    def merge_one(self, key, base, tensors, names):
        ref = base if base is not None else tensors[0]
        if self.mk_result_dtype is None or not self.should_merge(key, ref.dtype):
            return super().merge_one(key, base, tensors, names)
        from fusion_bench.checks import check_merged_tensor
        from fusion_bench.errors import ModelMismatchError
        from fusion_bench.methods.base import all_finite

        cd = self.compute_dtype(ref.dtype)
        for n, t in zip(names, tensors):
            if not all_finite(t):
                raise ModelMismatchError(f"Model '{n}' has non-finite values (NaN/inf) in tensor '{key}'; fix or drop "
                                         "that checkpoint.")
        b = base.to(cd) if base is not None else None
        out = self.merge_tensor(key, b, [t.to(cd) for t in tensors], names).to(self.mk_result_dtype)
        check_merged_tensor(self, key, out)
        return out


class MergekitModelStock(_MergekitDtype, TensorwiseMerge):
    """mergekit ``model_stock``: theta = t mean_i theta_i + (1 - t) theta_0 with t from the task vectors' angle.

    Paper: Jang, Yun and Han, "Model Stock" (ECCV 2024), Eq. 5 for N models. Variant: mergekit 0.1.5's:
    cos = mean over pairs i < j of <tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6), clamped to [-1, 1] (not to
    [0, 1] as fusion_bench's ``model_stock``), over the whole tensor or, with ``filter_wise``, per row
    (a 1-D tensor is one row); t = N cos / (1 + (N - 1) cos), and t = 0 where |1 + (N - 1) cos| < 1e-6.

    Args:
        filter_wise: one t per row instead of per tensor.
    """

    name = "mergekit_model_stock"
    config_class: ClassVar = TensorwiseConfig
    variant = "mergekit model_stock: t = N cos / (1 + (N - 1) cos), cos clamped to [-1, 1], per tensor or row."
    requires_pretrained = True
    min_models = 2

    def __init__(self, filter_wise: bool = False):
        super().__init__()
        self.filter_wise = filter_wise

    def merge_tensor(self, key, base, tensors, names):
        shape = base.shape
        if self.filter_wise:
            b = base.reshape(1, -1) if base.dim() < 2 else base.reshape(base.shape[0], -1)
        else:
            b = base.reshape(1, -1)
        ws = [t.reshape(b.shape) for t in tensors]
        taus = [w - b for w in ws]
        n = len(taus)
        coss = []
        for i in range(n):
            for j in range(i + 1, n):
                den = (taus[i].norm(dim=-1) * taus[j].norm(dim=-1)).clamp(min=1e-6)
                coss.append(((taus[i] * taus[j]).sum(dim=-1) / den).clamp(-1, 1))
        cos = torch.stack(coss).mean(dim=0).unsqueeze(-1)  # one rounding of the mean in a half dtype, as mergekit
        den = 1 + (n - 1) * cos
        singular = den.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(den), den))
        avg = sum(ws) / n
        return (t * avg + (1 - t) * b).reshape(shape)


class MergekitKarcher(_MergekitDtype, TensorwiseMerge):
    """mergekit ``karcher``: equal-weight Karcher mean of the tensors' directions times their mean norm, in mergekit
    0.1.5's arithmetic (its dtype, float32 norms, its order of operations), so half-precision merges are identical.

    Paper: Karcher 1977 (Riemannian centre of mass). Variant: norms n_i = ||x_i|| in float32, units u_i = x_i / n_i
    rounded to the dtype; inputs with n_i <= tol leave the direction; m = normalise(sum_i a_i u_i) (u_1 if its norm
    is below tol), a_i the equal weights renormalised over those inputs; at most ``max_iter`` steps: c_i = clamp(<m,
    u_i>, -1, 1), theta_i = arccos c_i (skipped below tol), g = sum_i a_i theta_i / sin(theta_i) (u_i - c_i m), stop
    when ||g|| < tol, else m = cos(||g||) m + sin(||g||) g / ||g||, renormalised; result (sum_i n_i / N) m. The same
    mean as fusion_bench's ``karcher_mean`` (kernels/merging/karcher.py), which works in float32 throughout.

    Args:
        max_iter: most gradient steps.
        tol: the stopping tolerance (also the zero threshold of norms and angles).
    """

    name = "mergekit_karcher"
    config_class: ClassVar = TensorwiseConfig
    variant = "mergekit karcher: Riemannian mean of the directions times the mean norm, in mergekit's arithmetic."

    def __init__(self, max_iter: int = 10, tol: float = 1e-5):
        super().__init__()
        self.max_iter = int(max_iter)
        self.tol = float(tol)

    def merge_tensor(self, key, base, tensors, names):
        xs = list(tensors) if base is None else [base, *tensors]
        if len(xs) == 1:
            return xs[0]
        tol = self.tol
        nd = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
        norms = [torch.linalg.vector_norm(x.to(nd)) for x in xs]
        units = [torch.zeros_like(x) if float(n) == 0.0 else (x / n).to(x.dtype) for x, n in zip(xs, norms)]
        live = [i for i, n in enumerate(norms) if float(n) > tol]
        if not live:
            return sum(x * 0 for x in xs)
        a0 = 1.0 / len(xs)
        alphas = [a0 / (a0 * len(live))] * len(live)
        us = [units[i] for i in live]
        m = torch.zeros_like(us[0])
        for a, u in zip(alphas, us):
            m += a * u
        mn = torch.linalg.vector_norm(m.to(nd))
        m = us[0].clone() if float(mn) < tol else (m / mn).to(m.dtype)
        for _ in range(self.max_iter):
            g = torch.zeros_like(m)
            for a, u in zip(alphas, us):
                c = torch.clamp(torch.dot(m.flatten(), u.flatten()), -1.0, 1.0)
                th = torch.arccos(c)
                if float(th) < tol:
                    continue
                g += a * (th / torch.sin(th)) * (u - c * m)
            gn = torch.linalg.vector_norm(g.to(nd))
            if float(gn) < tol:
                break
            m = (torch.cos(gn) * m + torch.sin(gn) * (g / gn)).to(m.dtype)
            un = torch.linalg.vector_norm(m.to(nd))
            if float(un) > tol:
                m = (m / un).to(m.dtype)
        return sum(a0 * n for n in norms) * m


_HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


class MergekitGTA(GeneralizedTaskArithmetic):
    """mergekit's generalized task arithmetic (task_arithmetic, ties, dare_*, breadcrumbs*, della*) in mergekit's
    arithmetic: in the config's ``dtype`` (else the checkpoint dtype), in mergekit 0.1.5's order: theta_i - theta_0,
    sparsify (L1 rescale factor rounded to the dtype), times the weights (rounded to the dtype), sign mask, sum
    over the models, divide, times lambda, add to theta_0 (:func:`fusion_bench.kernels.merging.gta_order.
    gta_merge_ordered`). fusion_bench's own ``generalized_task_arithmetic`` keeps computing in float32.

    Args:
        config: the :class:`GTAConfig` options.
        mk_dtype: mergekit's ``dtype`` (None: the checkpoint dtype).
    """

    name = "mergekit_generalized_task_arithmetic"

    def __init__(self, config=None, mk_dtype: torch.dtype | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self.mk_dtype = mk_dtype

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.mk_dtype or dtype

    def _stat(self, key, tau, name, density, gamma, epsilon):
        out = super()._stat(key, tau, name, density, gamma, epsilon)
        if out and out.get("scale") is not None and tau.dtype in (torch.bfloat16, torch.float16):
            # mergekit divides the two L1 norms (each a 0-dim tensor of the dtype) in the dtype
            out["scale"] = float((torch.tensor(out["scale"], dtype=torch.float32)).to(tau.dtype))
        return out

    def _merge(self, key, base, tensors, names, stats, generators, offset=0):
        from fusion_bench.kernels.merging.gta_order import gta_merge_ordered

        c = self.config
        weights, dens = self.params(key, names)
        gammas, epss, lam = self.extras(key, names)
        taus = []
        for i, t in enumerate(tensors):
            st = stats[i] if stats is not None else None
            g = generators[i] if generators is not None else None
            taus.append(self._sparsify(key, t - base, names[i], dens[i], gammas[i], epss[i], st, g, offset))
        return gta_merge_ordered(base, taus, weights, consensus=c.consensus, normalize=c.normalize,
                                 scaling_factor=lam)


class MergekitNuSlerp(_MergekitDtype, TensorwiseMerge):
    """mergekit ``nuslerp``: SLERP of two models (or of their task vectors from base_model) at t = w_2 / (w_1 + w_2).

    Paper: Shoemake 1985. Variant: :func:`fusion_bench.kernels.merging.nuslerp.nuslerp` (mergekit 0.1.5): t = 0.5
    when |w_1 + w_2| < 1e-6; ``nuslerp_flatten`` (default true) takes one angle per tensor, else per vector
    along the last dim or, with ``nuslerp_row_wise``, along dim 0; with a base, theta_0 + nuslerp(tau_1, tau_2).

    Args:
        resolver: the parameter resolver of the YAML.
        has_base: whether base_model is given (the task vectors are interpolated).
    """

    name = "mergekit_nuslerp"
    config_class: ClassVar = TensorwiseConfig
    variant = "mergekit nuslerp: [theta_0 +] nuslerp(t = w_2 / (w_1 + w_2)) of the two models [task vectors]."
    min_models = 2
    max_models = 2

    def __init__(self, resolver: ParameterResolver, has_base: bool):
        super().__init__()
        self.resolver = resolver
        self.requires_pretrained = has_base

    def merge_tensor(self, key, base, tensors, names):
        from fusion_bench.kernels.merging.nuslerp import nuslerp

        r = self.resolver
        w = [float(r.value("weight", key, n, required=True)) for n in names]
        total = sum(w)
        t = 0.5 if abs(total) < 1e-6 else w[1] / total
        opts = {"row_wise": bool(r.value("nuslerp_row_wise", key, None, default=False)),
                "flatten": bool(r.value("nuslerp_flatten", key, None, default=True))}
        if base is None:
            return nuslerp(tensors[0], tensors[1], t, **opts)
        return base + nuslerp(tensors[0] - base, tensors[1] - base, t, **opts)


class MergekitMultiSlerp(_MergekitDtype, TensorwiseMerge):
    """mergekit ``multislerp``: barycentric SLERP of N models (or task vectors from base_model), weights w_i.

    Reference: Goddard, "Multi-SLERP". Variant: :func:`fusion_bench.kernels.merging.nuslerp.multislerp` (mergekit
    0.1.5): ``normalize_weights`` (default true; a (near) zero weight sum is refused), ``eps`` (default 1e-8).

    Args:
        resolver: the parameter resolver of the YAML.
        has_base: whether base_model is given.
    """

    name = "mergekit_multislerp"
    config_class: ClassVar = TensorwiseConfig
    variant = "mergekit multislerp: tangent-space weighted mean of the directions, times the mean norm."

    def __init__(self, resolver: ParameterResolver, has_base: bool):
        super().__init__()
        self.resolver = resolver
        self.requires_pretrained = has_base

    def weights(self, key: str, names: list[str]) -> list[float]:
        w = [float(self.resolver.value("weight", key, n, required=True)) for n in names]
        if len(w) > 1 and bool(self.resolver.value("normalize_weights", key, None, default=True)):
            check_weights(w, f"the multislerp weights of tensor '{key}'", normalize=True,
                          fix="change the weights or set parameters.normalize_weights: false")
        return w

    def merge_tensor(self, key, base, tensors, names):
        from fusion_bench.kernels.merging.nuslerp import multislerp

        r = self.resolver
        try:
            return multislerp(tensors, self.weights(key, names), base,
                              normalize_weights=bool(r.value("normalize_weights", key, None, default=True)),
                              eps=float(r.value("eps", key, None, default=1e-8)))
        except ValueError as e:
            raise ConfigError(f"mergekit multislerp, tensor '{key}': {e}.") from None


class MergekitSCE(_MergekitDtype, TensorwiseMerge):
    """mergekit ``sce``: select by variance, calculate weights, erase minority signs, merge.

    Paper: Wan et al. 2024 (FuseChat, arXiv 2408.07990). Variant: :func:`fusion_bench.kernels.merging.sce.sce`
    (mergekit 0.1.5), ``select_topk`` per tensor (default 1: no selection).

    Args:
        resolver: the parameter resolver of the YAML.
    """

    name = "mergekit_sce"
    config_class: ClassVar = TensorwiseConfig
    variant = "mergekit sce: top-k variance mask, weights mean(tau^2) normalised, sign election, weighted mean."
    requires_pretrained = True

    def __init__(self, resolver: ParameterResolver):
        super().__init__()
        self.resolver = resolver

    def merge_tensor(self, key, base, tensors, names):
        from fusion_bench.kernels.merging.sce import sce

        return sce(base, tensors, float(self.resolver.value("select_topk", key, None, default=1.0)))


def _mergekit_methods():
    """The mergekit front end's subclasses of arcee_fusion, nearswap, ram and ramplus_tl: parameters evaluated per
    tensor (gradients, filters, slices) and arithmetic in mergekit's dtype."""
    from fusion_bench.kernels.merging import nearswap as NS
    from fusion_bench.kernels.merging import ram as RK
    from fusion_bench.methods.merging.arcee_fusion import ArceeFusion
    from fusion_bench.methods.merging.nearswap import NearSwap
    from fusion_bench.methods.merging.ram import RAM, RAMPlusTL

    class MergekitArceeFusion(_MergekitDtype, ArceeFusion):
        name = "mergekit_arcee_fusion"

    class MergekitNearSwap(_MergekitDtype, NearSwap):
        name = "mergekit_nearswap"

        def merge_tensor(self, key, base, tensors, names):
            return NS.nearswap(base, tensors[0], float(self.resolver.value("t", key, None, required=True)))

    class MergekitRAM(_MergekitDtype, RAM):
        name = "mergekit_ram"

        def merge_tensor(self, key, base, tensors, names):
            return RK.ram(base, tensors, float(self.resolver.value("epsilon", key, None, default=1e-5)))

    class MergekitRAMPlusTL(_MergekitDtype, RAMPlusTL):
        name = "mergekit_ramplus_tl"

        def merge_tensor(self, key, base, tensors, names):
            r = self.resolver
            return RK.ramplus_tl(base, tensors, float(r.value("r", key, None, default=0.1)),
                                 float(r.value("alpha", key, None, default=0.2)),
                                 float(r.value("epsilon", key, None, default=1e-5)))

    return {"arcee_fusion": MergekitArceeFusion, "nearswap": MergekitNearSwap, "ram": MergekitRAM,
            "ramplus_tl": MergekitRAMPlusTL}


# ----------------------------------------------------------------------------------------------
# YAML -> (method, pool)
# ----------------------------------------------------------------------------------------------
def _yaml_error_text(e: Exception) -> str:
    """One line: 'line L, column C: problem' from a PyYAML error."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


SLICE_KEYS = {"sources", "parameters", "residual_weight"}
TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}


_FLOAT_RX = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)", re.IGNORECASE)


def _coerce_value(v: Any) -> Any:
    if isinstance(v, str) and _FLOAT_RX.fullmatch(v.strip()):
        return float(v)  # PyYAML reads 1e-5 (no dot) as a string; mergekit's validation makes it a number
    if isinstance(v, list):
        return [_coerce_value(e) for e in v]
    if isinstance(v, Mapping):
        return {k: (_coerce_value(e) if k == "value" else e) for k, e in v.items()}
    return v


def _coerce_params(params: Any) -> Any:
    if not isinstance(params, Mapping):
        return params
    return {k: _coerce_value(v) for k, v in params.items()}


def _coerce_numbers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the config whose parameter values written as numeric strings (``1e-5``, which YAML 1.1 reads as a
    string) are numbers, as mergekit's validation makes them."""
    import copy

    out = copy.deepcopy(dict(cfg))

    def fix_inputs(holder: Any) -> None:
        if not isinstance(holder, Mapping):
            return
        if "parameters" in holder:
            holder["parameters"] = _coerce_params(holder["parameters"])
        for m in holder.get("models") or [] if isinstance(holder.get("models"), list) else []:
            if isinstance(m, dict) and "parameters" in m:
                m["parameters"] = _coerce_params(m["parameters"])
        for sl in holder.get("slices") or [] if isinstance(holder.get("slices"), list) else []:
            if isinstance(sl, dict):
                if "parameters" in sl:
                    sl["parameters"] = _coerce_params(sl["parameters"])
                for src in sl.get("sources") or [] if isinstance(sl.get("sources"), list) else []:
                    if isinstance(src, dict) and "parameters" in src:
                        src["parameters"] = _coerce_params(src["parameters"])

    fix_inputs(out)
    if isinstance(out.get("modules"), dict):
        for m in out["modules"].values():
            fix_inputs(m)
    return out


def _model_parameters(cfg: Mapping[str, Any], method_name: str) -> dict[str, Any]:
    """where -> parameters of every model entry and slice source (per-model parameters in mergekit)."""
    out: dict[str, Any] = {}
    for i, m in enumerate(cfg.get("models") or []):
        if isinstance(m, Mapping) and m.get("parameters") is not None:
            out[f"models[{i}].parameters"] = m["parameters"]
    for i, s in enumerate(cfg.get("slices") or []):
        if not isinstance(s, Mapping):
            raise ConfigError(f"slices[{i}] must be a mapping with 'sources'.")
        for k in s:
            if k == "base_model":
                raise ConfigError(f"mergekit slices[{i}].base_model (a per-slice base model) is not supported: "
                                  "fusion_bench merges every layer against one base; use the top-level base_model.")
            if k not in SLICE_KEYS:
                raise ConfigError(f"Unknown mergekit key 'slices[{i}].{k}'.{did_you_mean(str(k), SLICE_KEYS)}")
        rw = s.get("residual_weight")
        if rw is not None and (isinstance(rw, bool) or not isinstance(rw, (int, float)) or not math.isfinite(rw)):
            raise ConfigError(f"mergekit slices[{i}].residual_weight={rw!r} must be a finite number.")
        if s.get("parameters") is not None:
            out[f"slices[{i}].parameters"] = s["parameters"]
        for j, src in enumerate(s.get("sources") or []):
            if not isinstance(src, Mapping):
                raise ConfigError(f"slices[{i}].sources[{j}] must be a mapping with 'model' and 'layer_range'.")
            for k in src:
                if k not in SOURCE_KEYS:
                    raise ConfigError(f"Unknown mergekit key 'slices[{i}].sources[{j}].{k}'."
                                      f"{did_you_mean(str(k), SOURCE_KEYS)}")
            if src.get("parameters") is not None:
                out[f"slices[{i}].sources[{j}].parameters"] = src["parameters"]
    return out


def _tensor_keys(path: str) -> list[str]:
    """Tensor names of a local checkpoint (headers only), or [] when it is not on disk."""
    p = Path(path)
    if not p.exists():
        return []
    from fusion_bench.io.stream import StreamReader

    r = StreamReader(p)
    try:
        return list(r.keys())
    finally:
        close = getattr(r, "close", None)
        if callable(close):
            close()


#: the template names mergekit 0.1.5 bundles (its own files; not shipped with fusion_bench)
MERGEKIT_TEMPLATE_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def _check_chat_template(value: Any) -> str | None:
    """mergekit's chat_template: None, 'auto' or a Jinja template (at least 20 characters with a '{'); the names of
    the templates mergekit bundles are refused (fusion_bench does not ship mergekit's files)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"mergekit chat_template={value!r} must be a string ('auto' or a Jinja template).")
    if value == "auto":
        return value
    if value in MERGEKIT_TEMPLATE_NAMES:
        raise ConfigError(f"mergekit chat_template: {value} names a template file bundled with mergekit, which "
                          "fusion_bench does not ship; paste the template's Jinja text, or use 'auto'.")
    if len(value) < 20 or "{" not in value:
        raise ConfigError(f"mergekit chat_template={value!r} is not a Jinja template (as mergekit: at least 20 "
                          "characters with a '{'); give the template text or 'auto'.")
    return value


def set_chat_template(out_dir: str | Path, template: str, referenced: list[str]) -> str | None:
    """Set the output's tokenizer chat template as mergekit does: 'auto' takes the most common template of the
    referenced models' tokenizers (nothing is set when none has one); the tokenizer is re-saved with
    transformers (no remote code), each file replaced atomically. Returns the template set, or None."""
    import os
    import tempfile
    from collections import Counter

    import transformers

    if template == "auto":
        found = []
        for m in referenced:
            try:
                tok = transformers.AutoTokenizer.from_pretrained(m, trust_remote_code=False)
            except Exception:  # noqa: BLE001 - as mergekit: a model without a tokenizer has no vote
                continue
            t = tok.chat_template
            if isinstance(t, dict):
                t = t.get("default")
            if t:
                found.append(t.strip())
        if not found:
            return None
        template = Counter(found).most_common(1)[0][0]
    out = Path(out_dir)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - one line for the user
        raise ConfigError(f"chat_template: the merged model's tokenizer in {out} cannot be loaded "
                          f"({str(e).splitlines()[0][:200]}); drop chat_template or copy a tokenizer.") from None
    tok.chat_template = template
    with tempfile.TemporaryDirectory(dir=out, prefix=".tok_") as tmp:
        tok.save_pretrained(tmp)
        for f in Path(tmp).iterdir():
            os.replace(f, out / f.name)
    return template


def _flatten_modules(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``modules: {default: {models | slices, parameters}}`` -> the top-level form and the module's parameters.

    mergekit names the one module of a single-module (causal LM) architecture ``default``; its parameters come
    after a slice's and before the global ones. Multi-module architectures (vision-language models) are refused."""
    mods = cfg["modules"]
    if not isinstance(mods, Mapping) or not mods:
        raise ConfigError("mergekit 'modules' must be a mapping of module names to {models | slices, parameters}.")
    other = [k for k in mods if k != "default"]
    if other:
        raise ConfigError(f"mergekit modules.{other[0]}: fusion_bench merges single-module (causal LM) architectures, "
                          "whose one module mergekit calls 'default'; multi-module models (vision-language) are not "
                          "supported.")
    if cfg.get("models") or cfg.get("slices"):
        raise ConfigError("Give exactly one of 'models', 'slices' or 'modules' (as mergekit).")
    m = mods["default"]
    if not isinstance(m, Mapping):
        raise ConfigError("mergekit modules.default must be a mapping with 'models' or 'slices' (and 'parameters').")
    for k in m:
        if k not in MODULE_KEYS:
            raise ConfigError(f"Unknown mergekit key 'modules.default.{k}'.{did_you_mean(str(k), MODULE_KEYS)}")
    if bool(m.get("models")) == bool(m.get("slices")):
        raise ConfigError("mergekit modules.default needs exactly one of 'models' or 'slices' (as mergekit).")
    params = m.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"mergekit modules.default.parameters must be a mapping, got {params!r}.")
    out = {k: v for k, v in cfg.items() if k != "modules"}
    out["models" if m.get("models") else "slices"] = m.get("models") or m.get("slices")
    return out, dict(params)


def _checkpoint_dtype(path: str) -> torch.dtype | None:
    """The dtype of a local checkpoint's first floating-point tensor (None when not on disk)."""
    if not Path(path).exists():
        return None
    from fusion_bench.io.stream import StreamReader

    r = StreamReader(path)
    try:
        for k in r.keys():
            dt = r.meta(k).dtype
            if dt.is_floating_point:
                return dt
    finally:
        r.close()
    return None


def _check_della(resolver: ParameterResolver, keys: list[str], models: list[str]) -> None:
    """mergekit's della constraint: for density < 1, density - epsilon > 0 and density + epsilon < 1."""
    for k in keys:
        for m in models:
            d = float(resolver.value("density", k, m, default=1.0))
            eps = float(resolver.value("epsilon", k, m, default=0.15))
            if d < 1.0 and not (d - eps > 0.0 and d + eps < 1.0):
                raise ConfigError(f"mergekit della: density={d:g} with epsilon={eps:g} (model '{m}', tensor '{k}'): "
                                  "density +- epsilon must lie in (0, 1), as mergekit requires; lower epsilon.")


class _LoraContext:
    """Where ``MODEL+LORA`` references are materialised during one :func:`load_mergekit_config` call."""

    def __init__(self, cache: str | None, dtype: str | None):
        self.cache = cache
        self.dtype = dtype
        self.done: dict[tuple[str, str], str] = {}
        self.notes: list[str] = []

    def folder(self, model: str, lora: str) -> str:
        key = (model, lora)
        if key in self.done:
            return self.done[key]
        import atexit
        import binascii
        import tempfile

        from fusion_bench.compat.lora_apply import apply_lora

        for what, p in (("model", model), ("LoRA adapter", lora)):
            if not Path(p).is_dir():
                raise ConfigError(f"{what} '{p}' of '{model}+{lora}' is not a local folder; give local folders (hub "
                                  "ids are not downloaded).")
        if self.cache:
            root = Path(self.cache)
        else:
            root = Path(tempfile.mkdtemp(prefix="fb_lora_merge_"))
            atexit.register(lambda r=root: __import__("shutil").rmtree(r, ignore_errors=True))
        def uid(p: str) -> str:
            return f"{Path(p).resolve().name}_{binascii.crc32(str(Path(p).resolve()).encode())}"
        out = root / f"{uid(model)}_{uid(lora)}{'_' + self.dtype if self.dtype else ''}"
        stamp = json.dumps({"model": _fingerprint(model), "lora": _fingerprint(lora), "dtype": self.dtype},
                           sort_keys=True)
        marker = out / ".fusion_bench_lora_merge.json"
        if not (marker.is_file() and marker.read_text() == stamp):
            if out.exists():
                if not marker.is_file():
                    raise ConfigError(f"--lora-merge-cache: {out} exists and was not written by fusion_bench; remove "
                                      "it or choose another cache folder.")
                import shutil

                shutil.rmtree(out)
            info = apply_lora(model, lora, out, self.dtype)
            marker.write_text(stamp)
            self.notes.append(f"LoRA '{lora}' applied to '{model}' ({info['lora_modules']} LoRA tensor(s), "
                              f"{info['whole']} whole) in {out}")
            if info["ignored"]:
                self.notes.append(f"LoRA '{lora}': tensors {info['ignored'][:3]} are not in modules_to_save; "
                                  "ignored (as PEFT)")
        self.done[key] = str(out)
        return str(out)


def _fingerprint(path: str) -> list[tuple[str, int, int]]:
    """Names, sizes and modification times of a folder's files: a cached LoRA merge is reused only when
    neither input changed."""
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(path).iterdir() if f.is_file())


_LORA: _LoraContext | None = None


def _model_ref(ref: Any, where: str) -> str:
    """The local path of a mergekit model reference: ``MODEL``, ``MODEL+LORA`` or ``{model: ..., lora: ...}``
    (the LoRA is applied to the model first, as mergekit does; fusion_bench/compat/lora_apply.py)."""
    from fusion_bench.compat.lora_apply import split_model_ref

    if isinstance(ref, Mapping):
        ref = dict(ref)
    model, lora = split_model_ref(ref, where)
    if lora is None:
        return model
    ctx = _LORA or _LoraContext(None, None)
    return ctx.folder(model, lora)


def _unique_name(path: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path.rstrip("/")).name or "model")
    name, i = base, 1
    while name in taken or name == "_pretrained_":
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def _num_layers(path: str) -> int:
    p = Path(path)
    cfg = p / "config.json"
    if cfg.exists():
        c = json.loads(cfg.read_text())
        for k in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(c.get(k), int):
                return c[k]
    from fusion_bench.io.stream import StreamReader

    idx = {int(m.group(1)) for k in StreamReader(p).keys() if (m := LAYER_RX.search(k))}
    return max(idx) + 1 if idx else 1


@dataclass
class MergekitPlan:
    method: Any
    pool: Any
    merge_method: str
    notes: list[str]
    #: mergekit's chat_template: 'auto' or a Jinja template, set on the output's tokenizer after the merge
    chat_template: str | None = None
    #: every model the config references (for chat_template: auto)
    referenced: list[str] | None = None
    #: the output tokenizer built from mergekit's tokenizer settings (saved with the merge), else None
    tokenizer: Any = None


def load_mergekit_config(config: str | Path | Mapping[str, Any], *, random_seed: int | None = None,
                         allow_crimes: bool = False, lora_merge_cache: str | None = None,
                         lora_merge_dtype: str | None = None, tie_break: str = "mergekit") -> MergekitPlan:
    """Translate a mergekit YAML (path or mapping) into a fusion_bench method and causal-LM pool.

    Args:
        config: the YAML file or its mapping.
        random_seed: mergekit's ``--random-seed``: the seed of the random sparsifications (dare_*, della*).
        allow_crimes: mergekit's ``--allow-crimes``: merge models whose architectures differ (tensors by name).
        lora_merge_cache: mergekit's ``--lora-merge-cache``: where ``MODEL+LORA`` models are written (and reused
            while neither input changes); default: a temporary folder removed when the process exits.
        lora_merge_dtype: mergekit's ``--lora-merge-dtype``: the dtype a LoRA'd model is cast to before the
            adapter is added (default: its checkpoint dtype).
        tie_break: which entries the magnitude trims (ties, breadcrumbs and their variants) keep among entries of
            equal magnitude at the cut: ``mergekit`` (default) the ones mergekit 0.1.5 keeps (the order of torch's
            unstable CPU sort: a full argsort per tensor and model, so the merge equals mergekit's); ``index`` the
            lower flat index first (a k-th value selection, several times faster and bounded in memory; the kept
            count is the same, only which of the tied entries differs; not mergekit's result).
    """
    if tie_break not in ("mergekit", "index"):
        raise ConfigError(f"--tie-break {tie_break!r} is not one of: mergekit, index.")
    global _LORA
    prev = _LORA
    _LORA = _LoraContext(lora_merge_cache, lora_merge_dtype)
    try:
        plan = _load_mergekit_config(config, random_seed=random_seed, allow_crimes=allow_crimes)
        plan.notes[:0] = _LORA.notes
        if tie_break != "mergekit":
            c = getattr(plan.method, "config", None)
            if getattr(c, "tie_break", None) == "mergekit":
                c.tie_break = tie_break
                plan.notes.append(f"--tie-break {tie_break}: among entries tied at the magnitude cut the lower "
                                  "index is kept; the merge differs from mergekit's at those entries")
            else:
                plan.notes.append(f"--tie-break {tie_break} has no effect on merge_method {plan.merge_method} "
                                  "(no magnitude trim)")
        return plan
    finally:
        _LORA = prev


def _load_mergekit_config(config: str | Path | Mapping[str, Any], *, random_seed: int | None = None,
                          allow_crimes: bool = False) -> MergekitPlan:
    import yaml

    from fusion_bench.methods import build_method
    from fusion_bench.modelpool.causal_lm import CausalLMPool

    if not isinstance(config, Mapping):
        p = Path(config)
        if not p.exists():
            raise ConfigError(f"mergekit config {p} does not exist.")
        try:
            config = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"mergekit config {p} is not valid YAML: {_yaml_error_text(e)}.") from None
        if config is None:
            raise ConfigError(f"mergekit config {p} is empty; it needs merge_method, models, ...")
        if not isinstance(config, Mapping):
            raise ConfigError(f"mergekit config {p} must be a mapping of keys (merge_method, models, parameters, "
                              f"...) at the top level, not a {type(config).__name__}.")
    cfg = dict(config)
    for k in cfg:
        if k in UNSUPPORTED_KEYS:
            raise ConfigError(f"mergekit key '{k}' ({UNSUPPORTED_KEYS[k]}) is not supported by fusion_bench.")
        if k not in TOP_KEYS:
            raise ConfigError(f"Unknown mergekit key '{k}'.{did_you_mean(k, TOP_KEYS)}")
    method_name = cfg.get("merge_method")
    if method_name not in SUPPORTED:
        raise ConfigError(f"mergekit merge_method={method_name!r} is not supported.{did_you_mean(str(method_name), SUPPORTED)}"
                          " See docs/mergekit.md for the supported methods.")
    notes: list[str] = []
    chat_template = _check_chat_template(cfg.get("chat_template"))
    if any(isinstance(sl, Mapping) and sl.get("residual_weight") is not None for sl in cfg.get("slices") or []):
        notes.append("slices[].residual_weight has no effect in mergekit 0.1.5 (its planner never reads it); "
                     "ignored likewise")
    if not isinstance(cfg.get("parameters") or {}, Mapping):
        raise ConfigError(f"mergekit 'parameters' must be a mapping of parameter names to values, got "
                          f"{cfg['parameters']!r}.")
    cfg = _coerce_numbers(cfg)
    gparams = dict(cfg.get("parameters") or {})
    module_params: dict[str, Any] = {}
    if "modules" in cfg:
        cfg, module_params = _flatten_modules(cfg)
    where_params = _model_parameters(cfg, method_name)
    if module_params:
        where_params["modules.default.parameters"] = module_params
    validate_parameters(method_name, gparams, where_params)
    gp = {**gparams, **module_params}  # parameters read once per merge (mergekit: slice, module, then global)
    base_path = _model_ref(cfg["base_model"], "base_model") if cfg.get("base_model") else None
    taken: set[str] = set()
    base_listed = False
    entries: list[ModelEntry] = []
    models: dict[str, str] = {}
    if base_path is not None:
        models["_pretrained_"] = base_path
    if method_name == "passthrough":
        if cfg.get("models") and not cfg.get("slices"):
            raw = [{"sources": [{"model": m.get("model"), "parameters": m.get("parameters"),
                                 "layer_range": [0, _num_layers(_model_ref(m.get("model"), "models"))]}]}
                   for m in cfg["models"]]
        else:
            raw = cfg.get("slices") or []
        if not raw:
            raise ConfigError("passthrough needs 'slices' (or one model in 'models').")
        slices = []
        path_names: dict[str, str] = {}
        slice_params: list[tuple[dict[str, Any], dict[str, Any], int]] = []
        for i, s in enumerate(raw):
            srcs = s.get("sources") or []
            if len(srcs) != 1:
                raise ConfigError(f"slices[{i}] has {len(srcs)} sources; passthrough takes exactly one per slice.")
            src = srcs[0]
            path = _model_ref(src.get("model"), f"slices[{i}].sources[0].model")
            if path not in path_names:
                path_names[path] = "_pretrained_" if path == base_path else _unique_name(path, taken)
                models.setdefault(path_names[path], path)
            lr = list(src.get("layer_range") or [])
            if len(lr) != 2:
                raise ConfigError(f"slices[{i}].sources[0].layer_range must be [start, end].")
            slices.append({"model": path_names[path], "layers": [int(lr[0]), int(lr[1])]})
            slice_params.append((dict(src.get("parameters") or {}), dict(s.get("parameters") or {}),
                                 int(lr[1]) - int(lr[0])))
        pool = _make_pool(CausalLMPool, models, cfg, notes, allow_crimes)
        # mergekit: tensors before the layers from the first slice's model, after the layers from the last's
        method = build_method({"name": "passthrough", "slices": slices, "non_layer_source": slices[0]["model"],
                               "post_layer_source": slices[-1]["model"]})

        def scale(out_key: str, si: int, offset: int | None, model: str) -> float | None:
            # mergekit reads a slice's parameters from its source, then the slice, then the global ones, with
            # t = offset / (layers - 1) in the slice (1 for a one-layer slice) and t = 0 outside the layers
            src_p, sl_p, n = slice_params[si]
            t = 0.0 if offset is None else (offset / (n - 1) if n > 1 else 1.0)
            for where, params in ((f"slices[{si}].sources[0].parameters", src_p), (f"slices[{si}].parameters", sl_p),
                                  ("modules.default.parameters", module_params), ("parameters", gparams)):
                if "scale" in params:
                    v = evaluate_setting(out_key, params["scale"], t, f"{where}.scale")
                    if v is not None:
                        return float(v)
            return None

        if any("scale" in p for sp in slice_params for p in sp[:2]) or "scale" in gp:
            method.tensor_scale = scale
        return MergekitPlan(method, pool, method_name, notes, chat_template, list(dict.fromkeys(models.values())),
                            getattr(pool, "_mergekit_tokenizer", None))
    slice_defs: list[SliceDef] | None = None
    if cfg.get("slices"):
        if cfg.get("models"):
            raise ConfigError("Give either 'models' or 'slices', not both (as mergekit).")
        raw_models, slice_defs = _slices_in_place(cfg, method_name, base_path)
    else:
        raw_models = cfg.get("models") or []
    if not raw_models:
        raise ConfigError("The mergekit config has no 'models'.")
    for i, m in enumerate(raw_models):
        if not isinstance(m, Mapping) or "model" not in m:
            raise ConfigError(f"models[{i}] needs a 'model' key (path or hub id).")
        extra = set(m) - {"model", "parameters"}
        if extra:
            raise ConfigError(f"models[{i}] has unknown key(s) {sorted(extra)}; use 'model' and 'parameters'.")
        path = _model_ref(m["model"], f"models[{i}].model")
        if path == base_path and method_name not in BASE_IS_INPUT:
            notes.append(f"models[{i}] is the base model; it is not merged with itself (as mergekit)")
            continue
        if path == base_path:
            base_listed = True
        name = _unique_name(path, taken)
        models[name] = path
        entries.append(ModelEntry(name, path, dict(m.get("parameters") or {})))
    if method_name not in (*BASE_IS_INPUT, *BASE_OPTIONAL) and base_path is None:
        raise ConfigError(f"merge_method={method_name} needs base_model.")
    if method_name in BASE_IS_INPUT and base_path is not None:
        models.pop("_pretrained_", None)  # the base is one of the inputs, not a reference
        if method_name == "slerp":
            models["_pretrained_"] = base_path
            entries = [e for e in entries if e.path != base_path]
            for e in list(models):
                if e != "_pretrained_" and models[e] == base_path:
                    models.pop(e)
        elif not base_listed:
            # mergekit adds base_model to the inputs: linear then needs its weight (per model or global)
            name = _unique_name(base_path, taken)
            models[name] = base_path
            entries.append(ModelEntry(name, base_path, {}))
            if method_name == "linear" and "weight" not in gp:
                raise ConfigError(f"mergekit linear: base_model '{base_path}' is not in 'models', so mergekit merges it "
                                  "too and needs its weight; list it in 'models' with a weight, give a global "
                                  "parameters.weight, or drop base_model.")
    ref_path = base_path or entries[0].path
    n_layers = _num_layers(ref_path) if Path(ref_path).exists() else 1
    if slice_defs is not None:
        resolver: ParameterResolver = SliceParameterResolver(entries, gparams, n_layers, slice_defs)
    else:
        resolver = ParameterResolver(entries, gparams, n_layers)
    resolver.module_params = module_params
    if method_name == "linear":
        method: Any = MergekitLinear(resolver, normalize=bool(gp.get("normalize", True)))
        if method.normalize:  # refuse a (near) zero weight sum on any tensor before any work
            for key in _tensor_keys(ref_path):
                method.weights(key, [e.name for e in entries])
    elif method_name == "slerp":
        method = MergekitSlerp(resolver)
    elif method_name == "karcher":
        method = MergekitKarcher(**{k: gp[k] for k in ("max_iter", "tol") if k in gp})
    elif method_name == "nuslerp":
        if len(entries) != 2:
            raise ConfigError(f"mergekit nuslerp merges exactly two models besides base_model, got {len(entries)} "
                              f"({[e.path for e in entries]}); list two models.")
        method = MergekitNuSlerp(resolver, base_path is not None)
        for k in _tensor_keys(ref_path) or ["model.embed_tokens.weight"]:  # fail early on a missing weight
            for e in entries:
                resolver.value("weight", k, e.name, required=True)
    elif method_name == "multislerp":
        method = MergekitMultiSlerp(resolver, base_path is not None)
        for k in _tensor_keys(ref_path) or ["model.embed_tokens.weight"]:
            method.weights(k, [e.name for e in entries])
    elif method_name == "sce":
        method = MergekitSCE(resolver)
        if "int8_mask" in gp:
            notes.append("int8_mask only changes mergekit's mask dtype; ignored")
    elif method_name in ("arcee_fusion", "nearswap", "ram", "ramplus_tl"):
        if method_name in ("arcee_fusion", "nearswap") and len(entries) != 1:
            raise ConfigError(f"mergekit {method_name} merges exactly one model into base_model, got {len(entries)} "
                              f"({[e.path for e in entries]}); list one model besides the base.")
        method = _mergekit_methods()[method_name]()
        method.resolver = resolver
        method.mk_dtype = _HALF.get(str(cfg.get("dtype") or "")) or _checkpoint_dtype(ref_path)
        if method_name in ("arcee_fusion", "ramplus_tl") and not cfg.get("out_dtype") and \
                method.mk_dtype in (torch.bfloat16, torch.float16):
            # mergekit's kernels return float32 here (a float32 mask / lambdas) and, without out_dtype, it writes that
            cfg = {**cfg, "out_dtype": "float32"}
            method.mk_result_dtype = torch.float32
            notes.append(f"{method_name} in {str(method.mk_dtype).removeprefix('torch.')} gives float32 tensors, "
                         "which mergekit writes as float32 without out_dtype; so does fusion_bench")
        if method_name == "nearswap":  # mergekit requires t
            for k in _tensor_keys(ref_path) or ["model.embed_tokens.weight"]:
                resolver.value("t", k, None, required=True)
    elif method_name == "model_stock":
        if len(entries) < 2:
            raise ConfigError(f"mergekit model_stock needs at least two models besides base_model, got {len(entries)}; "
                              "add fine-tuned models to 'models'.")
        method = MergekitModelStock(filter_wise=bool(gp.get("filter_wise", False)))
    else:
        from fusion_bench.methods.merging.sparsify import MERGEKIT_PRESETS

        spars, consensus, norm_default, rescale_default = MERGEKIT_PRESETS[method_name]
        key0 = "model.layers.0.mlp.down_proj.weight"
        keys = _tensor_keys(ref_path) or [key0]
        dtype = str(cfg.get("dtype") or "")
        opts = {"sparsification": spars, "consensus": consensus,
                "normalize": bool(gp.get("normalize", norm_default)),
                "rescale": bool(gp.get("rescale", rescale_default)),
                "rescale_norm": "l1", "tie_break": "mergekit",
                # mergekit forms theta_i - theta_0 in its dtype; the sparsification sees those rounded values
                "task_vector_dtype": dtype if dtype in ("bfloat16", "float16") else None}
        if spars == "della":
            _check_della(resolver, keys, [e.name for e in entries])
        if "int8_mask" in gp:
            notes.append("int8_mask only changes mergekit's mask dtype; ignored")
        method = MergekitGTA(opts, mk_dtype=_HALF.get(dtype))
        method.tensor_params = resolver.gta_params
        method.tensor_extras = resolver.gta_extras
        for e in entries:  # fail early on a missing weight
            resolver.gta_params("model.embed_tokens.weight", [e.name])
        for k in keys:  # and on a lambda out of range on any tensor
            resolver.gta_extras(k, [e.name for e in entries])
    if isinstance(method, (MergekitModelStock, MergekitNuSlerp, MergekitMultiSlerp, MergekitSCE, MergekitKarcher)):
        method.mk_dtype = _HALF.get(str(cfg.get("dtype") or "")) or _checkpoint_dtype(ref_path)
    if random_seed is not None and hasattr(method, "config") and hasattr(method.config, "seed"):
        from fusion_bench.config_schema import SEED_RANGE

        lo, hi = SEED_RANGE.get("ge", 0), SEED_RANGE.get("le", 2**63 - 1)
        if not lo <= random_seed <= hi:
            raise ConfigError(f"--random-seed {random_seed} is out of range [{lo}, {hi}].")
        method.config.seed = int(random_seed)
    pool = _make_pool(CausalLMPool, models, cfg, notes, allow_crimes)
    return MergekitPlan(method, pool, method_name, notes, chat_template, list(dict.fromkeys(models.values())),
                        getattr(pool, "_mergekit_tokenizer", None))


def _architecture(path: str) -> tuple[Any, Any] | None:
    f = Path(path) / "config.json"
    if not f.exists():
        return None
    c = json.loads(f.read_text())
    arch = c.get("architectures")
    return (arch[0] if isinstance(arch, list) and arch else arch, c.get("model_type"))


def _make_pool(cls: Any, models: dict[str, str], cfg: Mapping[str, Any], notes: list[str],
               allow_crimes: bool = False):
    archs = {n: a for n, p in models.items() if (a := _architecture(p)) is not None}
    if len(set(archs.values())) > 1:
        if not allow_crimes:
            raise ConfigError(f"mergekit config: the models' architectures differ ({ {n: a[0] for n, a in archs.items()} }); "
                              "mergekit refuses this without --allow-crimes; pass --allow-crimes to merge tensors by name.")
        types = {a[1] for a in archs.values()}
        if len(types) > 1:
            raise ConfigError(f"--allow-crimes with models of different model_type ({sorted(map(str, types))}) is not "
                              "supported by fusion_bench; merge models of one model_type.")
        notes.append("--allow-crimes: architectures differ; tensors are merged by name (shapes must agree)")
    dtype = cfg.get("out_dtype") or cfg.get("dtype")
    if cfg.get("dtype") and cfg.get("out_dtype") and cfg["dtype"] != cfg["out_dtype"]:
        notes.append(f"computation in {cfg['dtype']} (linear and slerp: float32); output written as {cfg['out_dtype']}")
    tok = cfg.get("tokenizer_source")
    tokens_cfg = None
    pad = None
    if cfg.get("tokenizer") is not None:
        tcfg = cfg["tokenizer"]
        if not isinstance(tcfg, Mapping):
            raise ConfigError(f"mergekit 'tokenizer' must be a mapping (source, tokens, pad_to_multiple_of), got {tcfg!r}.")
        if tok is not None:
            raise ConfigError("Give tokenizer_source or tokenizer, not both (as mergekit).")
        for k in tcfg:
            if k not in TOKENIZER_KEYS:
                raise ConfigError(f"Unknown mergekit key 'tokenizer.{k}'.{did_you_mean(str(k), TOKENIZER_KEYS)}")
        tok = tcfg.get("source", "union")  # mergekit's default source is the union of the vocabularies
        tokens_cfg = tcfg.get("tokens")
        pad = tcfg.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise ConfigError(f"mergekit tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}.")
    pool_cfg = {"models": models, "dtype": dtype, "vocab_policy": "shared_rows"}
    if tok is None:  # mergekit refuses embeddings of different sizes unless a tokenizer setting aligns them
        sizes = {}
        for n, p in models.items():
            f = Path(p) / "config.json"
            if f.exists():
                v = json.loads(f.read_text()).get("vocab_size")
                if isinstance(v, int):
                    sizes[n] = v
        if len(set(sizes.values())) > 1:
            raise ConfigError(f"mergekit config: the models' vocabularies differ in size ({sizes}) and no tokenizer "
                              "setting is given; mergekit refuses this: add tokenizer_source: base (or a model path).")
        return cls(config=pool_cfg)
    from fusion_bench.compat import mergekit_vocab
    from fusion_bench.modelpool.causal_lm import DEFAULT_EMBEDDING_PATTERNS

    if tok not in ("union", "base"):
        if not isinstance(tok, (str, Mapping)):
            raise ConfigError(f"mergekit tokenizer source must be union, base or a model, got {tok!r}.")
        tok = _model_ref(tok, "tokenizer_source")
    if not cfg.get("base_model"):
        notes.append("tokenizer settings without base_model: the first model's tokenizer is the base one (mergekit "
                     "takes the first of its unordered model set)")
    tokens = mergekit_vocab.parse_tokens(tokens_cfg, _model_ref)
    for t, ts in tokens.items():
        if ts.model is not None and ts.model not in models.values():
            raise ConfigError(f"tokenizer.tokens[{t!r}]: model {ts.model} is not one of the merged models.")
    contributors = None
    if cfg.get("slices"):  # mergekit: embeddings from the first slice's sources, the head from the last slice's
        def srcs(sl: Any, i: int) -> list[str]:
            return [_model_ref(s.get("model"), f"slices[{i}].sources[].model") for s in (sl.get("sources") or [])]
        contributors = {"pre": srcs(cfg["slices"][0], 0), "post": srcs(cfg["slices"][-1], len(cfg["slices"]) - 1)}
    print("aligning the vocabularies to the output tokenizer (mergekit's tokenizer settings)...", flush=True)
    aligned, tokenizer, size = mergekit_vocab.align_models(
        models, _model_ref(cfg["base_model"], "base_model") if cfg.get("base_model") else None, tok, tokens, pad,
        cfg.get("dtype"), list(DEFAULT_EMBEDDING_PATTERNS), contributors)
    notes.append(f"output vocabulary: {len(tokenizer.get_vocab())} tokens ({tok if tok in ('union', 'base') else 'from ' + tok})"
                 + (f", padded to {size}" if size != len(tokenizer.get_vocab()) else ""))
    pool_cfg["models"] = aligned
    pool = cls(config=pool_cfg)
    pool._mergekit_tokenizer = tokenizer
    return pool


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def parse_mergekit_size(value: str) -> int:
    """mergekit's --out-shard-size: an integer, or with a K/M/B suffix (10^3, 10^6, 10^9); compared, as mergekit
    0.1.5's writer does, with the bytes of the tensors in a shard."""
    v = str(value).strip()
    mult = {"k": 10**3, "m": 10**6, "b": 10**9}
    try:
        n = int(v[:-1]) * mult[v[-1].lower()] if v and v[-1].lower() in mult else int(v)
    except ValueError:
        raise ConfigError(f"--out-shard-size {value!r} is not a size; give an integer with an optional K, M or B "
                          "suffix (e.g. 5B).") from None
    if n <= 0:
        raise ConfigError(f"--out-shard-size {value!r} must be positive.")
    return n


def main(argv: list[str] | None = None) -> int:
    """``fusion_bench mergekit CONFIG OUT_DIR``: run a mergekit YAML with the streaming engine."""
    from fusion_bench.engine.streaming import DEFAULT_BLOCK_ELEMENTS, merge_to_folder, plan_merge

    ap = argparse.ArgumentParser(prog="fusion_bench mergekit",
                                 description="Run a mergekit merge YAML with fusion_bench's streaming engine.")
    ap.add_argument("config", help="mergekit YAML")
    ap.add_argument("out_dir", nargs="?", help="output folder (required unless --dry-run)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (peak memory, bytes, mismatches) only")
    ap.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    ap.add_argument("--block-elements", type=int, default=DEFAULT_BLOCK_ELEMENTS,
                    help="elements per input in one row block of a large tensor")
    ap.add_argument("--prefetch", type=int, default=1, help="work units read ahead of the merge")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing OUT_DIR that fusion_bench wrote (it holds a .fusion_bench_output marker); "
                    "without it an existing OUT_DIR is refused before merging, and a folder fusion_bench did not write "
                    "or one holding an input model is never replaced")
    ap.add_argument("--no-overwrite", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    mk = ap.add_argument_group("mergekit-yaml options", "accepted with mergekit's meaning (docs/mergekit.md)")
    mk.add_argument("--random-seed", type=int, help="seed of the random sparsifications (dare_*, della*)")
    mk.add_argument("--allow-crimes", action=argparse.BooleanOptionalAction, default=False,
                    help="merge models whose architectures differ (tensors by name)")
    mk.add_argument("--out-shard-size", help="largest output shard in bytes, K/M/B decimal suffixes as mergekit "
                    "(5B = 5e9 bytes); overrides --max-shard-size")
    mk.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                    help="copy the tokenizer files to the output (default: yes)")
    refused = {"--trust-remote-code": "fusion_bench never runs model code from a checkpoint or the hub (configs are "
               "data, docs/guarantees.md); the mergekit front end reads only tensors and config.json",
               "--unsafe-truncate-embeddings": "dropping vocabulary rows is not supported; use tokenizer_source: base",
               "--no-safe-serialization": "fusion_bench writes safetensors only"}
    for flag in refused:
        mk.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    # execution-only options of mergekit-yaml: accepted, no effect on the result (see docs/mergekit.md)
    for flag in ("--lazy-unpickle", "--low-cpu-memory", "--cuda", "--read-to-gpu", "--multi-gpu", "--async-write",
                 "--clone-tensors", "--write-model-card", "--quiet"):
        mk.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                        help="mergekit execution option; no effect here")
    for flag in ("--no-trust-remote-code", "--no-unsafe-truncate-embeddings", "--safe-serialization", "--gpu-rich"):
        mk.add_argument(flag, action="store_true", help="accepted; no effect here")
    ap.add_argument("--tie-break", choices=("mergekit", "index"), default="mergekit",
                    help="entries kept among ties at a TIES/breadcrumbs magnitude cut: mergekit (default: mergekit's "
                    "result, a full sort per tensor) or index (lower index first: several times faster, bounded "
                    "memory, differs from mergekit's merge at the tied entries)")
    mk.add_argument("--lora-merge-cache", help="folder for models with a LoRA applied (MODEL+LORA references); "
                    "default: a temporary folder")
    mk.add_argument("--lora-merge-dtype", help="dtype a model is cast to before its LoRA is added (default: the "
                    "checkpoint dtype)")
    for flag in ("--device", "--num-threads", "--write-threads", "--transformers-cache"):
        mk.add_argument(flag, help="mergekit execution option; no effect here")
    mk.add_argument("-j", dest="num_threads", help=argparse.SUPPRESS)
    mk.add_argument("-v", action="count", default=0, help="accepted; no effect here")
    args = ap.parse_args(argv)
    for flag, why in refused.items():
        if getattr(args, flag.lstrip("-").replace("-", "_")):
            raise ConfigError(f"mergekit option {flag} is not supported: {why}.")
    max_shard: int | str = args.max_shard_size
    if args.out_shard_size is not None:
        max_shard = parse_mergekit_size(args.out_shard_size)
    plan = load_mergekit_config(args.config, random_seed=args.random_seed, allow_crimes=args.allow_crimes,
                                lora_merge_cache=args.lora_merge_cache, lora_merge_dtype=args.lora_merge_dtype,
                                tie_break=args.tie_break)
    for n in plan.notes:
        print(f"note: {n}")
    if args.dry_run:
        p = plan_merge(plan.method, plan.pool, block_elements=args.block_elements, prefetch=args.prefetch)
        print(p.summary())
        return 1 if p.mismatches else 0
    if not args.out_dir:
        raise ConfigError("Give the output folder: fusion_bench mergekit CONFIG OUT_DIR (or --dry-run).")
    if args.overwrite and args.no_overwrite:
        raise ConfigError("Give --overwrite or --no-overwrite, not both.")
    # merge_to_folder checks OUT_DIR (exists? ours? an input?) before any merging and locks it
    info = merge_to_folder(plan.method, plan.pool, args.out_dir, block_elements=args.block_elements,
                           max_shard_size=max_shard, prefetch=args.prefetch,
                           overwrite=args.overwrite, overwrite_hint="--overwrite",
                           copy_side_files=True if args.copy_tokenizer else "no_tokenizer")
    if plan.tokenizer is not None:  # as mergekit: the built tokenizer is saved whatever --copy-tokenizer says
        plan.tokenizer.save_pretrained(args.out_dir)
        if plan.chat_template:
            got = set_chat_template(args.out_dir, plan.chat_template, plan.referenced or [])
            print("note: chat template " + ("set" if got else "not set: no referenced model has one (as mergekit)"))
    elif plan.chat_template:
        if not args.copy_tokenizer:
            print("note: chat_template given with --no-copy-tokenizer: no tokenizer is written, so no template "
                  "(as mergekit)")
        else:
            got = set_chat_template(args.out_dir, plan.chat_template, plan.referenced or [])
            print("note: chat template " + ("set" if got else "not set: no referenced model has one (as mergekit)"))
    print(f"merged ({plan.merge_method}) into {info['output']}: {len(info['shards'])} shard(s), "
          f"{info['bytes_written'] / 2**20:.1f} MiB written in {info['merge_wall_time_s']:.2f} s")
    return 0


__all__ = ["evaluate_setting", "depth_t", "load_mergekit_config", "main", "MergekitLinear", "MergekitSlerp",
           "MergekitModelStock", "MergekitNuSlerp", "MergekitMultiSlerp", "MergekitSCE"]
