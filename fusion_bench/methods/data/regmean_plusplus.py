"""RegMean++: RegMean whose Gram matrices come from the merged model's activations, layer by layer."""

from __future__ import annotations

import copy
import fnmatch
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.kernels.data.regmean import regmean_linear
from fusion_bench.methods._task_data import (
    TaskDataMethod,
    data_used,
    progress,
    start_data_run,
)
from fusion_bench.methods.base import FusionResult, MethodConfig, register_method
from fusion_bench.methods.data.regmean import linear_kind
from fusion_bench.utils import count_parameters

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool


@dataclass
class RegMeanPlusPlusConfig(MethodConfig):
    num_regmean_examples: int = option(256, ge=1, le=10**9, help="Examples of each model's task (evenly spaced over the "
                                       "split) whose activations give the Gram matrices.")
    batch_size: int = option(32, ge=1, le=2**20, help="Examples per forward pass.")
    reduce_non_diagonal_ratio: float = option(0.95, ge=0.0, le=1.0, help="alpha: off-diagonal Gram entries are scaled by "
                                              "it (FusionBench's RegMean++ CLIP config: 0.95).")
    layers: str | None = option(None, help="Module path of the stack of blocks merged one after the other (e.g. "
                                "vision_model.encoder.layers); null: the longest nn.ModuleList of blocks of one class.")
    keep_pretrained: list[str] = option([], help="Glob patterns of tensors outside the block stack copied from "
                                        "'_pretrained_' instead of averaged (FusionBench's CLIP RegMean++ keeps "
                                        "*post_layernorm.* from the pretrained model).")
    exclude: list[str] = option([], help="Glob patterns of linear layers (full names) simple-averaged instead.")
    split: str = option("train", help="The dataset split the activations are computed on.")
    adapter: str = option("auto", choices=("auto", "clip", "generic"),
                          help="How models become classifiers: clip (zero-shot text heads of the pool's CLIP), "
                          "generic (model(x) -> logits), auto (clip for CLIP pools).")
    image_column: str | None = option(None, help="Image column of CLIP datasets (null: detected).")
    label_column: str | None = option(None, help="Label column (null: detected).")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")
    seed: int = option(0, **SEED_RANGE, help="Seed (the computation is deterministic; kept for the report).")
    progress: bool = option(True, help="Show a progress bar on a terminal.")

    def __post_init__(self) -> None:
        for k in ("num_regmean_examples", "batch_size"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"method.{k}={getattr(self, k)} must be positive.")
        if not 0.0 <= self.reduce_non_diagonal_ratio <= 1.0:
            raise ConfigError(f"method.reduce_non_diagonal_ratio={self.reduce_non_diagonal_ratio} must be in [0, 1].")


