"""Frank-Wolfe merging (hard and soft): the merged model moves toward the checkpoint that best opposes the loss
gradient, iteration after iteration."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.errors import ConfigError
from fusion_bench.kernels.data.adamerging import merge_params
from fusion_bench.kernels.data.frank_wolfe import fw_select, fw_step_size
from fusion_bench.methods._task_data import TaskDataMethod, TaskExamples, progress
from fusion_bench.methods.base import FusionResult, MethodConfig, register_method
from fusion_bench.methods.test_time.adamerging import MergedForward, entropy, load_task_vectors
from fusion_bench.utils import seeded_generator

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool



@dataclass
class FrankWolfeHardConfig(MethodConfig):
    max_iters: int = option(10, ge=1, le=10**6, help="Frank-Wolfe iterations.")
    step_size: float = option(0.1, gt=0.0, le=1.0, help="s: iteration t (0-based) moves by gamma_t = 2/(t+2) * s * "
                              "scaling_factor toward the selected checkpoint.")
    scaling_factor: float = option(0.3, gt=0.0, le=1.0, help="Task-arithmetic coefficient of the starting point "
                                   "theta_0 + lambda sum_i tau_i, and factor of every step.")
    init: str = option("task_arithmetic", choices=("task_arithmetic", "base"), help="Starting point: task "
                       "arithmetic with scaling_factor, or the pretrained model.")
    granularity: str = option("task", choices=("task", "layer"), help="task: one checkpoint per iteration (summed "
                              "per-tensor cosine); layer: each parameter tensor picks its own checkpoint.")
    loss_fn: str = option("cross_entropy", choices=("cross_entropy", "entropy"), help="Loss whose gradient drives "
                          "the selection: cross-entropy on labelled train examples, or prediction entropy on "
                          "unlabeled test inputs.")
    dataset_size: int = option(100, ge=1, le=10**9, help="Examples of every task per iteration (drawn from a seeded "
                               "shuffled cycle over the split).")
    batch_size: int = option(32, ge=1, le=2**20, help="Examples per forward pass of the gradient.")
    split: str = option("train", help="Split of the cross-entropy examples.")
    test_split: str = option("test", help="Split of the unlabeled inputs (loss_fn=entropy).")
    adapter: str = option("auto", choices=("auto", "clip", "generic"),
                          help="How models become classifiers: clip (zero-shot text heads of the pool's CLIP), "
                          "generic (model(x) -> logits), auto (clip for CLIP pools).")
    image_column: str | None = option(None, help="Image column of CLIP datasets (null: detected).")
    label_column: str | None = option(None, help="Label column (null: detected).")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")
    seed: int = option(0, **SEED_RANGE, help="Seed of the example sampling.")
    progress: bool = option(True, help="Show a progress bar on a terminal.")


@dataclass
class FrankWolfeSoftConfig(MethodConfig):
    max_iters: int = option(10, ge=1, le=10**6, help="Frank-Wolfe iterations.")
    granularity: str = option("task", choices=("task", "layer"), help="task: each task's gradient selects one "
                              "checkpoint; layer: each parameter tensor picks its own.")
    dataset_size: int = option(100, ge=1, le=10**9, help="Labelled examples of a task per gradient (drawn from a "
                               "seeded shuffled cycle over the split).")
    ada_iters: int = option(500, ge=1, le=10**7, help="AdaMerging steps per iteration (entropy on test batches).")
    ada_init: float = option(0.3, ge=-100.0, le=100.0, help="Initial AdaMerging coefficients at the first iteration.")
    ada_coeff: float = option(1e-8, ge=-100.0, le=100.0, help="Initial AdaMerging coefficients at later iterations.")
    ada_lr: float = option(1e-3, gt=0.0, le=10.0, help="Adam learning rate of the AdaMerging coefficients.")
    ada_batch_size: int = option(16, ge=1, le=2**20, help="Unlabeled test inputs of each task per AdaMerging step.")
    max_test_samples: int | None = option(None, ge=1, le=10**9, help="Use at most this many evenly spaced test "
                                          "inputs per task (null: the whole split).")
    batch_size: int = option(32, ge=1, le=2**20, help="Examples per forward pass of the gradient.")
    split: str = option("train", help="Split of the labelled gradient examples.")
    test_split: str = option("test", help="Split of the AdaMerging inputs (labels never read).")
    adapter: str = option("auto", choices=("auto", "clip", "generic"),
                          help="How models become classifiers: clip (zero-shot text heads of the pool's CLIP), "
                          "generic (model(x) -> logits), auto (clip for CLIP pools).")
    image_column: str | None = option(None, help="Image column of CLIP datasets (null: detected).")
    label_column: str | None = option(None, help="Label column (null: detected).")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")
    seed: int = option(0, **SEED_RANGE, help="Seed of the example sampling.")
    progress: bool = option(True, help="Show a progress bar on a terminal.")


class _Cycle:
    """Examples of one task drawn as a seeded shuffled cycle (a new permutation per pass, like a shuffled
    infinite loader)."""

    def __init__(self, data: TaskExamples, seed: int, task: str):
        self.data = data
        self.gen = seeded_generator(seed, "frank_wolfe", task)
        self.order = torch.randperm(len(data), generator=self.gen)
        self.pos = 0
        self.seen: set[int] = set()

    def draw(self, n: int) -> torch.Tensor:
        out = []
        while n > 0:
            if self.pos == len(self.order):
                self.order, self.pos = torch.randperm(len(self.data), generator=self.gen), 0
            take = self.order[self.pos:self.pos + n]
            out.append(take)
            self.pos += len(take)
            n -= len(take)
        idx = torch.cat(out)
        self.seen.update(int(i) for i in idx)
        return idx


class _FWBase(TaskDataMethod):
    requires_pretrained = True
    permutation_invariant = False  # ties in the selection go to the first candidate

    def _setup(self, modelpool: ModelPool):
        cfg = self.config
        tv = load_task_vectors(self, modelpool)
        classifiers, proxy = tv.classifiers()
        labelled = {n: tv.adapter.examples(n, cfg.split, None, with_labels=True) for n in tv.names}
        for n in tv.names:
            if labelled[n].labels is None or len(labelled[n]) == 0:
                raise ConfigError(f"{self.name}: task '{n}' has no labelled examples in split '{cfg.split}'.")
        cycles = {n: _Cycle(labelled[n], cfg.seed, n) for n in tv.names}
        return tv, classifiers, proxy, cycles

    def _grad(self, tv, classifiers, proxy: MergedForward, theta: dict[str, torch.Tensor], tasks: list[str],
              cycles: dict[str, _Cycle], norm: int, loss_fn: str = "cross_entropy",
              test_cycles: dict[str, _Cycle] | None = None) -> tuple[dict[str, torch.Tensor], float]:
        """Gradient at ``theta`` of ``sum_{t in tasks} sum_{n} loss_t(x_n) / norm`` over ``dataset_size`` examples of
        each task (cross-entropy with labels, or prediction entropy on test inputs)."""
        cfg = self.config
        params = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
        total = 0.0
        grads = {k: torch.zeros_like(v) for k, v in params.items()}
        for t in tasks:
            cyc = (test_cycles or cycles)[t] if loss_fn == "entropy" else cycles[t]
            idx = cyc.draw(cfg.dataset_size)
            for s in range(0, len(idx), cfg.batch_size):
                b = idx[s:s + cfg.batch_size]
                proxy.params = {**params, **tv.heads.get(t, {})}
                logits = classifiers[t](cyc.data.take(b).to(tv.device))
                if loss_fn == "entropy":
                    loss = entropy(logits) * len(b) / norm
                else:
                    loss = F.cross_entropy(logits.float(), cyc.data.labels[b].to(tv.device), reduction="sum") / norm
                g = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for k, gk in zip(params, g):
                    if gk is not None:
                        grads[k] += gk
                total += float(loss.detach())
        proxy.params = {}
        return grads, total


@register_method
class FrankWolfeHard(_FWBase):
    """Frank-Wolfe merging, hard variant: move the merged model toward one checkpoint per iteration.

    Chen et al. 2025, "FW-Merging: Scaling Model Merging with Frank-Wolfe Optimization" (hard variant, as the
    authors' FusionBench ``fw_hard``). Start from ``theta = theta_0 + lambda sum_i tau_i`` (``init``). The candidate
    set is the fine-tuned checkpoints plus the starting point. Iteration ``t``: ``g`` = gradient at ``theta`` of
    the loss summed over ``dataset_size`` examples of every task, divided by ``dataset_size * N`` (cross-entropy
    with each task's head; or prediction entropy); linear minimisation oracle: the candidate ``c`` minimising
    ``sum_p cos(g_p, theta_c,p)`` over parameter tensors ``p`` (``granularity=layer``: each tensor picks its own
    candidate; a tensor with a zero gradient or zero weights counts 0); step ``theta <- theta + gamma_t (theta_c -
    theta)`` with ``gamma_t = 2/(t+2) * step_size * lambda``.

    Args:
        config: :class:`FrankWolfeHardConfig`.
    """

    name = "frank_wolfe_hard"
    config_class: ClassVar = FrankWolfeHardConfig
    summary = "Frank-Wolfe steps toward the checkpoint whose weights best oppose the multi-task loss gradient."
    variant = ("Chen et al. 2025, FW-hard: init task arithmetic (lambda 0.3); per iteration the gradient of the mean "
               "cross-entropy over dataset_size train examples per task; LMO = argmin_c sum_p cos(g_p, theta_c,p) over "
               "the checkpoints and the start; theta += 2/(t+2) * step_size * lambda * (theta_c - theta).")

    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        cfg = self.config
        tv, classifiers, proxy, cycles = self._setup(modelpool)
        names, keys = tv.names, tv.keys
        test_cycles = None
        if cfg.loss_fn == "entropy":
            test_cycles = {n: _Cycle(tv.adapter.examples(n, cfg.test_split, None, with_labels=False), cfg.seed,
                                     n + "/test") for n in names}
        lam0 = torch.full((len(names),), cfg.scaling_factor if cfg.init == "task_arithmetic" else 0.0,
                          device=tv.device)
        theta = merge_params(tv.theta0, tv.vectors, keys, lam0)
        candidates = {n: {k: tv.theta0[k] + tv.vectors[k][i] for k in keys} for i, n in enumerate(names)}
        candidates["initial"] = {k: v.clone() for k, v in theta.items()}
        history = []
        show = cfg.progress and sys.stderr.isatty()
        with progress(self.name, cfg.max_iters, show) as adv:
            for t in range(cfg.max_iters):
                g, loss = self._grad(tv, classifiers, proxy, theta, names, cycles, cfg.dataset_size * len(names),
                                     cfg.loss_fn, test_cycles)
                pick, scores = fw_select(g, candidates, cfg.granularity)
                gamma = fw_step_size(t, cfg.step_size) * cfg.scaling_factor
                with torch.no_grad():
                    theta = {k: theta[k] + gamma * (candidates[pick[k]][k] - theta[k]) for k in keys}
                chosen = sorted(set(pick.values()))
                history.append({"iteration": t, "loss": loss, "gamma": gamma,
                                "selected": chosen[0] if cfg.granularity == "task" else
                                {c: sum(v == c for v in pick.values()) for c in chosen}})
                adv()
        used = {n: len(c.seen) for n, c in cycles.items()} if cfg.loss_fn == "cross_entropy" else {}
        meta: dict[str, Any] = dict(adapter=tv.adapter_kind, iterations=history)
        if cfg.loss_fn == "cross_entropy":
            meta["data_used"] = {"split": cfg.split, "labels_read": True, "examples_per_task": used,
                                 "examples": int(sum(used.values()))}
        else:
            seen = {n: len(c.seen) for n, c in (test_cycles or {}).items()}
            meta["data_used"] = {"split": cfg.test_split, "labels_read": False, "unlabeled_inputs_per_task": seen,
                                 "unlabeled_inputs": int(sum(seen.values()))}
        return tv.result(self, t0, theta, meta)


@register_method
class FrankWolfeSoft(_FWBase):
    """Frank-Wolfe merging, soft variant: per iteration, each task's gradient selects a checkpoint and AdaMerging
    learns how far to move toward each.

    Chen et al. 2025, "FW-Merging" (soft variant, as the authors' FusionBench ``fw_soft``). Start from
    ``theta = theta_0``. Iteration ``t``: for each task ``k`` in order, ``g_k`` = gradient at ``theta`` of task
    ``k``'s cross-entropy over ``dataset_size`` labelled examples divided by ``dataset_size * N``; the oracle picks
    the fine-tuned checkpoint minimising ``sum_p cos(g_k,p, theta_c,p)`` among those not yet picked in this
    iteration (``granularity=layer``: per tensor). Then layer-wise AdaMerging (no clamp, Adam ``ada_lr``,
    ``ada_iters`` steps, entropy on ``ada_batch_size`` unlabeled test inputs of every task) learns
    ``theta <- theta + sum_s lambda_s^p (theta_s - theta)`` over the picked checkpoints ``s``, lambdas starting at
    ``ada_init`` (first iteration) or ``ada_coeff`` (later).

    Args:
        config: :class:`FrankWolfeSoftConfig`.
    """

    name = "frank_wolfe_soft"
    config_class: ClassVar = FrankWolfeSoftConfig
    summary = "Frank-Wolfe merging whose steps toward the selected checkpoints are learned by AdaMerging."
    variant = ("Chen et al. 2025, FW-soft: from theta_0; per iteration each task's cross-entropy gradient picks a new "
               "checkpoint by min summed per-tensor cosine; layer-wise AdaMerging (entropy, init 0.3 then 1e-8) "
               "over the picked checkpoints' differences from theta.")

    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        cfg = self.config
        tv, classifiers, proxy, cycles = self._setup(modelpool)
        names, keys = tv.names, tv.keys
        test = {n: tv.adapter.examples(n, cfg.test_split, cfg.max_test_samples, with_labels=False) for n in names}
        gen = seeded_generator(cfg.seed, "frank_wolfe_soft", "adamerging")
        theta = {k: v.clone() for k, v in tv.theta0.items()}
        candidates = {n: {k: tv.theta0[k] + tv.vectors[k][i] for k in keys} for i, n in enumerate(names)}
        history = []
        show = cfg.progress and sys.stderr.isatty()
        with progress(self.name, cfg.max_iters * (len(names) + cfg.ada_iters), show) as adv:
            for t in range(cfg.max_iters):
                picks: list[dict[str, str]] = []
                taken: dict[str, set[str]] = {k: set() for k in keys}
                for task in names:
                    g, _ = self._grad(tv, classifiers, proxy, theta, [task], cycles, cfg.dataset_size * len(names))
                    pick, _ = fw_select(g, candidates, cfg.granularity, exclude=taken)
                    for k, c in pick.items():
                        taken[k].add(c)
                    picks.append(pick)
                    adv()
                vectors = {k: [candidates[p[k]][k] - theta[k] for p in picks] for k in keys}
                init = cfg.ada_init if t == 0 else cfg.ada_coeff
                lambdas = torch.full((len(picks), len(keys)), init, device=tv.device, requires_grad=True)
                opt = torch.optim.Adam([lambdas], lr=cfg.ada_lr)
                for _ in range(cfg.ada_iters):
                    merged = merge_params(theta, vectors, keys, lambdas)
                    loss = torch.zeros((), device=tv.device)
                    for n in names:
                        proxy.params = {**merged, **tv.heads.get(n, {})}
                        d = test[n]
                        idx = torch.randint(0, len(d), (min(cfg.ada_batch_size, len(d)),), generator=gen)
                        loss = loss + entropy(classifiers[n](d.take(idx).to(tv.device)))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    adv()
                proxy.params = {}
                with torch.no_grad():
                    theta = merge_params(theta, vectors, keys, lambdas.detach())
                history.append({"iteration": t, "selected": [p[keys[0]] for p in picks] if cfg.granularity == "task"
                                else len(picks), "entropy_last": float(loss.detach()),
                                "lambda_mean": float(lambdas.detach().mean())})
        used = {n: len(c.seen) for n, c in cycles.items()}
        meta: dict[str, Any] = dict(adapter=tv.adapter_kind, iterations=history, data_used={
            "split": f"{cfg.split} + {cfg.test_split}", "labels_read": True, "examples_per_task": used,
            "examples": int(sum(used.values())), "unlabeled_inputs_per_task": {n: len(d) for n, d in test.items()},
            "note": f"labelled {cfg.split} examples for the gradients, unlabeled {cfg.test_split} inputs for AdaMerging"})
        return tv.result(self, t0, theta, meta)
