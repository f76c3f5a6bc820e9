"""Out-of-core pruning: a causal LM larger than memory pruned into a folder, one decoder layer in memory at a time.

    from fusion_bench.methods import build_method
    from fusion_bench.methods.compression.out_of_core import prune_to_folder
    prune_to_folder(build_method({"name": "sparsegpt_pruning", "nm": "2:4"}), pool, "outputs/pruned")

The model is built with its parameters on the meta device (buffers such as rotary frequencies are real); the
parameters outside the decoder layers (embeddings, final norm, lm_head) are read from the checkpoint and written
to the output first. Then, for each decoder layer in order, its parameters are read from the checkpoint, the layer
is pruned (the calibration methods run it on its captured inputs as the in-memory path does: same statistics,
same result), its tensors are written to the output's sharded safetensors and its parameters freed. Peak memory:
the non-layer parameters, one decoder layer, its inputs and outputs and its statistics, independent of depth. The
output is written under a temporary name and renamed at the end (nothing half-written under the final name).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.methods.compression._common import (
    find_decoder_layers,
    linear_targets,
    model_name,
    weight_2d,
)
from fusion_bench.utils import measure

if TYPE_CHECKING:
    from fusion_bench.methods.compression.pruning import _Pruning
    from fusion_bench.modelpool.base import ModelPool


def _param_slots(module: nn.Module, prefix: str) -> list[tuple[nn.Module, str, str]]:
    """(owner module, parameter name, checkpoint key) of every parameter under ``module``."""
    out = []
    for mname, m in module.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            out.append((m, pname, f"{prefix}{mname + '.' if mname else ''}{pname}"))
    return out


def prune_to_folder(method: _Pruning, pool: ModelPool, out_dir: str | os.PathLike, *, overwrite: bool = False,
                    max_shard_size: int | str = "5GB", progress: bool | None = None) -> dict[str, Any]:
    """Prune the pool's model (``method.config.model``, default the base) into ``out_dir`` out of core.

    Args:
        method: a pruning method (magnitude, random, Wanda or SparseGPT), built with its config.
        pool: a causal LM pool whose model is a Hugging Face folder of safetensors on disk.
        out_dir: the output folder (refused if it exists unless ``overwrite`` and fusion_bench wrote it).
        max_shard_size: largest safetensors shard ('5GB', '500MB' or bytes).
        progress: show a progress bar (default: on a terminal).
    Returns:
        the report: sparsity reached per layer and overall, calibration, memory (peak RSS of the call and the
        largest layer's working set), wall time.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from fusion_bench.engine.streaming import parse_size, pool_input_paths
    from fusion_bench.io.outputs import output_dir
    from fusion_bench.io.stream import ShardedWriter
    from fusion_bench.methods.compression.pruning import _CalibrationPruning, _Pruning

    if not isinstance(method, _Pruning):
        raise ConfigError(f"prune_to_folder takes a pruning method (magnitude, random, wanda, sparsegpt), not "
                          f"'{getattr(method, 'name', method)}'.")
    t0 = time.perf_counter()
    cfg = method.config
    name = model_name(cfg, pool)
    folder = pool.hf_folder(name)
    if folder is None:
        raise ConfigError(f"Model '{name}' is not a Hugging Face folder on disk; out-of-core pruning reads its "
                          "safetensors layer by layer (use method.run for in-memory models).")
    src = pool.source(name)
    hf_cfg = AutoConfig.from_pretrained(folder)
    keys = list(src.keys())
    metas = {k: src.meta(k) for k in keys}
    ckpt_dtype = next((m.dtype for m in metas.values() if m.dtype.is_floating_point), torch.float32)
    dtype = pool.dtype or ckpt_dtype
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    model.eval()
    found = find_decoder_layers(model)
    if found is None:
        raise ModelMismatchError(f"Model '{name}' ({type(model).__name__}) has no decoder-layer list.")
    path, layers = found
    layer_params = {id(p) for p in layers.parameters()}
    out_dtype = {k: (dtype if m.dtype.is_floating_point else m.dtype) for k, m in metas.items()}
    plan = [(k, tuple(metas[k].shape), out_dtype[k]) for k in keys]

    def load(module: nn.Module, prefix: str) -> None:
        for owner, pname, key in _param_slots(module, prefix):
            if key not in metas:
                continue
            owner._parameters[pname] = nn.Parameter(src.get(key).to(out_dtype[key]), requires_grad=False)

    def free(module: nn.Module) -> None:
        for owner, pname, _ in _param_slots(module, ""):
            p = owner._parameters[pname]
            owner._parameters[pname] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                    requires_grad=False)

    targets = {}
    for i, layer in enumerate(layers):
        targets.update({n: m for n, m in linear_targets(layer, cfg.exclude, prefix=f"{path}.{i}.").items()})
    per_layer: dict[str, float] = {}
    counts = [0, 0]
    guard = {"overwrite": overwrite, "inputs": pool_input_paths(pool), "what": "pruned model"}
    show = sys.stderr.isatty() if progress is None else progress
    with measure() as m, output_dir(out_dir, **guard) as tmp:
        writer = ShardedWriter(tmp, plan, max_shard_bytes=parse_size(max_shard_size), dest=out_dir)
        try:
            # everything outside the decoder layers: read, kept in memory (the forward needs it), written
            outside = [(mod, pname, key) for mod, pname, key in _param_slots(model, "")
                       if id(getattr(mod, pname)) not in layer_params]
            for mod, pname, key in outside:
                if key in metas:
                    mod._parameters[pname] = nn.Parameter(src.get(key).to(out_dtype[key]), requires_grad=False)
            if hasattr(model, "tie_weights"):
                model.tie_weights()
            still = [key for mod, pname, key in outside if getattr(mod, pname).is_meta]
            if still:
                raise ModelMismatchError(f"Model '{name}': tensors {still[:3]} are missing from the checkpoint.")
            for key in keys:
                if not key.startswith(f"{path}."):
                    writer.write(key, src.get(key).to(out_dtype[key]))

            def store(index: int, prefix: str, layer: nn.Module) -> None:
                for mname, mod in linear_targets(layer, [], prefix=prefix).items():
                    if mname in targets:
                        w = weight_2d(mod)
                        z = int((w == 0).sum())
                        per_layer[mname] = round(z / w.numel(), 6)
                        counts[0] += z
                        counts[1] += w.numel()
                for owner, pname, key in _param_slots(layer, prefix):
                    if key in metas:
                        writer.write(key, getattr(owner, pname).detach().to(out_dtype[key]))
                free(layer)

            def load_layer(index: int, prefix: str, layer: nn.Module) -> None:
                load(layer, prefix)

            if isinstance(method, _CalibrationPruning):
                with torch.no_grad():
                    info = method.prune(model, targets, pool, layer_hooks=(load_layer, store))
            else:
                from fusion_bench.methods._task_data import progress as progress_bar
                from fusion_bench.methods.compression.pruning import _data_free_prune

                with torch.no_grad(), progress_bar(method.name, len(layers), show) as advance:
                    for i, layer in enumerate(layers):
                        prefix = f"{path}.{i}."
                        load(layer, prefix)
                        mods = {n: mod for n, mod in linear_targets(layer, [], prefix=prefix).items() if n in targets}
                        _data_free_prune(mods, cfg, method.scores_fn())
                        store(i, prefix, layer)
                        advance()
                info = {}
            writer.finish()
        finally:
            writer.close()
        hf_cfg.save_pretrained(tmp)
        pool._save_extras(tmp, name)
    return {"method": method.name, "hyperparameters": method.hyperparameters(), "model": name,
            "output": str(out_dir), "sparsity_per_layer": per_layer,
            "sparsity_overall": round(counts[0] / max(1, counts[1]), 6), **info,
            "peak_rss_mb": round(m.peak_rss_bytes / 2**20, 1), "wall_time_s": round(time.perf_counter() - t0, 3),
            "bytes_written": sum(math.prod(s) * torch.empty(0, dtype=d).element_size() for _, s, d in plan)}


__all__ = ["prune_to_folder"]
