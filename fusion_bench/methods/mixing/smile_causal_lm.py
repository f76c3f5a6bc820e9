"""SMILE upscaling of causal LMs (Llama, Mistral, Qwen2), streamed tensor by tensor to a reloadable folder.

Paper: Tang et al., "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From Pre-Trained
Foundation Models", arXiv 2408.10174 (their Mistral-7B experiments). FusionBench: ``smile_mistral_upscaling``,
``smile_qwen2_upscaling`` and the generic ``SmileCausalLMUpscalingAlgorithm`` (rank_of_router = ``gate_k``,
rank_of_expert = ``k``, num_experts_per_tok = ``top_k``).

The seven projections of every decoder layer (q, k, v, o, gate, up, down) become
:class:`~fusion_bench.models.smile.SmileLinear` layers; everything else (embeddings, norms, output head) is the
pretrained model's. With ``output_path`` the checkpoints are read tensor by tensor (safetensors, ``preadv``) and
the result is written as sharded safetensors: memory holds one projection of every model at a time (plus its
SVDs), whatever the model size. The folder (``config.json`` with ``model_type: smile_<family>``, weights,
generation config, tokenizer) reloads with ``AutoModelForCausalLM.from_pretrained`` after
``import fusion_bench.models`` (see :mod:`fusion_bench.models.smile_hf`); no remote code is written or run.
Without ``output_path`` the models are loaded whole and the upscaled model is built in memory (the program's
``merged_model_path`` then saves it with ``save_pretrained``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fusion_bench.config_schema import option
from fusion_bench.errors import CheckpointError, ModelMismatchError
from fusion_bench.methods.base import FusionMethod, FusionResult, MethodConfig, register_method
from fusion_bench.methods.mixing.smile import _check_top_k
from fusion_bench.utils import float_numel, resolve_device

VARIANT = ("Tang et al. 2024 (SMILE) for causal LMs, FusionBench smile_*_upscaling: the q/k/v/o/gate/up/down "
           "projections of every decoder layer become SMILE layers (dW_i = U_i S_i V_i^T, rank-k experts "
           "+ bias deltas, router ||V_i[:, :gate_k]^T x||, softmax over all experts, top_k renormalised); "
           "embeddings, norms and lm_head pretrained; streamed tensor by tensor with output_path")


@dataclass
class SmileCausalLMConfig(MethodConfig):
    gate_k: int = option(8, ge=1, le=2**20, help="Router rank (FusionBench's rank_of_router; default 8 as its "
                         "causal-LM configs). Capped at min(m, n) per projection.")
    k: int = option(64, ge=-1, le=2**20, help="Expert rank (FusionBench's rank_of_expert: 64 for Qwen2, 512 for "
                    "Mistral in its configs); k <= 0: full-rank experts (the whole delta).")
    top_k: int = option(1, ge=1, le=4096, help="Experts per token (FusionBench's num_experts_per_tok).")
    routing_use_diff: bool = option(True, help="Routers from the SVD of the deltas (the paper); false: from the SVD "
                                    "of the fine-tuned weights.")
    output_path: str | None = option(None, help="Stream the upscaled model to this folder tensor by tensor "
                                     "(FusionBench's model_save_path); null: build it in memory (save it with "
                                     "merged_model_path).")
    overwrite: bool = option(False, help="Replace an existing output_path that fusion_bench wrote.")
    load_output: bool = option(True, help="After streaming, load the folder as the result (needed to evaluate it); "
                               "false: the result is a stand-in holding only shapes (reports count its parameters).")
    max_shard_size: str = option("5GB", help="Largest safetensors shard written to output_path.")
    device: str = option("cpu", help="Where the SVDs run (cpu, cuda, auto); FusionBench's accelerator.")


def _family_of_config(cfg: dict[str, Any], name: str) -> str:
    from fusion_bench.models.smile_hf import FAMILIES

    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        raise ModelMismatchError(f"Model '{name}' has model_type {mt!r}; SMILE causal-LM upscaling supports "
                                 f"{list(FAMILIES)}. Use method=smile_upscaling for other models (in memory).")
    return mt


def _check_same_shapes(key: str, shape: tuple[int, ...], metas: dict[str, Any]) -> None:
    for n, m in metas.items():
        if m is None:
            raise ModelMismatchError(f"Model '{n}' has no tensor '{key}' that the base has; SMILE needs every model "
                                     "to be a fine-tune of the base (same architecture).")
        if tuple(m.shape) != tuple(shape):
            raise ModelMismatchError(f"Tensor '{key}' has shape {tuple(m.shape)} in model '{n}' but {tuple(shape)} in "
                                     "the base; SMILE needs fine-tunes of one base model.")


@torch.no_grad()
def upscale_causal_lm_in_memory(base: nn.Module, finetuned: list[nn.Module], names: list[str], *, gate_k: int,
                                k: int, top_k: int, routing_use_diff: bool = True,
                                device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The upscaled ``Smile*ForCausalLM`` of a loaded base and its fine-tunes, and the metadata (counts)."""
    from fusion_bench.models.smile import smile_linear_tensors, smile_parameter_counts
    from fusion_bench.models.smile_hf import TARGET_WEIGHT, smile_classes, smile_config, smile_family

    family = smile_family(base)
    if family is None:
        raise ModelMismatchError(f"The base model ({type(base).__name__}, model_type "
                                 f"{getattr(getattr(base, 'config', None), 'model_type', None)!r}) is not a Llama, "
                                 "Mistral or Qwen2 causal LM; use method=smile_upscaling for other models.")
    _check_top_k(top_k, len(finetuned), "smile_causal_lm_upscaling")
    dev = resolve_device(device)
    dtype = next(base.parameters()).dtype
    cfg = smile_config(base.config, family, num_experts=len(finetuned), top_k=top_k, gate_k=gate_k, k=k)
    model = smile_classes(family)[1](cfg).to(dtype)
    sd0 = base.state_dict()
    sds = [m.state_dict() for m in finetuned]
    biases = {m.group("prefix") + ".bias" for key in sd0 if (m := TARGET_WEIGHT.match(key))}
    new: dict[str, torch.Tensor] = {}
    for key, t in sd0.items():
        mt = TARGET_WEIGHT.match(key)
        if key in biases:
            continue
        if mt is None:
            new[key] = t
            continue
        p = mt.group("prefix")
        _check_same_shapes(key, tuple(t.shape), {n: sd.get(key) for n, sd in zip(names, sds)})
        b0 = sd0.get(p + ".bias")
        out = smile_linear_tensors(p, t.to(dev), b0.to(dev) if b0 is not None else None,
                                   [sd[key].to(dev) for sd in sds],
                                   [sd[p + ".bias"].to(dev) if b0 is not None else None for sd in sds],
                                   gate_k, k, routing_use_diff)
        new.update({n: v.to(device=t.device, dtype=t.dtype) for n, v in out.items()})
    missing, unexpected = model.load_state_dict(new, strict=False)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    missing = [m for m in missing if not (tied and m.endswith("lm_head.weight"))]
    if unexpected or missing:
        raise ModelMismatchError(f"The upscaled {family} model does not take the base's tensors: missing "
                                 f"{missing[:5]}, unexpected {unexpected[:5]}.")
    if tied:
        model.tie_weights()
    if getattr(base, "generation_config", None) is not None:
        model.generation_config = base.generation_config
    model.eval()
    one = float_numel(base)
    counts = smile_parameter_counts(model, one)
    return model, {**counts, "mixed_model": _summary(counts, one), "experts": list(names),
                   "model_type": cfg.model_type, "engine": "memory"}


