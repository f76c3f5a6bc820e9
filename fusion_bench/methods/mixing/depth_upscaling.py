"""Depth up-scaling (SOLAR): a deeper model whose layers are copies of a list of the base model's layers.

Runs in memory on any model holding an ``nn.ModuleList`` of layers (the pool's model is itself the
list, or ``layers`` names its attribute path, e.g. ``model.layers``), and in the streaming engine on
causal-LM checkpoints (layer tensors ``*.layers.<i>.*`` copied and renumbered, everything else
copied, ``num_hidden_layers`` and ``layer_types`` rewritten), so the output reloads with
``from_pretrained``.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from fusion_bench.config_schema import option
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.kernels.mixing.depth import parse_layer_indices, runs_of
from fusion_bench.methods.base import FusionMethod, FusionResult, register_method
from fusion_bench.methods.mixing._pick import one_model
from fusion_bench.methods.mixing.mixtral import _summary
from fusion_bench.utils import float_numel

_HF_LAYER_RX = r"^(?P<prefix>.*?\.layers\.)(?P<index>\d+)(?P<rest>\..+)$"


@dataclass
class DepthUpscalingConfig:
    layer_indices: list[Any] = option([], help=(
        "Source layers of the output, in order: integers, pairs [start, end] (end exclusive) or FusionBench's "
        "strings 'range(a, b)' (parsed, never evaluated). SOLAR on 32 layers: [[0, 24], [8, 32]] (48 layers)."))
    layers: str | None = option(None, help=(
        "In memory: attribute path of the nn.ModuleList of layers (e.g. 'model.layers'). Default: the model itself "
        "when it is a ModuleList, else 'model.layers' (Hugging Face decoders), else its only ModuleList."))
    model: str | None = option(None, help="The model to deepen (default: '_pretrained_', else the pool's only model).")
    layer_regex: str = option(_HF_LAYER_RX, help=(
        "Streaming: regex naming a layer tensor's prefix, index and rest (default '<...>.layers.<i>.<...>')."))
    num_layers_key: str = option("num_hidden_layers", help="Streaming: config.json key holding the number of layers.")


def _get_path(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"method.layers='{path}': the model ({type(model).__name__}) has no attribute '{part}'.")
        obj = getattr(obj, part)
    return obj


def _set_path(model: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, last = path.rpartition(".")
    setattr(_get_path(model, parent) if parent else model, last, value)


def find_layers(model: nn.Module, path: str | None) -> str:
    """The attribute path of the model's layer list ('' for a model that is itself a ModuleList)."""
    if path:
        if not isinstance(_get_path(model, path), nn.ModuleList):
            raise ConfigError(f"method.layers='{path}' is not an nn.ModuleList in {type(model).__name__}.")
        return path
    if isinstance(model, nn.ModuleList):
        return ""
    inner = getattr(model, "model", None)
    if isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return "model.layers"
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n]
    top = [n for n in lists if not any(n.startswith(o + ".") for o in lists if o != n)]
    if len(top) == 1:
        return top[0]
    raise ConfigError(f"{type(model).__name__} has {len(top)} top-level ModuleLists ({top[:5]}); set method.layers "
                      "to the one holding the layers.")


