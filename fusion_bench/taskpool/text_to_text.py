"""Text-to-text task pool: prompt, greedy generation, exact match (or Spearman's rho for scores).

FusionBench's ``flan-t5_glue_text_generation`` protocol (``fusion_bench/tasks/flan_t5_text_generation``):
every example is rendered with the task's prompt template (``{field}`` placeholders filled from the
dataset's columns) and truncated to ``max_input_length`` tokens; the model generates greedily
(``generation``: FusionBench's ``max_length=10`` decoder tokens, start token included); the decoded
output (special tokens skipped) is compared with the decoded target text:

- classification (``targets``: the label word of each label index): ``accuracy`` = exact string match;
- regression (``target_format``, e.g. ``"{:.1f}"`` for STSB): ``spearman_rho`` between the outputs parsed
  as floats (an unparsable output counts 0.0) and the targets, ``scipy.stats.spearmanr``.

Every task also reports ``score`` (its accuracy or rho), whose mean is FusionBench's average column.
Output ensembles are refused: generated texts are not combined by averaging logits.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fusion_bench.config_schema import build_config, option
from fusion_bench.data.loading import dataset_fingerprint, load_dataset_ref
from fusion_bench.errors import CheckpointError, ConfigError, ModelMismatchError, did_you_mean
from fusion_bench.models.ensemble import Ensemble
from fusion_bench.taskpool.base import (
    PerTaskPool,
    TaskPoolConfig,
    average_metrics,
    register_taskpool,
)
from fusion_bench.utils import resolve_device


@dataclass
class TextToTextTaskSpec:
    """One task of the ``text_to_text`` task pool (``taskpool.tasks.<task>``)."""

    dataset: Any = option(help="Dataset reference: a Hub id, a mapping {path, name} (e.g. {path: nyu-mll/glue, "
                          "name: cola}) or a local folder.")
    template: str = option(help="Prompt template with {column} placeholders, e.g. \"Given the sentence "
                           "'{sentence}', ...\".")
    split: str = option("validation", help="The split to evaluate ('validation[:100]' takes rows 0-99).")
    targets: list[str] | None = option(None, help="Target text of each label index (classification); exact match.")
    target_format: str | None = option(None, help="Format of a numeric label, e.g. '{:.1f}' (regression, Spearman).")
    metric: str = option("accuracy", choices=("accuracy", "spearman_rho"),
                         help="accuracy (exact match) or spearman_rho (outputs parsed as numbers).")
    label_column: str = option("label", help="The label column.")


@dataclass
class TextToTextTaskPoolConfig(TaskPoolConfig):
    """Options of the ``text_to_text`` task pool."""

    tokenizer: str = option("google/flan-t5-base", help="Tokenizer folder or Hub id (all Flan-T5 sizes share one).")
    tasks: dict[str, Any] = option({}, help="Task name -> {dataset, split, template, targets | target_format, metric}.")
    max_input_length: int = option(512, ge=1, le=1 << 20, help="Prompt tokens kept (truncation), FusionBench: 512.")
    generation: dict[str, Any] = option({"max_length": 10, "num_beams": 1, "do_sample": False},
                                        help="Keyword arguments of model.generate (FusionBench: max_length=10, greedy).")
    batch_size: int = option(32, ge=1, le=1 << 20, help="Prompts per generate call.")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")
    max_samples: int | None = option(None, ge=1, le=10**9, help="Evaluate at most this many evenly spaced examples "
                                     "per task (null: all); for fast runs.")


_GEN_KEYS = {"max_length", "max_new_tokens", "num_beams", "do_sample", "min_length", "length_penalty",
             "repetition_penalty", "no_repeat_ngram_size"}


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def parse_float(text: str) -> float:
    """FusionBench's STSB parsing: ``float(text)``, 0.0 when that fails."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return 0.0


def spearman_rho(preds: list[float], labels: list[float]) -> float:
    """Spearman's rank correlation (``scipy.stats.spearmanr``; NaN when either side is constant)."""
    import warnings

    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(preds, labels)[0])


