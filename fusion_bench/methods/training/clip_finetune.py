"""Fine-tune a CLIP vision encoder on each task against a frozen zero-shot text head (full or LoRA).

This is how the CLIP model zoos of task arithmetic and FusionBench are made (Ilharco et al. 2023,
"Editing models with task arithmetic", section 3 and appendix B): the classification head of a
task is the pretrained CLIP's text embeddings of the class names (prompt-ensembled templates) and
stays frozen, as does the visual projection; only the vision transformer is trained with
cross-entropy on ``logit_scale * normalize(P f(x)) @ head.T``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.errors import CheckpointError, ConfigError, did_you_mean
from fusion_bench.methods.base import FusionMethod, FusionResult, MethodConfig, register_method
from fusion_bench.utils import shuffled_batches

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool

DEFAULT_TEMPLATES = ["a photo of a {}."]


@dataclass
class CLIPFinetuneConfig(MethodConfig):
    tasks: list[str] = option([], help="Tasks to fine-tune on (names in modelpool.datasets); empty: every task.")
    mode: str = option("full", choices=("full", "lora"),
                       help="full: train every vision-encoder weight; lora: train low-rank adapters (peft) on "
                       "lora_target_modules and merge them into the weights at the end.")
    steps: int = option(200, ge=1, le=10**7, help="Optimizer steps per task.")
    batch_size: int = option(64, ge=1, le=2**20, help="Images per step.")
    lr: float = option(3e-4, gt=0.0, le=10.0, help="Peak learning rate (AdamW, linear warm-up then cosine decay).")
    weight_decay: float = option(0.1, ge=0.0, le=10.0, help="AdamW weight decay on matrices.")
    decay_to: str = option("zero", choices=("zero", "pretrained"),
                           help="zero: AdamW's decoupled decay of the weights toward 0 (the task-arithmetic "
                           "checkpoints' recipe); pretrained: the same decay toward the pretrained weights (L2-SP, Li et "
                           "al. 2018), so the decay adds nothing to the task vector by itself.")
    trainable: list[str] = option([], help="mode=full: glob patterns of the vision encoder's parameter names that "
                                  "train (e.g. ['*self_attn*']); the others stay at the pretrained values; empty: all.")
    warmup_steps: int = option(20, ge=0, le=10**7, help="Linear warm-up steps.")
    label_smoothing: float = option(0.0, ge=0.0, lt=1.0, help="Cross-entropy label smoothing.")
    augment_shift: int = option(0, ge=0, le=1024, help="Data augmentation: translate each training image by a random offset of up "
                                "to this many pixels (edge pixels repeated); 0: none.")
    lora_r: int = option(8, ge=1, le=65536, help="LoRA rank (mode=lora).")
    lora_alpha: float = option(16.0, gt=0.0, le=1e6, help="LoRA alpha; the update is scaled by alpha / r (mode=lora).")
    lora_dropout: float = option(0.0, ge=0.0, lt=1.0, help="Dropout on the LoRA input (mode=lora).")
    lora_target_modules: list[str] = option(["q_proj", "v_proj"], help="Linear layers that get adapters (mode=lora).")
    templates: dict[str, list[str]] = option(
        {}, help="Caption templates per task, e.g. {mnist: ['a photo of the number {}.']}. Tasks not listed use "
        "the model pool's templates (clip_zoo pools know them), else ['a photo of a {}.'].")
    train_split: str = option("train", help="The dataset split trained on.")
    max_train_samples: int | None = option(None, ge=1, le=10**9, help="Use at most this many training images per task (evenly spaced).")
    image_column: str | None = option(None, help="Image column (null: detected).")
    label_column: str | None = option(None, help="Label column (null: detected; its ClassLabel names are the classes).")
    save_dir: str | None = option(None, help="If set, save each fine-tuned encoder as a CLIPVisionModel folder "
                                  "<save_dir>/<task> (atomically, with the processor).")
    device: str = option("auto", help="Training device: auto, cpu, cuda:0, ...")
    seed: int = option(0, **SEED_RANGE, help="Seed of the batch order and LoRA initialisation (task name is mixed in).")

    def __post_init__(self) -> None:
        for k in ("steps", "batch_size", "lora_r"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"method.{k}={getattr(self, k)} must be positive.")
        if self.lr <= 0:
            raise ConfigError(f"method.lr={self.lr} must be positive.")
        if self.trainable and self.mode != "full":
            raise ConfigError(f"method.trainable={self.trainable} selects weights of mode=full; with mode={self.mode} "
                              "use lora_target_modules.")


def select_trainable(vision: nn.Module, patterns: list[str]) -> None:
    """Freeze every parameter of ``vision`` whose name matches none of ``patterns``."""
    from fnmatch import fnmatchcase

    named = list(vision.named_parameters())
    keep = {n for n, _ in named if any(fnmatchcase(n, p) for p in patterns)}
    if not keep:
        raise ConfigError(f"method.trainable={patterns} matches no parameter of the vision encoder; its names look "
                          f"like {named[min(4, len(named) - 1)][0]!r} (globs, e.g. '*self_attn*').")
    for n, p in named:
        p.requires_grad_(n in keep)


def load_full_clip(modelpool: ModelPool) -> tuple[nn.Module, Any]:
    """The pool's pretrained model as a full ``CLIPModel`` (both towers) and its ``CLIPProcessor``."""
    from transformers import CLIPModel, CLIPProcessor

    from fusion_bench.modelpool.base import PRETRAINED, _quiet_from_pretrained

    if not modelpool.has_pretrained:
        raise ConfigError("clip_finetune needs the pretrained CLIP: add '_pretrained_' (a full CLIPModel folder or "
                          "hub id, with its tokenizer and processor) to modelpool.models.")
    entry = modelpool.entry(PRETRAINED)
    if isinstance(entry, CLIPModel):
        clip = entry
        folder = modelpool.config.processor
    else:
        folder = modelpool.hf_folder(PRETRAINED)
        if folder is None:
            raise ConfigError("clip_finetune: '_pretrained_' must be a Hugging Face CLIPModel folder or hub id "
                              f"(got {entry!r}); the text tower is needed for the zero-shot heads.")
        try:
            clip = _quiet_from_pretrained(CLIPModel, folder)
        except Exception as e:
            raise CheckpointError(f"Model '_pretrained_': CLIPModel.from_pretrained({folder}) failed ({e}); it must be a "
                                  "full CLIP checkpoint (vision and text towers).") from e
        folder = modelpool.config.processor or folder
    if folder is None:
        raise ConfigError("clip_finetune: set modelpool.processor to the folder of the CLIPProcessor.")
    from fusion_bench.modelpool.base import resolve_hf_path

    try:
        processor = CLIPProcessor.from_pretrained(resolve_hf_path(str(folder), "processor"))
    except Exception as e:
        raise CheckpointError(f"Cannot load a CLIPProcessor (tokenizer + image processor) from {folder}: {e}") from e
    return clip.eval(), processor


