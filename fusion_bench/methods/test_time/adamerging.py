"""AdaMerging: task-arithmetic coefficients learned by entropy minimisation on unlabeled test inputs."""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.methods._task_data import (
    TaskDataMethod,
    TaskExamples,
    check_tasks,
    make_adapter,
    progress,
)
from fusion_bench.methods.base import FusionResult, MethodConfig, register_method
from fusion_bench.utils import count_parameters, resolve_device, seeded_generator

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool


@dataclass
class AdaMergingConfig(MethodConfig):
    granularity: str = option("layer_wise", choices=("task_wise", "layer_wise"),
                              help="task_wise: one lambda per task vector; layer_wise: one lambda per task vector "
                              "and parameter tensor.")
    init_lambda: float = option(0.3, ge=-100.0, le=100.0, help="Initial value of every lambda (the paper's 0.3).")
    steps: int = option(200, ge=1, le=10**7, help="Adam steps (each on one batch of every task).")
    lr: float = option(1e-3, gt=0.0, le=10.0, help="Adam learning rate of the lambdas.")
    batch_size: int = option(16, ge=1, le=2**20, help="Unlabeled test inputs of each task per step.")
    max_test_samples: int | None = option(None, ge=1, le=10**9, help="Use at most this many evenly spaced test inputs per task "
                                          "(null: the whole split).")
    clamp_lambdas: bool = option(False, help="Clamp lambdas to [0, 1] after each step.")
    split: str = option("test", help="The split whose inputs (never labels) the lambdas adapt to.")
    adapter: str = option("auto", choices=("auto", "clip", "generic"),
                          help="How models become classifiers: clip (zero-shot text heads of the pool's CLIP), "
                          "generic (model(x) -> logits), auto (clip for CLIP pools).")
    image_column: str | None = option(None, help="Image column of CLIP datasets (null: detected).")
    label_column: str | None = option(None, help="Label column name, only to locate the images (never read).")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")
    seed: int = option(0, **SEED_RANGE, help="Seed of the batch sampling.")
    progress: bool = option(True, help="Show a progress bar on a terminal.")

    def __post_init__(self) -> None:
        for k in ("steps", "batch_size"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"method.{k}={getattr(self, k)} must be positive.")
        if self.lr <= 0:
            raise ConfigError(f"method.lr={self.lr} must be positive.")
        if self.max_test_samples is not None and self.max_test_samples <= 0:
            raise ConfigError(f"method.max_test_samples={self.max_test_samples} must be positive or null.")