def _summary(counts: dict[str, int], one_model: int) -> dict[str, Any]:
    from fusion_bench.methods.mixing._moe_report import mixed_model_summary

    return mixed_model_summary(total=counts["total_parameters"], active=counts["active_parameters_per_token"],
                               applied=one_model + counts["router_parameters"], one_model=one_model,
                               router=counts["router_parameters"], inference=None)


class _ShapesOnly(nn.Module):
    """Stand-in for an upscaled model written to disk: its tensors as meta parameters (for parameter counts)."""

    def __init__(self, layout: list[tuple[str, tuple[int, ...], torch.dtype]], folder: str):
        super().__init__()
        self.folder = folder
        for i, (_, shape, dtype) in enumerate(layout):
            if dtype.is_floating_point:
                self.register_parameter(f"p{i}", nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"),
                                                              requires_grad=False))

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - not callable by design
        raise TypeError(f"The upscaled model was streamed to {self.folder}; load it with from_pretrained.")


def stream_upscale(pool, out_dir: str | Path, *, gate_k: int, k: int, top_k: int, routing_use_diff: bool = True,
                   device: str = "cpu", overwrite: bool = False, max_shard_size: str | int = "5GB",
                   progress: bool | None = None) -> dict[str, Any]:
    """Upscale the pool's causal LMs with SMILE tensor by tensor into ``out_dir`` (atomically, under the output
    guards). Returns the layout, counts and timing."""
    from fusion_bench.engine.streaming import (
        SIDE_FILE_SUFFIXES,
        checkpoint_folder,
        open_reader,
        parse_size,
        pool_input_paths,
    )
    from fusion_bench.io.checkpoint import SAFE_INDEX, read_json_object
    from fusion_bench.io.outputs import check_output, output_dir, safetensors_metadata
    from fusion_bench.io.stream import ShardedWriter
    from fusion_bench.models.smile import smile_linear_layout, smile_linear_tensors
    from fusion_bench.models.smile_hf import TARGET_WEIGHT, smile_config

    t0 = time.perf_counter()
    out_dir = Path(out_dir).expanduser()
    guard = {"overwrite": overwrite, "inputs": pool_input_paths(pool), "what": "upscaled model folder",
             "hint": "method.overwrite=true"}
    check_output(out_dir, kind="dir", **guard)
    base, names = pool.base_name(), pool.model_names
    _check_top_k(top_k, len(names), "smile_causal_lm_upscaling")
    folder = checkpoint_folder(pool, base)
    if folder is None or not (folder / "config.json").is_file():
        raise CheckpointError(f"Model '{base}': streaming SMILE needs a Hugging Face folder with config.json; set "
                              "method.output_path=null to upscale in memory.")
    base_cfg = read_json_object(folder / "config.json", base)
    family = _family_of_config(base_cfg, base)
    out_dtype = getattr(pool, "dtype", None)
    dev = resolve_device(device)
    readers = {n: open_reader(pool, n) for n in dict.fromkeys([base, *names])}
    try:
        r0 = readers[base]
        keys = r0.keys()
        n_exp = len(names)
        targets = {m.group("prefix"): key for key in keys if (m := TARGET_WEIGHT.match(key))}
        biases = {p + ".bias" for p in targets if p + ".bias" in keys}
        layout: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        base_numel = 0
        inactive = 0
        for key in keys:  # plan every output tensor and check every input before any weight is read
            meta = r0.meta(key)
            dt = out_dtype if (out_dtype is not None and meta.dtype.is_floating_point) else meta.dtype
            if meta.dtype.is_floating_point:
                base_numel += meta.numel
            if key in biases:
                continue
            mt = TARGET_WEIGHT.match(key)
            if mt is None:
                layout.append((key, tuple(meta.shape), dt))
                continue
            p = mt.group("prefix")
            metas = {n: (readers[n].meta(key) if key in readers[n] else None) for n in names}
            _check_same_shapes(key, tuple(meta.shape), metas)
            if p + ".bias" in biases:
                _check_same_shapes(p + ".bias", tuple(r0.meta(p + ".bias").shape),
                                   {n: (readers[n].meta(p + ".bias") if p + ".bias" in readers[n] else None)
                                    for n in names})
            entries = smile_linear_layout(p, tuple(meta.shape), p + ".bias" in biases, n_exp, gate_k, k)
            layout += [(n, s, dt) for n, s in entries]
            per_expert = sum(_numel(s) for n, s in entries if n.startswith(f"{p}.experts.0."))
            inactive += (n_exp - top_k) * per_expert
        total = sum(_numel(s) for _, s, dt in layout if dt.is_floating_point)
        show = sys.stderr.isatty() if progress is None else progress
        with output_dir(out_dir, **guard) as tmp:
            writer = ShardedWriter(tmp, layout, max_shard_bytes=parse_size(max_shard_size),
                                   metadata=safetensors_metadata("SMILE upscaled model"), dest=out_dir)
            try:
                with torch.no_grad(), _progress(len(keys), show, f"SMILE upscaling ({len(targets)} projections)") as bar:
                    task = bar.add_task("upscaling", total=len(keys))
                    step = max(1, len(keys) // 10)
                    for i, key in enumerate(keys):
                        bar.advance(task)
                        if not show and i % step == 0 and i:  # no terminal: a line every tenth of the way
                            print(f"SMILE upscaling: {i}/{len(keys)} tensors, {time.perf_counter() - t0:.0f}s",
                                  file=sys.stderr, flush=True)
                        if key in biases:
                            continue
                        mt = TARGET_WEIGHT.match(key)
                        if mt is None:
                            t = r0.read(key)
                            writer.write(key, t.to(out_dtype) if out_dtype is not None and t.is_floating_point() else t)
                            continue
                        p = mt.group("prefix")
                        has_b = p + ".bias" in biases
                        w0 = r0.read(key).to(dev)
                        dt = out_dtype or w0.dtype
                        b0 = r0.read(p + ".bias").to(dev) if has_b else None
                        ws = [readers[n].read(key).to(dev) for n in names]
                        bs = [readers[n].read(p + ".bias").to(dev) if has_b else None for n in names]
                        for name, v in smile_linear_tensors(p, w0, b0, ws, bs, gate_k, k, routing_use_diff).items():
                            writer.write(name, v.to(dtype=dt, device="cpu").contiguous())
                        del w0, b0, ws, bs
                writer.finish()
            finally:
                writer.close()
            cfg = smile_config(base_cfg, family, num_experts=n_exp, top_k=top_k, gate_k=gate_k, k=k)
            if out_dtype is not None:
                cfg.dtype = str(out_dtype).removeprefix("torch.")
            cfg.save_pretrained(tmp)
            side = []
            for f in sorted(folder.iterdir()):
                if f.is_file() and f.suffix in SIDE_FILE_SUFFIXES and f.name not in ("config.json", SAFE_INDEX):
                    shutil.copy2(f, tmp / f.name)
                    side.append(f.name)
            (tmp / "smile_upscaling.json").write_text(json.dumps(
                {"method": "smile_causal_lm_upscaling", "experts": list(names), "gate_k": gate_k, "k": k,
                 "top_k": top_k, "routing_use_diff": routing_use_diff}, indent=2) + "\n")
    finally:
        for r in readers.values():
            r.close()
    router = sum(_numel(s) for n, s, _ in layout if n.endswith(".gate.weight") and n[:-len(".gate.weight")] in targets)
    counts = {"total_parameters": int(total), "active_parameters_per_token": int(total - inactive),
              "extra_parameters": int(total - base_numel), "router_parameters": int(router),
              "upscaled_layers": len(targets)}
    return {"layout": layout, "family": family, **counts, "mixed_model": _summary(counts, base_numel),
            "side_files": side, "output": str(out_dir), "upscale_wall_time_s": round(time.perf_counter() - t0, 4)}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _progress(total: int, enabled: bool, what: str):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(what), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(),
                    transient=True, disable=not enabled)


