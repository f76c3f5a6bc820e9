"""Per-task data and classifiers for the data-dependent merges (Fisher merging, RegMean, AdaMerging).

A data-dependent merge needs, for each task, some inputs (and for Fisher merging with true labels, the
labels) and a way to turn a model of the pool into a classifier of that task. A
:class:`TaskDataAdapter` gives both; the methods only use this interface:

- :meth:`TaskDataAdapter.examples` ``(task, split, max_examples)`` -> :class:`TaskExamples`: inputs
  (a tensor, first dimension the examples) and labels (a 1-D long tensor, or None when not read).
- :meth:`TaskDataAdapter.classifier` ``(model, task)`` -> an ``nn.Module`` mapping a batch of inputs
  to logits ``(batch, classes)``. It must call ``model`` (so that forward hooks on ``model``'s
  layers see the inputs, gradients reach ``model``'s parameters and a stand-in module can replace
  ``model``); everything it adds (heads, projections) is frozen.

Two adapters are provided and chosen by :func:`make_adapter` (config key ``adapter``):

- :class:`CLIPTaskData` (``adapter=clip``; ``auto`` picks it for pools with
  ``model_class`` ``clip_vision``/``clip``): the models are CLIP vision encoders; the classifier of a
  task is :class:`~fusion_bench.models.clip.CLIPZeroShotClassifier` with the zero-shot text head of
  the pool's pretrained full CLIP (class names and templates from the pool or the dataset, exactly
  as ``clip_finetune`` builds them), and the images are preprocessed by
  :func:`~fusion_bench.data.images.preprocessed_images` (the shared, cached path).
- :class:`GenericTaskData` (``adapter=generic``): the models are plain ``nn.Module`` classifiers
  (``model(x) -> logits``, or an output with ``.logits`` such as Hugging Face classification models);
  ``modelpool.datasets[task][split]`` (or ``modelpool.datasets[task]``)
  is a ``torch.utils.data.Dataset`` of ``(input tensor, label)`` pairs or a pair
  ``(inputs, labels)`` of tensors.

Model ``i`` of the pool is fine-tuned on the task of the same name (the FusionBench convention).
A Python user can pass any other adapter with ``method.adapter = MyAdapter(...)`` before ``run``
(``modelpool.datasets`` is then not consulted).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fusion_bench.errors import ConfigError, ModelMismatchError, did_you_mean
from fusion_bench.methods.base import FusionMethod

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool


@dataclass
class TaskExamples:
    """Examples of one task: ``source`` is a tensor (first dimension: examples) or a
    :class:`~fusion_bench.data.images.PreprocessedImages` (read lazily, batch by batch); ``labels`` is
    a 1-D long tensor, or None when not read."""

    source: Any
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.source.shape[0]) if isinstance(self.source, torch.Tensor) else len(self.source)

    def take(self, idx: torch.Tensor | slice) -> torch.Tensor:
        """Model inputs of the examples ``idx`` (an index tensor or a slice), float32 for images."""
        if isinstance(self.source, torch.Tensor):
            return self.source[idx]
        from fusion_bench.data.images import PreprocessedImages

        src: PreprocessedImages = self.source
        if isinstance(idx, slice):
            start, stop, _ = idx.indices(len(src))
            return src.batch(start, stop)
        return PreprocessedImages(src.pixels[idx], src.labels[idx], src.scale, src.mean, src.std).all()

    @property
    def inputs(self) -> torch.Tensor:
        """Every example's model input (materialised)."""
        return self.take(slice(None))

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        for s in range(0, len(self), batch_size):
            yield self.take(slice(s, s + batch_size)), None if self.labels is None else self.labels[s:s + batch_size]


class TaskDataAdapter(ABC):
    """Gives per-task examples and wraps a model of the pool as a classifier of a task."""

    kind: str = ""

    @abstractmethod
    def examples(self, task: str, split: str, max_examples: int | None, with_labels: bool = True) -> TaskExamples:
        """At most ``max_examples`` evenly spaced examples of ``task``'s ``split`` (None: all)."""

    @abstractmethod
    def classifier(self, model: nn.Module, task: str) -> nn.Module:
        """A module ``inputs -> logits`` of ``task`` that calls ``model``; its other parts are frozen."""