def find_block_stack(model: nn.Module, path: str | None, where: str) -> tuple[str, nn.ModuleList]:
    """The stack of blocks of ``model``: the module at ``path``, or (None) the longest ``nn.ModuleList`` whose
    children are all of one class (first by name on ties)."""
    if path is not None:
        try:
            mod = model.get_submodule(path)
        except AttributeError as e:
            lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
            raise ConfigError(f"method.layers={path!r} is not a module of {where}; module lists there: "
                              f"{lists[:5]}.") from e
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            raise ConfigError(f"method.layers={path!r} is a {type(mod).__name__}, not a non-empty nn.ModuleList of blocks.")
        return path, mod
    best: tuple[str, nn.ModuleList] | None = None
    for n, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1:
            if best is None or len(m) > len(best[1]):
                best = (n, m)
    if best is None:
        raise ModelMismatchError(f"regmean_plusplus: {where} has no nn.ModuleList of blocks to merge layer by layer; "
                                 "use method=regmean, or name the stack with method.layers.")
    return best


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass at the first block."""


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _out_hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_block_inputs(classifier: nn.Module, block: nn.Module, inputs, batch_size: int,
                         device: torch.device) -> list[tuple[tuple, dict]]:
    """The call arguments ``(args, kwargs)`` of ``block`` (the first block of the stack) for every batch of ``inputs``
    while ``classifier`` runs; the forward stops there."""
    calls: list[tuple[tuple, dict]] = []

    def hook(mod, args, kwargs):
        calls.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                      {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}))
        raise _Stop

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for x, _ in inputs.batches(batch_size):
                n = len(calls)
                try:
                    classifier(x.to(device))
                except _Stop:
                    pass
                if len(calls) != n + 1:
                    raise ModelMismatchError("regmean_plusplus: the classifier did not call the first block of the "
                                             "stack exactly once per batch; set method.layers to the model's blocks.")
    finally:
        h.remove()
    return calls


@register_method
class RegMeanPlusPlus(TaskDataMethod):
    """RegMean++: RegMean with Gram matrices of the inputs the merged model gives each layer.

    Nguyen et al. 2025, "RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for Model
    Merging". The blocks of the model's stack (transformer layers) are merged in order. The inputs of block ``l``
    for task ``i``, ``X_i^(l)``, are the outputs of the already-merged blocks ``< l`` (and of the merged, i.e.
    averaged, embeddings) on ``num_regmean_examples`` examples of task ``i``. Model ``i``'s own block ``l`` runs
    on ``X_i^(l)``; forward hooks give ``G_i = X^T X`` (raw sums, float64; tokens are rows) of every linear layer
    inside it (so a layer's inputs inside the block come from model ``i``'s own earlier sub-layers, as in the
    paper's intra-layer dependency). Each linear weight is merged by RegMean's closed form
    ``W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T`` with ``G~ = alpha G + (1 - alpha) diag(G)``; the block's other
    tensors (biases, norms) are averaged. Then the merged block maps ``X_i^(l)`` to ``X_i^(l+1)``. Tensors outside
    the stack are averaged (or, with ``keep_pretrained``, copied from ``_pretrained_``, as FusionBench's CLIP
    version does for the final layer norm).

    Memory: every model in float32 at once (as FusionBench) plus, per task, the activations of the examples at one
    block boundary.

    Args:
        config: :class:`RegMeanPlusPlusConfig`.
    """

    name = "regmean_plusplus"
    config_class: ClassVar = RegMeanPlusPlusConfig
    uses_data = True
    permutation_invariant = True
    summary = "RegMean with Gram matrices from the merged model's activations, merging block after block."
    variant = ("Nguyen et al. 2025: blocks merged in order; block l's Gram matrices from model i's block l run on the "
               "outputs of the merged blocks < l (task i's train inputs); RegMean closed form per linear layer, "
               "alpha-reduced off-diagonals; other block tensors and everything outside the stack averaged.")

    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        cfg = self.config
        names, device, adapter, show = start_data_run(self, modelpool)
        models = {n: copy.deepcopy(modelpool.load_model(n)).to(device).float().eval() for n in names}
        first = models[names[0]]
        path, _ = find_block_stack(first, cfg.layers, f"model '{names[0]}'")
        states = {n: m.state_dict() for n, m in models.items()}
        for n in names[1:]:
            for k, v in states[names[0]].items():
                if k not in states[n] or states[n][k].shape != v.shape:
                    raise ModelMismatchError(f"Tensor '{k}' is missing or has another shape in model '{n}' than in "
                                             f"'{names[0]}'; merge models of one architecture.")
        pre = path + "."
        merged = copy.deepcopy(first)
        outside: dict[str, torch.Tensor] = {}
        base_state = modelpool.load_pretrained_model().state_dict() if cfg.keep_pretrained else {}
        for k, v in states[names[0]].items():
            if k.startswith(pre):
                continue
            if any(fnmatch.fnmatchcase(k, p) for p in cfg.keep_pretrained):
                if k not in base_state:
                    raise ModelMismatchError(f"method.keep_pretrained matches '{k}', which '_pretrained_' lacks.")
                outside[k] = base_state[k].to(device, v.dtype)
            elif v.dtype.is_floating_point:
                outside[k] = torch.stack([states[n][k] for n in names]).mean(0)
        merged.load_state_dict(outside, strict=False)
        _, stack = find_block_stack(merged, path, "the merged model")
        stacks = {n: find_block_stack(m, path, f"model '{n}'")[1] for n, m in models.items()}
        used: dict[str, int] = {}
        calls: dict[str, list[tuple[tuple, dict]]] = {}
        for n in names:
            data = adapter.examples(n, cfg.split, cfg.num_regmean_examples, with_labels=False)
            used[n] = len(data)
            clf = adapter.classifier(merged, n).to(device).eval()
            calls[n] = capture_block_inputs(clf, stack[0], data, cfg.batch_size, device)
        merged_linear = 0
        with progress("regmean++ blocks", len(stack), show) as adv, torch.no_grad():
            for li, block in enumerate(stack):
                grams: dict[str, list[torch.Tensor]] = {}
                for n in names:
                    g = block_grams(stacks[n][li], calls[n], cfg.exclude, f"{pre}{li}.")
                    for k, v in g.items():
                        grams.setdefault(k, []).append(v)
                new = {}
                bstates = [stacks[n][li].state_dict() for n in names]
                for k, v in bstates[0].items():
                    if v.dtype.is_floating_point:
                        new[k] = torch.stack([s[k] for s in bstates]).mean(0)
                for lin, gs in grams.items():
                    if len(gs) != len(names):
                        continue
                    mod = block.get_submodule(lin) if lin else block
                    ws = [s[f"{lin}.weight" if lin else "weight"] for s in bstates]
                    if linear_kind(mod) == "conv1d":
                        ws = [w.T for w in ws]
                    w = regmean_linear(ws, gs, cfg.reduce_non_diagonal_ratio)
                    new[f"{lin}.weight" if lin else "weight"] = w.T.contiguous() if linear_kind(mod) == "conv1d" else w
                    merged_linear += 1
                block.load_state_dict(new, strict=False)
                if li + 1 < len(stack):
                    for n in names:
                        calls[n] = [_with_hidden(a, kw, _out_hidden(block(*a, **kw)).detach()) for a, kw in calls[n]]
                adv()
        out = merged.cpu()
        for p in out.parameters():
            p.requires_grad_(False)
        return FusionResult("merged", model=out, metadata=self._metadata(
            t0, extra_parameters=0, parameters=count_parameters(out), adapter=adapter.kind, block_stack=path,
            blocks=len(stack), regmean_layers=merged_linear, keep_pretrained=list(cfg.keep_pretrained),
            data_used=data_used(cfg.split, False, used)))


def block_grams(block: nn.Module, calls: list[tuple[tuple, dict]], exclude: list[str],
                prefix: str) -> dict[str, torch.Tensor]:
    """``X^T X`` (float64, tokens as rows) of the inputs of every linear layer inside ``block`` while it runs on
    the recorded calls; keys are names inside the block. Layers whose full name (``prefix`` + name) matches an
    ``exclude`` glob are skipped."""
    grams: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name: str):
        def fn(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            g = x.T @ x
            grams[name] = grams[name] + g if name in grams else g
        return fn

    for n, m in block.named_modules():
        if linear_kind(m) is not None and not any(fnmatch.fnmatchcase(prefix + n, p) for p in exclude):
            hooks.append(m.register_forward_pre_hook(hook(n)))
    try:
        with torch.no_grad():
            for a, kw in calls:
                block(*a, **kw)
    finally:
        for h in hooks:
            h.remove()
    return grams
