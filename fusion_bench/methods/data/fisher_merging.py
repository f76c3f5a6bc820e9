"""Fisher merging: a per-parameter weighted average with each model's diagonal Fisher information."""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.engine.devices import module_device
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.kernels.data.fisher import fisher_accumulate, fisher_finish
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
class FisherMergingConfig(MethodConfig):
    num_fisher_examples: int = option(256, ge=1, le=10**9, help="Examples of each model's task used to estimate its Fisher "
                                      "(evenly spaced over the split).")
    batch_size: int = option(32, ge=1, le=2**20, help="Examples per forward pass (per-example gradients are computed in batches).")
    label_source: str = option("predicted", choices=("predicted", "dataset"),
                               help="Whose log-likelihood is differentiated: 'predicted' (the model's own arg-max "
                               "label, FusionBench) or 'dataset' (the dataset label: the empirical Fisher).")
    normalize_fisher_weight: bool = option(True, help="Divide each model's Fisher by its global L2 norm over all "
                                           "parameters, so that every model weighs the same in total.")
    minimal_fisher_weight: float = option(1e-6, ge=0.0, le=1.0, help="eps added to every Fisher entry before weighting (keeps "
                                          "the division defined; all-zero entries give the simple average).")
    split: str = option("train", help="The dataset split the Fisher is estimated on (modelpool.datasets).")
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
        for k in ("num_fisher_examples", "batch_size"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"method.{k}={getattr(self, k)} must be positive.")
        if self.minimal_fisher_weight < 0:
            raise ConfigError(f"method.minimal_fisher_weight={self.minimal_fisher_weight} must be >= 0.")


def per_example_squared_grads(classifier: nn.Module, params: dict[str, nn.Parameter], inputs: torch.Tensor,
                              labels: torch.Tensor | None, batch_size: int, device: torch.device,
                              advance=lambda n=1: None) -> dict[str, torch.Tensor]:
    """``sum_n (d/d theta log p(y_n | x_n))^2`` for every parameter in ``params`` (float32, on CPU).

    ``y_n`` is ``labels[n]``, or the classifier's arg-max prediction when ``labels`` is None. Per-example
    gradients come from ``torch.func.vmap(grad)`` over a batch; a model that vmap cannot trace falls back
    to one backward pass per example (same numbers).
    """
    from torch.func import functional_call, grad, vmap

    names = list(params)
    acc = {k: torch.zeros_like(p, dtype=torch.float32, device=device) for k, p in params.items()}
    fixed = {k: v.detach() for k, v in params.items()}

    def loglik(pvals: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(classifier, pvals, (x.unsqueeze(0),), strict=False)
        return F.log_softmax(logits.float(), dim=-1)[0].gather(0, y.reshape(1)).squeeze(0)

    use_vmap = True
    for s in range(0, len(inputs), batch_size):
        x = inputs[s:s + batch_size].to(device)
        with torch.no_grad():
            y = labels[s:s + batch_size].to(device) if labels is not None else classifier(x).argmax(-1)
        done = False
        if use_vmap:
            try:
                with warnings.catch_warnings():  # ops without a batching rule run in a slower fallback: fine
                    warnings.filterwarnings("ignore", message=".*batching rule.*")
                    g = vmap(grad(loglik), in_dims=(None, 0, 0), randomness="different")(fixed, x, y)
                for k in names:
                    acc[k] += g[k].float().pow(2).sum(0)
                done = True
            except Exception:  # an op without a batching rule: per-example loop from now on
                use_vmap = False
        if not done:
            for j in range(len(x)):
                classifier.zero_grad(set_to_none=True)
                logits = classifier(x[j:j + 1])
                F.log_softmax(logits.float(), dim=-1)[0, y[j]].backward()
                for k, p in params.items():
                    if p.grad is not None:
                        acc[k] += p.grad.detach().float().pow(2)
            classifier.zero_grad(set_to_none=True)
        advance(len(x))
    return {k: v.cpu() for k, v in acc.items()}


@register_method
class FisherMerging(TaskDataMethod):
    """Fisher merging: average parameters weighted by each model's diagonal Fisher information.

    Matena & Raffel, NeurIPS 2022, "Merging models with Fisher weighting", diagonal Fisher variant:
    for model ``i`` (fine-tuned on task ``i``), ``F_i = (1/N) sum_n (grad_theta log p_theta_i(y_n | x_n))^2``
    over ``N = num_fisher_examples`` examples of task ``i``'s ``split``, per example (not per batch),
    with ``y_n`` the model's own arg-max prediction (``label_source=predicted``, as FusionBench) or
    the true label (``label_source=dataset``, the empirical Fisher). With ``normalize_fisher_weight``
    each ``F_i`` is divided by its global L2 norm over all parameters. Then per parameter entry
    ``theta = sum_i (F_i + eps) theta_i / sum_i (F_i + eps)``, ``eps = minimal_fisher_weight``.
    Parameters without a Fisher (buffers, tensors that get no gradient) are simple-averaged;
    integer buffers are copied from the first model. The base model is not used. Models are
    classifiers through the adapter (CLIP: the zero-shot head of each task, frozen).

    Args:
        config: :class:`FisherMergingConfig` (num_fisher_examples, batch_size, label_source,
            normalize_fisher_weight, minimal_fisher_weight, split, adapter, device, seed).
    """

    name = "fisher_merging"
    config_class: ClassVar = FisherMergingConfig
    uses_data = True
    summary = "Per-parameter average weighted by each model's diagonal Fisher on its own task data."
    variant = ("Matena & Raffel 2022, diagonal Fisher: F_i = mean_n (grad log p(y_n|x_n))^2 per example on task i's "
               "train split, y_n = the model's prediction (or true label); optional global L2 normalisation of F_i; "
               "theta = sum_i (F_i+eps) theta_i / sum_i (F_i+eps); no Fisher -> simple average.")

    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        cfg = self.config
        names, device, adapter, show = start_data_run(self, modelpool)
        sums = FisherSums(cfg.minimal_fisher_weight)
        used: dict[str, int] = {}
        total_sq: dict[str, float] = {}
        template: nn.Module | None = None
        def fisher_of(name: str, work: nn.Module, clf: nn.Module, data, adv) -> dict[str, torch.Tensor]:
            params = {k: p for k, p in work.named_parameters() if p.dtype.is_floating_point}
            for p in work.parameters():
                p.requires_grad_(True)
            prefix = _param_prefix(clf, work)
            sq = per_example_squared_grads(clf, {prefix + k: p for k, p in params.items()}, data.inputs,
                                           data.labels, cfg.batch_size, module_device(work), adv)
            return {k[len(prefix):]: v / len(data) for k, v in sq.items()}

        for name, model, n, fisher in per_model_statistics(
                names, modelpool, adapter, label="fisher", split=cfg.split, num_examples=cfg.num_fisher_examples,
                with_labels=cfg.label_source == "dataset", device=device, show=show, stat=fisher_of,
                devices=data_devices(self)):
            if template is None:
                template = model
            used[name] = n
            if cfg.normalize_fisher_weight:
                norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in fisher.values()))
                if norm > 0:
                    fisher = {k: v / norm for k, v in fisher.items()}
            total_sq[name] = float(sum(float(v.sum()) for v in fisher.values()))
            sums.add(name, model.state_dict(), fisher)
        if template is None:  # pragma: no cover - check_tasks rejects empty pools
            raise ConfigError("fisher_merging: no models to merge.")
        merged = sums.finish()
        out = copy.deepcopy(template).cpu()
        _load_merged(out, merged, names[0])
        return FusionResult("merged", model=out, metadata=self._metadata(
            t0, extra_parameters=0, parameters=count_parameters(out), adapter=adapter.kind,
            data_used=data_used(cfg.split, cfg.label_source == "dataset", used),
            fisher_total={n: round(v, 6) for n, v in total_sq.items()}))


