"""OPCM: continual merging by orthogonal projection and adaptive scaling (Tang et al. 2025)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from fusion_bench.config_schema import option
from fusion_bench.kernels.continual.opcm import opcm_project
from fusion_bench.methods.base import register_method
from fusion_bench.methods.continual.base import ContinualConfig, ContinualMethod, Tensors


@dataclass
class OPCMConfig(ContinualConfig):
    alpha: float = option(0.5, ge=0.0, lt=1.0, help="Energy threshold: the top-left r x r block of the new task "
                          "vector in the merged update's singular basis is removed, r = the number of singular values "
                          "before their cumulative share of sum(s) first exceeds alpha (FusionBench's default 0.5).")


@register_method
class OPCM(ContinualMethod):
    """OPCM, Orthogonal Projection-based Continual Merging.

    Paper: Tang et al., "Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable
    Continual Model Merging", arXiv 2501.09522. Variant (the authors' FusionBench ``opcm/opcm``): the first
    model is the merged model. At step t, every ``nn.Linear`` weight's new task vector is projected by
    :func:`fusion_bench.kernels.continual.opcm.opcm_project` against the previous merged task vector (other
    tensors, biases and norms included, are added whole); the unscaled sum ``S_t = S_{t-1} + P(tau_t)`` is
    rescaled so that the merged task vector has the mean norm of the task vectors seen so far:
    ``theta_t = theta_0 + S_t * mean_i ||tau_i|| / ||S_t||`` (norms over every floating tensor of the
    model, i.e. ``lambda_t = ||S_t|| / mean_i ||tau_i||``). State: theta_0, S_t, two numbers.
    """

    name = "opcm"
    config_class: ClassVar = OPCMConfig
    summary = "OPCM: continual merging, new task vectors projected orthogonally to the merged update, norm-rescaled."
    variant = ("Tang et al. 2025 (arXiv 2501.09522), FusionBench opcm/opcm: linear weights' new task vector with its "
               "diagonal and top-left r x r block (alpha energy share of the merged update's singular values) removed "
               "in the merged update's SVD basis; other tensors added whole; merged task vector rescaled to the mean "
               "task-vector norm so far.")
    identity_on_equal_inputs = True

    def init_state(self) -> None:
        self._sum: Tensors = {}
        self._norm_sum = 0.0
        self.lambdas: list[float] = []

    def state_tensors(self) -> Iterator[torch.Tensor]:
        return iter(self._sum.values())

    def step(self, task: Tensors) -> Tensors:
        tau = self.tv(task)
        self._norm_sum += self.global_norm(tau)
        if self.t == 1:
            self._sum = {k: v.clone() for k, v in tau.items()}
        else:
            for k in self._keys:
                if k in self._linear and tau[k].dim() == 2:
                    # the merged task vector is S_{t-1} times a positive number: same singular basis and shares
                    self._sum[k].add_(opcm_project(self._sum[k], tau[k], self.config.alpha))
                else:
                    self._sum[k].add_(tau[k])
        scale = self._scale()
        self.lambdas.append(1.0 / scale if scale else 0.0)
        return {k: self._pre[k] + self._sum[k] * scale for k in self._keys}

    def _scale(self) -> float:
        """mean_i ||tau_i|| / ||S_t|| (0 when S_t is zero: the merged model is theta_0)."""
        norm = self.global_norm(self._sum)
        return (self._norm_sum / self.t) / norm if norm > 0 else 0.0
