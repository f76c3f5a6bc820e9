"""The ``text_zoo`` model pool: the MiniLM text zoo's encoders (full or LoRA), each task with its own head.

A :class:`~fusion_bench.modelpool.sequence_classification.SequenceClassificationPool` (FusionBench's GPT-2
GLUE protocol: backbones merged, heads per task) whose ``models``, ``heads``, ``text_fields``,
``tokenizer`` and ``datasets`` are filled in from the text zoo (built first when missing, see
:mod:`fusion_bench.benchmark.text_zoo`):

- ``_pretrained_``: the pretrained MiniLM encoder;
- ``<task>``: ``variant: full``: the fully fine-tuned classifier (its encoder is merged); ``variant: lora``:
  the task's LoRA adapter, folded into the pretrained encoder with ``merge_and_unload`` on load;
- ``heads.<task>``: the task's fine-tuned classifier (the data methods' classifier: Fisher, RegMean,
  AdaMerging);
- ``datasets.<task>``: train / validation / test of the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusion_bench.config_schema import build_config, option, to_plain
from fusion_bench.errors import ConfigError, did_you_mean
from fusion_bench.modelpool.base import PRETRAINED, check_architecture
from fusion_bench.modelpool.registry import register_modelpool
from fusion_bench.modelpool.sequence_classification import (
    SequenceClassificationPool,
    SequenceClassificationPoolConfig,
)


@dataclass
class TextZooPoolConfig(SequenceClassificationPoolConfig):
    """Config of the ``text_zoo`` model pool: the sequence-classification pool's options (``models``,
    ``heads``, ``text_fields``, ``tokenizer``, ``datasets`` are filled in from the zoo) plus where the zoo is."""

    variant: str = option("full", choices=("full", "lora"), help="Which fine-tuned encoders: full fine-tuning or "
                          "LoRA (adapters folded into full weights).")
    scale: str = option("full", choices=("full", "tiny"), help="Zoo size: full (the benchmark) or tiny (tests).")
    root: str | None = option(None, help="Zoo folder (default $FUSION_BENCH_CACHE/text-zoo-<scale> or "
                              "~/.cache/fusion_bench/text-zoo-<scale>).")
    build: bool = option(True, help="Build the zoo when it is missing or damaged (false: raise instead).")
    include_pretrained: bool = option(True, help="Put '_pretrained_' (the pretrained encoder) in the pool; the "
                                      "lora variant needs it (its adapters are applied to it).")
    max_length: int | None = option(None, ge=1, le=512, help="Tokens per example (truncation); null: the zoo's "
                                    "fine-tuning length, so that evaluation sees what training saw.")


_FILLED = ("models", "model_class", "heads", "text_fields", "tokenizer", "datasets", "model_template", "tasks")


@register_modelpool("text_zoo")
class TextZooModelPool(SequenceClassificationPool):
    """The MiniLM text zoo as a model pool (``modelpool=text_zoo``, ``text_zoo_lora``, ``text_zoo_tiny``).

    Args:
        config: :class:`TextZooPoolConfig` mapping (variant, scale, root, build, select, ...).
    """

    config_class = TextZooPoolConfig

    def __init__(self, config: Any = None, **kwargs: Any):
        from fusion_bench.benchmark.text_zoo import ensure_text_zoo

        zc: TextZooPoolConfig = build_config(TextZooPoolConfig, config, prefix="modelpool", ignore=("type",), **kwargs)
        defaults = TextZooPoolConfig()
        for key in _FILLED:
            if getattr(zc, key) != getattr(defaults, key):
                raise ConfigError(f"modelpool.{key} is filled in from the zoo by modelpool.type=text_zoo; remove it "
                                  "(or use modelpool.type=sequence_classification with your own checkpoints).")
        if zc.variant == "lora" and not zc.include_pretrained:
            raise ConfigError("modelpool.include_pretrained=false: the lora variant's adapters are applied to the "
                              "pretrained encoder; keep include_pretrained=true.")
        check_architecture(zc.architecture)
        self.zoo_config = zc
        self.zoo = ensure_text_zoo(zc.scale, zc.root, build=zc.build, variants=(zc.variant,))
        tasks = self.zoo.tasks
        if zc.select is not None:
            unknown = [t for t in zc.select if t not in tasks]
            if unknown:
                raise ConfigError(f"modelpool.select names unknown task '{unknown[0]}'.{did_you_mean(unknown[0], tasks)}")
            tasks = [t for t in tasks if t in zc.select]
        models: dict[str, str] = {PRETRAINED: str(self.zoo.pretrained_path)} if zc.include_pretrained else {}
        models.update({t: str(self.zoo.model_path(zc.variant, t)) for t in tasks})
        datasets = {t: {s: {"path": str(self.zoo.data_path(t)), "split": s} for s in ("train", "validation", "test")}
                    for t in tasks}
        filled = {**to_plain(zc), "max_length": zc.max_length or self.zoo.max_length, "models": models, "model_class": "auto", "select": None,
                  "tokenizer": str(self.zoo.pretrained_path), "datasets": datasets,
                  "heads": {t: str(self.zoo.head_path(zc.variant, t)) for t in tasks},
                  "text_fields": {t: self.zoo.text_fields(t) for t in tasks}}
        super().__init__(config=filled)
        self._tasks = tasks

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"type": "text_zoo", "variant": self.zoo_config.variant, "scale": self.zoo.scale,
                  "root": str(self.zoo.root)})
        return d
