"""RegMean: merge every linear layer by least squares on the models' own layer inputs."""

from __future__ import annotations

import copy
import fnmatch
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.engine.devices import module_device
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.kernels.data.regmean import regmean_accumulate, regmean_solve
from fusion_bench.methods._task_data import (
    TaskDataMethod,
    data_devices,
    data_used,
    per_model_statistics,
    start_data_run,
)
from fusion_bench.methods.base import FusionResult, MethodConfig, register_method
from fusion_bench.utils import count_parameters

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool


@dataclass
class RegMeanConfig(MethodConfig):
    num_regmean_examples: int = option(256, ge=1, le=10**9, help="Examples of each model's task whose layer inputs give the Gram "
                                       "matrices (evenly spaced over the split).")
    batch_size: int = option(32, ge=1, le=2**20, help="Examples per forward pass.")
    reduce_non_diagonal_ratio: float = option(0.9, ge=0.0, le=1.0, help="alpha: off-diagonal Gram entries are scaled by it "
                                              "(1: exact regression, 0: diagonal only).")
    include_bias: bool = option(False, help="Merge each bias with its weight in one regression on inputs [x, 1] "
                                "(false: biases are simple-averaged, as in the paper).")
    exclude: list[str] = option([], help="Glob patterns of linear-layer names (e.g. '*.fc2') merged by simple "
                                "average instead.")
    split: str = option("train", help="The dataset split the Gram matrices are computed on.")
    adapter: str = option("auto", choices=("auto", "clip", "generic"),
                          help="How models become classifiers: clip (zero-shot text heads of the pool's CLIP), "
                          "generic (model(x) -> logits), auto (clip for CLIP pools).")
    image_column: str | None = option(None, help="Image column of CLIP datasets (null: detected).")
    label_column: str | None = option(None, help="Label column (null: detected).")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")
    devices: list[str] | str | None = option(
        None, help="Compute several models' statistics at once, one per device (a list like [cuda:0,cuda:1], auto "
        "for every visible GPU, or a number of GPUs); same result as one device, K models in memory. null: device.")
    seed: int = option(0, **SEED_RANGE, help="Seed (the computation is deterministic; kept for the report).")
    progress: bool = option(True, help="Show a progress bar on a terminal.")

    def __post_init__(self) -> None:
        for k in ("num_regmean_examples", "batch_size"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"method.{k}={getattr(self, k)} must be positive.")
        if not 0.0 <= self.reduce_non_diagonal_ratio <= 1.0:
            raise ConfigError(f"method.reduce_non_diagonal_ratio={self.reduce_non_diagonal_ratio} must be in [0, 1].")


def linear_kind(module: nn.Module) -> str | None:
    """'linear' for ``nn.Linear`` (``y = x W^T + b``, W stored (out, in)), 'conv1d' for transformers' ``Conv1D``
    (GPT-2: ``y = x W + b``, W stored (in, out)), None for any other module."""
    if isinstance(module, nn.Linear):
        return "linear"
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return "conv1d" if isinstance(module, Conv1D) else None


