"""The CLIP hub experiments of FusionBench: one table of tasks, task sets, backbones and splits.

Everything the shipped ``clip-vit-*`` model pools and task pools say comes from here (they are
written by ``python -m fusion_bench.hub.write_configs``), so a dataset id, a split or a checkpoint
name is stated once.

Facts (ids, splits, class names, caption templates) follow FusionBench (Tang et al. 2024,
arXiv 2406.03280; its ``CLIPVisionModelPool`` / ``CLIPVisionModelTaskPool`` configs) which takes
the class names and per-task templates of the CLIP paper (Radford et al. 2021) and of task
arithmetic (Ilharco et al. 2023): e.g. SUN397 2 templates, Cars 8, RESISC45 18, EuroSAT 3, SVHN 1,
GTSRB 3, MNIST 1, DTD 8. The lists live in ``clip_text.json`` beside this file.

Validation split: FusionBench holds out ``int(0.1 * len(train))`` rows of each train split as
validation with ``torch.utils.data.random_split(train, [n - k, k], generator=manual_seed(0))``;
:data:`HOLDOUT` states that and :func:`fusion_bench.data.loading.holdout_indices` reproduces it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from fusion_bench.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class CLIPTask:
    """One image classification task of the hub experiments.

    Attributes:
        name: the task name (model pool key, task pool key, fine-tuned checkpoint suffix).
        dataset: Hugging Face dataset id.
        config: dataset config name (``load_dataset(dataset, config)``), or None.
        train_split / test_split: the splits FusionBench trains / evaluates on.
        image_column / label_column: the columns holding the image and the class index.
        corruptions: corrupted test splits of the dataset (robustness experiments), if any.
    """

    name: str
    dataset: str
    config: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    image_column: str = "image"
    label_column: str = "label"
    corruptions: tuple[str, ...] = field(default=())

    @property
    def classnames(self) -> list[str]:
        """The hand-written class names, in label order."""
        return list(_text()[self.name]["classnames"])

    @property
    def templates(self) -> list[str]:
        """The caption templates, each with one ``{}`` for the class name."""
        return list(_text()[self.name]["templates"])

    def dataset_ref(self, split: str, holdout: str | None = None) -> dict[str, Any]:
        """A dataset reference for configs (see :func:`fusion_bench.data.loading.load_dataset_ref`):
        ``split`` of this task's dataset, or its ``holdout`` part ('train' / 'validation') under :data:`HOLDOUT`."""
        ref: dict[str, Any] = {"path": self.dataset}
        if self.config is not None:
            ref["name"] = self.config
        ref["split"] = split
        if holdout is not None:
            ref["holdout"] = {**HOLDOUT, "part": holdout}
        return ref


#: FusionBench's validation hold-out: 10 % of train, seeded permutation (torch.Generator seed 0)
HOLDOUT: dict[str, Any] = {"fraction": 0.1, "seed": 0}

#: the corrupted test splits of the robustness experiments (Hendrycks & Dietterich 2019 corruptions)
CORRUPTIONS: tuple[str, ...] = ("contrast", "gaussian_noise", "impulse_noise", "jpeg_compression", "motion_blur",
                                "pixelate", "spatter")

_T = CLIPTask
TASKS: dict[str, CLIPTask] = {t.name: t for t in [
    # the eight tasks of task arithmetic (TA8)
    _T("sun397", "tanganke/sun397"),
    _T("stanford-cars", "tanganke/stanford_cars", corruptions=CORRUPTIONS),
    _T("resisc45", "tanganke/resisc45", corruptions=CORRUPTIONS),
    _T("eurosat", "tanganke/eurosat", corruptions=CORRUPTIONS),
    _T("svhn", "ufldl-stanford/svhn", config="cropped_digits"),
    _T("gtsrb", "tanganke/gtsrb", corruptions=CORRUPTIONS),
    _T("mnist", "ylecun/mnist"),
    _T("dtd", "tanganke/dtd"),
    # TALL14 adds (Wang et al. 2024, TALL masks)
    _T("oxford_flowers102", "dpdl-benchmark/oxford_flowers102"),
    _T("pcam", "1aurent/PatchCamelyon"),
    _T("fer2013", "clip-benchmark/wds_fer2013", image_column="jpg", label_column="cls"),
    _T("oxford-iiit-pet", "timm/oxford-iiit-pet"),
    _T("stl10", "tanganke/stl10"),
    _T("cifar100", "tanganke/cifar100"),
    # TALL20 adds
    _T("cifar10", "tanganke/cifar10"),
    _T("food101", "ethz/food101", test_split="validation"),
    _T("fashion_mnist", "zalando-datasets/fashion_mnist"),
    _T("emnist_letters", "tanganke/emnist_letters"),
    _T("kmnist", "tanganke/kmnist"),
    _T("rendered-sst2", "nateraw/rendered-sst2"),
]}

