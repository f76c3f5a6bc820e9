"""Decode and preprocess an image classification split once; cache the tensors on disk and in memory.

The cache key is (dataset content fingerprint, image and label columns, the image processor's
configuration, the number of samples). A hit loads one tensor file instead of decoding every image.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fusion_bench.data.loading import dataset_fingerprint, default_cache_dir
from fusion_bench.errors import ConfigError
from fusion_bench.io.atomic import atomic_path

_CACHE_VERSION = 1
_MEMORY: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_MEMORY_MAX_ENTRIES = 64

#: counters the tests read to see which path served a request
STATS = {"decoded": 0, "disk_hits": 0, "memory_hits": 0}


def subset_indices(n: int, max_samples: int | None) -> list[int]:
    """All rows, or ``max_samples`` rows evenly spaced over the split (deterministic, and not biased
    towards the first classes when the split is sorted by label)."""
    if max_samples is None or max_samples >= n:
        return list(range(n))
    if max_samples <= 0:
        raise ConfigError(f"max_samples={max_samples} must be positive (or null for all samples).")
    return sorted({int(i * n / max_samples) for i in range(max_samples)})


def processor_signature(processor: Any) -> str:
    """A JSON description of an image processor's configuration (part of the cache key)."""
    to_dict = getattr(processor, "to_dict", None)
    if callable(to_dict):
        d = dict(to_dict())
        d.pop("processor_class", None)
        d["__class__"] = type(processor).__name__
        return json.dumps(d, sort_keys=True, default=str)
    return repr(processor)


def _run_processor(processor: Any, images: list) -> torch.Tensor:
    if hasattr(processor, "to_dict") and callable(processor):  # a Hugging Face image processor
        out = processor(images=images, return_tensors="pt")
        return out["pixel_values"]
    if callable(processor):  # a per-image transform (PIL -> tensor), e.g. torchvision
        return torch.stack([processor(im) for im in images])
    raise ConfigError(f"The image processor {type(processor).__name__} is not callable; give a Hugging Face "
                      "image processor (AutoImageProcessor) or a transform PIL image -> tensor.")


def _to_rgb(im):
    if hasattr(im, "mode") and im.mode != "RGB":
        return im.convert("RGB")
    return im


def preprocessed_images(ds, processor: Any | Callable, *, image_column: str, label_column: str,
                        max_samples: int | None = None, cache_dir: str | Path | None = None,
                        batch_size: int = 256, use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel values (N, C, H, W) and labels (N,) of a split, preprocessed once and cached.

    Args:
        ds: a ``datasets.Dataset`` with an image column and an integer label column.
        processor: a Hugging Face image processor (``CLIPImageProcessor``, ``AutoImageProcessor``) or a
            callable PIL image -> tensor.
        image_column: the column holding the images (PIL images, decoded by ``datasets``).
        label_column: the column holding class indices.
        max_samples: None for every row, else that many evenly spaced rows.
        cache_dir: root of the cache (default ``$FUSION_BENCH_CACHE`` or ``~/.cache/fusion_bench``).
        batch_size: images per processor call while building the cache.
        use_cache: False to bypass both the disk and the memory cache.
    """
    idx = subset_indices(len(ds), max_samples)
    key_src = json.dumps({"v": _CACHE_VERSION, "data": dataset_fingerprint(ds), "image": image_column,
                          "label": label_column, "processor": processor_signature(processor),
                          "max_samples": max_samples}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    if use_cache and key in _MEMORY:
        STATS["memory_hits"] += 1
        _MEMORY.move_to_end(key)
        return _MEMORY[key]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / "images" / f"{key}.pt"
    out: tuple[torch.Tensor, torch.Tensor] | None = None
    if use_cache and path.exists():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            out = (obj["pixel_values"], obj["labels"])
            STATS["disk_hits"] += 1
        except Exception:  # a corrupt cache file is rebuilt
            out = None
    if out is None:
        out = _build(ds, processor, idx, image_column, label_column, batch_size)
        STATS["decoded"] += 1
        if use_cache:
            with atomic_path(path) as tmp:
                torch.save({"pixel_values": out[0], "labels": out[1], "key": key_src}, tmp)
    if use_cache:
        _MEMORY[key] = out
        while len(_MEMORY) > _MEMORY_MAX_ENTRIES:
            _MEMORY.popitem(last=False)
    return out


def _build(ds, processor, idx: list[int], image_column: str, label_column: str,
           batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = ds.select_columns([label_column])[idx][label_column] if len(idx) else []
    try:
        labels_t = torch.as_tensor(labels, dtype=torch.long)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Label column '{label_column}' does not hold class indices ({e}); set label_column.") from e
    images_ds = ds.select_columns([image_column])
    chunks = []
    for s in range(0, len(idx), batch_size):
        images = [_to_rgb(im) for im in images_ds[idx[s:s + batch_size]][image_column]]
        chunks.append(_run_processor(processor, images).float())
    if not chunks:
        raise ConfigError("The dataset split is empty; check the split name and max_samples.")
    return torch.cat(chunks).contiguous(), labels_t


def clear_memory_cache() -> None:
    _MEMORY.clear()
