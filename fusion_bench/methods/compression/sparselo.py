"""SparseLo: prune the linear layers, then compensate the pruned residual with a rank-r term (FusionBench's
``sparselo`` family; the math is in :mod:`fusion_bench.kernels.compression.sparselo`).

``fusion_bench method=sparselo modelpool=<causal LM pool> taskpool=causal_lm_perplexity method.sparsity=0.5
method.rank=128``. Each target layer becomes ``y = x (S + B A)^T``: ``S`` sparse (the pruned weight, stored in the
model itself), ``B A`` rank ``r``.

Output (``save_format``):
- ``adapter`` (default): the saved folder holds the sparse model (reloads with ``from_pretrained``: ``S`` only) and,
  in ``sparselo_adapter/``, the low-rank terms as a PEFT LoRA adapter (``lora_B = B``, ``lora_A = A``,
  ``lora_alpha = r``, so scale 1): ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out),
  out + '/sparselo_adapter')`` is the full SparseLo model. The returned model runs ``S + B A`` (forward hooks),
  so the task pool evaluates the full model.
- ``merged``: the dense weights ``S + B A`` are written (stock model, same outputs, no storage gain).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from fusion_bench.config_schema import option
from fusion_bench.errors import ConfigError
from fusion_bench.kernels.compression.pruning import (
    magnitude_scores,
    random_scores,
    select_mask,
    wanda_scores,
)
from fusion_bench.kernels.compression.sparselo import sparselo_iterative, sparselo_one_shot
from fusion_bench.methods.base import FusionMethod, FusionResult, register_method
from fusion_bench.methods.compression._common import (
    CalibrationConfig,
    LayerInputs,
    calibration_ids,
    check_calibration,
    collect_linear_inputs,
    layer_by_layer,
    linear_targets,
    load_copy,
    model_name,
    model_targets,
    perplexity,
    run_layer,
    set_weight_2d,
    sparsity_report,
    weight_2d,
)
from fusion_bench.methods.compression.pruning import _NM_HELP, _SPARSITY_HELP, _check_sparsity, _SquaredNorms
from fusion_bench.utils import count_parameters, resolve_device, seeded_generator

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool

ADAPTER_FOLDER = "sparselo_adapter"


@dataclass
class SparseLoConfig(CalibrationConfig):
    sparsity: float = option(0.5, ge=0.0, lt=1.0, help=_SPARSITY_HELP + " Per output row, as FusionBench.")
    nm: str | None = option(None, help=_NM_HELP)
    rank: int = option(128, ge=1, le=1 << 20, help="Rank r of the compensation B A of each layer (FusionBench: 128).")
    variant: str = option("wanda", choices=("wanda", "magnitude", "random"),
                          help="Scores that choose the pruned weights: Wanda's |W| ||X|| (calibration text), |W|, or "
                          "seeded random.")
    algorithm: str = option("one_shot", choices=("one_shot", "iterative"),
                            help="one_shot: B A = rank-r SVD of the pruned residual (FusionBench SparseLoForLlama); "
                            "iterative: the kept weights are refined so that W - S is closer to rank r first "
                            "(IterativeSparseLoForLlama).")
    num_iterations: int = option(10, ge=1, le=10**6, help="Iterations of the iterative algorithm (ranks "
                                 "linspace(1, r, num_iterations); stops early when the top ranks hold 99% of the "
                                 "residual's singular-value mass).")
    save_format: str = option("adapter", choices=("adapter", "merged"),
                              help="adapter: sparse model + the low-rank terms as a PEFT LoRA adapter in "
                              "sparselo_adapter/; merged: dense S + B A weights.")

    def __post_init__(self) -> None:
        _check_sparsity(self)


class _LowRankHook:
    """Forward hook adding ``x A^T B^T`` to a linear layer's output."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        self.A, self.B = A, B

    def __call__(self, module, args, out):
        x = args[0]
        return out + (x.to(self.A.dtype) @ self.A.T @ self.B.T).to(out.dtype)


