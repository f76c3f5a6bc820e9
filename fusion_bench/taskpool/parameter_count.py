"""A task pool that evaluates nothing and reports parameter counts (for runs without data)."""

from __future__ import annotations

from typing import Any

from torch import nn

from fusion_bench.taskpool.base import TaskPool, register_taskpool
from fusion_bench.utils import count_parameters


@register_taskpool("parameter_count")
class ParameterCountTaskPool(TaskPool):
    """Reports the model's parameter count only."""

    def evaluate(self, model: nn.Module, tasks: list[str] | None = None) -> dict[str, Any]:
        return {"tasks": {}, "average": {}, "parameters": count_parameters(model)}
