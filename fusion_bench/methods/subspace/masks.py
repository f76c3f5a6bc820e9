"""TALL masks and consensus merging (Wang et al., ICML 2024, "Localizing Task Information for Improved
Model Merging and Compression").

- ``consensus_task_arithmetic``: one merged model, theta_0 + alpha * (consensus mask * tau_MTL).
- ``tall_mask_task_arithmetic``: one model per task, theta_0 + m_t * tau_MTL (a ``per_task`` result).

Also home of :class:`PerTaskTensorwise`, the base of per-task tensor-wise methods (EMR-Merging uses it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fusion_bench.config_schema import option
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.kernels.merging import ties as T
from fusion_bench.kernels.subspace import masks as K
from fusion_bench.methods.base import (
    FusionMethod,
    FusionResult,
    TensorwiseConfig,
    TensorwiseMerge,
    register_method,
)
from fusion_bench.utils import count_parameters


@dataclass
class TallMaskOptions(TensorwiseConfig):
    tall_mask_lambda: float = option(
        0.4, ge=0.0, le=1e3,
        help="lambda_t of the TALL masks m_t = |tau_t| > lambda_t * |tau_MTL - tau_t| for every task (the paper picks "
        "it per task in [0.2, 0.6] on validation data; FusionBench's tall_mask default is 0.6).")
    tall_mask_lambdas: dict[str, float] = option(
        {}, ge=0.0, le=1e3, help="Per-task lambda_t overriding tall_mask_lambda, as {model name: lambda}.")

    def __post_init__(self) -> None:
        for name, v in self.tall_mask_lambdas.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= v <= 1e3) or math.isnan(v):
                raise ConfigError(f"method.tall_mask_lambdas.{name}={v!r} is out of range: it must be a number in "
                                  "[0, 1000].")


def _lambdas(cfg: TallMaskOptions, names: list[str]) -> list[float]:
    unknown = sorted(set(cfg.tall_mask_lambdas) - set(names))
    if unknown:
        raise ConfigError(f"method.tall_mask_lambdas names {unknown}, which are not models of the pool {names}; "
                          "use the pool's model names.")
    return [float(cfg.tall_mask_lambdas.get(n, cfg.tall_mask_lambda)) for n in names]


# ----------------------------------------------------------------------------------------------
# consensus merging (one merged model)
# ----------------------------------------------------------------------------------------------
@dataclass
class ConsensusTAConfig(TallMaskOptions):
    consensus_k: int = option(
        2, ge=0, le=10**6,
        help="k: keep the entries active in at least k TALL masks (2 removes catastrophic and selfish weights; "
        "0 keeps all: plain task arithmetic / TIES; more than the number of tasks gives the base model).")
    scaling_factor: float = option(
        0.3, ge=-1e3, le=1e3,
        help="alpha: theta = theta_0 + alpha * (consensus mask * tau_MTL) (the paper picks it on validation data "
        "in (0, 1]).")
    base_merge: str = option(
        "task_arithmetic", choices=("task_arithmetic", "ties"),
        help="How tau_MTL (used by the TALL masks and merged) is built: 'task_arithmetic' = sum_t tau_t (paper's "
        "Consensus TA); 'ties' = TIES merging (top-20% global trim, majority sign for zero votes, disjoint sum; "
        "the paper's Consensus TIES).")
    ties_density: float = option(
        0.2, ge=0.0, le=1.0, help="base_merge=ties: fraction of each task vector kept by the trim (paper code: 0.2).")


@register_method
class ConsensusTaskArithmetic(TensorwiseMerge):
    """Consensus merging: keep the weights that the TALL masks of at least k tasks share.

    Paper: Wang et al., "Localizing Task Information for Improved Model Merging and Compression", ICML 2024.
    Variant: see :mod:`fusion_bench.kernels.subspace.masks`. Per entry, tau_MTL = sum_t tau_t (or the TIES
    merge), m_t = |tau_t| > lambda_t |tau_MTL - tau_t|, theta = theta_0 + alpha * 1[sum_t m_t >= k] * tau_MTL.
    Element-wise per tensor (the TIES variant adds the whole-model trim thresholds of TIES' prepare pass).

    Args:
        config: :class:`ConsensusTAConfig`.
    """

    name = "consensus_task_arithmetic"
    config_class: ClassVar = ConsensusTAConfig
    requires_pretrained = True
    summary = "Consensus merging: task arithmetic (or TIES) restricted to weights shared by >= k TALL masks."
    variant = ("Wang et al. 2024 (TALL masks / Consensus): tau_MTL = sum_t tau_t (base_merge=task_arithmetic) or the "
               "TIES merge (top-20% global trim, disjoint sum); m_t = |tau_t| > lambda_t * |tau_MTL - tau_t|; "
               "theta = theta_0 + alpha * 1[sum_t m_t >= k] * tau_MTL.")

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self._ties = None
        if self.config.base_merge == "ties":
            from fusion_bench.methods.merging.ties import TiesMerging

            self._ties = TiesMerging({"scaling_factor": 1.0, "density": self.config.ties_density,
                                      "keep_rule": "fusionbench", "zero_vote": "majority", "merge_func": "sum",
                                      "trim_scope": "global", "exclude": list(self.config.exclude)})

    def prepare(self, base, sources, names, keys) -> None:
        _lambdas(self.config, names)
        if self._ties is not None:
            self._ties.prepare(base, sources, names, keys)

    def merge_tensor(self, key, base, tensors, names):
        c = self.config
        mtl = None
        if self._ties is not None:
            taus = [t - base for t in tensors]
            mtl = T.ties_merge(torch.zeros_like(base), taus, thresholds=self._ties._global_thresholds(names),
                               scaling_factor=1.0, sign_election="mass", merge="sum", zero_sign=self._ties._zero_sign)
        return K.consensus_merge(base, tensors, lambdas=_lambdas(c, names), k=c.consensus_k,
                                 scaling_factor=c.scaling_factor, mtl=mtl)


# ----------------------------------------------------------------------------------------------
# per-task models
# ----------------------------------------------------------------------------------------------
class _OneTask(TensorwiseMerge):
    """The model of task ``index`` of a :class:`PerTaskTensorwise` method, merged by the in-memory engine."""

    requires_pretrained = True

    def __init__(self, owner: PerTaskTensorwise, index: int):
        super().__init__({"exclude": list(owner.config.exclude)})
        self.name = owner.name  # type: ignore[misc]  (messages name the user's method)
        self.variant = owner.variant  # type: ignore[misc]
        self._owner = owner
        self._index = index

    def prepare(self, base, sources, names, keys) -> None:
        if base is None:
            raise ModelMismatchError(f"Method '{self.name}' needs the base model: add '_pretrained_' to the pool.")
        self._owner.prepare_tasks(base, sources, names, keys)

    def merge_tensor(self, key, base, tensors, names):
        return self._owner.task_tensor(self._index, key, base, tensors, names)


class PerTaskTensorwise(FusionMethod):
    """A data-free method giving one model per task, each computed tensor by tensor.

    Subclasses implement :meth:`task_tensor` (and optionally :meth:`prepare_tasks`, called once per
    run with whole-model access, one tensor at a time). :meth:`run` builds the N task models one after
    the other with the in-memory engine (:func:`fusion_bench.engine.inmemory.merge_in_memory`), so
    every tensor of the pool is read N times (once per task model) and no mask is ever stored: peak
    memory is the N output models plus the N + 1 input tensors of one key. The result is
    ``FusionResult("per_task", models={task: model})``; each model is evaluated on its own task only.
    """

    config_class: ClassVar = TensorwiseConfig
    requires_pretrained = True
    result_kind: ClassVar[str] = "per_task"
    min_models: ClassVar[int] = 1

    def prepare_tasks(self, base, sources, names, keys) -> None:
        """Whole-model statistics (called before each task model; compute once per run)."""

    def task_tensor(self, index: int, key: str, base: torch.Tensor, tensors: list[torch.Tensor],
                    names: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def extra_metadata(self, names: list[str], numel: int) -> dict[str, Any]:
        return {}

    def run(self, modelpool) -> FusionResult:
        from fusion_bench.engine.inmemory import merge_in_memory

        t0 = time.perf_counter()
        names = list(modelpool.model_names)
        if not modelpool.has_pretrained:
            raise ModelMismatchError(f"Method '{self.name}' needs the base model: add '_pretrained_' to the model "
                                     "pool's models.")
        if not names:
            raise ModelMismatchError(f"Method '{self.name}' needs at least 1 model besides '_pretrained_'.")
        self._run_state: dict[str, Any] = {}
        models = {}
        info: dict[str, Any] = {}
        for i, n in enumerate(names):
            models[n], info = merge_in_memory(_OneTask(self, i), modelpool)
        first = models[names[0]]
        numel = sum(v.numel() for k, v in first.state_dict().items()
                    if v.is_floating_point() and self._merged(k))
        meta = self._metadata(t0, parameters=count_parameters(first), needs_task_id=True, extra_parameters=numel,
                              extra_parameters_note="the shared task vector (tau_MTL / tau_uni) beside theta_0",
                              mask_bytes=len(names) * math.ceil(numel / 8), **info)
        meta.update(self.extra_metadata(names, numel))
        meta.setdefault("extra_storage_bytes", meta["mask_bytes"])
        self._run_state = {}
        return FusionResult("per_task", models=models, metadata=meta)

    def _merged(self, key: str) -> bool:
        import fnmatch

        return not any(fnmatch.fnmatchcase(key, p) for p in self.config.exclude)


@dataclass
class TallMaskTAConfig(TallMaskOptions):
    pass


@register_method
class TallMaskTaskArithmetic(PerTaskTensorwise):
    """TALL masks on task arithmetic: one model per task, theta_t = theta_0 + m_t * tau_MTL.

    Paper: Wang et al., "Localizing Task Information for Improved Model Merging and Compression", ICML 2024.
    Variant: tau_MTL = sum_t tau_t (unscaled, as the authors' code), m_t = |tau_t| > lambda_t |tau_MTL - tau_t|
    (one lambda for all tasks unless ``tall_mask_lambdas`` sets some; the paper selects each on validation
    data). Storage in the paper's compressed form: theta_0, tau_MTL and one bit per entry per task
    (``extra_storage_bytes`` = N * ceil(P / 8) for the P merged entries). Cost: every tensor is read N
    times (see :class:`PerTaskTensorwise`); peak memory: the N task models.

    Args:
        config: :class:`TallMaskTAConfig` (tall_mask_lambda, tall_mask_lambdas, exclude).
    """

    name = "tall_mask_task_arithmetic"
    config_class: ClassVar = TallMaskTAConfig
    summary = "TALL masks: per-task models theta_0 + m_t * sum_t tau_t (needs the task id at inference)."
    variant = ("Wang et al. 2024 (TALL masks + task arithmetic): tau_MTL = sum_t tau_t; m_t = |tau_t| > lambda_t * "
               "|tau_MTL - tau_t|; model of task t: theta_0 + m_t * tau_MTL.")

    def prepare_tasks(self, base, sources, names, keys) -> None:
        _lambdas(self.config, names)

    def task_tensor(self, index, key, base, tensors, names):
        taus = [t - base for t in tensors]
        mtl = K.task_arithmetic_mtl(base, tensors)
        lam = _lambdas(self.config, names)[index]
        mask = K.tall_masks([taus[index]], mtl, [lam])[0]
        return K.tall_mask_model(base, mtl, mask)