def _even(n: int, k: int | None) -> list[int]:
    from fusion_bench.data.images import subset_indices

    return subset_indices(n, k)


def _split_spec(modelpool: ModelPool, task: str, split: str) -> Any:
    ds = modelpool.config.datasets
    if task not in ds:
        raise ConfigError(f"modelpool.datasets has no task '{task}' (model '{task}' is matched to the task of its "
                          f"name).{did_you_mean(task, ds)} Add {{{task}: {{{split}: <dataset>}}}} to modelpool.datasets.")
    return ds[task]


class GenericTaskData(TaskDataAdapter):
    """Plain ``nn.Module`` classifiers and (input tensor, label) data (see the module docstring).

    Args:
        modelpool: the pool; ``modelpool.config.datasets[task]`` is ``{split: data}`` or ``data``, where
            ``data`` is a ``torch.utils.data.Dataset`` of ``(input, label)`` or a pair ``(inputs, labels)``.
    """

    kind = "generic"

    def __init__(self, modelpool: ModelPool):
        self.modelpool = modelpool

    def examples(self, task, split, max_examples, with_labels=True):
        spec = _split_spec(self.modelpool, task, split)
        if isinstance(spec, Mapping):
            if split not in spec:
                raise ConfigError(f"modelpool.datasets.{task} has no split '{split}'.{did_you_mean(split, spec)}")
            spec = spec[split]
        if isinstance(spec, (list, tuple)) and len(spec) == 2 and all(isinstance(t, torch.Tensor) for t in spec):
            x, y = spec
            if len(x) != len(y):
                raise ConfigError(f"modelpool.datasets.{task}.{split}: {len(x)} inputs but {len(y)} labels.")
            idx = torch.tensor(_even(len(x), max_examples), dtype=torch.long)
            return TaskExamples(x[idx], y[idx].long() if with_labels else None)
        if hasattr(spec, "__getitem__") and hasattr(spec, "__len__"):
            n = len(spec)
            if n == 0:
                raise ConfigError(f"modelpool.datasets.{task}.{split} is empty.")
            items = [spec[i] for i in _even(n, max_examples)]
            try:
                x = torch.stack([torch.as_tensor(it[0]) for it in items])
                y = torch.as_tensor([int(it[1]) for it in items], dtype=torch.long)
            except (TypeError, IndexError, ValueError) as e:
                raise ConfigError(f"modelpool.datasets.{task}.{split}: items must be (input tensor, label) pairs of one "
                                  f"shape ({type(e).__name__}: {e}).") from e
            return TaskExamples(x, y if with_labels else None)
        raise ConfigError(f"modelpool.datasets.{task}.{split} is a {type(spec).__name__}: the generic adapter needs a "
                          "torch Dataset of (input, label) pairs or a pair (inputs, labels) of tensors; for CLIP pools "
                          "set method.adapter=clip.")

    def classifier(self, model, task):
        return LogitsOf(model)


