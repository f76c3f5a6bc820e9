"""The method interface, its result type and the method registry.

A method is a class with a config dataclass (its options, documented by the fields' ``help``)
and ``run(modelpool) -> FusionResult``. Methods register by name with :func:`register_method`;
the CLI, the config system and the test-suite all read the registry (``list_methods()``).

Data-free methods that combine checkpoints tensor by tensor subclass :class:`TensorwiseMerge`
and implement only :meth:`TensorwiseMerge.merge_tensor`; the in-memory path and the streaming
engine both call it, so the two always agree.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from fusion_bench.config_schema import build_config, option, to_plain
from fusion_bench.errors import ConfigError, ModelMismatchError, RegistryError, did_you_mean
from fusion_bench.utils import count_parameters

if TYPE_CHECKING:
    from fusion_bench.io.checkpoint import TensorSource
    from fusion_bench.modelpool.base import ModelPool


# ----------------------------------------------------------------------------------------------
# result
# ----------------------------------------------------------------------------------------------
ResultKind = Literal["merged", "per_task", "ensemble"]


@dataclass
class FusionResult:
    """What a method produced.

    - ``kind="merged"``: ``model`` is one model of the pool's architecture (or a larger one for
      mixing/upscaling methods), evaluated on every task.
    - ``kind="per_task"``: ``models`` maps task name -> model; each is evaluated only on its task.
    - ``kind="ensemble"``: ``model`` is an :class:`fusion_bench.models.ensemble.Ensemble`.

    ``metadata`` holds the hyperparameters, wall time, peak memory, extra parameters and anything
    method specific; the program adds it to the report.
    """

    kind: ResultKind
    model: nn.Module | None = None
    models: dict[str, nn.Module] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind in ("merged", "ensemble") and self.model is None:
            raise ValueError(f"FusionResult(kind={self.kind!r}) needs a model")
        if self.kind == "per_task" and not self.models:
            raise ValueError("FusionResult(kind='per_task') needs models")


# ----------------------------------------------------------------------------------------------
# config + method base
# ----------------------------------------------------------------------------------------------
@dataclass
class MethodConfig:
    """Base of method configs. Subclasses add documented fields with :func:`option`."""


class FusionMethod(ABC):
    """Base class of every method.

    Subclasses set ``name`` (registry name), ``config_class``, ``summary`` (one line, shown in
    the method list) and ``variant`` (the paper and the exact variant implemented), and
    implement :meth:`run`. ``__init__`` only stores the validated config.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    summary: ClassVar[str] = ""
    variant: ClassVar[str] = ""
    family: ClassVar[Literal["merging", "ensemble", "mixing", "reference", "training", "compression", "continual"]] = "merging"
    requires_pretrained: ClassVar[bool] = False
    uses_data: ClassVar[bool] = False
    deterministic: ClassVar[bool] = True
    #: claims checked by the conformance suite (fusion_bench.testing): merging N copies of one model
    #: gives that model back; the order of the models does not matter.
    identity_on_equal_inputs: ClassVar[bool] = True
    permutation_invariant: ClassVar[bool] = True

    def __init__(self, config: MethodConfig | Mapping[str, Any] | None = None, **kwargs: Any):
        self.config = build_config(self.config_class, config, prefix="method", ignore=("name",), **kwargs)

    def hyperparameters(self) -> dict[str, Any]:
        return to_plain(self.config)

    @abstractmethod
    def run(self, modelpool: ModelPool) -> FusionResult:
        """Fuse the models of ``modelpool``."""

    def check_ready(self, modelpool: ModelPool) -> list[str]:
        """Check, without fusing, that ``modelpool`` gives this method everything :meth:`run` needs
        beyond the models themselves (data of each task, ...); raise a FusionBenchError naming what is
        missing. Returns notes on what could not be checked (shown by the dry run)."""
        return []

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"

    # helpers for subclasses
    def _metadata(self, t0: float, **extra: Any) -> dict[str, Any]:
        return {"method": self.name, "variant": self.variant, "hyperparameters": self.hyperparameters(),
                "method_wall_time_s": round(time.perf_counter() - t0, 4), **extra}


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[FusionMethod]] = {}
_DISCOVERED = False


def register_method(cls: type[FusionMethod]) -> type[FusionMethod]:
    """Class decorator: add a method to the registry under ``cls.name`` (duplicates rejected)."""
    name = cls.name
    if not name or not name.replace("_", "").isalnum() or name != name.lower():
        raise RegistryError(f"Method class {cls.__name__} needs a lower_snake_case `name`, got {name!r}.")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        other = _REGISTRY[name]
        raise RegistryError(
            f"Method name '{name}' is already registered by {other.__module__}.{other.__qualname__}; "
            "choose another name."
        )
    if not dataclasses.is_dataclass(cls.config_class):
        raise RegistryError(f"Method '{name}': config_class must be a dataclass.")
    if not cls.variant:
        raise RegistryError(f"Method '{name}': set `variant` to the paper and exact variant implemented.")
    _REGISTRY[name] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if not _DISCOVERED:
        _DISCOVERED = True
        import fusion_bench.methods  # noqa: F401  (imports every method module)


def list_methods(family: str | None = None) -> list[str]:
    """Names of registered methods (optionally of one family), sorted."""
    _discover()
    return sorted(n for n, c in _REGISTRY.items() if family is None or c.family == family)