def _param_prefix(classifier: nn.Module, model: nn.Module) -> str:
    """The name prefix of ``model``'s parameters inside ``classifier`` ('' when they are the same module)."""
    if classifier is model:
        return ""
    for n, m in classifier.named_modules():
        if m is model:
            return n + "." if n else ""
    raise ModelMismatchError("The adapter's classifier does not contain the model it wraps; it must call the model.")


class FisherSums:
    """Running Fisher-merging sums over models, added one model at a time (memory: three model-sized sums,
    whatever the number of models): ``sum_i (F_i + eps) theta_i``, ``sum_i (F_i + eps)`` and ``sum_i theta_i``
    (for tensors without a Fisher in some model, which are simple-averaged)."""

    def __init__(self, minimal_fisher_weight: float):
        self.eps = minimal_fisher_weight
        self.num: dict[str, torch.Tensor] = {}
        self.den: dict[str, torch.Tensor] = {}
        self.plain: dict[str, torch.Tensor] = {}
        self.has_fisher: dict[str, bool] = {}
        self.ref: dict[str, torch.Tensor] = {}
        self.first = ""
        self.n = 0

    def add(self, name: str, state: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]) -> None:
        state = {k: v.detach().cpu() for k, v in state.items()}
        if self.n == 0:
            self.first = name
            self.ref = {k: v.clone() if not v.dtype.is_floating_point else torch.empty(v.shape, dtype=v.dtype,
                                                                                       device="meta")
                        for k, v in state.items()}
        for k, ref in self.ref.items():
            if k not in state or state[k].shape != ref.shape:
                raise ModelMismatchError(f"Tensor '{k}' is missing or has another shape in model '{name}' than in "
                                         f"'{self.first}'; merge models of one architecture.")
            if not ref.dtype.is_floating_point:
                continue
            v = state[k].to(torch.float32)
            self.plain[k] = self.plain[k] + v if k in self.plain else v.clone()
            f = fisher.get(k)
            self.has_fisher[k] = self.has_fisher.get(k, True) and f is not None
            if self.has_fisher[k]:
                if k not in self.num:
                    self.num[k] = torch.zeros_like(v)
                    self.den[k] = torch.zeros_like(v)
                fisher_accumulate(self.num[k], self.den[k], v, f, self.eps)
            else:  # no Fisher in this model: the tensor is simple-averaged
                self.num.pop(k, None)
                self.den.pop(k, None)
        self.n += 1

    def finish(self) -> dict[str, torch.Tensor]:
        out = {}
        for k, ref in self.ref.items():
            if not ref.dtype.is_floating_point:
                out[k] = ref
            elif self.has_fisher[k]:
                out[k] = fisher_finish(self.num[k], self.den[k]).to(ref.dtype)
            else:
                out[k] = (self.plain[k] / self.n).to(ref.dtype)
        return out


def _load_merged(model: nn.Module, state: dict[str, Any], first: str) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ModelMismatchError(f"Merged tensors {list(unexpected)[:3]} do not fit model '{first}'.")