class LogitsOf(nn.Module):
    """``model(x)`` as a logits tensor: a tensor output as is, else its ``.logits`` (Hugging Face
    classification outputs); anything else is an error naming the fix."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if not isinstance(out, torch.Tensor):
            out = getattr(out, "logits", out)
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise ModelMismatchError(
                f"The generic adapter needs model(x) -> logits (batch, classes), but {type(self.model).__name__} "
                f"returned {type(out).__name__}{'' if not isinstance(out, torch.Tensor) else tuple(out.shape)}. "
                "For CLIP vision encoders set method.adapter=clip; otherwise wrap the model in a classifier.")
        return out


class CLIPTaskData(TaskDataAdapter):
    """CLIP vision encoders classified by the pretrained CLIP's zero-shot heads (see the module docstring).

    Args:
        modelpool: a pool whose ``_pretrained_`` is a full CLIPModel folder (text tower, processor).
        image_column: image column (None: detected).
        label_column: label column (None: detected).
        device: where heads are computed.
    """

    kind = "clip"

    def __init__(self, modelpool: ModelPool, image_column: str | None = None, label_column: str | None = None,
                 templates: Mapping[str, list[str]] | None = None):
        from fusion_bench.methods.training.clip_finetune import load_full_clip

        self.modelpool = modelpool
        self.image_column = image_column
        self.label_column = label_column
        self.templates = dict(templates or {})
        self.clip, self.processor = load_full_clip(modelpool)
        proj = self.clip.visual_projection
        self.projection = nn.Linear(proj.in_features, proj.out_features, bias=False)
        self.projection.load_state_dict(proj.state_dict())
        self.projection.requires_grad_(False)
        self.logit_scale = float(self.clip.logit_scale.detach().exp())
        self._heads: dict[str, torch.Tensor] = {}

    def _dataset(self, task: str, split: str):
        from fusion_bench.data.loading import find_image_column, find_label_column

        _split_spec(self.modelpool, task, split)
        ds = self.modelpool.dataset(task, split)
        img = find_image_column(ds, self.image_column, where=f"task '{task}' ({split})")
        lab = find_label_column(ds, self.label_column, where=f"task '{task}' ({split})")
        return ds, img, lab

    def head(self, task: str, split: str = "test") -> torch.Tensor:
        if task not in self._heads:
            from fusion_bench.methods.training.clip_finetune import task_classes_and_templates
            from fusion_bench.models.clip import zeroshot_head

            ds, _, lab = self._dataset(task, split)
            classnames, templates = task_classes_and_templates(self.modelpool, task, ds, lab, self.templates)
            self._heads[task] = zeroshot_head(self.clip, self.processor.tokenizer, classnames, templates)
        return self._heads[task]

    def examples(self, task, split, max_examples, with_labels=True):
        from fusion_bench.data.images import preprocessed_images

        ds, img, lab = self._dataset(task, split)
        data = preprocessed_images(ds, self.processor.image_processor, image_column=img, label_column=lab,
                                   max_samples=max_examples)
        self.head(task, split)
        return TaskExamples(data, data.labels.clone() if with_labels else None)

    def classifier(self, model, task):
        from fusion_bench.models.clip import CLIPZeroShotClassifier

        if task not in self._heads:
            self.head(task)
        return CLIPZeroShotClassifier(model, self.projection, self._heads[task], self.logit_scale)


def make_adapter(modelpool: ModelPool, adapter: str, image_column: str | None = None,
                 label_column: str | None = None) -> TaskDataAdapter:
    """The adapter named by a method's ``adapter`` option (``auto``: CLIP for CLIP pools, else generic)."""
    if adapter == "auto":
        factory = getattr(modelpool, "task_data_adapter", None)  # a pool that knows its own tasks' data
        if callable(factory):
            return factory()
        adapter = "clip" if is_clip_pool(modelpool) else "generic"
    if adapter == "clip":
        return CLIPTaskData(modelpool, image_column, label_column)
    if adapter == "generic":
        return GenericTaskData(modelpool)
    raise ConfigError(f"method.adapter={adapter!r} is unknown; use auto, clip or generic.")


def is_clip_pool(modelpool: ModelPool) -> bool:
    """A CLIP pool: ``model_class`` clip/clip_vision, live CLIP modules, or a ``clip*`` config.json model_type."""
    if modelpool.config.model_class in ("clip_vision", "clip", "transformers.CLIPVisionModel", "transformers.CLIPModel"):
        return True
    name = modelpool.model_names[0] if modelpool.model_names else modelpool.base_name()
    kind = modelpool.kind(name)
    if kind == "module":
        return type(modelpool.entry(name)).__name__.startswith("CLIP")
    if kind == "hf":
        folder = modelpool.hf_folder(name)
        cfg = folder / "config.json" if folder is not None else None
        if cfg is not None and cfg.exists():
            from fusion_bench.io.checkpoint import read_json_object

            return str(read_json_object(cfg, name).get("model_type", "")).startswith("clip")
    return False


