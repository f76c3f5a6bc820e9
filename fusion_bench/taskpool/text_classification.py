"""Text-classification task pool: the evaluated backbone with each task's own classification head.

FusionBench's GPT-2 GLUE protocol (``taskpool=gpt2_glue``), reusable for any backbone/heads zoo: each
task names its head checkpoint (``tasks.<task>.head``, a sequence-classification model such as
``tanganke/gpt2_cola``); the head's backbone (``base_model_prefix``) is replaced by the evaluated model,
texts (one column, or a pair) are tokenized with ``tokenizer`` (pad = unk, else eos, when it has none;
truncated to ``max_length``, right-padded per batch) and scored: ``accuracy`` and mean cross-entropy
``loss`` per task and their averages. An :class:`~fusion_bench.models.ensemble.Ensemble` of backbones is
evaluated member by member with the task's head, logits combined with the ensemble's rule.

The head checkpoints come from this config (generated from the same table as the model pool's), not
from the model pool: no component reaches into another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench.config_schema import build_config, option
from fusion_bench.data.loading import dataset_fingerprint, load_dataset_ref
from fusion_bench.errors import ConfigError, ModelMismatchError, did_you_mean
from fusion_bench.models.ensemble import Ensemble
from fusion_bench.taskpool.base import (
    PerTaskPool,
    TaskPoolConfig,
    average_metrics,
    devices_option,
    precision_option,
    register_taskpool,
)


@dataclass
class TextClassificationTaskSpec:
    """One task of the ``text_classification`` task pool (``taskpool.tasks.<task>``)."""

    dataset: Any = option(help="Dataset reference: a Hub id, a mapping {path, name} or a local folder.")
    head: str = option(help="Sequence-classification checkpoint (folder or Hub id) whose head classifies this task.")
    text_fields: list[str] = option(help="One or two text columns, e.g. [sentence] or [sentence1, sentence2].")
    split: str = option("validation", help="The split to evaluate ('validation[:100]' takes rows 0-99).")
    label_column: str = option("label", help="The label column (class indices).")


@dataclass
class TextClassificationTaskPoolConfig(TaskPoolConfig):
    """Options of the ``text_classification`` task pool."""

    tokenizer: str | None = option(None, help="Tokenizer folder or Hub id; null: each task's head checkpoint.")
    tasks: dict[str, Any] = option({}, help="Task name -> {dataset, split, text_fields, label_column, head}.")
    max_length: int = option(512, ge=1, le=1 << 20, help="Tokens per example (truncation, longest first).")
    batch_size: int = option(32, ge=1, le=1 << 20, help="Examples per forward pass.")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")
    devices: list[str] | str | None = devices_option()
    precision: str = precision_option("the forward passes")
    max_samples: int | None = option(None, ge=1, le=10**9, help="Evaluate at most this many evenly spaced examples "
                                     "per task (null: all); for fast runs.")


@register_taskpool("text_classification")
class TextClassificationTaskPool(PerTaskPool):
    """Accuracy and loss of a backbone with each task's head (see the module docstring).

    Args:
        config: :class:`TextClassificationTaskPoolConfig` or a mapping; keywords override.
    """

    config_class = TextClassificationTaskPoolConfig

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self._specs: dict[str, TextClassificationTaskSpec] = {}
        for task, raw in self.config.tasks.items():
            spec = build_config(TextClassificationTaskSpec, raw, prefix=f"taskpool.tasks.{task}")
            if not 1 <= len(spec.text_fields) <= 2:
                raise ConfigError(f"taskpool.tasks.{task}.text_fields must list one or two columns.")
            self._specs[task] = spec
        self._tokenizers: dict[str, Any] = {}
        self._skeletons: dict[str, nn.Module] = {}
        self._data: dict[str, tuple[list[list[int]], torch.Tensor]] = {}
        self._split_info: dict[str, dict[str, Any]] = {}

    def tokenizer(self, task: str):
        from fusion_bench.models.text_classification import load_text_tokenizer

        ref = self.config.tokenizer or self._specs[task].head
        if ref not in self._tokenizers:
            self._tokenizers[ref] = load_text_tokenizer(ref, "taskpool.tokenizer")
        return self._tokenizers[ref]

    def head(self, task: str) -> nn.Module:
        """The task's classifier with its backbone removed (frozen, float32), loaded once."""
        from fusion_bench.models.text_classification import load_head_skeleton

        if task not in self._skeletons:
            self._skeletons[task] = load_head_skeleton(self._specs[task].head, f"taskpool.tasks.{task}.head",
                                                       int(self.tokenizer(task).pad_token_id))
        return self._skeletons[task]

    def examples(self, task: str) -> tuple[list[list[int]], torch.Tensor]:
        """(token ids per example, labels) of ``task``, tokenized once."""
        if task not in self._data:
            from fusion_bench.methods._task_data import _even
            from fusion_bench.models.text_classification import encode_pairs

            spec = self._specs[task]
            ds = load_dataset_ref(spec.dataset, split=spec.split)
            missing = [c for c in [*spec.text_fields, spec.label_column] if c not in ds.column_names]
            if missing:
                raise ConfigError(f"taskpool.tasks.{task}: column '{missing[0]}' is not in the dataset (columns "
                                  f"{ds.column_names}).{did_you_mean(missing[0], ds.column_names)}")
            ds = ds.select(_even(len(ds), self.config.max_samples))
            ids = encode_pairs(self.tokenizer(task), [ds[c] for c in spec.text_fields], self.config.max_length)
            labels = torch.as_tensor(ds[spec.label_column], dtype=torch.long)
            self._data[task] = (ids, labels)
            self._split_info[task] = {"dataset": str(spec.dataset), "split": spec.split, "samples": len(ds),
                                      "fingerprint": dataset_fingerprint(ds)}
        return self._data[task]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, tasks: list[str] | None = None) -> dict[str, Any]:
        """Accuracy (in [0, 1]) and mean cross-entropy per task, and their averages."""
        from fusion_bench.engine.devices import DevicePlan, parse_precision, resolve_devices
        from fusion_bench.models.text_classification import attach_backbone, classify, pad_batch

        tasks = self._check_tasks(tasks)
        members = list(model.members) if isinstance(model, Ensemble) else [model]
        combine = model.combine_logits if isinstance(model, Ensemble) else None
        devices = resolve_devices(self.config.device, self.config.devices, key="taskpool.devices")
        if len(devices) == 1 and isinstance(model, Ensemble) and model.member_devices:
            devices = list(model.member_devices)  # the members stay where the ensemble method placed them
        device = devices[0]
        precision = parse_precision(self.config.precision, "taskpool.precision")
        modes = [m.training for m in members]
        results: dict[str, dict[str, float]] = {}
        try:
            for m in members:
                m.eval()
            for task in tasks:
                ids, labels = self.examples(task)
                skeleton = self.head(task)
                clfs = [attach_backbone(skeleton, m) for m in members]  # each its own copy of the (small) head
                # members round-robin over the devices, or one member's batches split across them (engine/devices.py)
                plan = DevicePlan(clfs, devices, precision)
                n_cls = int(getattr(skeleton.config, "num_labels", 0) or 0)
                if labels.numel() and n_cls and (int(labels.min()) < 0 or int(labels.max()) >= n_cls):
                    raise ConfigError(f"taskpool.tasks.{task}: labels range over [{int(labels.min())}, "
                                      f"{int(labels.max())}] but the head has {n_cls} classes (a test split without "
                                      "labels? evaluate a labelled split).")
                pad = int(self.tokenizer(task).pad_token_id)
                correct, loss_sum = 0, 0.0
                for s in range(0, len(ids), self.config.batch_size):
                    x, mask = pad_batch(ids[s:s + self.config.batch_size], pad)
                    y = labels[s:s + self.config.batch_size].to(device)

                    def logits(i, clf, xm, task=task):
                        try:
                            return classify(clf, xm[:, 0], xm[:, 1]).float()
                        except (TypeError, RuntimeError) as e:
                            raise ModelMismatchError(
                                f"Task '{task}': the evaluated model {i} ({type(members[i]).__name__}) does not fit "
                                f"the head {self._specs[task].head} ({type(e).__name__}: {e}); evaluate a backbone of "
                                "that architecture.") from e

                    zs = plan.map(logits, torch.stack([x, mask], dim=1))  # (B, 2, L): ids and mask split together
                    z = zs[0] if combine is None else combine(zs).float()
                    correct += int((z.argmax(-1) == y).sum())
                    loss_sum += float(F.cross_entropy(z, y, reduction="sum"))
                n = max(len(ids), 1)
                results[task] = {"accuracy": correct / n, "loss": loss_sum / n}
                plan.release()
                del clfs, plan
        finally:
            for m, t in zip(members, modes):
                m.train(t)
        return {"tasks": results, "average": average_metrics(results)}

    def report_extras(self) -> dict[str, Any]:
        return {"evaluation_splits": dict(self._split_info),
                "taskpool_info": {"type": "text_classification", "tokenizer": self.config.tokenizer,
                                  "heads": {t: s.head for t, s in self._specs.items()},
                                  "max_samples": self.config.max_samples}}