def get_method_class(name: str) -> type[FusionMethod]:
    _discover()
    if name not in _REGISTRY:
        raise RegistryError(f"Unknown method '{name}'.{did_you_mean(name, _REGISTRY)}")
    return _REGISTRY[name]


def build_method(config: Mapping[str, Any] | str, **overrides: Any) -> FusionMethod:
    """Build a method from a config mapping with a ``name`` key (or just a name)."""
    if isinstance(config, str):
        config = {"name": config}
    config = dict(to_plain(config))
    if "name" not in config:
        raise ConfigError("The method config has no 'name' key; set method=<name> (see `fusion_bench --list`).")
    cls = get_method_class(config.pop("name"))
    return cls(config, **overrides)


# ----------------------------------------------------------------------------------------------
# tensor-wise merging
# ----------------------------------------------------------------------------------------------
@dataclass
class TensorwiseConfig(MethodConfig):
    """Options shared by every tensor-wise merge."""

    exclude: list[str] = option(
        [], help="Glob patterns of tensor names not merged: they are copied from the base model "
        "(pretrained if present, else the first model).")


def all_finite(t: torch.Tensor) -> bool:
    """True when no entry is NaN or +-inf (exact; ~10x faster than ``torch.isfinite(t).all()``:
    one min/max reduction, which propagates NaN)."""
    if not t.dtype.is_floating_point or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _matches(name: str, patterns: list[str]) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class TensorwiseMerge(FusionMethod):
    """A data-free merge computed independently for every tensor.

    Subclasses implement :meth:`merge_tensor`. Floating-point tensors are merged in float32 (or
    float64 when inputs are float64) and cast back to the base dtype; integer and boolean tensors
    (buffers such as position ids) are copied from the base model and must agree across models.
    """

    config_class: ClassVar[type[MethodConfig]] = TensorwiseConfig
    #: minimum number of models (not counting ``_pretrained_``)
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    #: the output at an index depends only on the inputs at that index (and the tensor's key): the
    #: streaming engine may then merge large tensors in row blocks (fusion_bench.engine.streaming).
    elementwise: ClassVar[bool] = False

    def check_pool(self, names: list[str], has_pretrained: bool) -> None:
        """Reject pools the method cannot merge (called before any tensor is read)."""
        if self.requires_pretrained and not has_pretrained:
            raise ModelMismatchError(
                f"Method '{self.name}' needs the base model: add '_pretrained_' to the model pool's models.")
        n = len(names)
        if n < self.min_models:
            raise ModelMismatchError(f"Method '{self.name}' needs at least {self.min_models} models, the pool has {n}.")
        if self.max_models is not None and n > self.max_models:
            raise ModelMismatchError(f"Method '{self.name}' merges at most {self.max_models} models, the pool has {n}: "
                                     f"{names}. Select models with modelpool.select=[...].")

    def prepare(self, base: TensorSource | None, sources: list[TensorSource], names: list[str],
                keys: list[str]) -> None:
        """Optional pre-pass over the checkpoints before any tensor is merged (e.g. global statistics
        such as a whole-model magnitude threshold). Read tensors one at a time; default: nothing."""

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    @abstractmethod
    def merge_tensor(self, key: str, base: torch.Tensor | None, tensors: list[torch.Tensor],
                     names: list[str]) -> torch.Tensor:
        """Merge one tensor.

        Args:
            key: the tensor's name (used to seed randomness and for per-tensor options).
            base: the pretrained tensor in the compute dtype, or None when the pool has no base.
            tensors: the models' tensors (same order as ``names``), in the compute dtype.
            names: the model names.
        Returns:
            The merged tensor (any float dtype; it is cast back by the caller).
        """

    def should_merge(self, key: str, dtype: torch.dtype) -> bool:
        return dtype.is_floating_point and not _matches(key, self.config.exclude)

    def merge_one(self, key: str, base: torch.Tensor | None, tensors: list[torch.Tensor],
                  names: list[str]) -> torch.Tensor:
        """Cast, check finiteness, merge, cast back, check the result is finite (else nothing is written).
        Shared by in-memory and streaming paths."""
        ref = base if base is not None else tensors[0]
        if not self.should_merge(key, ref.dtype):
            return ref
        cd = self.compute_dtype(ref.dtype)
        for n, t in zip(names, tensors):
            if not all_finite(t):
                raise ModelMismatchError(
                    f"Model '{n}' has non-finite values (NaN/inf) in tensor '{key}'; fix or drop that checkpoint.")
        b = base.to(cd) if base is not None else None
        out = self.merge_tensor(key, b, [t.to(cd) for t in tensors], names).to(ref.dtype)
        from fusion_bench.checks import check_merged_tensor

        check_merged_tensor(self, key, out)
        return out

    def run(self, modelpool: ModelPool) -> FusionResult:
        from fusion_bench.engine.inmemory import merge_in_memory

        t0 = time.perf_counter()
        model, info = merge_in_memory(self, modelpool)
        return FusionResult("merged", model=model,
                            metadata=self._metadata(t0, extra_parameters=0, parameters=count_parameters(model),
                                                    **info))


MergeFn = Callable[[str, torch.Tensor | None, list[torch.Tensor], list[str]], torch.Tensor]
