"""Sequential baselines of continual merging: task arithmetic, TIES, weight averaging, MagMax.

Each keeps one model-sized accumulator, so memory is constant in the number of models. Task arithmetic,
TIES and weight averaging follow FusionBench's ``opcm/task_arithmetic``, ``opcm/ties_merging`` and
``opcm/weight_average``; MagMax is its sequential setting (Marczak et al., ECCV 2024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fusion_bench.config_schema import option
from fusion_bench.kernels.continual.sequential import ties_rows
from fusion_bench.kernels.merging.magmax import max_magnitude
from fusion_bench.methods.base import register_method
from fusion_bench.methods.continual.base import ContinualConfig, ContinualMethod, Tensors, _matches_any


@dataclass
class ContinualTAConfig(ContinualConfig):
    scaling_factor: float = option(0.3, ge=-1e3, le=1e3, help="lambda: theta_t = theta_{t-1} + lambda * tau_t "
                                   "(FusionBench's default 0.3).")


@register_method
class ContinualTaskArithmetic(ContinualMethod):
    """Sequential task arithmetic: theta_0' = theta_0, theta_t = theta_{t-1} + lambda tau_t.

    Paper: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023), run sequentially as in
    FusionBench's ``opcm/task_arithmetic`` (the baseline of OPCM, Tang et al. 2025). After step t it equals task
    arithmetic of the t models seen. State: theta_0 and the running sum of task vectors.
    """

    name = "continual_task_arithmetic"
    config_class: ClassVar = ContinualTAConfig
    summary = "Sequential task arithmetic: add lambda * tau_t to the merged model at each arrival."
    variant = "FusionBench opcm/task_arithmetic: theta_t = theta_{t-1} + lambda (theta_t' - theta_0), theta_0' = theta_0."
    permutation_invariant = True

    def init_state(self) -> None:
        self._sum: Tensors = {k: torch.zeros_like(v) for k, v in self._pre.items()}

    def state_tensors(self):
        return iter(self._sum.values())

    def step(self, task: Tensors) -> Tensors:
        lam = self.config.scaling_factor
        for k in self._keys:
            self._sum[k].add_(task[k] - self._pre[k])
        return {k: self._pre[k] + lam * self._sum[k] for k in self._keys}


@dataclass
class ContinualTIESConfig(ContinualConfig):
    scaling_factor: float = option(0.5, ge=-1e3, le=1e3, help="lambda: theta_t = theta_{t-1} + lambda * TIES(merged "
                                   "task vector, tau_t) (FusionBench's default 0.5).")
    threshold: float = option(20.0, gt=0.0, le=100.0, help="Share of entries each whole task vector keeps: a percent "
                              "when > 1 (FusionBench's default 20: the top 20 % by magnitude over the whole model).")
    merge_func: str = option("sum", choices=("sum", "mean", "max"), help="Aggregation of the sign-agreeing entries.")
    remove_keys: list[str] = option([], help="Glob patterns of tensors left out of the TIES vectors (they keep the "
                                    "merged model's value).")


@register_method
class ContinualTiesMerging(ContinualMethod):
    """Sequential TIES merging, as FusionBench's ``opcm/ties_merging`` runs it.

    Paper: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023). Variant:
    theta_1 = theta_0 + lambda tau_1; at step t > 1, ``m = theta_{t-1} - theta_0`` and ``tau_t`` are flattened
    over the whole model into two rows, merged by :func:`fusion_bench.kernels.continual.sequential.ties_rows`
    (trim to the top ``threshold`` % per row, sign by mass, disjoint sum), and ``theta_t = theta_{t-1} + lambda
    * TIES(m, tau_t)`` (added to the merged model, not to theta_0, as the reference code does). State:
    theta_0 and the merged task vector.
    """

    name = "continual_ties_merging"
    config_class: ClassVar = ContinualTIESConfig
    summary = "Sequential TIES: theta_t = theta_{t-1} + lambda * TIES(theta_{t-1} - theta_0, tau_t), whole-model trim."
    variant = ("FusionBench opcm/ties_merging: two rows (merged task vector, new task vector) over the whole model, "
               "top-k% trim per row, sign by mass, disjoint sum; added to the merged model with lambda.")

    def init_state(self) -> None:
        self._m: Tensors = {}

    def state_tensors(self):
        return iter(self._m.values())

    def step(self, task: Tensors) -> Tensors:
        c = self.config
        tau = self.tv(task)
        if self.t == 1:
            self._m = {k: c.scaling_factor * v for k, v in tau.items()}
        else:
            keys = sorted(k for k in self._keys if not _matches_any(k, c.remove_keys))
            rows = torch.stack([torch.cat([self._m[k].reshape(-1) for k in keys]),
                                torch.cat([tau[k].reshape(-1) for k in keys])])
            merged = ties_rows(rows, c.threshold, c.merge_func)
            del rows
            off = 0
            for k in keys:
                n = self._m[k].numel()
                self._m[k].add_(c.scaling_factor * merged[off:off + n].view_as(self._m[k]))
                off += n
        return {k: self._pre[k] + self._m[k] for k in self._keys}


@register_method
class ContinualWeightAverage(ContinualMethod):
    """Continual weight averaging: the running mean theta_t = ((t - 1) theta_{t-1} + theta_t') / t.

    Paper: the uniform weight average (model soups, Wortsman et al. 2022) kept incrementally as FusionBench's
    ``opcm/weight_average``. Needs no pretrained model. State: the merged model.
    """

    name = "continual_weight_average"
    config_class: ClassVar = ContinualConfig
    summary = "Continual weight averaging: the running mean of the models seen so far."
    variant = "FusionBench opcm/weight_average: theta_t = ((t-1) theta_{t-1} + theta_t') / t, theta_1 = theta_1'."
    requires_pretrained = False
    permutation_invariant = True

    def init_state(self) -> None:
        self._mean: Tensors = {}

    def state_tensors(self):
        return iter(self._mean.values())

    def step(self, task: Tensors) -> Tensors:
        t = self.t
        if t == 1:
            self._mean = {k: v.clone() for k, v in task.items()}
        else:
            for k in self._keys:
                self._mean[k].mul_(t - 1).add_(task[k]).div_(t)
        return self._mean


@dataclass
class ContinualMagMaxConfig(ContinualConfig):
    scaling_factor: float = option(0.5, ge=-1e3, le=1e3, help="lambda: theta_t = theta_0 + lambda * tau_max "
                                   "(0.5: the MagMax authors' 8-dataset script, FusionBench's default).")


@register_method
class ContinualMagMax(ContinualMethod):
    """MagMax in its sequential setting: the per-entry maximum-magnitude task vector, kept incrementally.

    Paper: Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning" (ECCV 2024).
    Variant: ``tau_max <- max-magnitude(tau_max, tau_t)`` entry by entry (magnitude ties: the larger signed
    value, as :func:`fusion_bench.kernels.merging.magmax.max_magnitude`), ``theta_t = theta_0 + lambda
    tau_max``; after step t it equals batch MagMax of the t models seen (order-free). The paper's models are
    fine-tuned sequentially, each from the previous one; here the pool's models are whatever they are (the
    zoo's are fine-tuned independently from theta_0). State: theta_0 and tau_max.
    """

    name = "continual_magmax"
    config_class: ClassVar = ContinualMagMaxConfig
    summary = "Sequential MagMax: per-entry max-magnitude task vector so far, theta_0 + lambda * tau_max."
    variant = ("Marczak et al. 2024 (MagMax), sequential: tau_max kept incrementally by entry-wise max |tau| (ties: "
               "larger signed value); theta_t = theta_0 + lambda tau_max.")
    permutation_invariant = True

    def init_state(self) -> None:
        self._best: Tensors = {}

    def state_tensors(self):
        return iter(self._best.values())

    def step(self, task: Tensors) -> Tensors:
        tau = self.tv(task)
        if self.t == 1:
            self._best = tau
        else:
            self._best = {k: max_magnitude([self._best[k], tau[k]]) for k in self._keys}
        lam = self.config.scaling_factor
        return {k: self._pre[k] + lam * self._best[k] for k in self._keys}