@register_method
class DepthUpscaling(FusionMethod):
    """Stack copies of chosen layers of one model into a deeper model (depth up-scaling).

    Paper: Kim et al., "SOLAR 10.7B: Scaling Large Language Models with Simple yet Effective Depth
    Up-Scaling", 2023; FusionBench ``depth_upscaling`` / ``DepthUpscalingForLlama``. Variant: output
    layer j = a copy of source layer ``layer_indices[j]`` (expanded); everything outside the layer list
    kept; ``num_hidden_layers`` / ``layer_types`` and each copy's attention ``layer_idx`` (KV cache slot)
    renumbered. No continued pre-training.

    Args:
        config: :class:`DepthUpscalingConfig`.
    """

    name = "depth_upscaling"
    config_class: ClassVar = DepthUpscalingConfig
    family = "mixing"
    summary = "SOLAR depth up-scaling: a deeper model from a list of (repeated) layers of one model."
    variant = ("Output layer j = copy of source layer layer_indices[j] (ints, [start, end) pairs or 'range(a, b)' "
               "parsed without eval); other modules kept; num_hidden_layers, layer_types and attention layer_idx "
               "renumbered.")
    identity_on_equal_inputs = False
    permutation_invariant = False
    conformance_skip = ("needs a model with a list of layers; the suite's TinyNet has none "
                        "(tested in tests/test_mixing_upcycle.py)")

    def _model_name(self, pool) -> str:
        return one_model(pool, self.config.model, "depth_upscaling", "deepens")

    def _require_indices(self) -> None:
        if not self.config.layer_indices:
            raise ConfigError("depth_upscaling needs method.layer_indices, e.g. [[0, 24], [8, 32]] (SOLAR on 32 layers).")

    # -- streaming (causal-LM checkpoints) ---------------------------------------------------------------
    def _passthrough(self, pool, keys: list[str]):
        from fusion_bench.methods.merging.passthrough import Passthrough

        self._require_indices()
        name = self._model_name(pool)
        rx = re.compile(self.config.layer_regex)
        idx = {int(m.group("index")) for k in keys if (m := rx.match(k))}
        n = max(idx) + 1 if idx else 0
        if n == 0:
            raise ModelMismatchError(f"Model '{name}' has no tensor matching method.layer_regex "
                                     f"({self.config.layer_regex!r}); set it to the layer tensors' naming.")
        indices = parse_layer_indices(self.config.layer_indices, n)
        slices = [{"model": name, "layers": [a, b]} for a, b in runs_of(indices)]
        return Passthrough({"slices": slices, "layer_regex": self.config.layer_regex,
                            "num_layers_key": self.config.num_layers_key}), indices, n

    def config_source(self, pool) -> str:
        return self._model_name(pool)

    def stream_plan(self, pool, readers: dict[str, Any], out_dtype: torch.dtype | None):
        name = self._model_name(pool)
        pt, indices, n = self._passthrough(pool, readers[name].keys())
        jobs, updates = pt.stream_plan(pool, readers, out_dtype)
        in_numel = sum(readers[name].meta(k).numel for k in readers[name].keys()
                       if readers[name].meta(k).dtype.is_floating_point)
        out_numel = sum(_numel(j.shape) for j in jobs if j.dtype.is_floating_point)
        self._stream_stats = _stats(indices, n, out_numel, in_numel)
        return jobs, updates

    def streaming_metadata(self) -> dict[str, Any]:
        return dict(getattr(self, "_stream_stats", {}) or {})

    # -- in memory ---------------------------------------------------------------------------------
    def run(self, modelpool) -> FusionResult:
        t0 = time.perf_counter()
        pool = modelpool
        self._require_indices()
        name = self._model_name(pool)
        model = pool.load_model(name)
        if pool.kind(name) == "module":
            model = copy.deepcopy(model)  # never modify the pool's live module
        if not isinstance(model, nn.Module) or type(model).__name__ == "TensorBag":
            raise ConfigError(f"Model '{name}' is a bare state dict; depth_upscaling needs a module (set "
                              "modelpool.architecture) or a Hugging Face checkpoint.")
        in_numel = float_numel(model)
        path = find_layers(model, self.config.layers)
        old = model if path == "" else _get_path(model, path)
        indices = parse_layer_indices(self.config.layer_indices, len(old))
        new = nn.ModuleList([copy.deepcopy(old[i]) for i in indices])
        for j, layer in enumerate(new):  # each copy caches its keys/values in its own slot
            for sub in layer.modules():
                if isinstance(getattr(sub, "layer_idx", None), int):
                    sub.layer_idx = j
        if path == "":
            model = new
        else:
            _set_path(model, path, new)
        cfg = getattr(model, "config", None)
        updates: dict[str, Any] = {}
        if cfg is not None and hasattr(cfg, self.config.num_layers_key):
            setattr(cfg, self.config.num_layers_key, len(new))
            updates[self.config.num_layers_key] = len(new)
            lt = getattr(cfg, "layer_types", None)
            if isinstance(lt, list) and len(lt) == len(old):
                cfg.layer_types = [lt[i] for i in indices]
                updates["layer_types"] = cfg.layer_types
        model.eval()
        meta = self._metadata(t0, config_updates=updates, **_stats(indices, len(old), float_numel(model), in_numel))
        return FusionResult("merged", model=model, metadata=meta)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _stats(indices: list[int], n_in: int, out_numel: int, in_numel: int) -> dict[str, Any]:
    return {"layer_indices_expanded": list(indices), "input_layers": n_in, "output_layers": len(indices),
            "total_parameters": int(out_numel), "active_parameters_per_token": int(out_numel),
            "input_model_parameters": int(in_numel), "extra_parameters": int(out_numel - in_numel),
            "parameter_ratio": round(out_numel / max(1, in_numel), 4),
            "mixed_model": _summary(out_numel, out_numel, in_numel, 0)}
