"""Concrete subspace learning: a shared, meta-learned concrete mask on the task vectors (task arithmetic or
AdaMerging as the merge)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.errors import ConfigError
from fusion_bench.kernels.data.concrete import masked_merge, sample_concrete_mask
from fusion_bench.methods._task_data import TaskDataMethod, progress
from fusion_bench.methods.base import FusionResult, MethodConfig, register_method
from fusion_bench.methods.test_time.adamerging import entropy, load_task_vectors
from fusion_bench.utils import seeded_generator

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool


def _shared_options():
    return dict(
        temperature=option(0.5, gt=0.0, le=100.0, help="Concrete temperature T of the relaxed Bernoulli mask."),
        initial_logits=option(0.0, ge=-100.0, le=100.0, help="Initial mask logits (0: keep probability 0.5)."),
        lr=option(1e-3, gt=0.0, le=10.0, help="Adam learning rate of the mask logits."),
        max_steps=option(2000, ge=1, le=10**7, help="Mask-learning steps (each on one batch of every task)."),
        batch_size=option(16, ge=1, le=2**20, help="Unlabeled test inputs of each task per forward pass."),
        eval_mask_type=option("continuous", choices=("continuous", "discrete"), help="The mask of the final merge: "
                              "one seeded continuous sample (the authors' default) or a discrete Bernoulli sample."),
    )


@dataclass
class ConcreteTaskArithmeticConfig(MethodConfig):
    scaling_factor: float = option(0.3, ge=-100.0, le=100.0, help="lambda of theta_0 + M * lambda sum_i tau_i "
                                   "(fixed).")
    temperature: float = _shared_options()["temperature"]
    initial_logits: float = _shared_options()["initial_logits"]
    lr: float = _shared_options()["lr"]
    max_steps: int = _shared_options()["max_steps"]
    batch_size: int = _shared_options()["batch_size"]
    eval_mask_type: str = _shared_options()["eval_mask_type"]
    max_test_samples: int | None = option(None, ge=1, le=10**9, help="Use at most this many evenly spaced test "
                                          "inputs per task (null: the whole split).")
    split: str = option("test", help="The split whose inputs (never labels) the mask adapts to.")
    adapter: str = option("auto", choices=("auto", "clip", "generic"),
                          help="How models become classifiers: clip (zero-shot text heads of the pool's CLIP), "
                          "generic (model(x) -> logits), auto (clip for CLIP pools).")
    image_column: str | None = option(None, help="Image column of CLIP datasets (null: detected).")
    label_column: str | None = option(None, help="Label column name, only to locate the images (never read).")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")
    seed: int = option(0, **SEED_RANGE, help="Seed of the mask noise and of the batch sampling.")
    progress: bool = option(True, help="Show a progress bar on a terminal.")


@dataclass
class ConcreteAdaMergingConfig(MethodConfig):
    granularity: str = option("layer_wise", choices=("task_wise", "layer_wise"), help="AdaMerging coefficients: one "
                              "per task, or per task and parameter tensor.")
    init_lambda: float = option(0.3, ge=-100.0, le=100.0, help="Initial AdaMerging coefficients (also the value the "
                                "inner step restarts from at every mask step).")
    base_lr: float = option(1.0, gt=0.0, le=100.0, help="Adam learning rate of the inner (lower-level) coefficient "
                            "step during mask learning (the authors' 1).")
    adamerging_lr: float = option(1e-3, gt=0.0, le=10.0, help="Adam learning rate of the final AdaMerging.")
    max_adamerging_steps: int = option(1000, ge=0, le=10**7, help="Final AdaMerging steps with the learned mask.")
    clamp_lambdas: bool = option(False, help="Use clamp(lambda, 0, 1) in the merge.")
    temperature: float = _shared_options()["temperature"]
    initial_logits: float = _shared_options()["initial_logits"]
    lr: float = _shared_options()["lr"]
    max_steps: int = option(1000, ge=1, le=10**7, help="Mask-learning steps (each: one inner coefficient step, then "
                            "one mask step).")
    batch_size: int = _shared_options()["batch_size"]
    eval_mask_type: str = _shared_options()["eval_mask_type"]
    max_test_samples: int | None = option(None, ge=1, le=10**9, help="Use at most this many evenly spaced test "
                                          "inputs per task (null: the whole split).")
    split: str = option("test", help="The split whose inputs (never labels) the mask and coefficients adapt to.")
    adapter: str = option("auto", choices=("auto", "clip", "generic"),
                          help="How models become classifiers: clip (zero-shot text heads of the pool's CLIP), "
                          "generic (model(x) -> logits), auto (clip for CLIP pools).")
    image_column: str | None = option(None, help="Image column of CLIP datasets (null: detected).")
    label_column: str | None = option(None, help="Label column name, only to locate the images (never read).")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")
    seed: int = option(0, **SEED_RANGE, help="Seed of the mask noise and of the batch sampling.")
    progress: bool = option(True, help="Show a progress bar on a terminal.")


class _ConcreteBase(TaskDataMethod):
    requires_pretrained = True
    identity_on_equal_inputs = True
    permutation_invariant = False  # sampling order follows the pool's order

    def _setup(self, modelpool: ModelPool):
        cfg = self.config
        tv = load_task_vectors(self, modelpool)
        data, classifiers, proxy = tv.task_data(self, modelpool)
        logits = {k: torch.full_like(tv.theta0[k], cfg.initial_logits, requires_grad=True) for k in tv.keys}
        noise = seeded_generator(cfg.seed, self.name, "mask")
        batches = seeded_generator(cfg.seed, self.name, "batches")
        return tv, data, classifiers, proxy, logits, noise, batches

    @staticmethod
    def _loss(tv, data, classifiers, proxy, theta, batch_size, gen) -> torch.Tensor:
        loss = torch.zeros((), device=tv.device)
        for n in tv.names:
            proxy.params = {**theta, **tv.heads.get(n, {})}
            d = data[n]
            idx = torch.randint(0, len(d), (min(batch_size, len(d)),), generator=gen)
            loss = loss + entropy(classifiers[n](d.take(idx).to(tv.device)))
        return loss

    def _final(self, tv, logits, noise) -> dict[str, torch.Tensor]:
        cfg = self.config
        with torch.no_grad():
            return sample_concrete_mask({k: v.detach() for k, v in logits.items()}, cfg.temperature, noise,
                                        discrete=cfg.eval_mask_type == "discrete")

    @staticmethod
    def _mask_stats(logits) -> dict[str, float]:
        with torch.no_grad():
            p = torch.cat([torch.sigmoid(v.detach()).reshape(-1) for v in logits.values()])
        return {"mean_keep_probability": float(p.mean()), "share_above_half": float((p > 0.5).float().mean())}

    def _data_used(self, data) -> dict[str, Any]:
        cfg = self.config
        n_images = {n: len(d) for n, d in data.items()}
        return {"split": cfg.split, "labels_read": False, "unlabeled_inputs_per_task": n_images,
                "unlabeled_inputs": int(sum(n_images.values()))}


@register_method
class ConcreteTaskArithmetic(_ConcreteBase):
    """Concrete subspace learning with task arithmetic: a shared concrete mask learned on unlabeled test inputs.

    Tang et al. 2023, "Concrete Subspace Learning based Interference Elimination for Multi-task Model Fusion" (task
    arithmetic variant, as the authors' ``clip_concrete_task_arithmetic``). One mask ``M`` (relaxed Bernoulli,
    logits ``initial_logits``, temperature ``T``; each tensor's sample divided by its mean) is shared by all task
    vectors: ``theta = theta_0 + M * lambda sum_i tau_i`` with ``lambda = scaling_factor`` fixed. Each step samples
    ``M`` (reparameterised) and takes one Adam step of the logits on the summed mean prediction entropy of one
    batch of unlabeled inputs of every task. The final merge uses one seeded sample of ``M`` (``eval_mask_type``).

    Args:
        config: :class:`ConcreteTaskArithmeticConfig`.
    """

    name = "concrete_task_arithmetic"
    config_class: ClassVar = ConcreteTaskArithmeticConfig
    summary = "Task arithmetic through a shared concrete mask learned by test-time entropy minimisation."
    variant = ("Tang et al. 2023, concrete TA: theta_0 + M * lambda sum_i tau_i, M ~ RelaxedBernoulli(logits, T=0.5) "
               "normalised by its mean per tensor, logits (init 0) minimise the summed test entropy with Adam; final "
               "merge with one sampled mask.")

    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        cfg = self.config
        tv, data, classifiers, proxy, logits, noise, batches = self._setup(modelpool)
        lam = torch.full((len(tv.names),), cfg.scaling_factor, device=tv.device)
        opt = torch.optim.Adam(list(logits.values()), lr=cfg.lr)
        history = []
        with progress(self.name, cfg.max_steps, cfg.progress and sys.stderr.isatty()) as adv:
            for _ in range(cfg.max_steps):
                mask = sample_concrete_mask(logits, cfg.temperature, noise)
                loss = self._loss(tv, data, classifiers, proxy, masked_merge(tv.theta0, tv.vectors, tv.keys, lam, mask),
                                  cfg.batch_size, batches)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                history.append(float(loss.detach()))
                adv()
        proxy.params = {}
        mask = self._final(tv, logits, noise)
        with torch.no_grad():
            merged = masked_merge(tv.theta0, tv.vectors, tv.keys, lam, mask)
        meta = dict(adapter=tv.adapter_kind, entropy_first=history[0], entropy_last=history[-1],
                    entropy_history=history[:: max(1, len(history) // 50)], mask=self._mask_stats(logits),
                    data_used=self._data_used(data))
        return tv.result(self, t0, merged, meta)


@register_method
class ConcreteAdaMerging(_ConcreteBase):
    """Concrete subspace learning with AdaMerging: the mask is meta-learned through one inner AdaMerging step, then
    AdaMerging runs with the learned mask.

    Tang et al. 2023 (AdaMerging variant, as the authors' ``clip_concrete_{task,layer}_wise_adamerging``). Mask
    ``M`` as in :class:`ConcreteTaskArithmetic`; ``theta = theta_0 + M * sum_i lambda_i(^k) tau_i``. Each of
    ``max_steps`` steps: sample ``M``; the merge with the current coefficients and ``M`` held fixed gives the
    entropy gradient of the coefficients, which restart from ``init_lambda`` and take one Adam step (``base_lr``;
    the optimiser's moments persist across steps): the lower-level problem; then the merge with these coefficients
    and the sampled ``M`` gives the entropy on fresh batches, whose gradient updates the mask logits (Adam, ``lr``;
    first-order: the coefficients are constants for it). Afterwards one seeded mask is drawn and AdaMerging
    (coefficients from ``init_lambda``, Adam ``adamerging_lr``, ``max_adamerging_steps``) runs with it fixed.

    Args:
        config: :class:`ConcreteAdaMergingConfig`.
    """

    name = "concrete_adamerging"
    config_class: ClassVar = ConcreteAdaMergingConfig
    summary = "AdaMerging through a shared concrete mask meta-learned on unlabeled test inputs."
    variant = ("Tang et al. 2023, concrete AdaMerging: mask logits learned through a one-step inner AdaMerging update "
               "(restart at 0.3, Adam lr 1), then layer-/task-wise AdaMerging with the sampled mask fixed.")

    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        cfg = self.config
        tv, data, classifiers, proxy, logits, noise, batches = self._setup(modelpool)
        shape = (len(tv.names),) if cfg.granularity == "task_wise" else (len(tv.names), len(tv.keys))
        lambdas = torch.full(shape, cfg.init_lambda, device=tv.device, requires_grad=True)

        def lam() -> torch.Tensor:
            return lambdas.clamp(0.0, 1.0) if cfg.clamp_lambdas else lambdas

        base_opt = torch.optim.Adam([lambdas], lr=cfg.base_lr)
        opt = torch.optim.Adam(list(logits.values()), lr=cfg.lr)
        history = []
        show = cfg.progress and sys.stderr.isatty()
        with progress(self.name, cfg.max_steps + cfg.max_adamerging_steps, show) as adv:
            for _ in range(cfg.max_steps):
                mask = sample_concrete_mask(logits, cfg.temperature, noise)
                fixed = {k: v.detach() for k, v in mask.items()}
                inner = self._loss(tv, data, classifiers, proxy,
                                   masked_merge(tv.theta0, tv.vectors, tv.keys, lam(), fixed), cfg.batch_size, batches)
                base_opt.zero_grad(set_to_none=True)
                inner.backward()
                with torch.no_grad():
                    lambdas.fill_(cfg.init_lambda)  # the gradient was taken at the previous coefficients
                base_opt.step()
                outer = self._loss(tv, data, classifiers, proxy,
                                   masked_merge(tv.theta0, tv.vectors, tv.keys, lam().detach(), mask), cfg.batch_size,
                                   batches)
                opt.zero_grad(set_to_none=True)
                outer.backward()
                opt.step()
                history.append(float(outer.detach()))
                adv()
            mask = self._final(tv, logits, noise)
            with torch.no_grad():
                lambdas.fill_(cfg.init_lambda)
            ada_opt = torch.optim.Adam([lambdas], lr=cfg.adamerging_lr)
            ada_history = []
            for _ in range(cfg.max_adamerging_steps):
                loss = self._loss(tv, data, classifiers, proxy, masked_merge(tv.theta0, tv.vectors, tv.keys, lam(), mask),
                                  cfg.batch_size, batches)
                ada_opt.zero_grad(set_to_none=True)
                loss.backward()
                ada_opt.step()
                ada_history.append(float(loss.detach()))
                adv()
        proxy.params = {}
        final = lam().detach()
        with torch.no_grad():
            merged = masked_merge(tv.theta0, tv.vectors, tv.keys, final, mask)
        if cfg.granularity == "task_wise":
            lam_meta: Any = {n: float(final[i]) for i, n in enumerate(tv.names)}
        else:
            lam_meta = {n: {k: float(final[i, j]) for j, k in enumerate(tv.keys)} for i, n in enumerate(tv.names)}
        meta = dict(adapter=tv.adapter_kind, granularity=cfg.granularity, lambdas=lam_meta,
                    lambda_mean={n: float(final[i].mean()) for i, n in enumerate(tv.names)},
                    mask_entropy_first=history[0], mask_entropy_last=history[-1],
                    adamerging_entropy_last=ada_history[-1] if ada_history else None,
                    mask=self._mask_stats(logits), data_used=self._data_used(data))
        if not tv.names:  # pragma: no cover - check_tasks rejects empty pools
            raise ConfigError(f"{self.name}: no models to merge.")
        return tv.result(self, t0, merged, meta)
