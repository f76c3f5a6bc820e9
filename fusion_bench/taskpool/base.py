"""Task pool interface: ``evaluate(model, tasks=None) -> report``.

A report is ``{"tasks": {task: {metric: value}}, "average": {metric: mean over tasks}, ...}``.
Task pools handle :class:`fusion_bench.models.ensemble.Ensemble` models by evaluating each member
and combining their logits with the ensemble's rule.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from fusion_bench.config_schema import build_config, option, to_plain
from fusion_bench.errors import ConfigError, did_you_mean
from fusion_bench.registry import Registry

TASKPOOLS = Registry("taskpool.type", "fusion_bench.taskpool")
register_taskpool = TASKPOOLS.register


@dataclass
class TaskPoolConfig:
    name: str = option("taskpool", help="A label for reports.")



def devices_option() -> Any:
    """The ``devices`` option of a task pool that evaluates across several devices (docs/logging_devices.md)."""
    return option(None, help="Evaluate across several devices: a list ([cuda:0,cuda:1]), auto (every visible GPU) or a "
                  "number of GPUs; ensemble members round-robin, one model's batches split (docs/logging_devices.md). "
                  "null: device.")


def precision_option(what: str = "the forward passes", extra: tuple[str, ...] = ()) -> Any:
    """The ``precision`` option of a task pool (autocast during evaluation)."""
    return option("32", choices=("32", "32-true", "bf16-mixed", "16-mixed", *extra),
                  help=f"32 (exact float32), bf16-mixed (bfloat16 autocast, also on CPU) or 16-mixed (float16 autocast, "
                  f"for GPUs) for {what}.")

class TaskPool(ABC):
    config_class: ClassVar[type] = TaskPoolConfig
    type_name: ClassVar[str] = ""

    def __init__(self, config: Any = None, **kwargs: Any):
        self.config = build_config(self.config_class, config, prefix="taskpool", ignore=("type",), **kwargs)

    @property
    def tasks(self) -> list[str]:
        """Names of the tasks this pool evaluates (may be empty)."""
        return []

    @abstractmethod
    def evaluate(self, model: nn.Module, tasks: list[str] | None = None) -> dict[str, Any]:
        """Evaluate ``model`` on ``tasks`` (default: all) and return the report dict."""


class PerTaskPool(TaskPool):
    """A task pool configured task by task: a subclass fills ``self._specs`` (task -> its spec) in
    ``__init__``; the task names and the check of a requested task list come from here."""

    _specs: dict[str, Any]

    @property
    def tasks(self) -> list[str]:
        return list(self._specs)

    def _check_tasks(self, tasks: list[str] | None) -> list[str]:
        """``tasks`` (default: every task), each checked to be one of this pool's tasks."""
        if tasks is None:
            return self.tasks
        for t in tasks:
            if t not in self._specs:
                raise ConfigError(f"taskpool.tasks has no task '{t}'.{did_you_mean(t, self._specs)}")
        return list(tasks)


def average_metrics(per_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of every numeric metric over tasks."""
    keys: dict[str, list[float]] = {}
    for m in per_task.values():
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in keys.items() if len(v) == len(per_task)}


def build_taskpool(config: Mapping[str, Any] | TaskPool | None, **kwargs: Any) -> TaskPool:
    """Build a task pool from its config (``type`` picks the class; default: parameter_count)."""
    if isinstance(config, TaskPool):
        return config
    cfg = dict(to_plain(config or {}))
    cls = TASKPOOLS.get(cfg.get("type", "parameter_count"))
    fields = {f for f in getattr(cls.config_class, "__dataclass_fields__", {})}
    extra = {k: v for k, v in kwargs.items() if k in fields and k not in cfg}
    return cls(cfg, **extra)