def check_tasks(modelpool: ModelPool, method: str, custom_adapter: bool = False) -> list[str]:
    """The models to fuse, each named after its task; raise when the pool has none, or (built-in adapters)
    when ``modelpool.datasets`` lacks a model's task."""
    refusal = getattr(modelpool, "data_method_refusal", None)
    if refusal:
        raise ConfigError(f"{method} does not run on this model pool: {refusal}.")
    names = modelpool.model_names
    if not names:
        raise ConfigError(f"{method}: the model pool has no model to fuse (only '_pretrained_').")
    if custom_adapter:
        return names
    missing = [n for n in names if n not in modelpool.config.datasets]
    if missing:
        raise ConfigError(f"{method} needs data of each model's task: modelpool.datasets has no task '{missing[0]}'."
                          f"{did_you_mean(missing[0], modelpool.config.datasets) if modelpool.config.datasets else ''} "
                          "Name each model after its task and give {task: {split: <dataset>}} in modelpool.datasets.")
    return names


def check_task_data(method: Any, modelpool: ModelPool, split: str) -> list[str]:
    """The dry run's check of a data method: every model to fuse has its task's ``split`` in
    ``modelpool.datasets`` and that dataset can be opened (local folder or hub cache). Returns notes."""
    if getattr(method, "adapter", None) is not None:
        check_tasks(modelpool, method.name, custom_adapter=True)
        return [f"{method.name}: the data of the custom adapter {type(method.adapter).__name__} was not checked"]
    names = check_tasks(modelpool, method.name)
    from fusion_bench.data import load_dataset_ref

    for task in names:
        spec = _split_spec(modelpool, task, split)
        if isinstance(spec, Mapping) and "path" not in spec:
            if split not in spec:
                raise ConfigError(f"{method.name} reads split '{split}' (method.split) of each task, but "
                                  f"modelpool.datasets.{task} has no split '{split}'.{did_you_mean(split, spec)}")
            spec = spec[split]
        if isinstance(spec, (str, Mapping)) or hasattr(spec, "__fspath__"):
            load_dataset_ref(spec, split=split)
        elif isinstance(spec, (list, tuple)) or hasattr(spec, "__getitem__"):
            if len(spec) == 0:
                raise ConfigError(f"modelpool.datasets.{task}.{split} is empty.")
    return []


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of ``model``'s state (parameters and buffers, shared tensors once)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def progress(desc: str, total: int, show: bool):
    """A rich progress bar context (or a no-op one) with an ``advance()`` callable."""
    from contextlib import contextmanager

    @contextmanager
    def _bar():
        if not show:
            yield lambda n=1: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      transient=True) as p:
            t = p.add_task(desc, total=total)
            yield lambda n=1: p.advance(t, n)

    return _bar()


def start_data_run(method: Any, modelpool: ModelPool) -> tuple[list[str], torch.device, TaskDataAdapter, bool]:
    """Common start of a per-model data method (Fisher, RegMean): seed the global RNG, check the pool's
    tasks, resolve the device and the adapter. Returns (model names, device, adapter, show progress)."""
    import sys

    from fusion_bench.utils import resolve_device

    cfg = method.config
    torch.manual_seed(cfg.seed)
    names = check_tasks(modelpool, method.name, custom_adapter=method.adapter is not None)
    device = resolve_device(cfg.device)
    adapter = method.adapter or make_adapter(modelpool, cfg.adapter, cfg.image_column, cfg.label_column)
    return names, device, adapter, bool(cfg.progress and sys.stderr.isatty())


