"""RegMean: merge every linear layer by least squares on the models' own layer inputs."""

from __future__ import annotations

import copy
import fnmatch
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from fusion_bench.config_schema import option
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.kernels.regmean import regmean_linear
from fusion_bench.methods._task_data import TaskDataAdapter, check_tasks, make_adapter, progress
from fusion_bench.methods.base import FusionMethod, FusionResult, MethodConfig, register_method
from fusion_bench.utils import count_parameters, resolve_device

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool


@dataclass
class RegMeanConfig(MethodConfig):
    num_regmean_examples: int = option(256, help="Examples of each model's task whose layer inputs give the Gram "
                                       "matrices (evenly spaced over the split).")
    batch_size: int = option(32, help="Examples per forward pass.")
    reduce_non_diagonal_ratio: float = option(0.9, help="alpha: off-diagonal Gram entries are scaled by it "
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
    seed: int = option(0, help="Seed (the computation is deterministic; kept for the report).")
    progress: bool = option(True, help="Show a progress bar on a terminal.")

    def __post_init__(self) -> None:
        for k in ("num_regmean_examples", "batch_size"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"method.{k}={getattr(self, k)} must be positive.")
        if not 0.0 <= self.reduce_non_diagonal_ratio <= 1.0:
            raise ConfigError(f"method.reduce_non_diagonal_ratio={self.reduce_non_diagonal_ratio} must be in [0, 1].")


def linear_grams(classifier: nn.Module, model: nn.Module, inputs: torch.Tensor, batch_size: int,
                 device: torch.device, with_bias: bool = False, skip: list[str] | None = None,
                 advance=lambda n=1: None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """``X^T X`` (float64) of the inputs of every ``nn.Linear`` of ``model`` while ``classifier`` runs on ``inputs``.

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
        if isinstance(m, nn.Linear) and not any(fnmatch.fnmatchcase(n, p) for p in (skip or [])):
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
class RegMean(FusionMethod):
    """RegMean: each linear layer merged by the closed-form regression on the models' layer inputs.

    Jin et al., ICLR 2023, "Dataless knowledge fusion by merging weights of language models": for
    every ``nn.Linear`` (``y = x W^T + b``) with Gram matrix ``G_i = X_i^T X_i`` of its inputs while
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
    variant = ("Jin et al. 2023: W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T per nn.Linear, G_i = X_i^T X_i on task i's "
               "train inputs, off-diagonals scaled by reduce_non_diagonal_ratio; other tensors (and biases unless "
               "include_bias) simple-averaged.")

    #: Python API: set to a TaskDataAdapter to supply data/classifiers for other model families
    adapter: TaskDataAdapter | None = None

    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        cfg = self.config
        torch.manual_seed(cfg.seed)
        names = check_tasks(modelpool, self.name, custom_adapter=self.adapter is not None)
        device = resolve_device(cfg.device)
        adapter = self.adapter or make_adapter(modelpool, cfg.adapter, cfg.image_column, cfg.label_column)
        show = cfg.progress and sys.stderr.isatty()
        states: dict[str, dict[str, torch.Tensor]] = {}
        grams: dict[str, dict[str, torch.Tensor]] = {}
        used: dict[str, int] = {}
        template: nn.Module | None = None
        linears: list[str] = []
        for name in names:
            model = modelpool.load_model(name)
            if template is None:
                template = model
                linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
                if not linears:
                    raise ModelMismatchError(f"regmean: model '{name}' has no nn.Linear layer to merge; use "
                                             "simple_average for it.")
            data = adapter.examples(name, cfg.split, cfg.num_regmean_examples, with_labels=False)
            used[name] = len(data)
            work = copy.deepcopy(model).to(device).float().eval()
            clf = adapter.classifier(work, name).to(device).eval()
            with progress(f"regmean {name}", len(data), show) as adv:
                grams[name], _ = linear_grams(clf, work, data.inputs, cfg.batch_size, device, cfg.include_bias,
                                              cfg.exclude, adv)
            states[name] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            del work, clf
        if template is None:  # pragma: no cover - check_tasks rejects empty pools
            raise ConfigError("regmean: no models to merge.")
        merged, merged_layers = merge_with_grams(states, grams, names, linears, cfg.reduce_non_diagonal_ratio,
                                                 cfg.include_bias)
        out = copy.deepcopy(template).cpu()
        missing, unexpected = out.load_state_dict(merged, strict=False)
        if unexpected:
            raise ModelMismatchError(f"Merged tensors {list(unexpected)[:3]} do not fit model '{names[0]}'.")
        return FusionResult("merged", model=out, metadata=self._metadata(
            t0, extra_parameters=0, parameters=count_parameters(out), adapter=adapter.kind,
            regmean_layers=len(merged_layers), averaged_linear_layers=len(linears) - len(merged_layers),
            data_used={"split": cfg.split, "labels_read": False, "examples_per_task": used,
                       "examples": int(sum(used.values()))}))


def merge_with_grams(states: dict[str, dict[str, torch.Tensor]], grams: dict[str, dict[str, torch.Tensor]],
                     names: list[str], linears: list[str], alpha: float,
                     include_bias: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """RegMean for linear layers with a Gram matrix from every model; simple average elsewhere."""
    ref = states[names[0]]
    out: dict[str, torch.Tensor] = {}
    done: list[str] = []
    for layer in linears:
        pre = f"{layer}." if layer else ""  # '' is a bare nn.Linear model
        wkey, bkey = f"{pre}weight", f"{pre}bias"
        if wkey not in ref or not all(layer in grams[n] for n in names):
            continue  # excluded or never called: averaged below
        ws = []
        for n in names:
            if wkey not in states[n] or states[n][wkey].shape != ref[wkey].shape:
                raise ModelMismatchError(f"Tensor '{wkey}' is missing or has another shape in model '{n}'.")
            w = states[n][wkey].float()
            if include_bias:
                b = states[n][bkey].float() if bkey in ref else torch.zeros(w.shape[0])
                w = torch.cat([w, b[:, None]], 1)
            ws.append(w)
        gs = [grams[n][layer] for n in names]
        if include_bias and bkey not in ref:  # no bias: drop the constant column
            gs = [g[:-1, :-1] for g in gs]
            ws = [w[:, :-1] for w in ws]
        m = regmean_linear(ws, gs, alpha)
        if include_bias and bkey in ref:
            out[wkey] = m[:, :-1].to(ref[wkey].dtype).contiguous()
            out[bkey] = m[:, -1].to(ref[bkey].dtype).contiguous()
        else:
            out[wkey] = m.to(ref[wkey].dtype)
        done.append(layer)
    for k, v in ref.items():
        if k in out:
            continue
        for n in names[1:]:
            if k not in states[n] or states[n][k].shape != v.shape:
                raise ModelMismatchError(f"Tensor '{k}' is missing or has another shape in model '{n}' than in "
                                         f"'{names[0]}'; merge models of one architecture.")
        if v.dtype.is_floating_point:
            out[k] = torch.stack([states[n][k].float() for n in names]).mean(0).to(v.dtype)
        else:
            out[k] = v.clone()
    return out, done
