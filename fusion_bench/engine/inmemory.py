"""Apply a tensor-wise method with the result held in memory (one output model + one tensor per input).

The base model (``_pretrained_``, else the first model) is loaded as a module; its tensors are
replaced one by one by the merged values, read lazily from each checkpoint. When checkpoint
files name tensors differently from the module (key renames on load), models are loaded whole.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from rich.progress import Progress
from torch import nn

from fusion_bench.checks import check_merged_tensor
from fusion_bench.engine.validate import align_keys, aligned_sources, untied_keys, validate_sources  # noqa: F401
from fusion_bench.io.checkpoint import ModuleSource, TensorSource

if TYPE_CHECKING:
    from fusion_bench.methods.base import TensorwiseMerge
    from fusion_bench.modelpool.base import ModelPool


def _progress(total: int, desc: str):
    import sys

    return Progress(transient=True, disable=not sys.stderr.isatty() or total < 50)


def merge_in_memory(method: TensorwiseMerge, pool: ModelPool) -> tuple[nn.Module, dict[str, Any]]:
    names = pool.model_names
    method.check_pool(names, pool.has_pretrained)
    base_name = pool.base_name()
    pool.check_architectures([base_name, *names])  # before loading anything
    model = pool.load_model(base_name)
    if pool.kind(base_name) == "module":
        model = copy.deepcopy(model)  # never modify the caller's module
    module_sd = model.state_dict()
    all_names = [base_name, *[n for n in names if n != base_name]]
    sources: dict[str, TensorSource] = {n: pool.source(n) for n in all_names}
    module_keys = untied_keys(model.state_dict(keep_vars=True), sources[base_name].keys())
    aligned = aligned_sources(base_name, sources, module_keys)
    lazy = aligned is not None
    if aligned is not None:
        # fine-tuned checkpoints may hold only a sub-model (e.g. the vision tower of a full CLIP base),
        # possibly under names that differ from the base's by a prefix
        sources, key_map = aligned
        file_keys = validate_sources(base_name, sources, keys=[key_map[k] for k in module_keys], allow_extra=False)
        keys = module_keys
    else:
        # read the base from its own copy: the output module is written while merging
        base_module = pool.entry(base_name) if pool.kind(base_name) == "module" else pool.load_model(base_name)
        sources = {n: ModuleSource(pool.load_model(n) if n != base_name else base_module, n) for n in all_names}
        keys = validate_sources(base_name, sources, keys=module_keys)
        key_map = {k: k for k in keys}
        file_keys = keys
    has_base = pool.has_pretrained
    method.prepare(sources[base_name] if has_base else None, [sources[n] for n in names], names,
                   [k for k in file_keys if method.should_merge(k, sources[base_name].meta(k).dtype)])
    with torch.no_grad(), _progress(len(keys), method.name) as prog:
        task = prog.add_task(f"merging ({method.name})", total=len(keys))
        for k in keys:
            fk = key_map[k]
            base_t = sources[base_name].get(fk) if has_base else None
            tensors = [sources[n].get(fk) for n in names]
            merged = method.merge_one(fk, base_t, tensors, names)
            target = module_sd[k]
            if merged.shape != target.shape:
                raise RuntimeError(f"method {method.name} returned shape {tuple(merged.shape)} for '{k}', "
                                   f"expected {tuple(target.shape)}")
            if merged.dtype != target.dtype:  # merge_one checked it in its dtype; the module's may overflow
                merged = merged.to(target.dtype)
                check_merged_tensor(method, k, merged)
            target.copy_(merged)
            prog.advance(task)
    return model, {"merged_tensors": len(keys), "base_model": base_name, "models": names,
                   "lazy_tensor_reading": lazy}