@register_method
class SmileCausalLMUpscaling(FusionMethod):
    """SMILE for Llama / Mistral / Qwen2 causal LMs: streamed to a folder that ``AutoModelForCausalLM`` reloads.

    Paper: Tang et al. 2024 (arXiv 2408.10174). Variant: see :data:`VARIANT`.

    Args:
        config: :class:`SmileCausalLMConfig` (gate_k, k, top_k, routing_use_diff, output_path, overwrite,
            load_output, max_shard_size, device).
    """

    name = "smile_causal_lm_upscaling"
    config_class: ClassVar = SmileCausalLMConfig
    family = "mixing"
    summary = "SMILE for causal LMs (Llama/Mistral/Qwen2), streamed tensor by tensor to a reloadable folder."
    variant = VARIANT
    requires_pretrained = True
    identity_on_equal_inputs = False
    permutation_invariant = False
    conformance_skip = ("upscales Hugging Face Llama/Mistral/Qwen2 causal LMs only (the tiny pool is a plain "
                        "nn.Module); tested on tiny Llama and Qwen2 models in tests/test_mixing_smile.py")

    def check_ready(self, modelpool) -> list[str]:
        """Dry run: the base is a Llama / Mistral / Qwen2 folder, top_k fits, output_path may be written."""
        c = self.config
        _check_top_k(c.top_k, len(modelpool.model_names), self.name)
        notes = []
        folder = modelpool.hf_folder(modelpool.base_name()) if modelpool.kind(modelpool.base_name()) == "hf" else None
        if folder is not None and (folder / "config.json").is_file():
            from fusion_bench.io.checkpoint import read_json_object

            _family_of_config(read_json_object(folder / "config.json", modelpool.base_name()), modelpool.base_name())
        else:
            notes.append("the base's model_type is checked when the model is loaded")
        if c.output_path is not None:
            from fusion_bench.engine.streaming import pool_input_paths
            from fusion_bench.io.outputs import check_output

            check_output(c.output_path, kind="dir", overwrite=c.overwrite, inputs=pool_input_paths(modelpool),
                         what="upscaled model folder", hint="method.overwrite=true")
        return notes

    def run(self, modelpool) -> FusionResult:
        c = self.config
        t0 = time.perf_counter()
        if not modelpool.has_pretrained:
            raise ModelMismatchError(f"Method '{self.name}' needs the base model: add '_pretrained_' to the pool.")
        names = modelpool.model_names
        if not names:
            raise ModelMismatchError(f"Method '{self.name}' needs at least one fine-tuned model besides '_pretrained_'.")
        _check_top_k(c.top_k, len(names), self.name)
        if modelpool.kind(modelpool.base_name()) == "hf":  # before any model is loaded
            from fusion_bench.io.checkpoint import read_json_object

            folder = modelpool.hf_folder(modelpool.base_name())
            if folder is not None and (folder / "config.json").is_file():
                _family_of_config(read_json_object(folder / "config.json", modelpool.base_name()),
                                  modelpool.base_name())
        if c.output_path is None:
            base = modelpool.load_pretrained_model()
            model, info = upscale_causal_lm_in_memory(base, [modelpool.load_model(n) for n in names], names,
                                                      gate_k=c.gate_k, k=c.k, top_k=c.top_k,
                                                      routing_use_diff=c.routing_use_diff, device=c.device)
            return FusionResult("merged", model=model, metadata=self._metadata(t0, **info))
        info = stream_upscale(modelpool, c.output_path, gate_k=c.gate_k, k=c.k, top_k=c.top_k,
                              routing_use_diff=c.routing_use_diff, device=c.device, overwrite=c.overwrite,
                              max_shard_size=c.max_shard_size)
        layout = info.pop("layout")
        if c.load_output:
            from fusion_bench.models.smile_hf import smile_classes

            model = smile_classes(info["family"])[1].from_pretrained(c.output_path).eval()
        else:
            model = _ShapesOnly(layout, info["output"])
        return FusionResult("merged", model=model, metadata=self._metadata(
            t0, **info, experts=list(names), engine="streaming", merged_model_path=info["output"]))
