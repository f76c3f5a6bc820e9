"""EMR-Merging: Elect, Mask & Rescale (Huang et al., NeurIPS 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.config_schema import option
from fusion_bench.errors import ModelMismatchError
from fusion_bench.kernels.subspace import emr as K
from fusion_bench.methods.base import TensorwiseConfig, all_finite, register_method
from fusion_bench.methods.subspace.masks import PerTaskTensorwise


@dataclass
class EMRMergingConfig(TensorwiseConfig):
    rescale: str = option(
        "tensor_means", choices=("tensor_means", "model"),
        help="Rescaler lambda_i = A_i / B_i: 'tensor_means' sums per-tensor means of |tau_i| and |m_i * tau_uni| "
        "(official code, FusionBench); 'model' sums the entries over the whole model (the paper's equation).")
    zero_sign: str = option(
        "negative", choices=("negative", "zero"),
        help="Elected sign where sum_i tau_i is exactly 0: 'negative' (-1, official code and FusionBench) or "
        "'zero' (sgn(0) = 0: no task keeps that entry).")


@register_method
class EMRMerging(PerTaskTensorwise):
    """EMR-Merging: a unified task vector plus a per-task mask and rescaler; one model per task.

    Paper: Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024.
    Variant: see :mod:`fusion_bench.kernels.subspace.emr` (elect sgn(sum tau) and the largest agreeing
    magnitude; m_i = tau_i * gamma > 0; one scalar rescaler per task over the whole model). The
    rescalers come from one pre-pass reading one tensor at a time; then each task model is built
    tensor by tensor (every tensor read N + 1 times in all). Storage in the paper's form: theta_0,
    tau_uni, N bit masks (``extra_storage_bytes`` = N * ceil(P / 8) + 4 N). Peak memory: the N task models.

    Args:
        config: :class:`EMRMergingConfig` (rescale, zero_sign, exclude).
    """

    name = "emr_merging"
    config_class: ClassVar = EMRMergingConfig
    summary = "EMR-Merging: elect a unified task vector, per-task sign masks and rescalers (needs the task id)."
    variant = ("Huang et al. 2024 (EMR): gamma = sgn(sum_i tau_i) (0 -> -1 as the official code, zero_sign); "
               "tau_uni = gamma * max agreeing |tau_i|; m_i = tau_i * gamma > 0; lambda_i = sum_p mean|tau_i| / "
               "sum_p mean|m_i * tau_uni| over tensors p (rescale=tensor_means, official code) or whole-model sums "
               "(rescale=model); model of task i: theta_0 + lambda_i * m_i * tau_uni.")

    def prepare_tasks(self, base, sources, names, keys) -> None:
        if "rescalers" in self._run_state:
            return
        stats: list[list[tuple[float, float]]] = [[] for _ in names]
        for key in keys:
            b = base.get(key)
            cd = self.compute_dtype_for(b.dtype)
            b = b.to(cd)
            taus = []
            for n, src in zip(names, sources):
                t = src.get(key)
                if not all_finite(t):
                    raise ModelMismatchError(f"Model '{n}' has non-finite values (NaN/inf) in tensor '{key}'; "
                                             "fix or drop that checkpoint.")
                taus.append(t.to(cd) - b)
            uni, masks = K.elect(taus, self.config.zero_sign)
            for i, s in enumerate(K.rescale_stats(taus, uni, masks, self.config.rescale)):
                stats[i].append(s)
        self._run_state["rescalers"] = [K.rescalers(s) for s in stats]

    @staticmethod
    def compute_dtype_for(dtype):
        import torch

        return torch.float64 if dtype == torch.float64 else torch.float32

    def task_tensor(self, index, key, base, tensors, names):
        taus = [t - base for t in tensors]
        uni, masks = K.elect(taus, self.config.zero_sign)
        return K.emr_task_tensor(base, uni, masks[index], self._run_state["rescalers"][index])

    def extra_metadata(self, names, numel):
        r = self._run_state.get("rescalers", [])
        return {"rescalers": dict(zip(names, r)), "extra_storage_bytes": len(names) * (-(-numel // 8) + 4)}
