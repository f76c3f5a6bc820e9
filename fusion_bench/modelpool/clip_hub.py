"""The ``clip_hub`` model pool: FusionBench's CLIP vision encoders on the Hugging Face Hub.

An ordinary :class:`~fusion_bench.modelpool.base.ModelPool` (``model_class: clip_vision``; models and
``datasets`` as written in the shipped ``clip-vit-*`` configs) whose tasks take their class names and
caption templates from the hub-experiment table :mod:`fusion_bench.hub.clip_tasks`, so that the
data methods (Fisher, RegMean, AdaMerging, ...) build the same zero-shot heads as the task pool.

LoRA entries (``modelpool=clip-vit-base-patch16_TA8_lora``): a model that is a PEFT adapter
(``tanganke/clip-vit-base-patch16_<task>_lora-16``: r 16, alpha 32, ``q_proj``/``v_proj``) is applied to the
vision transformer (``CLIPVisionModel.vision_model``, the module FusionBench trained and loads it on, see its
``load_lora_vision_model_hf``) of ``_pretrained_`` and folded into full weights with ``merge_and_unload``, as
FusionBench's ``merge_and_unload: true`` pool does (:mod:`fusion_bench.modelpool._peft`); every method then sees
full CLIP vision encoders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from fusion_bench.config_schema import option
from fusion_bench.modelpool._peft import PeftMergedMixin
from fusion_bench.modelpool.base import ModelPool, ModelPoolConfig
from fusion_bench.modelpool.registry import register_modelpool


@dataclass
class CLIPHubPoolConfig(ModelPoolConfig):
    """Config of the ``clip_hub`` model pool: the ModelPool options, CLIP vision encoders by default."""

    model_class: str = option("clip_vision", help="Which class loads the checkpoints (CLIP vision encoders).")


@register_modelpool("clip_hub")
class CLIPHubModelPool(PeftMergedMixin, ModelPool):
    """CLIP vision encoders of FusionBench's hub experiments (``type: clip_hub``); LoRA adapters merged on load.

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

    def adapter_target(self, base: nn.Module) -> nn.Module:
        """FusionBench's CLIP LoRA adapters are trained on (and name modules of) the vision transformer
        (transformers < 5: ``CLIPVisionModel.vision_model``; 5 merged it into ``CLIPVisionModel``)."""
        return getattr(base, "vision_model", base)

    def adapter_attach(self, base: nn.Module, merged: nn.Module) -> nn.Module:
        if getattr(base, "vision_model", None) is not None and base.vision_model is not merged:
            base.vision_model = merged
            return base
        return merged

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["type"] = "clip_hub"
        return d
