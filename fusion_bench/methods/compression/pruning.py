"""Weight pruning of linear layers: magnitude, random, Wanda and SparseGPT; unstructured or N:M (2:4, 4:8).

``fusion_bench method=wanda_pruning modelpool=<causal LM pool> taskpool=causal_lm_perplexity method.sparsity=0.5``
(add ``method.nm=2:4`` for semi-structured sparsity). The pool's base model (``_pretrained_``, else the first;
``method.model`` picks another) is pruned and returned with the pool's architecture, so the saved folder reloads
with ``AutoModelForCausalLM.from_pretrained``. The report's metadata gives the sparsity reached per layer, the
bytes (dense as saved, and sparse-storage estimates) and, with ``method.perplexity_data=builtin``, the perplexity
before and after pruning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from fusion_bench.config_schema import option
from fusion_bench.errors import ConfigError
from fusion_bench.kernels.compression.pruning import (
    apply_mask_,
    magnitude_scores,
    parse_nm,
    random_scores,
    select_mask,
    wanda_scores,
)
from fusion_bench.kernels.compression.sparsegpt import HessianAccumulator, sparsegpt_prune
from fusion_bench.methods.base import FusionMethod, FusionResult, register_method
from fusion_bench.methods.compression._common import (
    CalibrationConfig,
    CompressionConfig,
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
from fusion_bench.utils import count_parameters, resolve_device, seeded_generator

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool


def _check_sparsity(cfg: Any) -> None:
    try:
        nm = parse_nm(cfg.nm)
    except ValueError as e:
        raise ConfigError(f"method.nm={cfg.nm!r}: {e}.") from None
    if not 0.0 <= cfg.sparsity < 1.0:
        raise ConfigError(f"method.sparsity={cfg.sparsity} must be in [0, 1).")
    cfg._nm = nm


_SPARSITY_HELP = "Fraction of the weights of each pruned layer set to zero (unstructured; ignored when nm is set)."
_NM_HELP = ("Semi-structured N:M pattern such as '2:4' or '4:8': in every group of M consecutive input weights of a "
            "row, the N least important are pruned (the Wanda/SparseGPT/FusionBench convention; for 2:4 and 4:8 the "
            "same as NVIDIA's N nonzeros of M). null: unstructured.")


@dataclass
class MagnitudePruningConfig(CompressionConfig):
    sparsity: float = option(0.5, ge=0.0, lt=1.0, help=_SPARSITY_HELP)
    nm: str | None = option(None, help=_NM_HELP)
    group: str = option("layer", choices=("layer", "row"), help="Comparison group of unstructured pruning: the "
                        "whole layer (the magnitude baseline of the Wanda and SparseGPT papers) or each output row.")

    def __post_init__(self) -> None:
        _check_sparsity(self)


@dataclass
class RandomPruningConfig(MagnitudePruningConfig):
    pass


@dataclass
class WandaPruningConfig(CalibrationConfig):
    sparsity: float = option(0.5, ge=0.0, lt=1.0, help=_SPARSITY_HELP)
    nm: str | None = option(None, help=_NM_HELP)
    group: str = option("row", choices=("row", "layer"), help="Comparison group of unstructured pruning: each output "
                        "row (the Wanda paper) or the whole layer (its ablation).")

    def __post_init__(self) -> None:
        _check_sparsity(self)


@dataclass
class SparseGPTPruningConfig(CalibrationConfig):
    sparsity: float = option(0.5, ge=0.0, lt=1.0, help=_SPARSITY_HELP)
    nm: str | None = option(None, help=_NM_HELP)
    blocksize: int = option(128, ge=1, le=1 << 20, help="Columns per block: the adaptive mask is chosen and the lazy "
                            "OBS update applied block by block (the paper: 128). A multiple of M with nm.")
    percdamp: float = option(0.01, gt=0.0, le=10.0, help="Dampening added to the Hessian diagonal, as a fraction of "
                             "its mean (the paper: 1%).")

    def __post_init__(self) -> None:
        _check_sparsity(self)
        if self._nm is not None and self.blocksize % self._nm[1]:
            raise ConfigError(f"method.blocksize={self.blocksize} must be a multiple of M={self._nm[1]} "
                              f"(method.nm={self.nm}).")


class _Pruning(FusionMethod):
    """Prunes one model of the pool; subclasses implement :meth:`prune`."""

    family: ClassVar = "compression"
    identity_on_equal_inputs: ClassVar[bool] = False  # pruning changes the model by design
    permutation_invariant: ClassVar[bool] = True  # only the chosen model is read

    def prune(self, model: nn.Module, targets: dict[str, nn.Module], pool: ModelPool) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        cfg = self.config
        name = model_name(cfg, modelpool)
        model = load_copy(modelpool, name)
        targets = model_targets(model, cfg.exclude)
        if not targets:
            raise ConfigError(f"Model '{name}' has no linear layer to prune (method.exclude={cfg.exclude}).")
        ppl_before = perplexity(model, cfg, modelpool)
        with torch.no_grad():
            info = self.prune(model, targets, modelpool)
        rep = sparsity_report(model, targets, cfg._nm)
        ppl_after = perplexity(model, cfg, modelpool)
        extra = {"model": name, **rep, **info}
        if ppl_before is not None:
            extra["perplexity_before"] = ppl_before
            extra["perplexity_after"] = ppl_after
            print(f"{self.name}: perplexity on {cfg.perplexity_data} {ppl_before['perplexity']:.4f} before, "
                  f"{ppl_after['perplexity']:.4f} after (sparsity reached {rep['sparsity_overall']:.4f})")
        return FusionResult("merged", model=model, metadata=self._metadata(
            t0, extra_parameters=0, parameters=count_parameters(model), **extra))


def _data_free_prune(targets: dict[str, nn.Module], cfg: Any, scores_fn) -> None:
    for n, m in targets.items():
        w = weight_2d(m)
        mask = select_mask(scores_fn(n, w), cfg.sparsity, cfg._nm, cfg.group)
        apply_mask_(w, mask)


@register_method
class MagnitudePruning(_Pruning):
    name = "magnitude_pruning"
    config_class = MagnitudePruningConfig
    summary = "Prune the smallest |W| of every linear layer (per layer or per row; unstructured or N:M)."
    variant = ("Magnitude pruning (Han et al. 2015; the baseline of Wanda and SparseGPT): score |W_ij|, the "
               "floor(sparsity * size) smallest of each layer (group=layer) or row (group=row) set to 0, ties by "
               "position; N:M: the N smallest of every M consecutive inputs of a row. Causal LMs: linear layers of the "
               "decoder layers only.")

    def scores_fn(self):
        return lambda n, w: magnitude_scores(w)

    def prune(self, model, targets, pool):
        _data_free_prune(targets, self.config, self.scores_fn())
        return {}


@register_method
class RandomPruning(_Pruning):
    name = "random_pruning"
    config_class = RandomPruningConfig
    summary = "Prune random weights of every linear layer (seeded; unstructured or N:M): the sanity baseline."
    variant = ("Random pruning: scores uniform on [0, 1) from a generator seeded by (seed, layer name), then the same "
               "selection as magnitude pruning (group=layer or row; N:M). The same seed gives the same masks.")

    def scores_fn(self):
        seed = self.config.seed
        return lambda n, w: random_scores(w.shape, seeded_generator(seed, n))

    def prune(self, model, targets, pool):
        _data_free_prune(targets, self.config, self.scores_fn())
        return {"seed": self.config.seed}


class _SquaredNorms:
    """Sum over calibration tokens of ``x_j^2`` for each input feature ``j`` (float64)."""

    def __init__(self, columns: int, device: torch.device):
        self.sq = torch.zeros(columns, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.sq += (x * x).sum(dim=0)
        self.tokens += x.shape[0]


class _CalibrationPruning(_Pruning):
    uses_data: ClassVar[bool] = True

    def check_ready(self, modelpool: ModelPool) -> list[str]:
        return check_calibration(self.config, modelpool)

    def make_stat(self, name: str, module: nn.Module, device: torch.device) -> Any:
        raise NotImplementedError

    def prune_module(self, name: str, module: nn.Module, stat: Any) -> None:
        raise NotImplementedError

    def make_process(self, targets: dict[str, nn.Module], device: torch.device, stat_bytes: list[int]):
        """The per-layer step of the layer-by-layer driver: gather statistics, prune, return the pruned outputs."""

        def process(index: int, prefix: str, layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
            mods = {n: m for n, m in linear_targets(layer, [], prefix=prefix).items() if n in targets}
            stats, _ = collect_linear_inputs(layer, inputs, mods, lambda n, m: self.make_stat(n, m, device))
            stat_bytes[0] = max(stat_bytes[0], sum(_nbytes(s) for s in stats.values()))
            for n, m in mods.items():
                self.prune_module(n, m, stats[n])
                stats[n] = None  # free as we go
            return run_layer(layer, inputs)  # the pruned layer's outputs feed the next layer

        return process

    def prune(self, model, targets, pool, layer_hooks: tuple | None = None):
        cfg = self.config
        device = resolve_device(cfg.device)
        ids, calib = calibration_ids(cfg, pool, model)
        stat_bytes = [0]
        import sys

        show = cfg.progress and sys.stderr.isatty()
        load, store = layer_hooks or (None, None)
        mem = layer_by_layer(model, ids, cfg.batch_size, device, self.make_process(targets, device, stat_bytes),
                             progress=show, label=self.name, load_layer=load, store_layer=store)
        mem["largest_layer_statistics_bytes"] = stat_bytes[0]
        # inputs + outputs of one layer, its statistics and its weights: the part that does not grow with depth
        mem["layer_working_set_bytes"] = 2 * mem["layer_input_bytes"] + stat_bytes[0] + mem["largest_layer_bytes"]
        return {"calibration": calib, "memory": mem, "device": str(device)}


def _nbytes(stat: Any) -> int:
    t = getattr(stat, "H", None)
    if t is None:
        t = getattr(stat, "sq", None)
    return 0 if t is None else t.numel() * t.element_size()


@register_method
class WandaPruning(_CalibrationPruning):
    name = "wanda_pruning"
    config_class = WandaPruningConfig
    summary = "Wanda: prune by |W| * ||X||_2 per output row, layer by layer on calibration text (unstructured or N:M)."
    variant = ("Wanda (Sun et al. 2023, arXiv 2306.11695): score |W_ij| * ||X_j||_2 over every calibration token; the "
               "floor(sparsity * in) smallest of each output row pruned (group=row; ties by position); N:M: the N "
               "smallest of every M consecutive inputs. Layer by layer: inputs of decoder layer 0 captured, each layer "
               "pruned from its own inputs and its pruned outputs fed to the next. No weight update.")

    def make_stat(self, name, module, device):
        return _SquaredNorms(weight_2d(module).shape[1], device)

    def prune_module(self, name, module, stat):
        w = weight_2d(module)
        mask = select_mask(wanda_scores(w, stat.sq), self.config.sparsity, self.config._nm, self.config.group)
        apply_mask_(w, mask)


@register_method
class SparseGPTPruning(_CalibrationPruning):
    name = "sparsegpt_pruning"
    config_class = SparseGPTPruningConfig
    summary = "SparseGPT: OBS reconstruction with adaptive per-block masks, layer by layer on calibration text."
    variant = ("SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774): H = 2 X^T X / N, dampening 1% of mean diag, "
               "U = chol(H^-1) upper; columns in blocks of 128, the block's mask chosen at its start from the updated "
               "weights by w^2 / U_cc^2 (exact count over the block; N:M: per M columns of each row), pruned entries "
               "zeroed and their error propagated by the OBS update, lazily across blocks. Layer by layer, pruned "
               "outputs feed the next layer.")

    def make_stat(self, name, module, device):
        return HessianAccumulator(weight_2d(module).shape[1], device=device)

    def prune_module(self, name, module, stat):
        cfg = self.config
        w = weight_2d(module)
        new, _ = sparsegpt_prune(w, stat.H, cfg.sparsity, cfg._nm, cfg.blocksize, cfg.percdamp)
        set_weight_2d(module, new)


__all__ = ["MagnitudePruning", "RandomPruning", "SparseGPTPruning", "WandaPruning"]