TA8: tuple[str, ...] = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
TALL14: tuple[str, ...] = TA8 + ("oxford_flowers102", "pcam", "fer2013", "oxford-iiit-pet", "stl10", "cifar100")
TALL20: tuple[str, ...] = TALL14 + ("cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered-sst2")
TASK_SETS: dict[str, tuple[str, ...]] = {"TA8": TA8, "TALL14": TALL14, "TALL20": TALL20}
#: FusionBench's small ViT-B/32 pools (clip-vit-base-patch32_<name>), used in its TIES / task-arithmetic docs
B32_SUBSETS: dict[str, tuple[str, ...]] = {
    "svhn_and_mnist": ("svhn", "mnist"),
    "sun397_and_cars": ("sun397", "stanford-cars"),
    "sun397_and_dtd": ("sun397", "dtd"),
    "cars_and_dtd": ("stanford-cars", "dtd"),
    "sun397_cars_and_dtd": ("sun397", "stanford-cars", "dtd"),
}

#: the robustness experiments' tasks (FusionBench's clip-vit-base-patch32_robustness_* pools), in its order
ROBUSTNESS_TASKS: tuple[str, ...] = ("stanford-cars", "eurosat", "resisc45", "gtsrb")


@dataclass(frozen=True)
class Backbone:
    """A CLIP backbone with FusionBench's fully fine-tuned vision encoders.

    Attributes:
        name: config name prefix, e.g. 'clip-vit-base-patch32'.
        pretrained: Hub id of the full pretrained CLIPModel (text tower, processor).
        finetuned: Hub id of each task's fine-tuned CLIPVisionModel, '{task}' in it.
        tasks: the tasks with a published fine-tuned model.
        robustness: whether FusionBench runs its robustness experiments on this backbone.
    """

    name: str
    pretrained: str
    finetuned: str
    tasks: tuple[str, ...] = TALL20
    robustness: bool = False

    def model_id(self, task: str) -> str:
        return self.finetuned.replace("{task}", task)


BACKBONES: dict[str, Backbone] = {b.name: b for b in [
    Backbone("clip-vit-base-patch32", "openai/clip-vit-base-patch32", "tanganke/clip-vit-base-patch32_{task}",
             robustness=True),
    Backbone("clip-vit-base-patch16", "openai/clip-vit-base-patch16", "tanganke/clip-vit-base-patch16_{task}"),
    Backbone("clip-vit-large-patch14", "openai/clip-vit-large-patch14", "tanganke/clip-vit-large-patch14_{task}"),
]}

#: LoRA-16 adapters FusionBench publishes, backbone -> (Hub id template, tasks): PEFT LoRA r 16, alpha 32,
#: dropout 0.1 on q_proj / v_proj of the vision transformer (``CLIPVisionModel.vision_model``), trained by its
#: ``clip_finetune`` with ``use_lora=true``. Only ViT-B/16 on TA8 exists (FusionBench's
#: ``CLIPVisionModelPool/clip-vit-base-patch16_TA8_lora``); shipped as ``modelpool=<backbone>_TA8_lora``.
LORA_ADAPTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "clip-vit-base-patch16": ("tanganke/clip-vit-base-patch16_{task}_lora-16", TA8),
}
#: the adapters' PEFT settings (FusionBench's config/method/classification/clip_finetune.yaml lora_config)
LORA_CONFIG: dict[str, Any] = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
                               "lora_dropout": 0.1, "bias": "none"}


def lora_id(backbone: str, task: str) -> str:
    """The Hub id of FusionBench's LoRA-16 adapter of ``task`` on ``backbone`` (ConfigError when none is published)."""
    if backbone not in LORA_ADAPTERS or task not in LORA_ADAPTERS[backbone][1]:
        raise ConfigError(f"FusionBench publishes no LoRA-16 adapter for task '{task}' on '{backbone}'; "
                          f"published: {', '.join(f'{b} ({len(t)} tasks)' for b, (_, t) in LORA_ADAPTERS.items())}.")
    return LORA_ADAPTERS[backbone][0].replace("{task}", task)


@lru_cache(maxsize=1)
def _text() -> dict[str, dict[str, list[str]]]:
    with open(Path(__file__).with_name("clip_text.json"), encoding="utf-8") as f:
        return json.load(f)


def get_task(name: str) -> CLIPTask:
    """The task ``name`` of the table (a ConfigError naming the closest task otherwise)."""
    if name not in TASKS:
        raise ConfigError(f"'{name}' is not a task of the CLIP hub experiments.{did_you_mean(name, TASKS)} "
                          f"Known tasks: {', '.join(TASKS)}.")
    return TASKS[name]


def classnames(name: str) -> list[str]:
    """The hand-written class names of task ``name``."""
    return get_task(name).classnames


def templates(name: str) -> list[str]:
    """The caption templates of task ``name``."""
    return get_task(name).templates
