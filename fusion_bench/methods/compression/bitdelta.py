"""BitDelta: compress a fine-tuned causal LM to its base plus 1-bit deltas with distilled scales.

``fusion_bench method=bitdelta modelpool=<causal LM pool: _pretrained_ + the fine-tune> taskpool=causal_lm_perplexity``

Liu et al. 2024, "BitDelta: Your Fine-Tune May Only Be Worth One Bit" (arXiv 2402.10193). Every linear layer
inside the decoder layers (attention and MLP projections; embeddings, ``lm_head`` and norms stay the fine-tune's
own, as in the paper) is replaced by ``W_base + alpha * sign(W_ft - W_base)`` with ``alpha = mean|W_ft - W_base|``
(:mod:`fusion_bench.kernels.compression.bitdelta`). Then **scale distillation**: with the signs fixed, only the
per-matrix scales are trained so that the compressed model's logits match the fine-tune's on calibration text,

    alpha* = argmin_alpha  E_x || z_ft(x) - z_bitdelta(x; alpha) ||^2      (mean squared error of the logits)

with Adam, learning rate 1e-4, ``num_steps`` = 200 steps of ``batch_size`` = 4 sequences of ``seq_len`` = 128
tokens (the paper's 800 C4 samples; here the calibration text of ``calibration_data``, by default the train
part of the shipped text), and a cosine learning-rate decay over the steps as in the authors' code
(``schedule=constant`` turns it off). ``num_steps=0`` keeps the initial scales.

The output is the compressed model in the pool's architecture (``W_base + alpha * S`` rounded once to the
model's dtype), so it saves and reloads with ``from_pretrained``. ``save_delta=<folder>`` also writes the
storage form: the packed sign bits (8 per byte) and the scale of each matrix, and the tensors of the fine-tune
outside those matrices that differ from the base (kept whole), which :func:`apply_bitdelta` adds back to the
base. The report gives the bytes of the 1-bit delta (packed bits + scales) against the full delta of the same
matrices, the scales before and after distillation, the distillation loss, and, with
``perplexity_data=builtin``, the perplexity of the base, the fine-tune, BitDelta with the initial scales and
BitDelta after distillation.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench.config_schema import option
from fusion_bench.engine.devices import module_device
from fusion_bench.errors import CheckpointError, ConfigError, ModelMismatchError, did_you_mean
from fusion_bench.kernels.compression import bitdelta as K
from fusion_bench.methods.base import FusionMethod, FusionResult, register_method
from fusion_bench.methods.compression._common import (
    CalibrationConfig,
    calibration_ids,
    load_copy,
    model_targets,
    perplexity,
)
from fusion_bench.utils import count_parameters, resolve_device

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool

FORMAT = "fusion_bench.bitdelta"
DELTA_FILE = "bitdelta.safetensors"
META_FILE = "bitdelta.json"


@dataclass
class BitDeltaConfig(CalibrationConfig):
    """Options of ``bitdelta``."""

    model: str | None = option(None, help="The fine-tuned model to compress (default: the first model of the pool "
                               "that is not '_pretrained_'); '_pretrained_' is the base.")
    num_steps: int = option(200, ge=0, le=10**7, help="Scale-distillation steps (the paper: 200; 0: keep the "
                            "initial scales mean|delta|).")
    lr: float = option(1e-4, gt=0.0, le=10.0, help="Adam learning rate of the scales (the paper: 1e-4).")
    schedule: str = option("cosine", choices=("cosine", "constant"), help="Learning-rate schedule over num_steps: "
                           "cosine decay to 0 (the authors' code) or constant.")
    batch_size: int = option(4, ge=1, le=10**6, help="Calibration sequences per distillation step (the paper: 4).")
    n_samples: int | None = option(None, ge=1, le=10**7, help="Calibration sequences (null: num_steps * batch_size, "
                                   "the paper's 800); the steps cycle through them.")
    seq_len: int = option(128, ge=2, le=10**7, help="Tokens per calibration sequence (the paper: 128).")
    save_delta: str | None = option(None, help="Folder to write the storage form to (packed sign bits, scales, the "
                                    "fine-tune's other changed tensors; reload with apply_bitdelta).")
    overwrite_delta: bool = option(False, help="Replace an existing save_delta folder that fusion_bench wrote.")


class _BitDeltaLinear(nn.Module):
    """A linear layer computing ``x (W_base + alpha S)^T + b`` with a trainable ``alpha``; with ``teacher`` set,
    the fine-tune's own ``x W_ft^T + b`` (the distillation target, same module, no second model)."""

    def __init__(self, linear: nn.Linear, base_w: torch.Tensor, bits: torch.Tensor, alpha: torch.Tensor):
        super().__init__()
        self.linear = linear  # holds the fine-tune's weight and bias; the output is written back into it
        self.register_buffer("base", base_w.to(linear.weight.dtype), persistent=False)
        self.register_buffer("sign", K.signs(bits, linear.weight.dtype), persistent=False)
        self.bits = bits
        self.alpha = nn.Parameter(alpha.detach().float().clone())
        self.initial_alpha = float(alpha)
        self.teacher = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.teacher:
            return F.linear(x, self.linear.weight, self.linear.bias)
        w = self.base + self.alpha.to(self.base.dtype) * self.sign
        return F.linear(x, w, self.linear.bias)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)