def task_classes_and_templates(modelpool: ModelPool, task: str, ds, label_column: str,
                               templates: Mapping[str, list[str]]) -> tuple[list[str], list[str]]:
    """Class names and caption templates of ``task``: config, then the pool, then the dataset's ClassLabel."""
    from fusion_bench.data.loading import class_names

    info = modelpool.task_info(task) if hasattr(modelpool, "task_info") else {}
    classnames = list(info.get("classnames") or class_names(ds, label_column) or [])
    if not classnames:
        raise ConfigError(f"Task '{task}': its label column '{label_column}' is not a ClassLabel and the model pool "
                          "gives no class names; store the labels as datasets.ClassLabel with names.")
    tmpl = list(templates.get(task) or info.get("templates") or DEFAULT_TEMPLATES)
    bad = [t for t in tmpl if "{}" not in t]
    if bad:
        raise ConfigError(f"method.templates.{task}: template {bad[0]!r} has no '{{}}' for the class name.")
    return classnames, tmpl


def vision_from_clip(clip: nn.Module) -> nn.Module:
    """A ``CLIPVisionModel`` holding a copy of ``clip``'s vision tower."""
    from transformers import CLIPVisionModel

    vision = CLIPVisionModel(clip.config.vision_config)
    # transformers < 5 wraps the tower in ``vision_model``; 5 holds its children directly
    getattr(vision, "vision_model", vision).load_state_dict(clip.vision_model.state_dict())
    return vision


