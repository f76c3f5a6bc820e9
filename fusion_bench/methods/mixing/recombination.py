"""Model recombination (FusionBench ``model_recombination``): a model assembled from units of random models.

See :mod:`fusion_bench.kernels.mixing.recombination` for the draw. The pool's models (not
``_pretrained_``) are recombined; the result is recombined model ``model_index`` (FusionBench returns
the first one unless asked for the whole new pool; this framework's results are one model).
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.kernels.mixing.recombination import assign_units
from fusion_bench.methods.base import FusionMethod, FusionResult, register_method

_LAYER_RX = r"^(?:(?P<prefix>.*?\.layers\.)|)(?P<index>\d+)\."


@dataclass
class ModelRecombinationConfig:
    granularity: str = option("auto", choices=("auto", "tensor", "layer", "module"), help=(
        "The unit drawn from one model: 'tensor' (each state-dict tensor; FusionBench for a plain nn.Module), "
        "'layer' (all tensors of one numbered layer, matched by layer_regex; other tensors one by one), 'module' "
        "(all tensors under one top-level name; FusionBench for an nn.ModuleDict), 'auto' (layer for a live "
        "nn.ModuleList, module for a live nn.ModuleDict, else tensor: FusionBench's choice)."))
    layer_regex: str = option(_LAYER_RX, help=(
        "granularity=layer: regex whose group 'index' is the layer number (default: '<...>.layers.<i>.' or a "
        "bare '<i>.' of a ModuleList)."))
    seed: int = option(0, **SEED_RANGE, help="Seed of the draws (each unit's permutation from a hash of seed and unit).")
    model_index: int = option(0, ge=0, help="Which of the N recombined models is returned (0: FusionBench's "
                              "return_modelpool=false).")


@register_method
class ModelRecombination(FusionMethod):
    """Recombine the units (tensors, layers or modules) of the pool's models at random.

    Paper / tool: FusionBench (Tang et al., arXiv 2406.03280) ``ModelRecombinationAlgorithm``.
    Variant: for every unit the N models are permuted (seeded per unit); recombined model i takes
    the unit of model perm[i]; the result is recombined model ``model_index``. Pure copies, no
    averaging.

    Args:
        config: :class:`ModelRecombinationConfig`.
    """

    name = "model_recombination"
    config_class: ClassVar = ModelRecombinationConfig
    family = "mixing"
    summary = "FusionBench model recombination: each tensor / layer / module taken from a random model (seeded)."
    variant = ("Per unit (tensor, layer or top-level module) a seeded permutation of the N models; recombined model "
               "model_index takes the unit of model perm[model_index]; copies only.")
    identity_on_equal_inputs = True
    permutation_invariant = False

    def _granularity(self, pool) -> str:
        g = self.config.granularity
        if g != "auto":
            return g
        first = pool.model_names[0]
        if pool.kind(first) == "module":
            e = pool.entry(first)
            if isinstance(e, nn.ModuleList):
                return "layer"
            if isinstance(e, nn.ModuleDict):
                return "module"
        return "tensor"

    def _units(self, keys: list[str], granularity: str) -> dict[str, str]:
        """key -> unit id."""
        if granularity == "tensor":
            return {k: k for k in keys}
        if granularity == "module":
            return {k: "module:" + k.split(".", 1)[0] for k in keys}
        rx = re.compile(self.config.layer_regex)
        out = {}
        for k in keys:
            m = rx.match(k)
            out[k] = f"layer:{m.group('prefix') or ''}{m.group('index')}" if m else k
        return out

    def _assign(self, pool, keys: list[str]) -> dict[str, str]:
        """key -> model name."""
        names = pool.model_names
        if not names:
            raise ConfigError("model_recombination needs models in the pool besides '_pretrained_'.")
        if self.config.model_index >= len(names):
            raise ConfigError(f"method.model_index={self.config.model_index} but the pool has {len(names)} models "
                              f"({names}); use 0 .. {len(names) - 1}.")
        units = self._units(keys, self._granularity(pool))
        draw = assign_units(sorted(set(units.values())), len(names), self.config.seed, self.config.model_index)
        return {k: names[draw[units[k]]] for k in keys}

    def _stats(self, who: dict[str, str], names: list[str], src: Any) -> dict[str, Any]:
        counts = {n: 0 for n in names}
        for m in who.values():
            counts[m] += 1
        total = 0
        for k in who:
            meta = src.meta(k)
            if meta.dtype.is_floating_point:
                total += meta.numel
        return {"seed": int(self.config.seed), "granularity_used": None, "tensors_from": counts,
                "total_parameters": int(total), "active_parameters_per_token": int(total),
                "input_model_parameters": int(total), "extra_parameters": 0}

    # -- streaming ---------------------------------------------------------------------------------
    def config_source(self, pool) -> str:
        return pool.model_names[0]

    def stream_plan(self, pool, readers: dict[str, Any], out_dtype: torch.dtype | None):
        from fusion_bench.engine.streaming import Job, open_reader

        names = pool.model_names
        for n in names:
            if n not in readers:
                readers[n] = open_reader(pool, n)
        keys = readers[names[0]].keys()
        self._check_same(keys, {n: readers[n] for n in names}, names)
        who = self._assign(pool, keys)
        jobs = []
        for k in keys:
            meta = readers[who[k]].meta(k)
            dt = out_dtype if (out_dtype is not None and meta.dtype.is_floating_point) else meta.dtype
            jobs.append(Job(k, tuple(meta.shape), dt, "copy", {who[k]: k}, copy_from=who[k], in_dtype=meta.dtype))
        st = self._stats(who, names, readers[names[0]])
        st["granularity_used"] = self._granularity(pool)
        self._stream_stats = st
        return jobs, {}

    def streaming_metadata(self) -> dict[str, Any]:
        return dict(getattr(self, "_stream_stats", {}) or {})

    @staticmethod
    def _check_same(keys: list[str], srcs: dict[str, Any], names: list[str]) -> None:
        ref = srcs[names[0]]
        for n in names[1:]:
            s = srcs[n]
            for k in keys:
                if k not in s:
                    raise ModelMismatchError(f"Model '{n}' lacks tensor '{k}' that model '{names[0]}' has.")
                if tuple(s.meta(k).shape) != tuple(ref.meta(k).shape):
                    raise ModelMismatchError(f"Tensor '{k}' has shape {list(s.meta(k).shape)} in model '{n}' but "
                                             f"{list(ref.meta(k).shape)} in model '{names[0]}'.")
            if len(s.keys()) != len(keys):
                extra = sorted(set(s.keys()) - set(keys))[:3]
                raise ModelMismatchError(f"Model '{n}' has tensors {extra} that model '{names[0]}' lacks.")

    # -- in memory ---------------------------------------------------------------------------------
    def run(self, modelpool) -> FusionResult:
        t0 = time.perf_counter()
        pool = modelpool
        names = pool.model_names
        if not names:
            raise ConfigError("model_recombination needs models in the pool besides '_pretrained_'.")
        srcs = {n: pool.source(n) for n in names}
        keys = srcs[names[0]].keys()
        self._check_same(keys, srcs, names)
        who = self._assign(pool, keys)
        sd = {}
        for k in keys:
            t = srcs[who[k]].get(k)
            if pool.dtype is not None and t.is_floating_point():
                t = t.to(pool.dtype)
            sd[k] = t.detach().clone()
        first = names[0]
        from fusion_bench.modelpool.base import TensorBag

        model = pool.load_model(first)
        if isinstance(model, TensorBag):
            return FusionResult("merged", model=TensorBag(sd), metadata=self._metadata(
                t0, **{**self._stats(who, names, srcs[first]), "granularity_used": self._granularity(pool)}))
        if pool.kind(first) == "module":
            model = copy.deepcopy(model)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise ModelMismatchError(f"Recombined tensors do not fit {type(model).__name__}: missing {missing[:5]}, "
                                     f"unexpected {list(unexpected)[:5]}.")
        st = self._stats(who, names, srcs[first])
        st["granularity_used"] = self._granularity(pool)
        return FusionResult("merged", model=model.eval() if hasattr(model, "eval") else model,
                            metadata=self._metadata(t0, **st))
