"""Sequence-classification backbone pool: backbones are merged, every task keeps its own head.

``modelpool.type=sequence_classification``: FusionBench's GPT-2 GLUE protocol (``modelpool=gpt2_glue``),
and the pool of any text zoo built the same way (a BERT/MiniLM encoder fine-tuned per task). Each model
entry is a sequence-classification checkpoint (or ``_pretrained_``'s plain backbone) loaded as its
backbone with ``model_class`` (``transformers.GPT2Model``, ``auto``): the classification head is not
part of what methods merge.

Heads never travel through the pool to the task pool (no back references): the task pool names each
task's head checkpoint in its own config (``taskpool.tasks.<task>.head``), both generated from one table
(``fusion_bench/hub/glue.py``). This pool's ``heads``, ``text_fields``, ``tokenizer`` and ``datasets``
serve the data methods (Fisher merging, RegMean, AdaMerging) through
:class:`TextClassificationTaskData`. PEFT adapters are merged into full weights on load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fusion_bench.config_schema import option
from fusion_bench.errors import ConfigError, did_you_mean
from fusion_bench.io.checkpoint import TensorSource
from fusion_bench.methods._task_data import TaskDataAdapter, TaskExamples, _even
from fusion_bench.modelpool._peft import PeftMergedMixin
from fusion_bench.modelpool.base import ModelPool, ModelPoolConfig
from fusion_bench.modelpool.registry import register_modelpool


@dataclass
class SequenceClassificationPoolConfig(ModelPoolConfig):
    """Config of a sequence-classification backbone pool (``modelpool.type=sequence_classification``)."""

    model_class: str = option("auto", help="Class that loads each checkpoint's backbone (auto = AutoModel; "
                              "'transformers.GPT2Model' for GPT-2).")
    heads: dict[str, str] = option({}, help="Task -> sequence-classification checkpoint whose head classifies that "
                                   "task for the data methods (default: the task's own model entry).")
    text_fields: dict[str, list[str]] = option({}, help="Task -> its one or two text columns (e.g. [sentence1, "
                                               "sentence2]).")
    label_column: str = option("label", help="Label column of the tasks' datasets.")
    max_length: int = option(512, ge=1, le=1 << 20, help="Tokens per example (truncation, longest first).")


@register_modelpool("sequence_classification")
class SequenceClassificationPool(PeftMergedMixin, ModelPool):
    """Backbones of per-task sequence classifiers (see the module docstring).

    Args:
        models: name -> checkpoint (``_pretrained_``: the base backbone).
        config: :class:`SequenceClassificationPoolConfig` or a mapping (keywords win).
    """

    config_class = SequenceClassificationPoolConfig

    def __init__(self, models=None, config=None, **kwargs: Any):
        super().__init__(models, config, **kwargs)
        for key in ("heads", "text_fields"):
            for t in getattr(self.config, key):
                if t not in self.model_names:
                    raise ConfigError(f"modelpool.{key} names '{t}', which is not a model of the pool."
                                      f"{did_you_mean(t, self.model_names)}")
        for t, cols in self.config.text_fields.items():
            if not isinstance(cols, (list, tuple)) or not 1 <= len(cols) <= 2:
                raise ConfigError(f"modelpool.text_fields.{t} must list one or two column names, got {cols!r}.")

    def source(self, name: str):
        """A lazy view of ``name``'s backbone tensors under the base checkpoint's names: a classifier
        checkpoint's head (``score.*``, ``classifier.*``) and its backbone prefix (``transformer.``) are left out."""
        src = super().source(name)
        base = self.base_name()
        if name == base or getattr(src, "_backbone_view", False):
            return src
        from fusion_bench.engine.validate import rename_map

        base_keys = list(super().source(base).keys())
        mapping = rename_map(base_keys, src.keys())
        if mapping is None:
            if not set(base_keys) <= set(src.keys()) or set(src.keys()) == set(base_keys):
                return src
            mapping = {k: k for k in base_keys}
        elif len(mapping) != len(base_keys):
            return src  # validation names what does not map
        view = _BackboneView(src, mapping)
        self._sources[name] = view
        return view

    def head_ref(self, task: str) -> str:
        ref = self.config.heads.get(task) or self.entry(task)
        if not isinstance(ref, str):
            raise ConfigError(f"modelpool.heads.{task}: give the checkpoint of task '{task}''s classifier.")
        return ref

    def tokenizer_ref(self) -> str:
        ref = self.config.tokenizer or self.entry(self.base_name())
        if not isinstance(ref, str):
            raise ConfigError("modelpool.tokenizer: give the tokenizer folder or hub id.")
        return ref

    def task_data_adapter(self) -> TaskDataAdapter:
        """The data methods' adapter of this pool (``method.adapter=auto``)."""
        return TextClassificationTaskData(self)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"type": "sequence_classification", "heads": {t: self.head_ref(t) for t in self.model_names}})
        return d


