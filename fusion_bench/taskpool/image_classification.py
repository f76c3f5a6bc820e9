"""Image classification task pool: accuracy and cross-entropy of a model mapping images to logits.

Expected model interface: ``model(pixel_values=x)`` (or ``model(x)`` when ``forward`` has no
``pixel_values`` argument) with ``x`` of shape (batch, 3, H, W) as produced by the configured image
processor, returning logits (batch, classes) as a tensor or as an object with ``.logits`` (e.g.
``transformers.AutoModelForImageClassification``). When a task gives a ``head``, the model is a
feature extractor instead: its output's ``pooler_output`` (or the output tensor itself) of shape
(batch, dim) goes through the head, an ``nn.Linear(dim, classes)``. An
:class:`fusion_bench.models.ensemble.Ensemble` is evaluated member by member (each with the task's
head) and the logits combined with the ensemble's rule.
"""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench.config_schema import build_config, option
from fusion_bench.data.images import PreprocessedImages, preprocessed_images
from fusion_bench.data.loading import (
    class_names,
    dataset_fingerprint,
    default_cache_dir,
    find_image_column,
    find_label_column,
    load_dataset_ref,
)
from fusion_bench.errors import CheckpointError, ConfigError, ModelMismatchError
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
class ImageTaskSpec:
    """One task of the image classification task pool (``taskpool.tasks.<task>``)."""

    dataset: Any = option(help="Dataset reference: a save_to_disk folder, a Hub id, or a mapping {path, name, split}.")
    split: str = option("test", help="The split to evaluate ('test[:100]' takes rows 0-99).")
    head: Any = option(None, help="Task-specific classification head: a state-dict file (.safetensors/.pt/.bin) "
                       "holding one 2-D 'weight' (classes x dim) and optionally its 'bias', or an nn.Linear "
                       "(Python API). null: the model outputs the logits itself.")
    image_column: str | None = option(None, help="Image column; null uses taskpool.image_column.")
    label_column: str | None = option(None, help="Label column; null uses taskpool.label_column.")


@dataclass
class ImageClassificationTaskPoolConfig(TaskPoolConfig):
    """Options of the ``image_classification`` task pool."""

    tasks: dict[str, Any] = option(
        {}, help="Task name -> {dataset, split (test), head (null), image_column, label_column}; a bare string "
        "is the dataset.")
    processor: Any = option(
        None, help="Image processor: a folder or Hub id (AutoImageProcessor), or (Python API) an image "
        "processor object or a callable PIL image -> tensor. Required.")
    batch_size: int = option(128, ge=1, le=2**20, help="Images per forward pass.")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")
    devices: list[str] | str | None = devices_option()
    precision: str = precision_option("the forward passes")
    cache_dir: str | None = option(None, help="Cache folder for preprocessed images; null: $FUSION_BENCH_CACHE or "
                                   "~/.cache/fusion_bench.")
    use_cache: bool = option(True, help="Read and write the preprocessed-image caches.")
    max_samples: int | None = option(None, ge=1, le=10**9, help="At most this many evenly spaced samples per task (null: all).")
    image_column: str | None = option(None, help="Image column; null: the first Image feature, else 'image'/'img'.")
    label_column: str | None = option(None, help="Label column; null: the first ClassLabel feature, else 'label'.")


def load_linear_head(ref: Any, where: str) -> nn.Linear:
    """An ``nn.Linear`` from a state-dict file holding one 2-D weight and optionally its bias."""
    if isinstance(ref, nn.Linear):
        return ref
    if not isinstance(ref, (str, os.PathLike)):
        raise ConfigError(f"{where}={ref!r} must be a state-dict file path or an nn.Linear.")
    from fusion_bench.io.checkpoint import open_checkpoint

    path = Path(os.path.expanduser(str(ref)))
    if not path.exists():
        raise ConfigError(f"{where}: head file {path} does not exist.")
    src = open_checkpoint(path, where)
    weights = [k for k in src.keys() if k.endswith("weight") and len(src.meta(k).shape) == 2]
    if len(weights) != 1:
        raise CheckpointError(f"{where}: {path} must hold exactly one 2-D weight tensor (classes x dim), found "
                              f"{weights or list(src.keys())}.")
    wk = weights[0]
    bk = wk[: -len("weight")] + "bias"
    w = src.get(wk).float()
    b = src.get(bk).float() if bk in src.keys() else None
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise CheckpointError(f"{where}: bias '{bk}' has shape {list(b.shape)}, expected [{w.shape[0]}].")
    head = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        head.weight.copy_(w)
        if b is not None:
            head.bias.copy_(b)
    return head.eval()


