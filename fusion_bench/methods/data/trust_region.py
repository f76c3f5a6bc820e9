"""Task arithmetic in a trust region: task vectors restricted to the entries where tasks do not conflict."""

from __future__ import annotations

import copy
import sys
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.kernels.data.trust_region import trust_region_omega, trust_region_threshold
from fusion_bench.methods._task_data import (
    TaskDataMethod,
    check_tasks,
    data_used,
    make_adapter,
    progress,
)
from fusion_bench.methods.base import FusionResult, MethodConfig, register_method
from fusion_bench.utils import count_parameters, resolve_device

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool


@dataclass
class TrustRegionConfig(MethodConfig):
    scaling_factor: float = option(0.3, ge=-100.0, le=100.0, help="lambda: theta_0 + lambda * sum_i M * tau_i.")
    threshold_quantile: float = option(0.99, ge=0.0, le=1.0, help="q: entries whose conflict score Omega is below "
                                       "its q-quantile are kept (the rest, the most conflicting, are removed).")
    zero_shot: bool = option(False, help="true: estimate each task's gradient by |tau_i| (no data); false: the mean "
                             "absolute per-example gradient of the task's cross-entropy at the pretrained model.")
    max_samples: int = option(128, ge=1, le=10**9, help="Labelled examples of each task for its gradient (evenly "
                              "spaced over the split).")
    batch_size: int = option(32, ge=1, le=2**20, help="Examples per vectorised per-example gradient pass.")
    split: str = option("train", help="The labelled split the gradients are computed on.")
    adapter: str = option("auto", choices=("auto", "clip", "generic"),
                          help="How models become classifiers: clip (zero-shot text heads of the pool's CLIP), "
                          "generic (model(x) -> logits), auto (clip for CLIP pools).")
    image_column: str | None = option(None, help="Image column of CLIP datasets (null: detected).")
    label_column: str | None = option(None, help="Label column (null: detected).")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")
    seed: int = option(0, **SEED_RANGE, help="Seed (the computation is deterministic; kept for the report).")
    progress: bool = option(True, help="Show a progress bar on a terminal.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold_quantile <= 1.0:
            raise ConfigError(f"method.threshold_quantile={self.threshold_quantile} must be in [0, 1].")
        for k in ("max_samples", "batch_size"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"method.{k}={getattr(self, k)} must be positive.")


def per_example_abs_grads(classifier: nn.Module, params: dict[str, nn.Parameter], inputs, labels: torch.Tensor,
                          batch_size: int, device: torch.device, advance=lambda n=1: None) -> dict[str, torch.Tensor]:
    """``sum_n |d/d theta CE(classifier(x_n), y_n)|`` for every parameter in ``params`` (float32, CPU): one gradient
    per example (``torch.func.vmap(grad)``, else a per-example backward loop with the same numbers)."""
    from torch.func import functional_call, grad, vmap

    acc = {k: torch.zeros_like(p, dtype=torch.float32, device=device) for k, p in params.items()}
    fixed = {k: v.detach() for k, v in params.items()}

    def ce(pvals, x, y):
        logits = functional_call(classifier, pvals, (x.unsqueeze(0),), strict=False)
        return F.cross_entropy(logits.float(), y.reshape(1))

    use_vmap = True
    for s in range(0, len(inputs), batch_size):
        x = inputs.take(slice(s, s + batch_size)).to(device)
        y = labels[s:s + batch_size].to(device)
        done = False
        if use_vmap:
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*batching rule.*")
                    g = vmap(grad(ce), in_dims=(None, 0, 0), randomness="different")(fixed, x, y)
                for k in acc:
                    acc[k] += g[k].float().abs().sum(0)
                done = True
            except Exception:  # an op without a batching rule: per-example loop from now on
                use_vmap = False
        if not done:
            for j in range(len(x)):
                classifier.zero_grad(set_to_none=True)
                F.cross_entropy(classifier(x[j:j + 1]).float(), y[j:j + 1]).backward()
                for k, p in params.items():
                    if p.grad is not None:
                        acc[k] += p.grad.detach().float().abs()
            classifier.zero_grad(set_to_none=True)
        advance(len(x))
    return {k: v.cpu() for k, v in acc.items()}


@register_method
class TrustRegionTaskArithmetic(TaskDataMethod):
    """Task arithmetic in a trust region (TATR): remove the task-vector entries where the tasks conflict.

    Sun et al., ICLR 2025, "Task Arithmetic in Trust Region". With ``tau_i = theta_i - theta_0`` over every floating
    parameter, ``g_i`` the mean absolute per-example gradient of task ``i``'s cross-entropy at ``theta_0`` on
    ``max_samples`` labelled examples of task ``i`` (``zero_shot``: ``g_i = |tau_i|``, no data), the conflict score
    is ``Omega = sum_i sum_{j != i} g_i * |tau_j|`` (how much task j's update moves a parameter that task i's loss is
    sensitive to). Over the whole flattened model, entries with ``Omega`` below its ``threshold_quantile`` value
    (0-based position ``floor(n q)`` of the ascending order, strict ``<``) form the trust region ``M``; then
    ``theta = theta_0 + lambda * sum_i M * tau_i``. Buffers come from the base model.

    Args:
        config: :class:`TrustRegionConfig`.
    """

    name = "trust_region_task_arithmetic"
    config_class: ClassVar = TrustRegionConfig
    uses_data = True
    requires_pretrained = True
    summary = "Task arithmetic restricted to the entries where the tasks' gradients and task vectors do not conflict."
    variant = ("Sun et al. 2025 (TATR): Omega = sum_i sum_{j!=i} mean_n|grad CE_i(theta_0)| * |tau_j| (zero_shot: "
               "|tau_i| for the gradient); keep Omega < its q-quantile over the whole model; theta_0 + lambda * "
               "sum_i M tau_i.")

    def check_ready(self, modelpool: ModelPool) -> list[str]:
        return [] if self.config.zero_shot else super().check_ready(modelpool)

    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        cfg = self.config
        if not modelpool.has_pretrained:
            raise ModelMismatchError(f"{self.name} needs the base model: add '_pretrained_' to modelpool.models.")
        names = check_tasks(modelpool, self.name, custom_adapter=self.adapter is not None or cfg.zero_shot)
        device = resolve_device(cfg.device)
        base = modelpool.load_pretrained_model()
        base_state = {k: v.detach() for k, v in base.state_dict().items()}
        keys = [k for k, p in base.named_parameters() if p.dtype.is_floating_point]
        theta0 = torch.cat([base_state[k].reshape(-1).float() for k in keys])
        taus = []
        for n in names:
            sd = modelpool.load_model(n).state_dict()
            for k in keys:
                if k not in sd or sd[k].shape != base_state[k].shape:
                    raise ModelMismatchError(f"Tensor '{k}' is missing or has another shape in model '{n}' than in "
                                             "'_pretrained_'; merge models fine-tuned from the base.")
            taus.append(torch.cat([sd[k].reshape(-1).float() for k in keys]) - theta0)
        used: dict[str, int] = {}
        adapter_kind = "none"
        if cfg.zero_shot:
            grads = [t.abs() for t in taus]
        else:
            adapter = self.adapter or make_adapter(modelpool, cfg.adapter, cfg.image_column, cfg.label_column)
            adapter_kind = adapter.kind
            work = copy.deepcopy(base).to(device).float().eval()
            params = dict(work.named_parameters())
            for p in params.values():
                p.requires_grad_(True)
            grads = []
            show = cfg.progress and sys.stderr.isatty()
            for n in names:
                data = adapter.examples(n, cfg.split, cfg.max_samples, with_labels=True)
                used[n] = len(data)
                clf = adapter.classifier(work, n).to(device).eval()
                prefix = _prefix(clf, work)
                with progress(f"trust region grads {n}", len(data), show) as adv:
                    g = per_example_abs_grads(clf, {prefix + k: params[k] for k in keys}, data, data.labels,
                                              cfg.batch_size, device, adv)
                grads.append(torch.cat([g[prefix + k].reshape(-1) for k in keys]) / len(data))
        omega = trust_region_omega(grads, taus)
        thr = trust_region_threshold(omega, cfg.threshold_quantile)
        mask = omega < thr
        merged = theta0 + cfg.scaling_factor * (sum(taus) * mask)
        out = copy.deepcopy(base).cpu()
        state, off = dict(base_state), 0
        for k in keys:
            size = base_state[k].numel()
            state[k] = merged[off:off + size].reshape(base_state[k].shape).to(base_state[k].dtype)
            off += size
        out.load_state_dict(state)
        return FusionResult("merged", model=out, metadata=self._metadata(
            t0, extra_parameters=0, parameters=count_parameters(out), adapter=adapter_kind,
            omega_threshold=thr, kept_fraction=float(mask.float().mean()),
            data_used=(data_used(cfg.split, True, used) if not cfg.zero_shot else
                       {"split": None, "labels_read": False, "examples": 0, "note": "zero_shot: |tau_i| as gradient"})))


def _prefix(classifier: nn.Module, model: nn.Module) -> str:
    if classifier is model:
        return ""
    for n, m in classifier.named_modules():
        if m is model:
            return n + "." if n else ""
    raise ModelMismatchError("The adapter's classifier does not contain the model it wraps; it must call the model.")