class TextClassificationTaskData(TaskDataAdapter):
    """Tokenized task examples and head classifiers of a :class:`SequenceClassificationPool`.

    ``examples`` gives a long tensor (N, 2, L): token ids and attention mask, right-padded to the longest
    selected example (tokenizer: ``modelpool.tokenizer``; pad = unk, else eos, when it has none).
    ``classifier(model, task)`` is the task's head checkpoint with ``model`` as its backbone (head frozen).
    """

    kind = "text_classification"

    def __init__(self, modelpool: SequenceClassificationPool):
        self.modelpool = modelpool
        self._tokenizer = None
        self._skeletons: dict[str, nn.Module] = {}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from fusion_bench.models.text_classification import load_text_tokenizer

            self._tokenizer = load_text_tokenizer(self.modelpool.tokenizer_ref(), "modelpool.tokenizer")
        return self._tokenizer

    def _fields(self, task: str, ds) -> list[str]:
        cols = self.modelpool.config.text_fields.get(task)
        if cols is None:
            raise ConfigError(f"modelpool.text_fields has no task '{task}'; give its text column(s), e.g. "
                              f"{{{task}: [sentence]}}.")
        missing = [c for c in cols if c not in ds.column_names]
        if missing:
            raise ConfigError(f"modelpool.text_fields.{task}: column '{missing[0]}' is not in the dataset "
                              f"(columns: {ds.column_names}).{did_you_mean(missing[0], ds.column_names)}")
        return list(cols)

    def examples(self, task, split, max_examples, with_labels=True):
        from fusion_bench.models.text_classification import encode_pairs, pack, pad_batch

        ds = self.modelpool.dataset(task, split)
        cols = self._fields(task, ds)
        if len(ds) == 0:
            raise ConfigError(f"modelpool.datasets.{task}.{split} is empty.")
        ds = ds.select(_even(len(ds), max_examples))
        ids = encode_pairs(self.tokenizer, [ds[c] for c in cols], self.modelpool.config.max_length)
        x, mask = pad_batch(ids, int(self.tokenizer.pad_token_id))
        labels = None
        if with_labels:
            lab = self.modelpool.config.label_column
            if lab not in ds.column_names:
                raise ConfigError(f"modelpool.label_column='{lab}' is not a column of task '{task}' "
                                  f"({ds.column_names}).")
            labels = torch.as_tensor(ds[lab], dtype=torch.long)
        return TaskExamples(pack(x, mask), labels)

    def classifier(self, model, task):
        from fusion_bench.models.text_classification import (
            PackedTextClassifier,
            attach_backbone,
            load_head_skeleton,
        )

        if task not in self._skeletons:
            self._skeletons[task] = load_head_skeleton(self.modelpool.head_ref(task), f"head of task '{task}'",
                                                       int(self.tokenizer.pad_token_id))
        return PackedTextClassifier(attach_backbone(self._skeletons[task], model))


class _BackboneView(TensorSource):
    """A checkpoint seen through ``mapping`` (base name -> its own name); only the mapped tensors."""

    _backbone_view = True

    def __init__(self, src, mapping: dict[str, str]):
        self.src = src
        self.name = src.name
        self._map = dict(mapping)

    def keys(self) -> list[str]:
        return list(self._map)

    def meta(self, key: str):
        return self.src.meta(self._map.get(key, key))

    def get(self, key: str) -> torch.Tensor:
        return self.src.get(self._map.get(key, key))

    def content_hash(self) -> str:
        return self.src.content_hash()



def _is_mapping(v: Any) -> bool:
    return isinstance(v, Mapping)


__all__ = ["SequenceClassificationPool", "SequenceClassificationPoolConfig", "TextClassificationTaskData"]
