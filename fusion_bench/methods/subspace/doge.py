"""DOGE-TA (Wei et al., ICML 2025), data-free: per 2-D weight a shared modification of the task vectors
optimised by Adam with the gradient projected out of the tasks' shared subspace, then a global magnitude
mask and per-layer norm weights. Kernel: :mod:`fusion_bench.kernels.subspace.doge`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fusion_bench.config_schema import option
from fusion_bench.errors import ModelMismatchError
from fusion_bench.kernels.merging.ties import KthLargestSelector
from fusion_bench.kernels.subspace import doge as K
from fusion_bench.methods.base import TensorwiseConfig, TensorwiseMerge, _matches, register_method
from fusion_bench.methods.merging.magnitude_diff import EMBEDDING_MARKERS


@dataclass
class DogeTAConfig(TensorwiseConfig):
    lamda: float = option(0.07, gt=0.0, le=1e3, help="Per-layer task weight lambda_j = lamda / ||tau_j||_F of that "
                          "layer (FusionBench lamda: 0.07).")
    subspace: int = option(6, ge=1, le=100000, help="The shared subspace keeps floor(min(out, in) / subspace) "
                           "directions (FusionBench subspace: 6).")
    keep_ratio: float = option(0.3, ge=0.0, le=1.0, help="Fraction of each task vector kept by the global magnitude "
                               "mask (FusionBench K=30 means 0.3).")
    iterations: int = option(400, ge=0, le=100000, help="Adam steps per weight (FusionBench: 400).")
    lr: float = option(1e-4, gt=0.0, le=1.0, help="Adam learning rate (FusionBench: 1e-4).")
    include: list[str] = option([], help="Glob patterns of the merged tensors (2-D, 'weight' in the name); empty: "
                                "every 2-D weight except embeddings, which on CLIP vision models is FusionBench's set "
                                "(encoder weights without layer norms). Every other tensor is the pretrained one.")


@register_method
class DogeTA(TensorwiseMerge):
    """DOGE-TA, data-free adaptive projective gradient descent on task arithmetic.

    Paper: Wei et al., ICML 2025, "Modeling Multi-Task Model Merging as Adaptive Projective Gradient
    Descent" (arXiv 2501.01230), data-free variant of FusionBench's ``DOGE_TA_Algorithm`` (exact details in
    the kernel). Models are taken in name order (exactly permutation invariant).

    Args:
        config: :class:`DogeTAConfig`.
    """

    name = "doge_ta"
    config_class: ClassVar = DogeTAConfig
    requires_pretrained = True
    summary = "Projected-gradient (shared subspace) task-vector modification + magnitude mask + norm weights."
    variant = ("Wei et al. 2025 (DOGE), FusionBench data-free DOGE_TA: per selected 2-D weight, lambda_j = lamda/||V_j||, "
               "delta = Adam(lr, iterations) on sum_j ||rowsum(V_j*(V_j - sum_i lambda_i V_i - sum_i lambda_i delta))||^2 "
               "with grad -= P grad (P: top min/subspace left singular vectors of the tasks' top min/N ones); "
               "theta = theta_0 + sum_j lambda_j (V_j + delta) * [|V_j| >= global top floor(keep_ratio d)+1]; "
               "other tensors (1-D, embeddings, unselected): theta_0.")
    def selected(self, key: str, shape) -> bool:
        if len(shape) != 2 or "weight" not in key:
            return False
        if self.config.include:
            return _matches(key, self.config.include)
        return not any(m in key for m in EMBEDDING_MARKERS)

    def prepare(self, base, sources, names, keys):
        if base is None:
            raise ModelMismatchError("doge_ta needs the base model: add '_pretrained_' to the pool.")
        sel = [k for k in keys if self.selected(k, tuple(base.meta(k).shape))]
        if not sel:
            raise ModelMismatchError(f"doge_ta: method.include={list(self.config.include)} matches no 2-D weight "
                                     "tensor (embeddings are left out unless named); set it, e.g. method.include=['*layers*'].")
        self._selected = set(sel)
        dtype = torch.float64 if any(self.compute_dtype(base.meta(k).dtype) == torch.float64 for k in sel) \
            else torch.float32
        total = sum(base.meta(k).numel for k in sel)
        k = K.keep_count(total, self.config.keep_ratio)
        selector = KthLargestSelector([k] * len(names), dtype, totals=[total] * len(names))
        while not selector.done:
            selector.start_pass()
            for key in sel:
                b = base.get(key)
                if selector.stride == 1:
                    b = b.to(dtype)
                for i, (n, src) in enumerate(zip(names, sources)):
                    if not selector.add_delta(i, src.get(key), b):
                        raise ModelMismatchError(f"Model '{n}' (or the base) has non-finite values (NaN/inf) in "
                                                 f"tensor '{key}'; fix or drop that checkpoint.")
            selector.finish_pass()
        self._thresholds = dict(zip(names, selector.values()))

    def merge_tensor(self, key, base, tensors, names):
        if getattr(self, "_thresholds", None) is None:
            raise RuntimeError("doge_ta: prepare() must run before merging (the engines call it).")
        if key not in self._selected:
            return base
        c = self.config
        order = sorted(range(len(names)), key=lambda i: names[i])
        taus = [tensors[i] - base for i in order]
        lambdas = K.doge_lambdas(taus, c.lamda)
        proj = K.shared_projector(taus, c.subspace)
        delta = K.doge_delta(taus, lambdas, proj, iterations=c.iterations, lr=c.lr)
        thr = [self._thresholds[names[i]] for i in order]
        return base + K.doge_merge(taus, lambdas, delta, thr)
