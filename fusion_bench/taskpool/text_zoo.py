"""The ``text_zoo`` task pool: accuracy and loss on the MiniLM text zoo's tasks, each with its own head.

A :class:`~fusion_bench.taskpool.text_classification.TextClassificationTaskPool` whose ``tokenizer`` and
``tasks`` (dataset folder, split, text fields, head) are filled in from the text zoo (built first when
missing, see :mod:`fusion_bench.benchmark.text_zoo`). The head of a task is its fine-tuned classifier of
the chosen ``variant`` (full or LoRA): the evaluated encoder replaces that classifier's encoder. The
pretrained encoder evaluated here is FusionBench's GPT-2 "pretrained" row: the pretrained backbone under
each task's fine-tuned head. ``split`` picks the test split (default) or the validation split (for
choosing hyperparameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusion_bench.config_schema import build_config, option
from fusion_bench.errors import ConfigError, did_you_mean
from fusion_bench.taskpool.base import TaskPoolConfig, devices_option, precision_option, register_taskpool
from fusion_bench.taskpool.text_classification import (
    TextClassificationTaskPool,
    TextClassificationTaskPoolConfig,
)


@dataclass
class TextZooTaskPoolConfig(TaskPoolConfig):
    """Options of the ``text_zoo`` task pool."""

    variant: str = option("full", choices=("full", "lora"), help="Whose heads classify the tasks: the fully "
                          "fine-tuned classifiers or the LoRA ones (match the model pool's variant).")
    scale: str = option("full", choices=("full", "tiny"), help="Zoo size: full (the benchmark) or tiny (tests).")
    root: str | None = option(None, help="Zoo folder (default $FUSION_BENCH_CACHE/text-zoo-<scale> or "
                              "~/.cache/fusion_bench/text-zoo-<scale>).")
    build: bool = option(True, help="Build the zoo when it is missing or damaged (false: raise instead).")
    select: list[str] | None = option(None, help="Evaluate only these tasks (null: all).")
    split: str = option("test", choices=("test", "validation"),
                        help="The split evaluated: test (results) or validation (labelled held-out examples for "
                        "choosing hyperparameters, e.g. the leaderboard's --tune).")
    max_length: int | None = option(None, ge=1, le=512, help="Tokens per example (truncation); null: the zoo's "
                                    "fine-tuning length, so that evaluation sees what training saw.")
    batch_size: int = option(64, ge=1, le=1 << 20, help="Examples per forward pass.")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")
    devices: list[str] | str | None = devices_option()
    precision: str = precision_option("the forward passes")
    max_samples: int | None = option(None, ge=1, le=10**9, help="At most this many evenly spaced examples per "
                                     "task (null: all).")


@register_taskpool("text_zoo")
class TextZooTaskPool(TextClassificationTaskPool):
    """Accuracy and loss on the text zoo's tasks (``taskpool=text_zoo``); see TextClassificationTaskPool.

    Args:
        config: :class:`TextZooTaskPoolConfig` mapping (variant, scale, root, select, split, ...).
    """

    config_class = TextZooTaskPoolConfig

    def __init__(self, config: Any = None, **kwargs: Any):
        from fusion_bench.benchmark.text_zoo import ensure_text_zoo

        zc: TextZooTaskPoolConfig = build_config(TextZooTaskPoolConfig, config, prefix="taskpool", ignore=("type",),
                                                 **kwargs)
        self.zoo_config = zc
        self.zoo = ensure_text_zoo(zc.scale, zc.root, build=zc.build, variants=(zc.variant,))
        tasks = self.zoo.tasks
        if zc.select is not None:
            unknown = [t for t in zc.select if t not in tasks]
            if unknown:
                raise ConfigError(f"taskpool.select names unknown task '{unknown[0]}'.{did_you_mean(unknown[0], tasks)}")
            tasks = [t for t in tasks if t in zc.select]
        spec_tasks = {t: {"dataset": str(self.zoo.data_path(t)), "split": zc.split,
                          "text_fields": self.zoo.text_fields(t), "head": str(self.zoo.head_path(zc.variant, t))}
                      for t in tasks}
        self.config_class = TextClassificationTaskPoolConfig  # the parent validates the filled-in config
        super().__init__({"name": zc.name, "tokenizer": str(self.zoo.pretrained_path), "tasks": spec_tasks,
                          "max_length": zc.max_length or self.zoo.max_length, "batch_size": zc.batch_size, "device": zc.device,
                          "devices": zc.devices, "precision": zc.precision, "max_samples": zc.max_samples})

    def report_extras(self) -> dict[str, Any]:
        d = super().report_extras()
        d["taskpool_info"].update({"type": "text_zoo", "variant": self.zoo_config.variant,
                                   "scale": self.zoo.scale, "root": str(self.zoo.root), "split": self.zoo_config.split})
        return d
