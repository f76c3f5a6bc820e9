"""CLIP zero-shot image classification task pool.

Radford et al. 2021 (CLIP), zero-shot classification with prompt ensembling (section 3.1.4): each
class is the renormalised mean of the unit-norm text embeddings of every caption template filled
with the class name; ``logits = exp(logit_scale) * normalize(W_v f(x)) @ head.T``; the prediction is
the arg-max. This is the evaluation protocol of task arithmetic / FusionBench for merged CLIP vision
encoders: the text tower, the visual projection and the logit scale come from ``clip_model``; only
the vision encoder varies.

Speed comes from caches: zero-shot heads are keyed by (text tower content hash, tokenizer,
classnames, templates) and preprocessed test images by (dataset content fingerprint, split, image
processor config, max_samples); both are kept in memory and on disk under ``cache_dir``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench.config_schema import build_config, option
from fusion_bench.data.images import STATS as IMAGE_STATS
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
from fusion_bench.io.atomic import atomic_path
from fusion_bench.models.clip import vision_tower, zeroshot_head
from fusion_bench.models.ensemble import Ensemble
from fusion_bench.taskpool.base import (
    PerTaskPool,
    TaskPoolConfig,
    average_metrics,
    register_taskpool,
)
from fusion_bench.utils import resolve_device, sha256_tensors

#: used for tasks that give no templates (generic photo captions)
DEFAULT_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a low resolution photo of the {}.",
    "itap of a {}.",
]

_HEAD_CACHE_VERSION = 1
_HEADS: OrderedDict[str, torch.Tensor] = OrderedDict()  # process-wide, shared by pool instances

#: counters the tests read (heads computed by the text encoder / read from disk / from memory)
HEAD_STATS = {"computed": 0, "disk_hits": 0, "memory_hits": 0}


@dataclass
class CLIPTaskSpec:
    """One task of the CLIP zero-shot task pool (``taskpool.tasks.<task>``)."""

    dataset: Any = option(help="Dataset reference: a save_to_disk folder, a Hub id such as "
                          "'tanganke/sun397', or a mapping {path, name, split}.")
    split: str = option("test", help="The split to evaluate (any split name, e.g. 'test_gaussian_noise'; "
                        "'test[:100]' takes rows 0-99).")
    classnames: list[str] | None = option(None, help="Class names in label order; null reads the dataset's "
                                          "ClassLabel names (underscores read as spaces: 'sea_lake' -> 'sea lake').")
    templates: list[str] | None = option(None, help="Caption templates with '{}' for the class name; null uses "
                                         "taskpool.templates.")
    image_column: str | None = option(None, help="Image column; null uses taskpool.image_column.")
    label_column: str | None = option(None, help="Label column; null uses taskpool.label_column.")
    prompts: str | None = option(None, help="Take the class names and templates of this task of the CLIP hub-experiment "
                                 "table (fusion_bench.hub.clip_tasks, e.g. 'gtsrb'); explicit classnames/templates win.")


@dataclass
class CLIPZeroShotTaskPoolConfig(TaskPoolConfig):
    """Options of the ``clip_zeroshot`` task pool."""

    clip_model: str = option(
        "openai/clip-vit-base-patch32",
        help="Folder or Hub id of a full transformers CLIPModel: its text tower (zero-shot heads), visual "
        "projection and logit scale are used.")
    processor: str | None = option(
        None, help="Folder or Hub id of the CLIP tokenizer and image processor; null: clip_model.")
    tasks: dict[str, Any] = option(
        {}, help="Task name -> {dataset, split (test), classnames (null: ClassLabel names), templates "
        "(null: taskpool.templates), image_column, label_column}; a bare string is the dataset.")
    templates: list[str] | None = option(
        None, help="Default caption templates for tasks without their own; null: a built-in generic set.")
    batch_size: int = option(256, ge=1, le=2**20, help="Images per forward pass.")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")
    devices: list[str] | str | None = option(
        None, help="Evaluate across several devices (docs/logging_devices.md): a list ([cuda:0,cuda:1]), auto (every "
        "visible GPU) or a number of GPUs; an ensemble's members go round-robin, one model's batches are split. "
        "null: the one device.")
    precision: str = option(
        "float32", choices=("float32", "bf16", "32", "32-true", "bf16-mixed", "16-mixed"),
        help="Image-encoder arithmetic: float32 / 32 (exact reference numbers), or bf16 / bf16-mixed autocast "
        "(about 2x faster on CPUs with AMX/AVX512-BF16 and on GPUs; accuracies can differ slightly from float32), "
        "or 16-mixed (float16 autocast, for GPUs).")
    cache_dir: str | None = option(
        None, help="Cache folder for heads and preprocessed images; null: $FUSION_BENCH_CACHE or "
        "~/.cache/fusion_bench.")
    use_cache: bool = option(True, help="Read and write the on-disk and in-memory caches.")
    max_samples: int | None = option(
        None, ge=1, le=10**9, help="Evaluate at most this many evenly spaced samples per task (null: all); for fast runs.")
    image_column: str | None = option(None, help="Image column; null: the first Image feature, else 'image'/'img'.")
    label_column: str | None = option(None, help="Label column; null: the first ClassLabel feature, else 'label'.")


@register_taskpool("clip_zeroshot")
class CLIPZeroShotTaskPool(PerTaskPool):
    """CLIP zero-shot classification accuracy and cross-entropy per task.

    Radford et al. 2021, zero-shot classifier from prompt-ensembled text embeddings; the model under
    evaluation supplies only the image features (see the module docstring).

    The evaluated model is a ``CLIPVisionModel`` (what CLIP merges produce), a full ``CLIPModel``
    (its vision tower and its own visual projection are used), a ``CLIPVisionModelWithProjection``,
    a :class:`fusion_bench.models.clip.CLIPZeroShotClassifier` (its vision encoder and projection),
    or an :class:`fusion_bench.models.ensemble.Ensemble` of those (each member's logits are combined
    with the ensemble's rule).

    Args:
        config: a :class:`CLIPZeroShotTaskPoolConfig` or a mapping; keywords override.
    """

    config_class = CLIPZeroShotTaskPoolConfig

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        cfg: CLIPZeroShotTaskPoolConfig = self.config
        if cfg.batch_size <= 0:
            raise ConfigError(f"taskpool.batch_size={cfg.batch_size} must be positive.")
        if cfg.max_samples is not None and cfg.max_samples <= 0:
            raise ConfigError(f"taskpool.max_samples={cfg.max_samples} must be positive or null.")
        self._specs: dict[str, CLIPTaskSpec] = {}
        for task, raw in cfg.tasks.items():
            if isinstance(raw, str) or not hasattr(raw, "items"):
                raw = {"dataset": raw}
            self._specs[task] = build_config(CLIPTaskSpec, raw, prefix=f"taskpool.tasks.{task}")
            if self._specs[task].prompts is not None:
                from fusion_bench.hub.clip_tasks import get_task

                try:
                    get_task(self._specs[task].prompts)
                except ConfigError as e:
                    raise ConfigError(f"taskpool.tasks.{task}.prompts: {e}") from None
            for t in self._specs[task].templates or []:
                if "{}" not in t:
                    raise ConfigError(f"taskpool.tasks.{task}.templates: template {t!r} has no '{{}}' for the "
                                      "class name.")
        for t in cfg.templates or []:
            if "{}" not in t:
                raise ConfigError(f"taskpool.templates: template {t!r} has no '{{}}' for the class name.")
        self._resolved: tuple[Path, Path] | None = None
        self._clip: nn.Module | None = None
        self._tokenizer = None
        self._image_processor = None
        self._text_hash: str | None = None
        self._datasets: dict[str, Any] = {}
        self._columns: dict[str, tuple[str, str]] = {}
        self._split_info: dict[str, dict[str, Any]] = {}

    # -- properties ----------------------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        c = self.config.cache_dir
        return Path(c).expanduser() if c else default_cache_dir()

    @property
    def device(self) -> torch.device:
        return resolve_device(self.config.device)

    # -- CLIP model, tokenizer, processor --------------------------------------------------------
    def _paths(self) -> tuple[Path, Path]:
        """Local folders of the CLIP model and of its processor (Hub ids resolved once)."""
        if self._resolved is None:
            from fusion_bench.modelpool.base import resolve_hf_path

            clip = resolve_hf_path(self.config.clip_model, "taskpool.clip_model")
            proc = resolve_hf_path(self.config.processor, "taskpool.processor") if self.config.processor else clip
            self._resolved = (clip, proc)
        return self._resolved

    @property
    def clip_model(self) -> nn.Module:
        """The full CLIP model (float32, eval mode), loaded on first use."""
        if self._clip is None:
            from transformers import CLIPModel

            from fusion_bench.modelpool.base import _quiet_from_pretrained

            path, _ = self._paths()
            try:
                self._clip = _quiet_from_pretrained(CLIPModel, path).float().eval()
            except Exception as e:
                raise CheckpointError(
                    f"taskpool.clip_model: cannot load a CLIPModel from {path} ({type(e).__name__}: {e}). "
                    "Give the folder or Hub id of a full CLIP model (text and vision towers).") from e
            self._clip.requires_grad_(False)
        return self._clip

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            _, path = self._paths()
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(path)
            except Exception as e:
                raise CheckpointError(
                    f"taskpool.processor: cannot load the CLIP tokenizer from {path} ({type(e).__name__}: {e}). "
                    "Set taskpool.processor to a folder holding the CLIP tokenizer files.") from e
        return self._tokenizer

    @property
    def image_processor(self):
        if self._image_processor is None:
            from transformers import AutoImageProcessor
            from transformers.utils import logging as hf_logging

            _, path = self._paths()
            old = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                self._image_processor = AutoImageProcessor.from_pretrained(path)
            except Exception as e:
                raise CheckpointError(
                    f"taskpool.processor: cannot load the CLIP image processor from {path} "
                    f"({type(e).__name__}: {e}). Set taskpool.processor to a folder holding "
                    "preprocessor_config.json / processor_config.json.") from e
            finally:
                hf_logging.set_verbosity(old)
        return self._image_processor

    def text_hash(self) -> str:
        """Content hash of the text tower, the text projection and the tokenizer's vocabulary."""
        if self._text_hash is None:
            sd = {k: v for k, v in self.clip_model.state_dict().items()
                  if k.startswith(("text_model.", "text_projection."))}
            vocab = json.dumps(sorted(self.tokenizer.get_vocab().items()))
            h = hashlib.sha256(sha256_tensors(sd).encode())
            h.update(type(self.tokenizer).__name__.encode())
            h.update(hashlib.sha256(vocab.encode()).digest())
            self._text_hash = h.hexdigest()
        return self._text_hash

    # -- data ----------------------------------------------------------------------------------
    def dataset(self, task: str):
        """The evaluation split of ``task`` (a ``datasets.Dataset``), loaded once."""
        if task not in self._datasets:
            spec = self._specs[task]
            ds = load_dataset_ref(spec.dataset, split=spec.split)
            import datasets

            if isinstance(ds, datasets.DatasetDict):
                raise ConfigError(f"taskpool.tasks.{task}: the dataset reference gave several splits "
                                  f"{sorted(ds)}; set split.")
            where = f"taskpool.tasks.{task} (dataset {spec.dataset!r}, split {spec.split!r})"
            img = find_image_column(ds, spec.image_column or self.config.image_column, where)
            lab = find_label_column(ds, spec.label_column or self.config.label_column, where)
            self._datasets[task] = ds
            self._columns[task] = (img, lab)
        return self._datasets[task]

    def classnames(self, task: str) -> list[str]:
        spec = self._specs[task]
        if spec.classnames is None and spec.prompts is not None:
            from fusion_bench.hub.clip_tasks import classnames

            return classnames(spec.prompts)
        if spec.classnames is not None:
            if not spec.classnames:
                raise ConfigError(f"taskpool.tasks.{task}.classnames is empty.")
            return list(spec.classnames)
        ds = self.dataset(task)
        names = class_names(ds, self._columns[task][1])
        if names is None:
            raise ConfigError(
                f"taskpool.tasks.{task}: label column '{self._columns[task][1]}' is not a ClassLabel, so "
                f"the class names are unknown; set taskpool.tasks.{task}.classnames.")
        return [n.replace("_", " ") for n in names]

    def templates(self, task: str) -> list[str]:
        spec = self._specs[task]
        if spec.templates is None and spec.prompts is not None:
            from fusion_bench.hub.clip_tasks import templates

            return templates(spec.prompts)
        return list(spec.templates or self.config.templates or DEFAULT_TEMPLATES)

    def images(self, task: str) -> PreprocessedImages:
        """Preprocessed images (N, 3, H, W) and labels (N,) of ``task`` (cached)."""
        ds = self.dataset(task)
        img, lab = self._columns[task]
        data = preprocessed_images(
            ds, self.image_processor, image_column=img, label_column=lab, max_samples=self.config.max_samples,
            cache_dir=self.cache_dir, use_cache=self.config.use_cache)
        labels = data.labels
        n_cls = len(self.classnames(task))
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_cls):
            raise ConfigError(
                f"taskpool.tasks.{task}: labels range over [{int(labels.min())}, {int(labels.max())}] but there "
                f"are {n_cls} class names; fix classnames or label_column.")
        if task not in self._split_info:
            spec = self._specs[task]
            self._split_info[task] = {"dataset": str(spec.dataset), "split": spec.split, "samples": int(labels.numel()),
                                      "fingerprint": dataset_fingerprint(ds)}
        return data

    # -- heads ---------------------------------------------------------------------------------
    def head(self, task: str) -> torch.Tensor:
        """The zero-shot head of ``task``: (num_classes, projection_dim), unit-norm rows (cached)."""
        classnames, templates = self.classnames(task), self.templates(task)
        key_src = json.dumps({"v": _HEAD_CACHE_VERSION, "text": self.text_hash(), "classnames": classnames,
                              "templates": templates})
        key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
        use = self.config.use_cache
        if use and key in _HEADS:
            HEAD_STATS["memory_hits"] += 1
            return _HEADS[key]
        path = self.cache_dir / "heads" / f"{key}.pt"
        head = None
        if use and path.exists():
            try:
                head = torch.load(path, map_location="cpu", weights_only=True)["head"]
                HEAD_STATS["disk_hits"] += 1
            except Exception:
                head = None
        if head is None:
            head = zeroshot_head(self.clip_model, self.tokenizer, classnames, templates,
                                 device=self._text_device())
            HEAD_STATS["computed"] += 1
            if use:
                with atomic_path(path) as tmp:
                    torch.save({"head": head, "key": key_src}, tmp)
        if use:
            _HEADS[key] = head
            while len(_HEADS) > 256:
                _HEADS.popitem(last=False)
        return head

    def _text_device(self) -> torch.device:
        return self.device

    # -- evaluation ------------------------------------------------------------------------------
    def _member_parts(self, member: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(vision encoder returning pooled output, visual projection) of one evaluated model."""
        from fusion_bench.models.clip import CLIPZeroShotClassifier

        if isinstance(member, CLIPZeroShotClassifier):
            return vision_tower(member.vision), member.projection
        if hasattr(member, "vision_model") and hasattr(member, "visual_projection"):
            return member.vision_model, member.visual_projection  # CLIPModel / CLIPVisionModelWithProjection
        if isinstance(member, Ensemble):
            raise ConfigError("Nested ensembles are not supported by the clip_zeroshot task pool.")
        return vision_tower(member), self.clip_model.visual_projection

    def _check_member(self, i: int, vision: nn.Module, projection: nn.Module, shape: tuple[int, ...]) -> None:
        cfg = getattr(vision, "config", None)
        hidden = getattr(cfg, "hidden_size", None)
        in_f = getattr(projection, "in_features", None)
        if hidden is not None and in_f is not None and hidden != in_f:
            raise ModelMismatchError(
                f"Evaluated model {i}: its vision encoder has hidden size {hidden} but the visual projection of "
                f"taskpool.clip_model expects {in_f}; use the CLIP model the vision encoder comes from.")
        size = getattr(cfg, "image_size", None)
        if size is not None and shape[-1] != size:
            raise ModelMismatchError(
                f"Evaluated model {i} expects {size}x{size} images but the image processor of "
                f"{self.config.processor or self.config.clip_model} gives {shape[-2]}x{shape[-1]}; "
                "set taskpool.processor to the processor of the evaluated model.")

    def evaluate(self, model: nn.Module, tasks: list[str] | None = None) -> dict[str, Any]:
        """Accuracy (in [0, 1]) and mean cross-entropy of ``model`` on each task, and their averages.

        Args:
            model: the model to evaluate (see the class docstring).
            tasks: task names (default: every task of the pool).
        """
        from fusion_bench.engine.devices import DevicePlan, resolve_devices

        tasks = self._check_tasks(tasks)
        devices = resolve_devices(self.config.device, self.config.devices, key="taskpool.devices")
        if len(devices) == 1 and isinstance(model, Ensemble) and model.member_devices:
            devices = list(model.member_devices)  # the members stay where the ensemble method placed them
        device = devices[0]
        members = list(model.members) if isinstance(model, Ensemble) else [model]
        combine = model.combine_logits if isinstance(model, Ensemble) else None
        parts = [self._member_parts(m) for m in members]
        if len(devices) > 1:  # the pool's shared visual projection (small): one copy per member, each on its device
            parts = [(v, copy.deepcopy(p)) for v, p in parts]
        scale = float(self.clip_model.logit_scale.exp())
        modes = [m.training for m in members]
        for m in members:
            m.eval()
        # members round-robin over the devices, or one member's batches split across them (engine/devices.py)
        plan = DevicePlan([nn.ModuleList([v, p]) for v, p in parts], devices, self._precision())
        moved = [(plan.members[i][0], plan.members[i][1]) for i in range(len(parts))]
        results: dict[str, dict[str, float]] = {}
        try:
            for task in tasks:
                head = self.head(task).to(device)
                data = self.images(task)
                for i, (v, p) in enumerate(moved):
                    self._check_member(i, v, p, data.shape)
                results[task] = self._evaluate_task(moved, combine, head, scale, data, device, plan)
        finally:
            plan.release()
            for m, t in zip(members, modes):
                m.train(t)
        return {"tasks": results, "average": average_metrics(results)}

    def _precision(self) -> str:
        from fusion_bench.engine.devices import parse_precision

        return parse_precision(self.config.precision, key="taskpool.precision")

    def _evaluate_task(self, parts, combine, head: torch.Tensor, scale: float, data: PreprocessedImages,
                       device: torch.device, plan=None) -> dict[str, float]:
        from fusion_bench.engine.devices import DevicePlan

        correct = 0
        loss_sum = 0.0
        labels = data.labels
        n = len(data)
        bs = self.config.batch_size
        dtypes = [next(v.parameters()).dtype for v, _ in parts]
        if plan is None:
            plan = DevicePlan([nn.ModuleList([v, p]) for v, p in parts], [device], self._precision())

        def features(i: int, vp: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
            v, p = vp[0], vp[1]
            try:
                out = v(pixel_values=x)
            except TypeError as e:
                raise ModelMismatchError(
                    f"Evaluated model {i} ({type(v).__name__}) does not take pixel_values ({e}); the "
                    "clip_zeroshot task pool evaluates CLIP vision encoders.") from e
            pooled = out.pooler_output if hasattr(out, "pooler_output") else out[1]
            return F.normalize(p(pooled).float(), dim=-1)

        with torch.inference_mode():
            for s in range(0, n, bs):
                x = data.batch(s, s + bs, device)
                y = labels[s:s + bs].to(device)
                feats = plan.map(features, x, prepare=lambda i, xc: xc.to(dtypes[i]))
                zs = [scale * f.float() @ head.T for f in feats]
                z = zs[0] if combine is None else combine(zs).float()
                correct += int((z.argmax(-1) == y).sum())
                loss_sum += float(F.cross_entropy(z, y, reduction="sum"))
        return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1)}

    def report_extras(self) -> dict[str, Any]:
        """Identity of the evaluation splits (dataset, split, sample count, content fingerprint)."""
        return {"evaluation_splits": dict(self._split_info),
                "taskpool_info": {"type": "clip_zeroshot", "clip_model": self.config.clip_model,
                             "max_samples": self.config.max_samples,
                             "cache": {"heads": dict(HEAD_STATS), "images": dict(IMAGE_STATS)}}}
