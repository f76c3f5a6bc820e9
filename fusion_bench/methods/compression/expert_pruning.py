"""Expert pruning and dynamic expert skipping for Mixtral / Qwen2-MoE causal LMs (Lu et al. 2024).

``fusion_bench method=expert_pruning modelpool=<Mixtral pool> taskpool=causal_lm_perplexity
method.num_preserved_experts=4`` keeps, in every MoE layer, the experts whose removal changes the layer's output
least on calibration text (all subsets enumerated); the router rows and expert weights of the others are
removed and ``num_local_experts`` (Mixtral) / ``num_experts`` (Qwen2-MoE) updated, so the saved folder reloads
with ``AutoModelForCausalLM.from_pretrained``.

``method=expert_skipping`` measures each layer's threshold ``beta`` (median of ``w_2 / w_1``) and returns the
model with skipping switched on (the second expert of a token dropped when ``w_2 < beta w_1``); the betas are
saved in the model config (``dynamic_skipping_betas``) and :func:`enable_dynamic_skipping` switches skipping on
again after ``from_pretrained`` (stock transformers ignores the key and runs the model unchanged).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench.config_schema import option
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.kernels.compression.experts import (
    ExpertSubsetLoss,
    all_expert_outputs,
    skip_ratios,
    skip_second,
)
from fusion_bench.methods.base import FusionMethod, FusionResult, register_method
from fusion_bench.methods.compression._common import (
    CalibrationConfig,
    LayerInputs,
    calibration_ids,
    check_calibration,
    find_decoder_layers,
    layer_by_layer,
    load_copy,
    model_name,
    perplexity,
    run_layer,
)
from fusion_bench.utils import count_parameters, resolve_device

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool

#: tokens per chunk when all experts are evaluated on calibration tokens (bounds the (tokens, experts, hidden) buffer)
TOKEN_CHUNK = 4096


# ----------------------------------------------------------------------------------------------
# the MoE block of a decoder layer (transformers >= 5 layout: router weight (E, H), experts as 3-D tensors)
# ----------------------------------------------------------------------------------------------
def moe_block(layer: nn.Module) -> nn.Module | None:
    """The routed MoE block of a decoder layer (a module with ``gate.weight`` (E, H) and ``experts.gate_up_proj`` /
    ``experts.down_proj``), or None for a dense layer."""
    for m in layer.modules():
        gate = getattr(m, "gate", None)
        experts = getattr(m, "experts", None)
        if gate is not None and experts is not None and isinstance(getattr(gate, "weight", None), torch.Tensor) \
                and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"):
            return m
    return None


def _top_k(block: nn.Module) -> int:
    return int(getattr(block.gate, "top_k", None) or block.top_k)


def _normalize(block: nn.Module) -> bool:
    """Mixtral renormalises the top-k weights; Qwen2-MoE only with ``norm_topk_prob``."""
    return bool(getattr(block.gate, "norm_topk_prob", True))


def expert_output(block: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """``E_e(x) = down_e(act(gate_e x) * up_e x)`` (the concatenated gate/up layout of transformers' experts)."""
    ex = block.experts
    if getattr(ex, "is_transposed", False) or getattr(ex, "has_bias", False) or not getattr(ex, "has_gate", True):
        raise ModelMismatchError(f"{type(ex).__name__}: only the concatenated gate/up expert layout without bias is "
                                 "supported (Mixtral, Qwen2-MoE).")
    gate, up = F.linear(x, ex.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(ex.act_fn(gate) * up, ex.down_proj[e])


def router_logits(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, block.gate.weight)


def _block_inputs(layer: nn.Module, block: nn.Module, inputs: LayerInputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run ``layer``; return (the MoE block's inputs as (tokens, hidden) per batch, the layer's outputs)."""
    seen: list[torch.Tensor] = []
    h = block.register_forward_pre_hook(lambda mod, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).detach()))
    try:
        outs = run_layer(layer, inputs)
    finally:
        h.remove()
    return seen, outs


def keep_experts_(block: nn.Module, keep: list[int]) -> None:
    """Remove every expert not in ``keep`` from ``block`` (router rows and expert weights), in place."""
    idx = torch.as_tensor(keep, dtype=torch.long, device=block.gate.weight.device)
    with torch.no_grad():
        block.gate.weight = nn.Parameter(block.gate.weight.index_select(0, idx).clone())
        ex = block.experts
        ex.gate_up_proj = nn.Parameter(ex.gate_up_proj.index_select(0, idx).clone())
        ex.down_proj = nn.Parameter(ex.down_proj.index_select(0, idx).clone())
    for m in (block, block.gate, block.experts):
        if hasattr(m, "num_experts"):
            m.num_experts = len(keep)


def _set_num_experts(config: Any, r: int) -> None:
    done = False
    for key in ("num_local_experts", "num_experts"):
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, r)
            done = True
    if not done:
        raise ModelMismatchError("The model config has neither num_local_experts nor num_experts.")


# ----------------------------------------------------------------------------------------------
# dynamic skipping at inference
# ----------------------------------------------------------------------------------------------
def enable_dynamic_skipping(model: nn.Module, betas: list[float | None] | None = None) -> list[Any]:
    """Switch on dynamic skipping: a forward hook on each MoE router zeroes the second expert's weight where
    ``w_2 < beta * w_1`` (and renormalises). ``betas`` per decoder layer (None: a dense layer), default
    ``model.config.dynamic_skipping_betas``. Returns the hook handles (``.remove()`` switches it off).

    The second expert is still evaluated with weight 0 by transformers' grouped experts; the result is exact,
    the compute saving needs an experts kernel that drops zero-weight slots."""
    found = find_decoder_layers(model)
    if found is None:
        raise ModelMismatchError(f"{type(model).__name__} has no decoder layers.")
    layers = found[1]
    if betas is None:
        betas = getattr(getattr(model, "config", None), "dynamic_skipping_betas", None)
    if betas is None or len(betas) != len(layers):
        raise ConfigError("No dynamic_skipping_betas (one per decoder layer) in the model config; run "
                          "method=expert_skipping first or pass betas.")
    handles = []
    for layer, beta in zip(layers, betas):
        block = moe_block(layer)
        if block is None or beta is None:
            continue
        if _top_k(block) != 2:
            raise ModelMismatchError(f"Dynamic skipping is defined for top-2 routing; this model routes to "
                                     f"{_top_k(block)} experts.")

        def hook(mod, args, out, _beta=float(beta)):
            logits, scores, indices = out
            new, _ = skip_second(scores.float(), _beta)
            return logits, new.to(scores.dtype), indices

        handles.append(block.gate.register_forward_hook(hook))
    return handles


# ----------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------
@dataclass
class ExpertPruningConfig(CalibrationConfig):
    num_preserved_experts: int = option(4, ge=1, le=4096, help="Experts kept in every MoE layer (r; at least the "
                                        "experts per token). The paper keeps 6 or 4 of Mixtral's 8.")
    mode: str = option("layerwise", choices=("layerwise", "progressive"),
                       help="layerwise: every layer chooses from its inputs in the unpruned model (the paper's "
                       "layer-wise pruning); progressive: each layer sees the outputs of the already pruned layers "
                       "before it.")


@dataclass
class ExpertSkippingConfig(CalibrationConfig):
    pass


class _MoEMethod(FusionMethod):
    family: ClassVar = "compression"
    uses_data: ClassVar[bool] = True
    identity_on_equal_inputs: ClassVar[bool] = False

    def check_ready(self, modelpool: ModelPool) -> list[str]:
        return check_calibration(self.config, modelpool)

    def _moe_layers(self, model: nn.Module, name: str) -> nn.ModuleList:
        found = find_decoder_layers(model)
        if found is None or not any(moe_block(layer) is not None for layer in found[1]):
            raise ModelMismatchError(f"Model '{name}' ({type(model).__name__}) has no mixture-of-experts layer with a "
                                     "router and stacked experts (Mixtral, Qwen2-MoE).")
        return found[1]


@register_method
class ExpertPruning(_MoEMethod):
    name = "expert_pruning"
    config_class = ExpertPruningConfig
    summary = "Drop MoE experts layer by layer by enumerating subsets on calibration text (Mixtral, Qwen2-MoE)."
    variant = ("Not All Experts are Equal (Lu et al. 2024) expert pruning: in each MoE layer keep the r of n experts "
               "minimising ||F(X) - F_S(X)||_F over all calibration tokens (all C(n, r) subsets; the removed experts' "
               "router logits dropped before softmax/top-k); layerwise (inputs from the unpruned model) or "
               "progressive; router rows and expert tensors removed, num_local_experts/num_experts updated.")

    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        cfg = self.config
        name = model_name(cfg, modelpool)
        model = load_copy(modelpool, name)
        layers = self._moe_layers(model, name)
        blocks = [moe_block(layer) for layer in layers]
        first = next(b for b in blocks if b is not None)
        n_exp = int(first.gate.weight.shape[0])
        r = cfg.num_preserved_experts
        if not _top_k(first) <= r <= n_exp:
            raise ConfigError(f"method.num_preserved_experts={r} must be between the experts per token ({_top_k(first)}) "
                              f"and the experts per layer ({n_exp}).")
        ppl_before = perplexity(model, cfg, modelpool)
        device = resolve_device(cfg.device)
        ids, calib = calibration_ids(cfg, modelpool, model)
        kept: dict[int, list[int]] = {}
        losses: dict[int, dict[str, float]] = {}

        def process(index: int, prefix: str, layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
            block = moe_block(layer)
            if block is None:
                return run_layer(layer, inputs)
            xs, outs = _block_inputs(layer, block, inputs)
            acc = ExpertSubsetLoss(int(block.gate.weight.shape[0]), r, _top_k(block), _normalize(block))
            with torch.no_grad():
                for x in xs:
                    for s in range(0, x.shape[0], TOKEN_CHUNK):
                        xc = x[s:s + TOKEN_CHUNK]
                        acc.add(all_expert_outputs(xc, lambda e, t: expert_output(block, e, t),
                                                   int(block.gate.weight.shape[0])),
                                router_logits(block, xc))
            best = acc.best()
            kept[index] = best
            losses[index] = {",".join(map(str, k)): round(v, 6) for k, v in sorted(acc.losses().items(),
                                                                                  key=lambda kv: kv[1])[:5]}
            keep_experts_(block, best)
            return run_layer(layer, inputs) if cfg.mode == "progressive" else outs

        show = cfg.progress and sys.stderr.isatty()
        with torch.no_grad():
            mem = layer_by_layer(model, ids, cfg.batch_size, device, process, progress=show, label=self.name)
        _set_num_experts(model.config, r)
        ppl_after = perplexity(model, cfg, modelpool)
        extra: dict[str, Any] = {"model": name, "experts_before": n_exp, "experts_after": r,
                                 "kept_experts": {str(k): v for k, v in kept.items()},
                                 "lowest_losses": {str(k): v for k, v in losses.items()},
                                 "calibration": calib, "memory": mem, "mode": cfg.mode}
        if ppl_before is not None:
            extra.update(perplexity_before=ppl_before, perplexity_after=ppl_after)
        return FusionResult("merged", model=model, metadata=self._metadata(
            t0, extra_parameters=0, parameters=count_parameters(model), **extra))


@register_method
class ExpertSkipping(_MoEMethod):
    name = "expert_skipping"
    config_class = ExpertSkippingConfig
    summary = "Dynamic skipping of the second expert when w2 < beta w1; beta = median of w2/w1 on calibration text."
    variant = ("Not All Experts are Equal (Lu et al. 2024) dynamic skipping for top-2 MoE: per layer beta = median of "
               "w_2/w_1 over the calibration tokens (inputs from the unmodified model); at inference the second "
               "expert's weight is set to 0 where w_2 < beta w_1 and the pair renormalised. Betas saved in "
               "config.dynamic_skipping_betas; enable_dynamic_skipping() re-applies them after from_pretrained.")

    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        cfg = self.config
        name = model_name(cfg, modelpool)
        model = load_copy(modelpool, name)
        layers = self._moe_layers(model, name)
        for layer in layers:
            b = moe_block(layer)
            if b is not None and _top_k(b) != 2:
                raise ModelMismatchError(f"Model '{name}': dynamic skipping is defined for top-2 routing, the model "
                                         f"routes to {_top_k(b)} experts.")
        ppl_before = perplexity(model, cfg, modelpool)
        device = resolve_device(cfg.device)
        ids, calib = calibration_ids(cfg, modelpool, model)
        betas: list[float | None] = [None] * len(layers)

        def process(index: int, prefix: str, layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
            block = moe_block(layer)
            if block is None:
                return run_layer(layer, inputs)
            xs, outs = _block_inputs(layer, block, inputs)
            with torch.no_grad():
                ratios = torch.cat([skip_ratios(router_logits(block, x)) for x in xs])
            betas[index] = float(torch.median(ratios.double()))  # torch's median: the lower middle value
            return outs

        show = cfg.progress and sys.stderr.isatty()
        with torch.no_grad():
            mem = layer_by_layer(model, ids, cfg.batch_size, device, process, progress=show, label=self.name)
        model.config.dynamic_skipping_betas = betas
        enable_dynamic_skipping(model, betas)
        ppl_after = perplexity(model, cfg, modelpool)
        extra: dict[str, Any] = {"model": name, "betas": betas, "calibration": calib, "memory": mem}
        if ppl_before is not None:
            extra.update(perplexity_before=ppl_before, perplexity_after=ppl_after)
        return FusionResult("merged", model=model, metadata=self._metadata(
            t0, extra_parameters=0, parameters=count_parameters(model), **extra))


__all__ = ["ExpertPruning", "ExpertSkipping", "enable_dynamic_skipping", "expert_output", "keep_experts_", "moe_block"]
