"""The ``clip_zoo`` model pool: the offline CLIP zoo's pretrained model and eight fine-tuned encoders.

It builds the zoo first when the cache is incomplete (see :mod:`fusion_bench.benchmark.zoo`), then
behaves as an ordinary :class:`~fusion_bench.modelpool.base.ModelPool` with
``model_class: clip_vision``: ``_pretrained_`` is the full CLIP folder (its vision tower is loaded),
each task's model is its fine-tuned ``CLIPVisionModel`` folder, and ``datasets`` gives every task's
train / validation / test splits (for methods that use data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusion_bench.config_schema import build_config, option, to_plain
from fusion_bench.errors import ConfigError, did_you_mean
from fusion_bench.modelpool.base import PRETRAINED, ModelPool, ModelPoolConfig, check_architecture
from fusion_bench.modelpool.registry import register_modelpool


@dataclass
class CLIPZooPoolConfig(ModelPoolConfig):
    """Config of the ``clip_zoo`` model pool: the ModelPool options (``models``, ``model_class``,
    ``processor`` and ``datasets`` are filled in from the zoo) plus where the zoo is."""

    scale: str = option("full", choices=("full", "tiny"), help="Zoo size: full (the benchmark) or tiny (tests).")
    root: str | None = option(None, help="Zoo folder (default $FUSION_BENCH_ZOO or ~/.cache/fusion_bench/zoo-<scale>).")
    build: bool = option(True, help="Build the zoo when it is missing or damaged (false: raise instead).")
    include_pretrained: bool = option(True, help="Put '_pretrained_' (the base CLIP) in the pool.")


_FILLED = ("models", "model_class", "processor", "datasets", "model_template", "tasks")


@register_modelpool("clip_zoo")
class CLIPZooModelPool(ModelPool):
    """The offline CLIP zoo as a model pool (``modelpool=clip_zoo``).

    Args:
        config: :class:`CLIPZooPoolConfig` mapping (scale, root, build, select, ...).
    """

    config_class = CLIPZooPoolConfig

    def __init__(self, config: Any = None, **kwargs: Any):
        from fusion_bench.benchmark.zoo import ensure_zoo

        zc: CLIPZooPoolConfig = build_config(CLIPZooPoolConfig, config, prefix="modelpool", ignore=("type",), **kwargs)
        defaults = CLIPZooPoolConfig()
        for key in _FILLED:
            if getattr(zc, key) != getattr(defaults, key):
                raise ConfigError(f"modelpool.{key} is filled in from the zoo by modelpool.type=clip_zoo; remove it "
                                  "(or use the default model pool with your own checkpoints).")
        self.zoo_config = zc
        check_architecture(zc.architecture)  # configs are data: before the zoo is built
        self.zoo = ensure_zoo(zc.scale, zc.root, build=zc.build)
        tasks = self.zoo.tasks
        if zc.select is not None:
            unknown = [t for t in zc.select if t not in tasks]
            if unknown:
                raise ConfigError(f"modelpool.select names unknown task '{unknown[0]}'.{did_you_mean(unknown[0], tasks)}")
            tasks = [t for t in tasks if t in zc.select]
        models: dict[str, str] = {PRETRAINED: str(self.zoo.pretrained_path)} if zc.include_pretrained else {}
        models.update({t: str(self.zoo.finetuned_path(t)) for t in tasks})
        datasets = {t: {s: {"path": str(self.zoo.data_path(t)), "split": s} for s in ("train", "validation", "test")}
                    for t in tasks}
        filled = {**to_plain(zc), "models": models, "model_class": "clip_vision", "select": None,
                  "processor": str(self.zoo.pretrained_path), "datasets": datasets}
        super().__init__(config=filled)
        self._tasks = tasks

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def task_info(self, task: str) -> dict[str, Any]:
        """Class names and caption templates of a zoo task (used by data-driven methods and fine-tuning)."""
        if task not in self._tasks:
            raise ConfigError(f"The clip_zoo pool has no task '{task}'.{did_you_mean(task, self._tasks)}")
        spec = self.zoo.task_spec(task)
        return {"classnames": list(spec.classnames), "templates": list(spec.templates)}

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"type": "clip_zoo", "scale": self.zoo.scale, "root": str(self.zoo.root)})
        return d
