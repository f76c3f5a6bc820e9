"""Task Singular Vectors: TSV-Merge (one merged model) and TSV-Compress (one low-rank model per task).

Paper: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025
(arXiv 2412.00081). The tensor math is in :mod:`fusion_bench.kernels.subspace.tsv`.
"""

from __future__ import annotations

import copy
import fnmatch
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fusion_bench.config_schema import option
from fusion_bench.errors import FusionBenchError, ModelMismatchError
from fusion_bench.kernels.subspace import tsv as K
from fusion_bench.methods.base import (
    FusionMethod,
    FusionResult,
    TensorwiseConfig,
    TensorwiseMerge,
    register_method,
)
from fusion_bench.utils import count_parameters

MEAN_KEYS_HELP = ("Glob patterns of 2-D tensors merged as the mean task vector instead of by SVD (FusionBench's "
                  "exclude_keys; the authors' CLIP code uses '*text_projection*'). Tensors that are not 2-D are "
                  "always averaged.")


def uses_svd(key: str, tensor: torch.Tensor, mean_keys: list[str]) -> bool:
    """True when ``tensor`` is merged through its SVD: it is 2-D and no ``mean_keys`` pattern matches ``key``."""
    return tensor.dim() == 2 and not any(fnmatch.fnmatchcase(key, p) for p in mean_keys)