@register_method
class BitDelta(FusionMethod):
    """BitDelta (see the module docstring)."""

    name = "bitdelta"
    config_class = BitDeltaConfig
    family: ClassVar = "compression"
    requires_pretrained: ClassVar[bool] = True
    uses_data: ClassVar[bool] = True  # scale distillation reads calibration text (num_steps=0: data-free)
    identity_on_equal_inputs: ClassVar[bool] = False
    permutation_invariant: ClassVar[bool] = True
    summary = "BitDelta: a fine-tune as its base plus sign(delta) x one distilled scale per linear matrix."
    variant = ("BitDelta (Liu et al. 2024, arXiv 2402.10193): for each linear layer of the decoder layers, delta = "
               "W_ft - W_base -> alpha * sign(delta) (sign(0) = +1), alpha initialised to mean|delta|; scale "
               "distillation: only the alphas trained by Adam (lr 1e-4, cosine decay) to minimise the MSE between the "
               "compressed model's and the fine-tune's logits, 200 steps x 4 sequences x 128 tokens; embeddings, "
               "lm_head and norms are the fine-tune's. Output: W_base + alpha * sign, rounded once to the dtype.")

    def _finetune_name(self, pool: ModelPool) -> str:
        if self.config.model is not None:
            if self.config.model not in pool.names:
                raise ConfigError(f"method.model='{self.config.model}' is not a model of the pool."
                                  f"{did_you_mean(self.config.model, pool.names)}")
            if self.config.model == pool.base_name():
                raise ConfigError("method.model names the base ('_pretrained_'); BitDelta compresses a fine-tune "
                                  "against it: name a fine-tuned model.")
            return self.config.model
        others = [n for n in pool.names if n != pool.base_name()]
        if not others:
            raise ConfigError("BitDelta needs a fine-tuned model besides '_pretrained_' in the pool.")
        return others[0]

    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        cfg = self.config
        if not modelpool.has_pretrained:
            raise ConfigError("BitDelta needs the base model as '_pretrained_' in the pool (the delta is W_ft - W_base).")
        ft_name = self._finetune_name(modelpool)
        base_name = modelpool.base_name()
        model = load_copy(modelpool, ft_name)
        base = load_copy(modelpool, base_name)
        targets = model_targets(model, cfg.exclude)
        if not targets:
            raise ConfigError(f"Model '{ft_name}' has no linear layer to compress (method.exclude={cfg.exclude}).")
        base_params = dict(base.named_parameters())
        for n, m in targets.items():
            if not isinstance(m, nn.Linear):
                raise ModelMismatchError(f"BitDelta compresses nn.Linear layers; '{n}' of '{ft_name}' is "
                                         f"{type(m).__name__}. Exclude it with method.exclude=['{n}'].")
            bw = base_params.get(f"{n}.weight")
            if bw is None or bw.shape != m.weight.shape:
                raise ModelMismatchError(f"'{n}.weight' of '{ft_name}' {tuple(m.weight.shape)} has no counterpart of "
                                         f"that shape in the base '{base_name}' "
                                         f"({None if bw is None else tuple(bw.shape)}).")

        ppl: dict[str, Any] = {}
        if cfg.perplexity_data:
            ppl["base"] = perplexity(base, cfg, modelpool)
            ppl["finetuned"] = perplexity(model, cfg, modelpool)

        # what the storage form keeps whole: the fine-tune's other tensors that differ from the base
        target_keys = {f"{n}.weight" for n in targets}
        base_sd = base.state_dict()
        others = {k: v for k, v in model.state_dict().items()
                  if k not in target_keys and (k not in base_sd or base_sd[k].shape != v.shape
                                               or not torch.equal(base_sd[k], v))}

        # 1-bit deltas with the initial scales
        wrapped: dict[str, _BitDeltaLinear] = {}
        with torch.no_grad():
            for n, m in targets.items():
                bits, alpha = K.compress(base_params[f"{n}.weight"].detach(), m.weight.detach())
                wrapped[n] = _BitDeltaLinear(m, base_params[f"{n}.weight"].detach(), bits, alpha)
                _set_module(model, n, wrapped[n])
        del base, base_params, base_sd

        distill: dict[str, Any] = {"num_steps": cfg.num_steps}
        if cfg.perplexity_data and cfg.num_steps > 0:
            ppl["bitdelta_initial_scales"] = perplexity(model, cfg, modelpool)
        if cfg.num_steps > 0:
            distill.update(self._distill(model, wrapped, modelpool))

        # write W_base + alpha * S back into the original linear layers; the model is plain again
        scales = {}
        with torch.no_grad():
            for n, w in wrapped.items():
                lin = w.linear
                alpha = w.alpha.detach().float().cpu()
                new = K.rebuild(w.base.cpu(), w.bits.cpu(), alpha, lin.weight.dtype)
                lin.weight.data = new.to(lin.weight.device)
                _set_module(model, n, lin)
                scales[n] = {"initial": w.initial_alpha, "final": float(alpha)}
        if cfg.perplexity_data:
            ppl["bitdelta"] = perplexity(model, cfg, modelpool)

        nbytes = self._bytes(wrapped, others)
        extra: dict[str, Any] = {"model": ft_name, "base": base_name, "compressed_matrices": len(wrapped),
                                 "bytes": nbytes, "scales": scales, "distillation": distill}
        if ppl:
            extra["perplexity"] = ppl
        if cfg.save_delta:
            extra["save_delta"] = self._save(wrapped, others, modelpool, ft_name, base_name, model)
        for w in wrapped.values():  # free the buffers
            w.base = w.sign = None
        return FusionResult("merged", model=model.eval(), metadata=self._metadata(
            t0, extra_parameters=0, parameters=count_parameters(model), **extra))

    # -- scale distillation ------------------------------------------------------------------------
    def _distill(self, model: nn.Module, wrapped: dict[str, _BitDeltaLinear], pool: ModelPool) -> dict[str, Any]:
        cfg = self.config
        n_samples = cfg.n_samples or cfg.num_steps * cfg.batch_size
        calib_cfg = _Calib(cfg, n_samples)
        ids, calib = calibration_ids(calib_cfg, pool, model)
        device = resolve_device(cfg.device)
        home = module_device(model)
        for p in model.parameters():
            p.requires_grad_(False)
        alphas = [w.alpha for w in wrapped.values()]
        for a in alphas:
            a.requires_grad_(True)
        model.to(device)
        opt = torch.optim.Adam(alphas, lr=cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.num_steps) if cfg.schedule == "cosine" \
            else None
        losses: list[float] = []
        t0 = time.perf_counter()
        from fusion_bench.methods._task_data import progress as progress_bar

        show = cfg.progress and sys.stderr.isatty()
        was_training = model.training
        model.eval()
        try:
            with progress_bar("bitdelta scale distillation", cfg.num_steps, show) as advance:
                for step in range(cfg.num_steps):
                    rows = [(step * cfg.batch_size + i) % ids.shape[0] for i in range(cfg.batch_size)]
                    x = ids[rows].to(device)
                    for w in wrapped.values():
                        w.teacher = True
                    with torch.no_grad():
                        target = model(input_ids=x, use_cache=False).logits.float()
                    for w in wrapped.values():
                        w.teacher = False
                    out = model(input_ids=x, use_cache=False).logits.float()
                    loss = F.mse_loss(out, target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if sched is not None:
                        sched.step()
                    losses.append(float(loss.detach()))
                    advance()
        finally:
            for w in wrapped.values():
                w.teacher = False
            for a in alphas:
                a.requires_grad_(False)
            model.to(home)
            model.train(was_training)
        return {"calibration": calib, "lr": cfg.lr, "schedule": cfg.schedule, "batch_size": cfg.batch_size,
                "loss_first": losses[0], "loss_last": losses[-1], "loss": losses, "device": str(device),
                "wall_time_s": round(time.perf_counter() - t0, 4)}

    # -- bytes and storage -------------------------------------------------------------------------
    @staticmethod
    def _bytes(wrapped: dict[str, _BitDeltaLinear], others: dict[str, torch.Tensor]) -> dict[str, Any]:
        full = sum(w.linear.weight.numel() * w.linear.weight.element_size() for w in wrapped.values())
        one_bit = sum(K.packed_nbytes(w.linear.weight.numel()) + 4 for w in wrapped.values())
        other = sum(t.numel() * t.element_size() for t in others.values())
        return {"delta_full": full, "delta_1bit_packed": one_bit, "delta_compression": round(full / one_bit, 3),
                "other_changed_tensors_full": other, "storage_total": one_bit + other,
                "note": "delta_full: the compressed matrices' W_ft - W_base in the model dtype; delta_1bit_packed: "
                        "their sign bits 8 per byte + one float32 scale each; other_changed_tensors_full: the "
                        "fine-tune's embeddings/lm_head/norms that differ from the base, stored whole"}

    def _save(self, wrapped, others, pool: ModelPool, ft_name: str, base_name: str, model: nn.Module) -> dict[str, Any]:
        from safetensors.torch import save_file

        from fusion_bench.engine.streaming import pool_input_paths
        from fusion_bench.io.outputs import output_dir, safetensors_metadata

        tensors: dict[str, torch.Tensor] = {}
        shapes = {}
        for n, w in wrapped.items():
            tensors[f"sign.{n}"] = K.pack_bits(w.bits.cpu())
            tensors[f"scale.{n}"] = w.alpha.detach().float().cpu().reshape(1)
            shapes[n] = list(w.linear.weight.shape)
        for k, t in others.items():
            tensors[f"full.{k}"] = t.detach().cpu().contiguous()
        meta = {"format": FORMAT, "version": 1, "base_model": str(pool.entry(base_name)) if hasattr(pool, "entry")
                else base_name, "finetuned_model": ft_name, "dtype": str(next(model.parameters()).dtype),
                "shapes": shapes, "full_tensors": sorted(others),
                "rebuild": "W = W_base + scale * (2 * bits - 1) in float32, rounded to dtype; bits packed 8 per byte, "
                           "least significant first"}
        dest = Path(os.path.expanduser(self.config.save_delta))
        try:
            with output_dir(dest, overwrite=self.config.overwrite_delta, inputs=pool_input_paths(pool),
                            what="BitDelta delta folder", hint="method.overwrite_delta=true") as tmp:
                save_file(tensors, str(tmp / DELTA_FILE), metadata=safetensors_metadata("bitdelta delta"))
                (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        except OSError as e:
            raise CheckpointError(f"Cannot write the BitDelta delta to {dest}: {e}") from e
        return {"path": str(dest), "bytes_on_disk": (dest / DELTA_FILE).stat().st_size}


class _Calib:
    """The calibration options :func:`calibration_ids` reads, with n_samples resolved."""

    def __init__(self, cfg: BitDeltaConfig, n_samples: int):
        self.calibration_data = cfg.calibration_data
        self.calibration_split = cfg.calibration_split
        self.calibration_field = cfg.calibration_field
        self.n_samples = n_samples
        self.seq_len = cfg.seq_len
        self.seed = cfg.seed


@torch.no_grad()
def apply_bitdelta(base_model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Turn ``base_model`` (in place) into the BitDelta-compressed fine-tune stored in ``folder`` by ``save_delta``:
    each listed matrix becomes ``W_base + scale * (2 bits - 1)`` (float32, rounded to its dtype) and the whole
    tensors replace the base's. Returns the model."""
    from safetensors.torch import load_file

    folder = Path(os.path.expanduser(str(folder)))
    try:
        meta = json.loads((folder / META_FILE).read_text())
        tensors = load_file(str(folder / DELTA_FILE))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder} is not a BitDelta delta folder ({e}); write one with method=bitdelta "
                              "method.save_delta=<folder>.") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder / META_FILE} is not a {FORMAT} file (format {meta.get('format')!r}).")
    params = dict(base_model.named_parameters())
    buffers = dict(base_model.named_buffers())
    for n, shape in meta["shapes"].items():
        p = params.get(f"{n}.weight")
        if p is None or list(p.shape) != list(shape):
            raise ModelMismatchError(f"The base model has no '{n}.weight' of shape {shape} (BitDelta delta {folder}).")
        bits = K.unpack_bits(tensors[f"sign.{n}"], tuple(shape))
        p.data = K.rebuild(p.data, bits.to(p.device), tensors[f"scale.{n}"][0], p.dtype)
    for k in meta["full_tensors"]:
        t = tensors[f"full.{k}"]
        dst = params.get(k, buffers.get(k))
        if dst is None:
            raise ModelMismatchError(f"The base model has no tensor '{k}' (BitDelta delta {folder}).")
        dst.data = t.to(device=dst.device, dtype=dst.dtype)
    return base_model


__all__ = ["BitDelta", "BitDeltaConfig", "apply_bitdelta"]
