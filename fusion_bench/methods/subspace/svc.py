"""SVC, singular value calibration (Li et al., 2026, arXiv 2602.05536) as a plug-in after any tensor-wise
merge: every 2-D weight's merged update has its singular values rescaled where tasks over-accumulate.
Kernel: :mod:`fusion_bench.kernels.subspace.svc`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.config_schema import option
from fusion_bench.kernels.subspace import svc as K
from fusion_bench.methods.base import register_method
from fusion_bench.methods.subspace.lines import BaseMergePlugin, PluginConfig


@dataclass
class SVCConfig(PluginConfig):
    alpha: float = option(0.1, ge=0.0, le=1e3, help="Lower clip of the projection coefficients s_r^i in "
                          "gamma_r = N / sum_i max(alpha, s_r^i) (FusionBench: 0.1 after TA/TIES/DARE/average, "
                          "0.2 Iso-CTS, 1.0 TSV-M and WUDI).")


@register_method
class SingularValueCalibration(BaseMergePlugin):
    """SVC: W_0 + U diag(gamma * sigma) V^T of the base merge's update of every 2-D weight.

    Paper: Li et al., "When Shared Knowledge Hurts: Spectral Over-Accumulation in Model Merging"
    (arXiv 2602.05536, ICML 2026), Algorithm 1 in FusionBench's float64 vectorised form; other tensors are
    the base merge's. Default base: task_arithmetic with its scaling_factor 0.3 (FusionBench's SVC TA config).

    Args:
        config: :class:`SVCConfig`.
    """

    name = "svc"
    config_class: ClassVar = SVCConfig
    summary = "Singular value calibration of any tensor-wise merge: shrink over-accumulated shared directions."
    variant = ("Li et al. 2026 (SVC): per 2-D weight, dW = W_merge - W_0 = U S V^T, a_r = u_r^T dW, a_r^i = "
               "u_r^T (W_i - W_0), s = <a_r, a_r^i>/max(||a_r^i||^2, 1e-12), gamma_r = N / sum_i max(alpha, s), "
               "W = W_0 + U diag(gamma S) V^T (float64); other tensors: the base merge.")

    def merge_tensor(self, key, base, tensors, names):
        merged = self.base_merge(key, base, tensors, names)
        if base.dim() != 2:
            return merged
        order = sorted(range(len(names)), key=lambda i: names[i])
        return K.svc_calibrate(base, [tensors[i] for i in order], merged, self.config.alpha)