def _pad_rank(B: torch.Tensor, A: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    if B.shape[1] == r:
        return B, A
    pb = torch.zeros(B.shape[0], r, dtype=B.dtype, device=B.device)
    pa = torch.zeros(r, A.shape[1], dtype=A.dtype, device=A.device)
    pb[:, :B.shape[1]] = B
    pa[:A.shape[0]] = A
    return pb, pa


def write_lora_adapter(folder: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int,
                       dtype: torch.dtype) -> None:
    """Write ``factors`` (module name -> (B, A)) as a PEFT LoRA adapter (``lora_alpha = r``: scale 1)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (B, A) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.to(dtype).contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.to(dtype).contiguous().cpu()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
           "bias": "none", "fan_in_fan_out": False, "target_modules": sorted(factors), "base_model_name_or_path": None,
           "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False}
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


@register_method
class SparseLo(FusionMethod):
    name = "sparselo"
    config_class = SparseLoConfig
    family: ClassVar = "compression"
    uses_data: ClassVar[bool] = True
    identity_on_equal_inputs: ClassVar[bool] = False
    summary = "Prune (Wanda / magnitude / random, unstructured or N:M), then add a rank-r SVD of the pruned residual."
    variant = ("SparseLo as FusionBench 0.2.33 (LoSparse-style, Li et al. 2023): mask per output row from the variant's "
               "scores; S = W * keep; one_shot: B A = rank-r SVD of W - S; iterative: for r_k in linspace(1, r, T), "
               "S += keep * (W - S - SVD_{r_k}(W - S)) until the top r_k singular values hold 99%, then B A = "
               "SVD_r(W - S). Wanda: layer by layer, the next layer fed by the sparse-only outputs (as FusionBench).")

    def check_ready(self, modelpool: ModelPool) -> list[str]:
        return check_calibration(self.config, modelpool) if self.config.variant == "wanda" else []

    def _compress(self, name: str, module: nn.Module, scores: torch.Tensor, out: dict) -> None:
        cfg = self.config
        w = weight_2d(module)
        mask = select_mask(scores, cfg.sparsity, cfg._nm, "row")
        if cfg.algorithm == "one_shot":
            S, B, A = sparselo_one_shot(w, mask, cfg.rank)
            iters = 0
        else:
            S, B, A, iters = sparselo_iterative(w, mask, cfg.rank, cfg.num_iterations)
        set_weight_2d(module, S)
        B, A = _pad_rank(B, A, cfg.rank)
        out[name] = (B.to(torch.float32), A.to(torch.float32), iters)

    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        cfg = self.config
        name = model_name(cfg, modelpool)
        model = load_copy(modelpool, name)
        targets = model_targets(model, cfg.exclude)
        if not targets:
            raise ConfigError(f"Model '{name}' has no linear layer to prune (method.exclude={cfg.exclude}).")
        if cfg.save_format == "adapter" and not (hasattr(model, "save_pretrained") and isinstance(model, nn.Module)
                                                 and all(isinstance(m, nn.Module) for m in targets.values())):
            raise ConfigError(f"method.save_format=adapter needs a Hugging Face model; model '{name}' is "
                              f"{type(model).__name__}: use method.save_format=merged.")
        ppl_before = perplexity(model, cfg, modelpool)
        factors: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        info: dict[str, Any] = {}
        with torch.no_grad():
            if cfg.variant == "wanda":
                device = resolve_device(cfg.device)
                ids, info["calibration"] = calibration_ids(cfg, modelpool, model)

                def process(index: int, prefix: str, layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
                    mods = {n: m for n, m in linear_targets(layer, [], prefix=prefix).items() if n in targets}
                    stats, _ = collect_linear_inputs(layer, inputs, mods,
                                                     lambda n, m: _SquaredNorms(weight_2d(m).shape[1], device))
                    for n, m in mods.items():
                        self._compress(n, m, wanda_scores(weight_2d(m), stats[n].sq), factors)
                    return run_layer(layer, inputs)  # sparse-only outputs feed the next layer (FusionBench)

                show = cfg.progress and sys.stderr.isatty()
                info["memory"] = layer_by_layer(model, ids, cfg.batch_size, device, process, progress=show,
                                                label=self.name)
            else:
                for n, m in targets.items():
                    w = weight_2d(m)
                    sc = magnitude_scores(w) if cfg.variant == "magnitude" else random_scores(
                        w.shape, seeded_generator(cfg.seed, n))
                    self._compress(n, m, sc, factors)
        rep = sparsity_report(model, targets, cfg._nm)
        lowrank_params = sum(B.numel() + A.numel() for B, A, _ in factors.values())
        plain = {n: (B, A) for n, (B, A, _) in factors.items()}
        if cfg.save_format == "merged":
            for n, (B, A) in plain.items():
                w = weight_2d(targets[n])
                set_weight_2d(targets[n], w.float() + B @ A)
        else:
            for n, (B, A) in plain.items():
                targets[n].register_forward_hook(_LowRankHook(A.to(weight_2d(targets[n]).device),
                                                              B.to(weight_2d(targets[n]).device)))
            dtype = next(model.parameters()).dtype
            rank = cfg.rank
            orig_save = model.save_pretrained

            def save_pretrained(save_directory, *args, **kwargs):
                orig_save(save_directory, *args, **kwargs)
                write_lora_adapter(Path(save_directory) / ADAPTER_FOLDER, plain, rank, dtype)

            model.save_pretrained = save_pretrained  # the sparse model + the adapter beside it
        ppl_after = perplexity(model, cfg, modelpool)
        extra = {"model": name, **rep, **info, "rank": cfg.rank, "lowrank_parameters": lowrank_params,
                 "iterations": {n: it for n, (_, _, it) in factors.items()} if cfg.algorithm == "iterative" else None,
                 "save_format": cfg.save_format}
        if ppl_before is not None:
            extra.update(perplexity_before=ppl_before, perplexity_after=ppl_after)
        return FusionResult("merged", model=model, metadata=self._metadata(
            t0, extra_parameters=lowrank_params if cfg.save_format == "adapter" else 0,
            parameters=count_parameters(model), **extra))


__all__ = ["ADAPTER_FOLDER", "SparseLo", "write_lora_adapter"]