def linear_grams(classifier: nn.Module, model: nn.Module, inputs: torch.Tensor, batch_size: int,
                 device: torch.device, with_bias: bool = False, skip: list[str] | None = None,
                 advance=lambda n=1: None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """``X^T X`` (float64) of the inputs of every linear layer of ``model`` (``nn.Linear`` or transformers'
    ``Conv1D``) while ``classifier`` runs on ``inputs``.

    Inputs of any rank are flattened to rows ``(-1, in_features)`` (tokens count as rows). With
    ``with_bias`` a constant 1 is appended to every row. Also returns the number of rows per layer.
    """
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    hooks = []

    def hook(name: str):
        def fn(mod, args, kwargs=None):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            if with_bias:
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
            g = x.T @ x
            grams[name] = grams[name] + g if name in grams else g
            rows[name] = rows.get(name, 0) + x.shape[0]
        return fn

    for n, m in model.named_modules():
        if linear_kind(m) is not None and not any(fnmatch.fnmatchcase(n, p) for p in (skip or [])):
            hooks.append(m.register_forward_pre_hook(hook(n)))
    try:
        with torch.no_grad():
            for s in range(0, len(inputs), batch_size):
                classifier(inputs[s:s + batch_size].to(device))
                advance(min(batch_size, len(inputs) - s))
    finally:
        for h in hooks:
            h.remove()
    return {k: v.cpu() for k, v in grams.items()}, rows


@register_method
class RegMean(TaskDataMethod):
    """RegMean: each linear layer merged by the closed-form regression on the models' layer inputs.

    Jin et al., ICLR 2023, "Dataless knowledge fusion by merging weights of language models": for
    every ``nn.Linear`` (``y = x W^T + b``; transformers' ``Conv1D``, ``y = x W + b``, likewise with its weight
    transposed) with Gram matrix ``G_i = X_i^T X_i`` of its inputs while
    model ``i`` runs on ``num_regmean_examples`` examples of its own task (tokens are rows; raw sums,
    not means), ``W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T`` with ``G~_i = alpha G_i + (1 - alpha)
    diag(G_i)`` (``alpha = reduce_non_diagonal_ratio``). Biases, and every other tensor (embeddings,
    convolutions, norms), are simple-averaged; with ``include_bias`` the bias is solved jointly
    with the weight on inputs ``[x, 1]``. Excluded layers are simple-averaged. The base model is
    not used.

    Args:
        config: :class:`RegMeanConfig` (num_regmean_examples, batch_size, reduce_non_diagonal_ratio,
            include_bias, exclude, split, adapter, device, seed).
    """

    name = "regmean"
    config_class: ClassVar = RegMeanConfig
    uses_data = True
    summary = "Linear layers merged by least squares on each model's layer inputs (Gram matrices); rest averaged."
    variant = ("Jin et al. 2023: W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T per nn.Linear (and transformers Conv1D), G_i = X_i^T X_i on task i's "
               "train inputs, off-diagonals scaled by reduce_non_diagonal_ratio; other tensors (and biases unless "
               "include_bias) simple-averaged.")

    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        cfg = self.config
        names, device, adapter, show = start_data_run(self, modelpool)
        sums = RegMeanSums(cfg.reduce_non_diagonal_ratio, cfg.include_bias)
        used: dict[str, int] = {}
        template: nn.Module | None = None
        def grams_of(name: str, work: nn.Module, clf: nn.Module, data, adv):
            if not any(linear_kind(m) for m in work.modules()):
                raise ModelMismatchError(f"regmean: model '{name}' has no linear layer (nn.Linear or Conv1D) to merge; "
                                         "use simple_average for it.")
            return linear_grams(clf, work, data.inputs, cfg.batch_size, module_device(work), cfg.include_bias,
                                cfg.exclude, adv)[0]

        for name, model, n, grams in per_model_statistics(
                names, modelpool, adapter, label="regmean", split=cfg.split, num_examples=cfg.num_regmean_examples,
                with_labels=False, device=device, show=show, stat=grams_of,
                devices=data_devices(self)):
            if template is None:
                template = model
            used[name] = n
            sums.add(name, model, grams)
        if template is None:  # pragma: no cover - check_tasks rejects empty pools
            raise ConfigError("regmean: no models to merge.")
        merged, merged_layers = sums.finish()
        out = copy.deepcopy(template).cpu()
        missing, unexpected = out.load_state_dict(merged, strict=False)
        if unexpected:
            raise ModelMismatchError(f"Merged tensors {list(unexpected)[:3]} do not fit model '{names[0]}'.")
        n_linear = sum(linear_kind(m) is not None for m in out.modules())
        return FusionResult("merged", model=out, metadata=self._metadata(
            t0, extra_parameters=0, parameters=count_parameters(out), adapter=adapter.kind,
            regmean_layers=len(merged_layers), averaged_linear_layers=n_linear - len(merged_layers),
            data_used=data_used(cfg.split, False, used)))


class RegMeanSums:
    """Running RegMean sums over models, added one model at a time (memory: one model's size plus, per
    linear layer, ``sum G~`` and ``sum G~ W^T`` in float64, whatever the number of models).

    Args:
        alpha: ``reduce_non_diagonal_ratio``.
        include_bias: solve each bias with its weight (Gram matrices of ``[x, 1]``).
    """

    def __init__(self, alpha: float, include_bias: bool):
        self.alpha = alpha
        self.include_bias = include_bias
        self.g_sum: dict[str, torch.Tensor] = {}
        self.rhs: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.plain: dict[str, torch.Tensor] = {}
        self.ref: dict[str, torch.Tensor] = {}
        self.linears: dict[str, bool] = {}  # layer -> has bias
        self.transposed: set[str] = set()  # Conv1D layers: weight stored (in, out)
        self.first = ""
        self.n = 0

    def add(self, name: str, model: nn.Module, grams: dict[str, torch.Tensor]) -> None:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if self.n == 0:
            self.first = name
            # non-float tensors are copied from the first model; float ones only need shape and dtype here
            self.ref = {k: v.clone() if not v.dtype.is_floating_point else torch.empty(v.shape, dtype=v.dtype,
                                                                                       device="meta")
                        for k, v in state.items()}
            self.linears = {n: m.bias is not None for n, m in model.named_modules() if linear_kind(m)}
            self.transposed = {n for n, m in model.named_modules() if linear_kind(m) == "conv1d"}
        for k, v in self.ref.items():
            if k not in state or state[k].shape != v.shape:
                raise ModelMismatchError(f"Tensor '{k}' is missing or has another shape in model '{name}' than in "
                                         f"'{self.first}'; merge models of one architecture.")
        for k, v in state.items():
            if k in self.ref and v.dtype.is_floating_point:
                if k in self.plain:
                    self.plain[k] += v.to(torch.float32)
                else:
                    self.plain[k] = v.to(torch.float32).clone()
        for layer, has_bias in self.linears.items():
            if layer not in grams:
                continue
            pre = f"{layer}." if layer else ""  # '' is a bare nn.Linear model
            w = state[f"{pre}weight"]
            if layer in self.transposed:
                w = w.T  # (out, in), as nn.Linear stores it
            g = grams[layer]
            if self.include_bias:
                if has_bias:
                    w = torch.cat([w.to(torch.float64), state[f"{pre}bias"].to(torch.float64)[:, None]], 1)
                else:  # no bias: drop the constant input
                    g = g[:-1, :-1]
            if layer not in self.g_sum:
                self.g_sum[layer] = torch.zeros(g.shape, dtype=torch.float64)
                self.rhs[layer] = torch.zeros(g.shape[0], w.shape[0], dtype=torch.float64)
            regmean_accumulate(self.g_sum[layer], self.rhs[layer], w, g, self.alpha)
            self.count[layer] = self.count.get(layer, 0) + 1
        self.n += 1

    def finish(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The merged state dict and the layers merged by RegMean (the others are simple-averaged)."""
        out: dict[str, torch.Tensor] = {}
        done = []
        for layer, has_bias in self.linears.items():
            if self.count.get(layer, 0) != self.n:
                continue  # excluded, or not called by every model: averaged below
            pre = f"{layer}." if layer else ""
            wkey, bkey = f"{pre}weight", f"{pre}bias"
            m = regmean_solve(self.g_sum[layer], self.rhs[layer])  # (out, in [+ 1])
            if self.include_bias and has_bias:
                out[wkey] = m[:, :-1].to(self.ref[wkey].dtype).contiguous()
                out[bkey] = m[:, -1].to(self.ref[bkey].dtype).contiguous()
            else:
                out[wkey] = m.to(self.ref[wkey].dtype)
            if layer in self.transposed:
                out[wkey] = out[wkey].T.contiguous()
            done.append(layer)
        for k, v in self.ref.items():
            if k not in out:
                out[k] = (self.plain[k] / self.n).to(v.dtype) if v.dtype.is_floating_point else v
        return out, done