def _takes_pixel_values(model: nn.Module) -> bool:
    try:
        return "pixel_values" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@register_taskpool("image_classification")
class ImageClassificationTaskPool(PerTaskPool):
    """Top-1 accuracy and mean cross-entropy of an image classifier on each task.

    Standard supervised evaluation: ``accuracy = mean(argmax_c z_c(x) == y)``,
    ``loss = mean(-log softmax(z(x))_y)`` over the split (or ``max_samples`` evenly spaced rows).
    See the module docstring for the model interface.

    Args:
        config: an :class:`ImageClassificationTaskPoolConfig` or a mapping; keywords override.
    """

    config_class = ImageClassificationTaskPoolConfig

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        cfg: ImageClassificationTaskPoolConfig = self.config
        if cfg.batch_size <= 0:
            raise ConfigError(f"taskpool.batch_size={cfg.batch_size} must be positive.")
        if cfg.max_samples is not None and cfg.max_samples <= 0:
            raise ConfigError(f"taskpool.max_samples={cfg.max_samples} must be positive or null.")
        if cfg.processor is None:
            raise ConfigError("taskpool.processor is required: the folder or Hub id of the model's image processor "
                              "(preprocessor_config.json), or a transform in the Python API.")
        self._specs: dict[str, ImageTaskSpec] = {}
        for task, raw in cfg.tasks.items():
            if isinstance(raw, str) or not hasattr(raw, "items"):
                raw = {"dataset": raw}
            self._specs[task] = build_config(ImageTaskSpec, raw, prefix=f"taskpool.tasks.{task}")
        self._processor = None
        self._heads: dict[str, nn.Linear] = {}
        self._datasets: dict[str, Any] = {}
        self._columns: dict[str, tuple[str, str]] = {}
        self._split_info: dict[str, dict[str, Any]] = {}

    @property
    def processor(self):
        if self._processor is None:
            p = self.config.processor
            if isinstance(p, (str, os.PathLike)):
                from transformers import AutoImageProcessor
                from transformers.utils import logging as hf_logging

                from fusion_bench.modelpool.base import resolve_hf_path

                path = resolve_hf_path(str(p), "taskpool.processor")
                old = hf_logging.get_verbosity()
                hf_logging.set_verbosity_error()
                try:
                    self._processor = AutoImageProcessor.from_pretrained(path)
                except Exception as e:
                    raise CheckpointError(f"taskpool.processor: cannot load an image processor from {path} "
                                          f"({type(e).__name__}: {e}).") from e
                finally:
                    hf_logging.set_verbosity(old)
            elif callable(p):
                self._processor = p
            else:
                raise ConfigError(f"taskpool.processor={p!r} must be a folder, a Hub id or a callable.")
        return self._processor

    def head(self, task: str) -> nn.Linear | None:
        ref = self._specs[task].head
        if ref is None:
            return None
        if task not in self._heads:
            self._heads[task] = load_linear_head(ref, f"taskpool.tasks.{task}.head")
        return self._heads[task]

    def dataset(self, task: str):
        if task not in self._datasets:
            spec = self._specs[task]
            ds = load_dataset_ref(spec.dataset, split=spec.split)
            import datasets

            if isinstance(ds, datasets.DatasetDict):
                raise ConfigError(f"taskpool.tasks.{task}: the dataset reference gave several splits {sorted(ds)}; "
                                  "set split.")
            where = f"taskpool.tasks.{task} (dataset {spec.dataset!r}, split {spec.split!r})"
            self._columns[task] = (find_image_column(ds, spec.image_column or self.config.image_column, where),
                                   find_label_column(ds, spec.label_column or self.config.label_column, where))
            self._datasets[task] = ds
        return self._datasets[task]

    def images(self, task: str) -> PreprocessedImages:
        ds = self.dataset(task)
        img, lab = self._columns[task]
        cache = Path(self.config.cache_dir).expanduser() if self.config.cache_dir else default_cache_dir()
        data = preprocessed_images(ds, self.processor, image_column=img, label_column=lab,
                                   max_samples=self.config.max_samples, cache_dir=cache,
                                   use_cache=self.config.use_cache)
        labels = data.labels
        if task not in self._split_info:
            spec = self._specs[task]
            self._split_info[task] = {"dataset": str(spec.dataset), "split": spec.split,
                                      "samples": int(labels.numel()), "fingerprint": dataset_fingerprint(ds)}
        return data

    def _logits(self, model: nn.Module, head: nn.Linear | None, x: torch.Tensor, kw: bool) -> torch.Tensor:
        out = model(pixel_values=x) if kw else model(x)
        if head is None:
            z = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
            if z is None:
                raise ModelMismatchError(
                    f"{type(model).__name__} returned {type(out).__name__} without logits; give the task a head "
                    "(taskpool.tasks.<task>.head) or evaluate a classifier.")
            return z.float()
        if isinstance(out, torch.Tensor):
            feats = out
        elif getattr(out, "pooler_output", None) is not None:
            feats = out.pooler_output
        else:
            raise ModelMismatchError(f"{type(model).__name__} returned {type(out).__name__} without pooler_output; "
                                     "the head needs (batch, dim) features.")
        if feats.dim() != 2 or feats.shape[-1] != head.in_features:
            raise ModelMismatchError(f"{type(model).__name__} gives features of shape {list(feats.shape)} but the "
                                     f"task head expects (batch, {head.in_features}).")
        return head(feats.to(head.weight.dtype)).float()

    def evaluate(self, model: nn.Module, tasks: list[str] | None = None) -> dict[str, Any]:
        """Accuracy (in [0, 1]) and mean cross-entropy per task, and their averages.

        Args:
            model: a classifier, a feature extractor (with task heads) or an Ensemble of those.
            tasks: task names (default: every task of the pool).
        """
        from fusion_bench.engine.devices import DevicePlan, parse_precision, resolve_devices

        tasks = self._check_tasks(tasks)
        devices = resolve_devices(self.config.device, self.config.devices, key="taskpool.devices")
        if len(devices) == 1 and isinstance(model, Ensemble) and model.member_devices:
            devices = list(model.member_devices)  # the members stay where the ensemble method placed them
        device = devices[0]
        members = list(model.members) if isinstance(model, Ensemble) else [model]
        modes = [m.training for m in members]
        results: dict[str, dict[str, float]] = {}
        plan = None
        try:
            for m in members:
                m.eval()
            # members round-robin over the devices, or one member's batches split across them (engine/devices.py)
            plan = DevicePlan(members, devices, parse_precision(self.config.precision, "taskpool.precision"))
            kws = [_takes_pixel_values(m) for m in members]
            dtypes = [next(iter(m.parameters()), torch.empty(0)).dtype for m in members]
            for task in tasks:
                head = self.head(task)
                heads = {}
                if head is not None:
                    head = head.to(device)
                    heads = {d: head if d == device else copy.deepcopy(head).to(d) for d in set(devices)}
                data = self.images(task)
                labels = data.labels
                names = class_names(self.dataset(task), self._columns[task][1])
                correct, loss_sum, n = 0, 0.0, labels.numel()

                def logits(i, m, x, head=head, heads=heads):
                    return self._logits(m, heads.get(x.device, head), x, kws[i])

                with torch.inference_mode():
                    for s in range(0, n, self.config.batch_size):
                        x = data.batch(s, s + self.config.batch_size, device)
                        y = labels[s:s + self.config.batch_size].to(device)
                        zs = plan.map(logits, x, prepare=lambda i, xc: xc.to(dtypes[i]) if dtypes[i].is_floating_point
                                      else xc)
                        z = zs[0] if len(zs) == 1 and not isinstance(model, Ensemble) else model.combine_logits(zs)
                        if names is not None and z.shape[-1] != len(names):
                            raise ModelMismatchError(
                                f"Task '{task}' has {len(names)} classes but the model gives {z.shape[-1]} logits; "
                                f"give taskpool.tasks.{task}.head or the task's fine-tuned classifier.")
                        if int(y.max()) >= z.shape[-1]:
                            raise ModelMismatchError(f"Task '{task}' has label {int(y.max())} but the model gives "
                                                     f"only {z.shape[-1]} logits.")
                        correct += int((z.argmax(-1) == y).sum())
                        loss_sum += float(F.cross_entropy(z.float(), y, reduction="sum"))
                results[task] = {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1)}
        finally:
            if plan is not None:
                plan.release()
            for m, t in zip(members, modes):
                m.train(t)
        return {"tasks": results, "average": average_metrics(results)}

    def report_extras(self) -> dict[str, Any]:
        return {"evaluation_splits": dict(self._split_info)}