@register_method
class CLIPFinetune(FusionMethod):
    """Fine-tune the vision encoder of a pretrained CLIP on every task (one model per task).

    Ilharco et al. 2023 (task arithmetic) fine-tuning protocol: frozen zero-shot text head from the
    pretrained CLIP (class names x templates, prompt-ensembled, unit norm), frozen visual projection
    and temperature; cross-entropy on the vision transformer's weights (``mode=full``) or on LoRA
    adapters of its attention projections (``mode=lora``, Hu et al. 2022, ``W + (alpha/r) B A``,
    merged into ``W`` after training). AdamW, linear warm-up then cosine decay. Returns
    ``FusionResult(kind="per_task")`` of ``CLIPVisionModel``s.

    Args:
        config: :class:`CLIPFinetuneConfig` (tasks, mode, steps, batch_size, lr, LoRA options,
            templates, save_dir, device, seed).
    """

    name = "clip_finetune"
    config_class: ClassVar = CLIPFinetuneConfig
    family = "training"
    uses_data = True
    requires_pretrained = True
    identity_on_equal_inputs = False
    permutation_invariant = False
    summary = "Fine-tune the CLIP vision encoder per task against frozen zero-shot text heads (full or LoRA)."
    variant = ("Ilharco et al. 2023 protocol: frozen text head (templates x class names, prompt-ensembled) and "
               "visual projection; cross-entropy; full fine-tuning (of the weights matching trainable, default all) "
               "or LoRA (Hu et al. 2022) on lora_target_modules merged after training; AdamW (decay toward 0, or "
               "toward the pretrained weights with decay_to=pretrained: L2-SP) with warm-up + cosine decay.")

    #: optional progress hook ``on_step(step, total, loss)`` (set by callers such as the zoo build)
    on_step: Callable[[int, int, float], None] | None = None

    def run(self, modelpool: ModelPool) -> FusionResult:
        from fusion_bench.data.images import preprocessed_images
        from fusion_bench.data.loading import find_image_column, find_label_column
        from fusion_bench.models.clip import zeroshot_head
        from fusion_bench.utils import resolve_device

        t0 = time.perf_counter()
        cfg = self.config
        available = list(modelpool.config.datasets)
        tasks = list(cfg.tasks) or available
        if not tasks:
            raise ConfigError("clip_finetune: modelpool.datasets is empty; give {task: {train: <dataset>}} per task.")
        for t in tasks:
            if t not in available:
                raise ConfigError(f"method.tasks names task '{t}' that modelpool.datasets lacks.{did_you_mean(t, available)}")
        device = resolve_device(cfg.device)
        clip, processor = load_full_clip(modelpool)
        models: dict[str, nn.Module] = {}
        info: dict[str, Any] = {}
        for task in tasks:
            ds = modelpool.dataset(task, cfg.train_split)
            img_col = find_image_column(ds, cfg.image_column, where=f"task '{task}'")
            lab_col = find_label_column(ds, cfg.label_column, where=f"task '{task}'")
            classnames, templates = task_classes_and_templates(modelpool, task, ds, lab_col, cfg.templates)
            head = zeroshot_head(clip, processor.tokenizer, classnames, templates)
            pixels, labels = preprocessed_images(ds, processor.image_processor, image_column=img_col,
                                                 label_column=lab_col, max_samples=cfg.max_train_samples)
            if int(labels.max()) >= len(classnames) or int(labels.min()) < 0:
                raise ConfigError(f"Task '{task}': labels range over [{int(labels.min())}, {int(labels.max())}] but "
                                  f"there are {len(classnames)} class names.")
            tt = time.perf_counter()
            vision, stats = finetune_vision(clip, head, pixels, labels, cfg, task, device, self.on_step)
            stats["train_time_s"] = round(time.perf_counter() - tt, 2)
            models[task] = vision
            info[task] = stats
            if cfg.save_dir:
                save_vision(vision, processor, Path(cfg.save_dir) / task)
        return FusionResult("per_task", models=models,
                            metadata=self._metadata(t0, tasks=tasks, training=info, extra_parameters=0))