@register_taskpool("text_to_text")
class TextToTextTaskPool(PerTaskPool):
    """Prompted generation scored by exact match or Spearman's rho (see the module docstring).

    Args:
        config: :class:`TextToTextTaskPoolConfig` or a mapping; keywords override.
    """

    config_class = TextToTextTaskPoolConfig

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self._specs: dict[str, TextToTextTaskSpec] = {}
        for task, raw in self.config.tasks.items():
            spec = build_config(TextToTextTaskSpec, raw, prefix=f"taskpool.tasks.{task}")
            if spec.metric == "accuracy" and not spec.targets:
                raise ConfigError(f"taskpool.tasks.{task}: metric accuracy needs targets (the text of each label).")
            if spec.metric == "spearman_rho" and not spec.target_format:
                raise ConfigError(f"taskpool.tasks.{task}: metric spearman_rho needs target_format, e.g. '{{:.1f}}'.")
            if not template_fields(spec.template):
                raise ConfigError(f"taskpool.tasks.{task}.template has no {{column}} placeholder.")
            self._specs[task] = spec
        unknown = set(self.config.generation) - _GEN_KEYS
        if unknown:
            k = sorted(unknown)[0]
            raise ConfigError(f"Unknown key 'taskpool.generation.{k}'.{did_you_mean(k, _GEN_KEYS)}")
        self._tokenizer = None
        self._data: dict[str, tuple[list[str], list[Any]]] = {}
        self._split_info: dict[str, dict[str, Any]] = {}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from fusion_bench.modelpool.base import resolve_hf_path

            path = resolve_hf_path(self.config.tokenizer, "taskpool.tokenizer")
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(path)
            except Exception as e:
                raise CheckpointError(f"taskpool.tokenizer: cannot load a tokenizer from {path} "
                                      f"({type(e).__name__}: {e}).") from e
        return self._tokenizer

    def target_text(self, task: str, label: Any) -> str:
        spec = self._specs[task]
        if spec.metric == "spearman_rho":
            return spec.target_format.format(float(label))
        i = int(label)
        if not 0 <= i < len(spec.targets):
            raise ConfigError(f"taskpool.tasks.{task}: label {i} has no target text ({len(spec.targets)} targets).")
        return spec.targets[i]

    def examples(self, task: str) -> tuple[list[str], list[Any]]:
        """(prompts, labels) of ``task`` (labels: indices, or floats for regression)."""
        if task not in self._data:
            from fusion_bench.methods._task_data import _even

            spec = self._specs[task]
            ds = load_dataset_ref(spec.dataset, split=spec.split)
            fields = template_fields(spec.template)
            missing = [c for c in [*fields, spec.label_column] if c not in ds.column_names]
            if missing:
                raise ConfigError(f"taskpool.tasks.{task}: column '{missing[0]}' is not in the dataset (columns "
                                  f"{ds.column_names}).{did_you_mean(missing[0], ds.column_names)}")
            ds = ds.select(_even(len(ds), self.config.max_samples))
            cols = {c: ds[c] for c in fields}
            prompts = [spec.template.format(**{c: cols[c][i] for c in fields}) for i in range(len(ds))]
            self._data[task] = (prompts, list(ds[spec.label_column]))
            self._split_info[task] = {"dataset": str(spec.dataset), "split": spec.split, "samples": len(ds),
                                      "fingerprint": dataset_fingerprint(ds)}
        return self._data[task]

    def _decode_targets(self, texts: list[str]) -> list[str]:
        # the label as FusionBench compares it: tokenized, then decoded without special tokens
        tok = self.tokenizer
        ids = tok(texts, truncation=True, max_length=self.config.max_input_length)["input_ids"]
        return tok.batch_decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: list[str]) -> list[str]:
        tok = self.tokenizer
        device = resolve_device(self.config.device)
        model.to(device)
        out: list[str] = []
        for s in range(0, len(prompts), self.config.batch_size):
            enc = tok(prompts[s:s + self.config.batch_size], truncation=True, max_length=self.config.max_input_length,
                      padding=True, return_tensors="pt")
            ids = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                                 **dict(self.config.generation))
            out += tok.batch_decode(ids, skip_special_tokens=True)
        return out

    def evaluate(self, model: nn.Module, tasks: list[str] | None = None) -> dict[str, Any]:
        """``accuracy`` (exact match) or ``spearman_rho``, and ``score``, per task; their averages."""
        tasks = self._check_tasks(tasks)
        if isinstance(model, Ensemble):
            raise ConfigError("The text_to_text task pool evaluates one generating model; output ensembles of "
                              "seq2seq models are not supported (use a merging method).")
        if not callable(getattr(model, "generate", None)):
            raise ModelMismatchError(f"The text_to_text task pool needs a model with generate() (a seq2seq LM such "
                                     f"as T5ForConditionalGeneration), got {type(model).__name__}.")
        was_training = model.training
        model.eval()
        results: dict[str, dict[str, float]] = {}
        try:
            for task in tasks:
                prompts, labels = self.examples(task)
                preds = self.generate(model, prompts)
                targets = self._decode_targets([self.target_text(task, y) for y in labels])
                if self._specs[task].metric == "accuracy":
                    acc = sum(p == t for p, t in zip(preds, targets)) / max(len(preds), 1)
                    results[task] = {"accuracy": acc, "score": acc}
                else:
                    rho = spearman_rho([parse_float(p) for p in preds], [parse_float(t) for t in targets])
                    results[task] = {"spearman_rho": rho, "score": rho}
        finally:
            model.train(was_training)
        return {"tasks": results, "average": average_metrics(results)}

    def report_extras(self) -> dict[str, Any]:
        return {"evaluation_splits": dict(self._split_info),
                "taskpool_info": {"type": "text_to_text", "tokenizer": self.config.tokenizer,
                                  "generation": dict(self.config.generation), "max_samples": self.config.max_samples}}