def data_devices(method: Any) -> list[torch.device] | None:
    """The device slots of a data method with a ``devices`` option (None: its one ``device``)."""
    devices = getattr(method.config, "devices", None)
    if devices in (None, [], ()):
        return None
    from fusion_bench.engine.devices import resolve_devices

    return resolve_devices(method.config.device, devices, key="method.devices")


def per_model_statistics(names: list[str], modelpool: ModelPool, adapter: TaskDataAdapter, *, label: str,
                         split: str, num_examples: int | None, with_labels: bool, device: torch.device, show: bool,
                         stat: Callable[[str, nn.Module, nn.Module, TaskExamples, Callable[[int], None]], Any],
                         devices: list[torch.device] | None = None,
                         ) -> Iterator[tuple[str, nn.Module, int, Any]]:
    """The per-model loop of a data method (Fisher, RegMean): each model on its own task's examples.

    For every name: load the model, draw ``num_examples`` examples of its task's ``split``, make a float32
    copy on ``device`` (the loaded model is left untouched) and the adapter's classifier around it, and call
    ``stat(name, copy, classifier, examples, advance)`` under a progress bar ``"<label> <name>"``. Yields
    ``(name, model, number of examples, stat's result)``; the copy is dropped before the next model.

    With several ``devices`` (K slots, :mod:`fusion_bench.engine.devices`), K models at a time are computed at
    once, model j of a wave on slot j, one thread per slot (``stat`` must use its copy's device); models and
    examples are still loaded in order in this thread, and results are yielded in order, so they equal the
    one-device loop's.
    """
    import copy

    if devices is not None and len(devices) > 1:
        yield from _per_model_statistics_parallel(names, modelpool, adapter, label=label, split=split,
                                                  num_examples=num_examples, with_labels=with_labels,
                                                  devices=devices, stat=stat)
        return
    for name in names:
        model = modelpool.load_model(name)
        data = adapter.examples(name, split, num_examples, with_labels=with_labels)
        work = copy.deepcopy(model).to(device).float().eval()
        clf = adapter.classifier(work, name).to(device).eval()
        with progress(f"{label} {name}", len(data), show) as adv:
            result = stat(name, work, clf, data, adv)
        del work, clf
        yield name, model, len(data), result


def _per_model_statistics_parallel(names, modelpool, adapter, *, label, split, num_examples, with_labels, devices,
                                   stat) -> Iterator[tuple[str, nn.Module, int, Any]]:
    import copy
    from concurrent.futures import ThreadPoolExecutor

    from fusion_bench.engine.devices import device_context

    def on_slot(dev: torch.device, args: tuple) -> Any:
        with device_context(dev):
            return stat(*args, lambda n=1: None)

    k = len(devices)
    with ThreadPoolExecutor(max_workers=k) as ex:
        for start in range(0, len(names), k):
            wave = []
            for j, name in enumerate(names[start:start + k]):
                model = modelpool.load_model(name)
                data = adapter.examples(name, split, num_examples, with_labels=with_labels)
                work = copy.deepcopy(model).to(devices[j]).float().eval()
                clf = adapter.classifier(work, name).to(devices[j]).eval()
                wave.append((name, model, data, ex.submit(on_slot, devices[j], (name, work, clf, data))))
            for name, model, data, fut in wave:
                yield name, model, len(data), fut.result()


def data_used(split: str, labels_read: bool, used: Mapping[str, int]) -> dict[str, Any]:
    """The ``data_used`` metadata of a data method (reported by the leaderboard)."""
    return {"split": split, "labels_read": labels_read, "examples_per_task": dict(used),
            "examples": int(sum(used.values()))}


class TaskDataMethod(FusionMethod):
    """Base of the methods that read each task's data (Fisher, RegMean, AdaMerging): the Python API's
    ``adapter`` hook and the dry run's data check, written once."""

    uses_data = True
    #: Python API: set to a TaskDataAdapter to supply data/classifiers for other model families
    adapter: TaskDataAdapter | None = None

    def check_ready(self, modelpool: ModelPool) -> list[str]:
        return check_task_data(self, modelpool, self.config.split)