def finetune_vision(clip: nn.Module, head: torch.Tensor, pixels: torch.Tensor, labels: torch.Tensor,
                    cfg: CLIPFinetuneConfig, task: str, device: torch.device,
                    progress: Callable[[int, int, float], None] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train a copy of ``clip``'s vision tower on (pixels, labels) against the frozen ``head``.

    Returns the trained ``CLIPVisionModel`` (LoRA merged, eval mode, on CPU) and training statistics.
    """
    from fusion_bench.benchmark.clip_pretrain import warmup_cosine
    from fusion_bench.models.clip import CLIPZeroShotClassifier
    from fusion_bench.utils import seeded_generator

    gen = seeded_generator(cfg.seed, "clip_finetune", task)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    vision = vision_from_clip(clip)
    projection = nn.Linear(clip.visual_projection.in_features, clip.visual_projection.out_features, bias=False)
    projection.load_state_dict(clip.visual_projection.state_dict())
    projection.requires_grad_(False)
    if cfg.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_target_modules), bias="none")
        try:
            trainable: nn.Module = get_peft_model(vision, lcfg)
        except ValueError as e:
            raise ConfigError(f"method.lora_target_modules={cfg.lora_target_modules}: {e}") from e
    else:
        trainable = vision
        if cfg.trainable:
            select_trainable(vision, cfg.trainable)
    model = CLIPZeroShotClassifier(trainable, projection, head, float(clip.logit_scale.detach().exp())).to(device)
    model.train()
    params = [p for p in trainable.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    to_pretrained = cfg.decay_to == "pretrained" and cfg.weight_decay > 0
    anchors = [p.detach().clone() for p in decay] if to_pretrained else []
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0 if to_pretrained else cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    n = len(labels)
    batches = shuffled_batches(n, cfg.batch_size, gen)
    correct = seen = 0
    last_loss = float("nan")
    for step in range(cfg.steps):
        idx = next(batches)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warmup_cosine(step, cfg.steps, cfg.warmup_steps)
        x, y = pixels[idx], labels[idx]
        if cfg.augment_shift > 0:
            x = random_shift(x, cfg.augment_shift, gen)
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if to_pretrained:  # decoupled decay toward theta_0 (w += rate * (w0 - w)), before the Adam step as AdamW
            with torch.no_grad():
                rate = opt.param_groups[0]["lr"] * cfg.weight_decay
                for p, p0 in zip(decay, anchors):
                    p.lerp_(p0, rate)
        opt.step()
        last_loss = float(loss.detach())
        if progress is not None:
            progress(step + 1, cfg.steps, last_loss)
        if step >= cfg.steps - max(1, cfg.steps // 10):  # running accuracy over the last 10 % of steps
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
    if cfg.mode == "lora":
        vision = trainable.merge_and_unload()
    vision = vision.cpu().eval()
    for p in vision.parameters():
        p.requires_grad_(False)
    return vision, {"final_loss": round(last_loss, 4), "train_accuracy_last_steps": round(correct / max(1, seen), 4),
                    "steps": cfg.steps, "samples": n, "mode": cfg.mode,
                    "trainable_parameters": int(sum(p.numel() for p in params))}


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image of (N, C, H, W) by a random offset in [-max_shift, max_shift]^2 (edges repeated)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    off = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(off.tolist())])


def save_vision(vision: nn.Module, processor: Any, folder: Path) -> Path:
    """Save a ``CLIPVisionModel`` (and the processor) as a Hugging Face folder, atomically."""
    from fusion_bench.io.atomic import atomic_dir

    with atomic_dir(folder) as tmp:
        vision.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
    return folder