def svd_guard(method: FusionMethod, key: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``fn`` (an SVD-based merge of tensor ``key``); a failed SVD becomes one line naming the tensor."""
    try:
        return fn()
    except torch.linalg.LinAlgError as e:
        raise FusionBenchError(
            f"Method '{method.name}': the SVD of tensor '{key}' did not converge ({e}); merge it by averaging with "
            f"method.mean_keys=['{key}'], or leave it at the base with method.exclude=['{key}'].") from None


def check_task_count(method: FusionMethod, names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise ModelMismatchError(f"Method '{method.name}': model names repeat in {names}; give each task one model.")


class SvdTaskMerge(TensorwiseMerge):
    """Shared frame of the per-layer SVD merges (TSV-M, Iso-C, Iso-CTS): the base model is required, each
    task has one model, 2-D tensors outside ``mean_keys`` go through :meth:`svd_merge`, a failed SVD is one
    line naming the tensor."""

    requires_pretrained = True

    def check_pool(self, names: list[str], has_pretrained: bool) -> None:
        super().check_pool(names, has_pretrained)
        check_task_count(self, names)

    def svd_merge(self, base: torch.Tensor, tensors: list[torch.Tensor], use_svd: bool) -> torch.Tensor:
        raise NotImplementedError

    def merge_tensor(self, key, base, tensors, names):
        if base is None:
            raise ModelMismatchError(f"Method '{self.name}' needs the base model: add '_pretrained_' to the pool.")
        use = uses_svd(key, base, self.config.mean_keys)
        return svd_guard(self, key, lambda: self.svd_merge(base, tensors, use))


# ----------------------------------------------------------------------------------------------
# TSV-M
# ----------------------------------------------------------------------------------------------
@dataclass
class TsvMergingConfig(TensorwiseConfig):
    scaling_factor: float = option(
        1.0, ge=-1e3, le=1e3, help="alpha: theta = theta_0 + alpha * merged task vector (1.0 in the paper and "
        "FusionBench; the authors' code can also pick it on validation data).")
    mean_keys: list[str] = option([], help=MEAN_KEYS_HELP)


@register_method
class TsvMerging(SvdTaskMerge):
    """TSV-Merge: per 2-D tensor, the top 1/T singular components of every task, orthogonalised together.

    Paper: Gargiulo et al., CVPR 2025. Variant: see :mod:`fusion_bench.kernels.subspace.tsv` (per-task rank
    int(k / T), concatenated U and V^T replaced by their polar factors, Delta = U_perp diag(s) V_perp^T; tensors
    that are not 2-D, and 2-D tensors matching ``mean_keys``, get the mean task vector, as in the authors' code);
    theta = theta_0 + alpha * Delta.

    Args:
        config: :class:`TsvMergingConfig` (scaling_factor, mean_keys, exclude).
    """

    name = "tsv_merging"
    config_class: ClassVar = TsvMergingConfig
    family = "merging"
    summary = "TSV-M: top 1/T task singular vectors per layer, orthogonalised across tasks (Gargiulo et al. 2025)."
    variant = ("Gargiulo et al. 2025 (TSV-M), authors' code: per 2-D tensor, Delta_i = theta_i - theta_0 = U_i S_i V_i^T, "
               "keep r = int(k / T) (k = min(m, n)) singular triplets per task, concatenate U and V^T over tasks, "
               "replace each by its nearest orthogonal matrix P Q^T (SVD), Delta = U_perp diag(s) V_perp^T; "
               "tensors that are not 2-D (and mean_keys) get the mean task vector; theta = theta_0 + alpha * Delta.")

    def svd_merge(self, base, tensors, use_svd):
        return K.tsv_merge(base, tensors, self.config.scaling_factor, use_svd=use_svd)


# ----------------------------------------------------------------------------------------------
# TSV-C
# ----------------------------------------------------------------------------------------------
@dataclass
class TsvCompressConfig(TensorwiseConfig):
    rank_fraction: float | None = option(
        None, gt=0.0, le=1.0, help="Fraction of the singular values kept per task and 2-D tensor: rank "
        "int(k * rank_fraction), k = min(m, n). Default (None): 1/T for T tasks, as in the paper.")
    mean_keys: list[str] = option(
        [], help="Glob patterns of 2-D tensors stored in full (the task's own tensor) instead of compressed. "
        "Tensors that are not 2-D are always stored in full, as in the authors' code.")


class _TsvCompressOneTask(TensorwiseMerge):
    """The model of one task of TSV-C, as a tensor-wise merge over the pool (only ``task``'s tensor is used):
    theta_0 + low-rank(Delta_task) for 2-D tensors, the task's own tensor else. Runs in memory or streamed."""

    name = "tsv_compress"
    config_class: ClassVar = TsvCompressConfig
    variant = "TSV-C, one task"
    requires_pretrained = True

    def __init__(self, config: TsvCompressConfig, task: str, num_tasks: int):
        super().__init__(config)
        self.task = task
        self.num_tasks = num_tasks
        self.stats = {"low_rank_elements": 0, "full_elements": 0, "low_rank_bytes": 0, "full_bytes": 0}
        self._dtype = torch.float32

    def rank(self, k: int) -> int:
        f = self.config.rank_fraction
        return K.per_task_rank(k, self.num_tasks) if f is None else K.fraction_rank(k, f)

    def merge_one(self, key, base, tensors, names):
        self._dtype = (base if base is not None else tensors[0]).dtype
        return super().merge_one(key, base, tensors, names)

    def merge_tensor(self, key, base, tensors, names):
        if base is None:
            raise ModelMismatchError(f"Method '{self.name}' needs the base model: add '_pretrained_' to the pool.")
        theta = tensors[names.index(self.task)]
        size = self._dtype.itemsize
        if not uses_svd(key, base, self.config.mean_keys):
            self.stats["full_elements"] += theta.numel()
            self.stats["full_bytes"] += theta.numel() * size
            return theta
        r = self.rank(min(base.shape))
        n = K.low_rank_elements(base.shape, r)
        self.stats["low_rank_elements"] += n
        self.stats["low_rank_bytes"] += n * size
        return svd_guard(self, key, lambda: base + K.tsv_compress_delta(theta - base, r))


def _subpool(pool: Any, names: list[str]) -> Any:
    """A shallow copy of ``pool`` holding only ``_pretrained_`` and ``names`` (same class, config and caches).

    ModelPool has no public subset API yet; this copies the pool object and filters its entries. A pool whose
    ``vocab_source`` is a dropped model is returned whole (the per-task merge picks its task's tensors by name)."""
    keep = set(names)
    src = getattr(pool.config, "vocab_source", None)
    if src is not None and src != "_pretrained_" and src not in keep:
        return pool
    sub = copy.copy(pool)
    sub._entries = {k: v for k, v in pool._entries.items() if k in keep or k not in pool.model_names}
    sub._sources = {k: v for k, v in pool._sources.items() if k in sub._entries}
    return sub


@register_method
class TsvCompress(FusionMethod):
    """TSV-Compress: one model per task, its task vector compressed to the top singular components per layer.

    Paper: Gargiulo et al., CVPR 2025 (TSV-C). Variant: task i's model is theta_0 + U_i,r diag(s_i,r) V_i,r^T for
    every 2-D tensor (r = int(k / T) by default, k = min(m, n)) and theta_i for tensors that are not 2-D (stored
    in full, as in the authors' code). Evaluating needs the task id (which model to use). The metadata reports the
    extra storage: the low-rank factors r (m + n + 1) per 2-D tensor and task, plus the full non-2-D tensors.

    Args:
        config: :class:`TsvCompressConfig` (rank_fraction, mean_keys, exclude).
    """

    name = "tsv_compress"
    config_class: ClassVar = TsvCompressConfig
    family = "merging"
    result_kind = "per_task"
    requires_pretrained = True
    summary = "TSV-C: each task vector compressed to its top singular components per layer; one model per task."
    variant = ("Gargiulo et al. 2025 (TSV-C), authors' code: per task and 2-D tensor, Delta_i = U_i S_i V_i^T truncated "
               "to r = int(k / T) singular triplets (or int(k * rank_fraction)), k = min(m, n); model_i = theta_0 + "
               "U_i,r S_i,r V_i,r^T; tensors that are not 2-D (and mean_keys) are theta_i; per-task result, needs "
               "the task id.")

    def task_method(self, task: str, num_tasks: int) -> TensorwiseMerge:
        """The tensor-wise merge producing ``task``'s model (for the streaming engine: run it on
        :meth:`task_pool`)."""
        return _TsvCompressOneTask(self.config, task, num_tasks)

    @staticmethod
    def task_pool(modelpool: Any, task: str) -> Any:
        """``modelpool`` restricted to ``_pretrained_`` and ``task`` (each tensor is read once per task)."""
        return _subpool(modelpool, [task])

    def run(self, modelpool) -> FusionResult:
        from fusion_bench.engine.inmemory import merge_in_memory

        t0 = time.perf_counter()
        names = modelpool.model_names
        if not modelpool.has_pretrained:
            raise ModelMismatchError(f"Method '{self.name}' needs the base model: add '_pretrained_' to the model "
                                     "pool's models.")
        if not names:
            raise ModelMismatchError(f"Method '{self.name}' needs at least 1 model, the pool has 0.")
        models = {}
        totals = {"low_rank_elements": 0, "full_elements": 0, "low_rank_bytes": 0, "full_bytes": 0}
        params = 0
        for task in names:
            sub = self.task_method(task, len(names))
            model, _ = merge_in_memory(sub, self.task_pool(modelpool, task))
            models[task] = model
            for k, v in sub.stats.items():
                totals[k] += v
            params = count_parameters(model)
        extra_bytes = totals["low_rank_bytes"] + totals["full_bytes"]
        meta = self._metadata(
            t0, needs_task_id=True, tasks=names, parameters=params,
            extra_parameters=totals["low_rank_elements"] + totals["full_elements"],
            extra_storage_bytes=extra_bytes, low_rank_factor_bytes=totals["low_rank_bytes"],
            full_tensor_bytes=totals["full_bytes"],
            rank_rule=("int(k / T)" if self.config.rank_fraction is None
                       else f"int(k * {self.config.rank_fraction})"))
        return FusionResult("per_task", models=models, metadata=meta)
