"""WUDI-Merging (Cheng et al., ICML 2025): data-free, per linear layer, the merged task vector minimising
the interference on each task's input subspace, optimised by Adam. Kernel:
:mod:`fusion_bench.kernels.subspace.wudi`.

Cost (CPU, float32, one thread, 8 task vectors, 400 steps, shared 2-core machine): a 768x3072 weight
(ViT-B MLP down projection) 71 s, 3072x768 (up projection) 23 s, 768x768 4.5 s, so ~22 min for a ViT-B/32;
the autograd loop of the reference code takes ~5x longer (0.9 s per step on 768x3072). See docs/subspace_wudi_lines.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.config_schema import option
from fusion_bench.kernels.subspace import wudi as K
from fusion_bench.methods.base import TensorwiseConfig, TensorwiseMerge, _matches, register_method


@dataclass
class WUDIConfig(TensorwiseConfig):
    iterations: int = option(400, ge=0, le=100000,
                             help="Adam steps per 2-D weight (FusionBench iter_num: 400 in its config; the official "
                             "code uses 300 for ViTs).")
    lr: float = option(1e-5, gt=0.0, le=1.0, help="Adam learning rate (paper and FusionBench: 1e-5).")
    average_only: list[str] = option(
        [], help="Glob patterns of 2-D tensors given the mean task vector instead of the optimisation "
        "(FusionBench exclude_keys, there exact names). Tensors that are not 2-D always get the mean.")


@register_method
class WUDIMerging(TensorwiseMerge):
    """WUDI-Merging: theta_0 + argmin_tau sum_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 per 2-D weight.

    Paper: Cheng et al., ICML 2025, "Whoever Started the Interference Should End It" (arXiv 2503.08099).
    Variant: Adam (lr 1e-5) from the sum of the task vectors; non-2-D tensors: the mean task vector.
    The models are taken in name order (exactly permutation invariant).

    Args:
        config: :class:`WUDIConfig`.
    """

    name = "wudi_merging"
    config_class: ClassVar = WUDIConfig
    requires_pretrained = True
    summary = "Per 2-D weight, Adam on sum_i ||(tau - tau_i) tau_i^T||^2/||tau_i||^2 from sum_i tau_i (data-free)."
    variant = ("Cheng et al. 2025 (WUDI-Merging, FusionBench WUDIMerging): 2-D weights: tau_m = Adam(lr, iterations) "
               "on sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 from sum_i tau_i (zero tau_i: term 0); other "
               "tensors: mean_i tau_i; theta = theta_0 + tau_m.")

    def merge_tensor(self, key, base, tensors, names):
        order = sorted(range(len(names)), key=lambda i: names[i])
        taus = [tensors[i] - base for i in order]
        c = self.config
        if base.dim() == 2 and not _matches(key, c.average_only):
            return base + K.wudi_merge_matrix(taus, iterations=c.iterations, lr=c.lr)
        return base + sum(taus) / len(taus)