class MergedForward(nn.Module):
    """Runs ``module`` with the tensors ``params`` (set before each call) through ``torch.func.functional_call``,
    so that gradients of its outputs reach whatever ``params`` was computed from."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._module = [module]  # not a submodule: its own parameters are never used
        self.params: dict[str, torch.Tensor] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self._module[0], self.params, args, kwargs, strict=False)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the softmax of ``logits`` over a batch."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def merge_params(base: dict[str, torch.Tensor], vectors: dict[str, list[torch.Tensor]], keys: list[str],
                 lambdas: torch.Tensor) -> dict[str, torch.Tensor]:
    """``theta_0 + sum_i lambda_i[k] tau_i[k]`` for every key (``lambdas``: (tasks,) or (tasks, len(keys)))."""
    out = {}
    for j, k in enumerate(keys):
        lam = lambdas[:, j] if lambdas.ndim == 2 else lambdas
        out[k] = base[k] + sum(lam[i] * t for i, t in enumerate(vectors[k]))
    return out


@register_method
class AdaMerging(TaskDataMethod):
    """AdaMerging: task-arithmetic coefficients learned by minimising prediction entropy on unlabeled test data.

    Yang et al., ICLR 2024, "AdaMerging: adaptive model merging for multi-task learning":
    ``theta = theta_0 + sum_i lambda_i tau_i`` with ``tau_i = theta_i - theta_0`` over every floating
    parameter tensor (task-wise: one ``lambda_i``; layer-wise: one ``lambda_i^k`` per parameter tensor
    ``k``, as FusionBench's layer-wise variant), all initialised to ``init_lambda`` (0.3). The lambdas
    minimise ``sum_t H(p_theta(. | x))``, the mean Shannon entropy of the merged model's predictions on a
    batch of UNLABELED inputs of each task ``t`` (its ``split``, default test: test-time adaptation;
    labels are never read), with Adam for ``steps`` steps (one batch per task per step, sampled with a
    seeded generator). Task ``t``'s predictions use its classifier (CLIP: its zero-shot head). The
    merged model's forward is ``torch.func.functional_call`` with the merged tensors, so gradients
    reach the lambdas. Non-floating buffers come from the base model.

    Args:
        config: :class:`AdaMergingConfig` (granularity, init_lambda, steps, lr, batch_size,
            max_test_samples, clamp_lambdas, split, adapter, device, seed).
    """

    name = "adamerging"
    config_class: ClassVar = AdaMergingConfig
    uses_data = True
    requires_pretrained = True
    identity_on_equal_inputs = True
    permutation_invariant = False  # sampling order follows the pool's order
    summary = "Task-wise or layer-wise task-arithmetic coefficients learned by test-time entropy minimisation."
    variant = ("Yang et al. 2024: theta = theta_0 + sum_i lambda_i(^k) tau_i, lambdas (init 0.3; per task or per task "
               "and parameter tensor) minimise the summed mean prediction entropy on unlabeled test batches of every "
               "task with Adam for a fixed number of steps; functional_call forward.")

    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        cfg = self.config
        if not modelpool.has_pretrained:
            raise ModelMismatchError("adamerging needs the base model: add '_pretrained_' to modelpool.models.")
        names = check_tasks(modelpool, self.name, custom_adapter=self.adapter is not None)
        device = resolve_device(cfg.device)
        adapter = self.adapter or make_adapter(modelpool, cfg.adapter, cfg.image_column, cfg.label_column)
        base_model = modelpool.load_pretrained_model()
        base_state = {k: v.detach() for k, v in base_model.state_dict().items()}
        keys = [k for k, _ in base_model.named_parameters() if base_state[k].dtype.is_floating_point]
        theta0 = {k: base_state[k].to(device, torch.float32) for k in keys}
        vectors: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for name in names:
            sd = modelpool.load_model(name).state_dict()
            for k in keys:
                if k not in sd or sd[k].shape != base_state[k].shape:
                    raise ModelMismatchError(f"Tensor '{k}' is missing or has another shape in model '{name}' than in "
                                             "'_pretrained_'; merge models fine-tuned from the base.")
                vectors[k].append(sd[k].detach().to(device, torch.float32) - theta0[k])
        data: dict[str, TaskExamples] = {
            n: adapter.examples(n, cfg.split, cfg.max_test_samples, with_labels=False) for n in names}
        work = copy.deepcopy(base_model).to(device).float().eval()
        for p in work.parameters():
            p.requires_grad_(False)
        proxy = MergedForward(work)
        classifiers = {n: adapter.classifier(proxy, n).to(device).eval() for n in names}
        for c in classifiers.values():
            for p in c.parameters():
                p.requires_grad_(False)
        shape = (len(names),) if cfg.granularity == "task_wise" else (len(names), len(keys))
        lambdas = torch.full(shape, cfg.init_lambda, dtype=torch.float32, device=device, requires_grad=True)
        opt = torch.optim.Adam([lambdas], lr=cfg.lr)
        gen = seeded_generator(cfg.seed, "adamerging")
        history: list[float] = []
        show = cfg.progress and sys.stderr.isatty()
        with progress("adamerging", cfg.steps, show) as adv:
            for _ in range(cfg.steps):
                proxy.params = merge_params(theta0, vectors, keys, lambdas)
                loss = torch.zeros((), device=device)
                for n in names:
                    d = data[n]
                    idx = torch.randint(0, len(d), (min(cfg.batch_size, len(d)),), generator=gen)
                    loss = loss + entropy(classifiers[n](d.take(idx).to(device)))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if cfg.clamp_lambdas:
                    with torch.no_grad():
                        lambdas.clamp_(0.0, 1.0)
                history.append(float(loss.detach()))
                adv()
        proxy.params = {}
        lam = lambdas.detach()
        with torch.no_grad():
            merged = merge_params(theta0, vectors, keys, lam)
        out = copy.deepcopy(base_model).cpu()
        state = {k: (merged[k].cpu().to(base_state[k].dtype) if k in merged else v.clone()) for k, v in base_state.items()}
        out.load_state_dict(state, strict=False)
        if cfg.granularity == "task_wise":
            lam_meta: Any = {n: float(lam[i]) for i, n in enumerate(names)}
        else:
            lam_meta = {n: {k: float(lam[i, j]) for j, k in enumerate(keys)} for i, n in enumerate(names)}
        n_images = {n: len(d) for n, d in data.items()}
        return FusionResult("merged", model=out, metadata=self._metadata(
            t0, extra_parameters=0, parameters=count_parameters(out), adapter=adapter.kind,
            granularity=cfg.granularity, lambdas=lam_meta,
            lambda_mean={n: float(lam[i].mean()) for i, n in enumerate(names)},
            entropy_first=history[0], entropy_last=history[-1], entropy_history=history[:: max(1, len(history) // 50)],
            data_used={"split": cfg.split, "labels_read": False, "unlabeled_inputs_per_task": n_images,
                       "unlabeled_inputs": int(sum(n_images.values())),
                       "inputs_seen": cfg.steps * sum(min(cfg.batch_size, v) for v in n_images.values())}))
