"""A local Hugging Face cache of tiny random models and tiny datasets under FusionBench's real ids.

The shipped hub configs (``modelpool=clip-vit-base-patch32_TA8`` ...) run unchanged against it with the
Hub switched off. Usage in a test module::

    from tests.hubcache import build_clip_hub_cache, use_hub_cache

    @pytest.fixture(scope="session")
    def hub(tmp_path_factory):
        return build_clip_hub_cache(tmp_path_factory.mktemp("hub"))          # TA8, ViT-B/32

    def test_x(hub, monkeypatch):
        use_hub_cache(monkeypatch, hub)                                     # env + library constants, offline
        ...

What is written under ``root``:

- ``hub/models--<org>--<name>/snapshots/<rev>/`` + ``refs/main`` (the hub layout ``snapshot_download``
  resolves offline): for each id in ``models`` (a pretrained CLIP id such as
  ``openai/clip-vit-base-patch32``) a tiny random ``CLIPModel`` (hidden size 32, 32x32 images, patch 8)
  with a character-level CLIP tokenizer and image processor; and, with ``finetuned=True``, for each task
  the backbone's fine-tuned id (``tanganke/clip-vit-base-patch32_<task>``) as a ``CLIPVisionModel`` =
  the pretrained vision tower plus seeded noise; with ``lora=True``, for each task with a published LoRA
  adapter (``clip_tasks.LORA_ADAPTERS``: ViT-B/16 on TA8) the adapter id
  (``tanganke/clip-vit-base-patch16_<task>_lora-16``) as a PEFT LoRA adapter (``clip_tasks.LORA_CONFIG``:
  r 16, alpha 32, q_proj/v_proj) on the vision transformer (``CLIPVisionModel.vision_model``, as FusionBench
  trained them), A and B seeded noise (so merging it changes the weights), no ``config.json``.
- ``hub/datasets--<org>--<name>/snapshots/<rev>/`` parquet files per split (the repo as on the Hub) and
  ``datasets/<org>___<name>/<config>/0.0.0/<rev>/`` the prepared Arrow cache that
  ``datasets.load_dataset(id[, config], split=...)`` reads with ``HF_DATASETS_OFFLINE=1`` (datasets >= 3
  resolves an offline hub id only from that cache).
  Each dataset has the real columns (``image``/``label``; ``jpg``/``cls``/``__key__``/``__url__`` for
  fer2013; ``image_id``/``label_cat_dog`` for oxford-iiit-pet; a bool ``label`` for pcam), a
  ``ClassLabel`` with the task's class count, the real split names (train, test or validation, the
  corrupted splits of the robustness tasks) and ``rows`` images per split whose colour depends on the
  class (labels spread evenly over the classes).

Any task of :data:`fusion_bench.hub.clip_tasks.TASKS` (TALL20) and any backbone of ``BACKBONES`` can be
held; the default is the eight TA8 tasks and ViT-B/32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

REVISION = "0" * 39 + "1"
#: FusionBench's split names for datasets whose splits differ from (train, test)
_EXTRA_SPLITS = {"oxford_flowers102": ("validation",), "rendered-sst2": ("validation",), "svhn": ("extra",)}


def _snapshot(root: Path, kind: str, repo_id: str) -> Path:
    org, name = repo_id.split("/")
    repo = root / "hub" / f"{kind}--{org}--{name}"
    snap = repo / "snapshots" / REVISION
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snap


def _tokenizer_files(folder: Path) -> dict[str, int]:
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,-'\":/()&"
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return vocab


def _write_clip(root: Path, model_id: str, seed: int):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    snap = _snapshot(root, "models", model_id)
    vocab = _tokenizer_files(snap)
    tok = CLIPTokenizer(str(snap / "vocab.json"), str(snap / "merges.txt"), model_max_length=77)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(snap)
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(snap)
    return model


def _write_finetuned(root: Path, model_id: str, clip, seed: int, scale: float = 0.05) -> None:
    from fusion_bench.methods.training.clip_finetune import vision_from_clip

    vision = vision_from_clip(clip)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vision.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    vision.save_pretrained(_snapshot(root, "models", model_id))


def _write_lora(root: Path, model_id: str, clip, seed: int, scale: float = 0.05) -> None:
    from peft import LoraConfig, get_peft_model

    from fusion_bench.hub.clip_tasks import LORA_CONFIG
    from fusion_bench.methods.training.clip_finetune import vision_from_clip

    vision = vision_from_clip(clip)
    # the vision transformer (transformers < 5: CLIPVisionModel.vision_model; 5: the CLIPVisionModel itself)
    peft_model = get_peft_model(getattr(vision, "vision_model", vision), LoraConfig(**LORA_CONFIG))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(_snapshot(root, "models", model_id)))


def _features(task, n_classes: int):
    import datasets

    names = [f"class_{i}" for i in range(n_classes)]
    if task.name == "fer2013":
        return datasets.Features({"jpg": datasets.Image(), "cls": datasets.Value("int64"),
                                  "__key__": datasets.Value("string"), "__url__": datasets.Value("string")})
    if task.name == "pcam":
        return datasets.Features({"image": datasets.Image(), "label": datasets.Value("bool")})
    feats = {"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}
    if task.name == "oxford-iiit-pet":
        feats.update({"image_id": datasets.Value("string"), "label_cat_dog": datasets.ClassLabel(names=["cat", "dog"])})
    return datasets.Features(feats)


def _rows(task, n_classes: int, n: int, rng) -> dict[str, list]:
    from PIL import Image

    labels = [(i * n_classes) // n if n_classes > n else i % n_classes for i in range(n)]
    images = []
    for c in labels:
        base = rng.uniform(0, 96, (24, 24, 3))
        base[..., c % 3] += 80 + 60 * ((c // 3) % 2)
        images.append(Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB"))
    if task.name == "fer2013":
        return {"jpg": images, "cls": labels, "__key__": [f"{i:06d}" for i in range(n)],
                "__url__": ["fer2013.tar"] * n}
    if task.name == "pcam":
        return {"image": images, "label": [bool(c) for c in labels]}
    out: dict[str, list] = {"image": images, "label": labels}
    if task.name == "oxford-iiit-pet":
        out.update({"image_id": [f"pet_{i}" for i in range(n)], "label_cat_dog": [c % 2 for c in labels]})
    return out


def _write_dataset(root: Path, task, rows: int, seed: int) -> None:
    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet

    n_classes = len(task.classnames)
    splits = dict.fromkeys([task.train_split, task.test_split, *_EXTRA_SPLITS.get(task.name, ()), *task.corruptions])
    snap = _snapshot(root, "datasets", task.dataset)
    sub = task.config or "data"
    (snap / sub).mkdir(parents=True, exist_ok=True)
    feats = _features(task, n_classes)
    rng = np.random.default_rng(seed)
    files: dict[str, list[str]] = {}
    for split in splits:
        ds = datasets.Dataset.from_dict(_rows(task, n_classes, rows, rng), features=feats)
        p = snap / sub / f"{split}-00000-of-00001.parquet"
        ds.to_parquet(str(p))
        files[split] = [str(p)]
    config = task.config or ("mnist" if task.dataset == "ylecun/mnist" else "default")
    card = ["---", "configs:", f"- config_name: {config}", "  data_files:"]
    for split in splits:
        card += [f"  - split: {split}", f"    path: {sub}/{split}-*"]
    (snap / "README.md").write_text("\n".join(card + ["---", f"Tiny test stand-in of {task.dataset}.", ""]))
    # the prepared Arrow cache, as a first online load_dataset(id) leaves it
    tmp = root / ".build" / task.name
    name = task.dataset.split("/")[1]
    from datasets.naming import camelcase_to_snakecase

    builder = Parquet(cache_dir=str(tmp), dataset_name=camelcase_to_snakecase(name), config_name=config,
                      data_files=files, hash=REVISION)
    builder.download_and_prepare()
    built = Path(builder.cache_dir)
    org = task.dataset.split("/")[0]
    dest = root / "datasets" / f"{org}___{camelcase_to_snakecase(name)}" / config / built.parts[-2] / built.parts[-1]
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(built), str(dest))
    shutil.rmtree(tmp, ignore_errors=True)


def build_clip_hub_cache(root: Path, models: tuple[str, ...] = ("openai/clip-vit-base-patch32",),
                         tasks: tuple[str, ...] | None = None, *, finetuned: bool = True, rows: int = 10,
                         seed: int = 0, lora: bool = False) -> dict[str, Any]:
    """Write the hub cache under ``root`` and return its description (pass it to :func:`use_hub_cache`).

    Args:
        root: an empty folder (becomes HF_HOME).
        models: pretrained CLIP ids (``BACKBONES[...].pretrained``, e.g. ``openai/clip-vit-base-patch32``).
        tasks: task names of :data:`fusion_bench.hub.clip_tasks.TASKS` (default: the eight TA8 tasks).
        finetuned: also write each backbone's fine-tuned ``tanganke/<backbone>_<task>`` vision encoders.
        rows: images per split (labels spread evenly over the classes).
        seed: seed of the weights and images.
        lora: also write the backbone's published LoRA-16 adapters (``tanganke/<backbone>_<task>_lora-16``).
    Returns:
        ``{"root", "hub", "datasets", "models": [ids], "datasets_ids": [ids], "tasks": [names]}``.
    """
    from fusion_bench.hub.clip_tasks import BACKBONES, LORA_ADAPTERS, TA8, get_task, lora_id

    root = Path(root)
    tasks = tuple(tasks) if tasks is not None else TA8
    task_objs = [get_task(t) for t in tasks]
    by_pretrained = {b.pretrained: b for b in BACKBONES.values()}
    written: list[str] = []
    for i, mid in enumerate(models):
        clip = _write_clip(root, mid, seed + i)
        written.append(mid)
        bb = by_pretrained.get(mid)
        if finetuned and bb is not None:
            for j, t in enumerate(tasks):
                if t in bb.tasks:
                    _write_finetuned(root, bb.model_id(t), clip, seed + 1000 * (i + 1) + j)
                    written.append(bb.model_id(t))
        if lora and bb is not None and bb.name in LORA_ADAPTERS:
            for j, t in enumerate(tasks):
                if t in LORA_ADAPTERS[bb.name][1]:
                    _write_lora(root, lora_id(bb.name, t), clip, seed + 5000 * (i + 1) + j)
                    written.append(lora_id(bb.name, t))
    for j, t in enumerate(task_objs):
        _write_dataset(root, t, rows, seed + j)
    shutil.rmtree(root / ".build", ignore_errors=True)
    return {"root": root, "hub": root / "hub", "datasets": root / "datasets", "models": written,
            "datasets_ids": sorted({t.dataset for t in task_objs}), "tasks": list(tasks)}


def use_hub_cache(monkeypatch, info: dict[str, Any]) -> None:
    """Point HF_HOME / HF_HUB_CACHE / HF_DATASETS_CACHE at the cache, switch the Hub off, and patch the
    constants ``huggingface_hub`` and ``datasets`` read at import time (so it works mid-session)."""
    root, hub, dsets = str(info["root"]), str(info["hub"]), str(info["datasets"])
    for k, v in {"HF_HOME": root, "HF_HUB_CACHE": hub, "HUGGINGFACE_HUB_CACHE": hub, "HF_DATASETS_CACHE": dsets,
                 "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
        monkeypatch.setenv(k, v)
    import datasets.config as dcfg
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HOME", root, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", hub, raising=False)
    monkeypatch.setattr(hc, "HUGGINGFACE_HUB_CACHE", hub, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(dcfg, "HF_DATASETS_CACHE", Path(dsets), raising=False)
    monkeypatch.setattr(dcfg, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(dcfg, "HF_DATASETS_OFFLINE", True, raising=False)
    try:
        import transformers.utils.hub as th

        monkeypatch.setattr(th, "HF_HUB_CACHE", hub, raising=False)
        monkeypatch.setattr(th, "TRANSFORMERS_CACHE", hub, raising=False)
    except ImportError:  # pragma: no cover
        pass
