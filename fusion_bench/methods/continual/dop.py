"""DOP: continual merging by dual orthogonal projections (Yang et al., NeurIPS 2025)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.config_schema import option
from fusion_bench.kernels.continual.dop import dop_merge_weight
from fusion_bench.methods.base import register_method
from fusion_bench.methods.continual.base import ContinualConfig, ContinualMethod, Tensors


@dataclass
class DOPConfig(ContinualConfig):
    lr: float = option(1e-4, gt=0.0, le=10.0, help="Adam learning rate of each linear layer's optimisation.")
    num_steps: int = option(200, ge=0, le=10**6, help="Adam steps per linear layer and merge step.")
    mgda: bool = option(True, help="Weigh the stability (merged model) and plasticity (new model) losses by MGDA's "
                        "min-norm rule; false: fixed weights alpha, 1 - alpha.")
    alpha: float = option(0.8, ge=0.0, le=1.0, help="Weight of the merged model's loss (the EMA's start with MGDA).")
    ema: bool = option(True, help="With MGDA, smooth the weights by an exponential moving average from alpha.")
    ema_beta: float = option(0.999, ge=0.0, le=1.0, help="Decay of that moving average.")
    svd_epsilon: float = option(0.99999, ge=0.0, le=1.0, help="Each task vector's subspace keeps the leading singular "
                                "triplets while their cumulative share of sum(s) is below this.")
    svd_proj_space: str = option("uv", choices=("uv", "u", "v"), help="Project the weight difference on the left "
                                 "(u), right (v) or both (uv) singular subspaces.")


@register_method
class DOP(ContinualMethod):
    """DOP, Dual Orthogonal Projections.

    Paper: Yang et al., "Continual Model Merging without Data: Dual Projections for Balancing Stability and
    Plasticity", NeurIPS 2025. Variant (the authors' FusionBench ``dop/dop`` and its defaults): the first model
    is the merged model; at each later step every ``nn.Linear`` weight is optimised from the mean of the merged
    and the new weight by :func:`fusion_bench.kernels.continual.dop.dop_merge_weight` (losses: the weight
    difference to each of the two models projected on that model's task-vector subspace, left and right; MGDA
    weights smoothed by an EMA); every other floating tensor (biases, norms, embeddings) becomes the mean of
    the merged and the new model's tensor. State: theta_0 and the merged model. No data is used.
    """

    name = "dop"
    config_class: ClassVar = DOPConfig
    summary = "DOP: continual merging, per-layer Adam on dual projected distances to the merged and new model (MGDA)."
    variant = ("Yang et al. NeurIPS 2025, FusionBench dop/dop: linear weights from (W_merged + W_new)/2 by Adam on "
               "sum_i c_i (||diag(s_i) U_i^T (W - W_i)||^2 + ||(W - W_i) V_i diag(s_i)||^2), subspaces of each "
               "task vector at energy share svd_epsilon, c by MGDA with EMA from (alpha, 1-alpha); other tensors "
               "averaged with the merged model.")
    identity_on_equal_inputs = True

    def init_state(self) -> None:
        self._merged: Tensors = {}

    def state_tensors(self):
        return iter(self._merged.values())

    def step(self, task: Tensors) -> Tensors:
        c = self.config
        if self.t == 1:
            self._merged = {k: v.clone() for k, v in task.items()}
            return self._merged
        for k in self._keys:
            if k in self._linear and task[k].dim() == 2:
                self._merged[k] = dop_merge_weight(
                    self._pre[k], self._merged[k], task[k], lr=c.lr, steps=c.num_steps, mgda=c.mgda, ema=c.ema,
                    alpha=c.alpha, ema_beta=c.ema_beta, epsilon=c.svd_epsilon, proj_space=c.svd_proj_space)
            else:
                self._merged[k] = (self._merged[k] + task[k]) / 2
        return self._merged
