"""The ``clip_hub`` model pool: FusionBench's CLIP vision encoders on the Hugging Face Hub.

An ordinary :class:`~fusion_bench.modelpool.base.ModelPool` (``model_class: clip_vision``; models and
``datasets`` as written in the shipped ``clip-vit-*`` configs) whose tasks take their class names and
caption templates from the hub-experiment table :mod:`fusion_bench.hub.clip_tasks`, so that the
data methods (Fisher, RegMean, AdaMerging, ...) build the same zero-shot heads as the task pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusion_bench.config_schema import option
from fusion_bench.modelpool.base import ModelPool, ModelPoolConfig
from fusion_bench.modelpool.registry import register_modelpool


@dataclass
class CLIPHubPoolConfig(ModelPoolConfig):
    """Config of the ``clip_hub`` model pool: the ModelPool options, CLIP vision encoders by default."""

    model_class: str = option("clip_vision", help="Which class loads the checkpoints (CLIP vision encoders).")


@register_modelpool("clip_hub")
class CLIPHubModelPool(ModelPool):
    """CLIP vision encoders of FusionBench's hub experiments (``type: clip_hub``).

    Args:
        models: optional live models (Python API); see :class:`ModelPool`.
        config: :class:`CLIPHubPoolConfig` mapping.
    """

    config_class = CLIPHubPoolConfig

    def task_info(self, task: str) -> dict[str, Any]:
        """Class names and caption templates of ``task`` from the hub table ({} for a task it lacks,
        which then falls back to the dataset's ClassLabel names)."""
        from fusion_bench.hub.clip_tasks import TASKS

        if task not in TASKS:
            return {}
        t = TASKS[task]
        return {"classnames": t.classnames, "templates": t.templates}

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["type"] = "clip_hub"
        return d
