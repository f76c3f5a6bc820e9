"""Resolve dataset references from configs into ``datasets`` objects.

A reference is one of:

- a local folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (a
  ``DatasetDict`` folder gives the requested split);
- a local data file (``.parquet``, ``.csv``, ``.json``, ``.jsonl``, ``.arrow``) or a folder of such
  files / images, read with the matching ``datasets`` packaged builder;
- a Hugging Face Hub id such as ``"tanganke/sun397"`` (``datasets.load_dataset(id, split=...)``);
- a mapping ``{path: ..., name: ..., split: ..., revision: ..., data_files: ...}``;
- such a mapping with ``holdout: {fraction: 0.1, seed: 0, part: validation}``: a seeded part of the
  split (FusionBench's validation hold-out, see :func:`holdout_indices`; ``part: train`` is the rest);
- a ``datasets.Dataset`` / ``DatasetDict`` object (Python API), passed through.

A split may carry a slice, ``"test[:100]"`` or ``"test[100:200]"`` (rows, not percentages, for
local datasets; the hub path passes it to ``datasets.load_dataset`` which also accepts ``%``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fusion_bench.errors import CheckpointError, ConfigError, did_you_mean

_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}
_MAPPING_KEYS = ("path", "name", "split", "revision", "data_files", "data_dir", "trust_remote_code", "holdout")
_HOLDOUT_KEYS = ("fraction", "seed", "part")
_SLICE = re.compile(r"^(?P<split>[^\[\]]+)\[(?P<a>-?\d*):(?P<b>-?\d*)\]$")

IMAGE_COLUMN_NAMES = ("image", "img", "images", "picture", "pixel_values")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "target", "class", "y")


def default_cache_dir() -> Path:
    """``$FUSION_BENCH_CACHE`` when set, else ``~/.cache/fusion_bench``."""
    env = os.environ.get("FUSION_BENCH_CACHE")
    return Path(os.path.expanduser(env)) if env else Path.home() / ".cache" / "fusion_bench"


def _describe(spec: Any) -> str:
    if isinstance(spec, Mapping):
        return str(spec.get("path", dict(spec)))
    return str(spec)


def _is_saved_dataset(p: Path) -> bool:
    return (p / "dataset_dict.json").exists() or (p / "state.json").exists()


def _split_and_slice(split: str | None) -> tuple[str | None, slice | None]:
    if split is None:
        return None, None
    m = _SLICE.match(str(split).strip())
    if not m:
        return str(split), None
    a = int(m["a"]) if m["a"] else None
    b = int(m["b"]) if m["b"] else None
    return m["split"], slice(a, b)


def _apply_slice(ds, sl: slice | None):
    if sl is None:
        return ds
    return ds.select(range(*sl.indices(len(ds))))


def _pick_split(obj, split: str | None, where: str):
    """From a DatasetDict pick ``split`` (with an optional row slice); a Dataset passes through."""
    import datasets

    name, sl = _split_and_slice(split)
    if isinstance(obj, datasets.DatasetDict):
        if name is None:
            return obj
        if name not in obj:
            raise ConfigError(
                f"Dataset {where} has no split '{name}' (it has {sorted(obj)}).{did_you_mean(name, obj)} "
                "Set the task's split to one of these.")
        return _apply_slice(obj[name], sl)
    return _apply_slice(obj, sl)


def _load_local(p: Path, split: str | None, where: str, extra: Mapping[str, Any]):
    import datasets

    if p.is_dir() and _is_saved_dataset(p):
        try:
            obj = datasets.load_from_disk(str(p))
        except Exception as e:
            raise CheckpointError(f"Dataset {where}: cannot read the saved dataset folder {p} ({e}).") from e
        return _pick_split(obj, split, where)
    if p.is_file():
        builder = _FILE_BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise ConfigError(
                f"Dataset {where}: unknown file type '{p.suffix}'; use a save_to_disk folder or one of "
                f"{sorted(_FILE_BUILDERS)}.")
        try:
            obj = datasets.load_dataset(builder, data_files=str(p), split="train")
        except Exception as e:
            raise CheckpointError(f"Dataset {where}: cannot read {p} as {builder} ({e}).") from e
        return _apply_slice(obj, _split_and_slice(split)[1])  # one file is one split
    # a folder of data files or images (packaged builders: parquet, csv, json, imagefolder, ...)
    try:
        obj = datasets.load_dataset(str(p), **dict(extra))
    except Exception as e:
        raise CheckpointError(
            f"Dataset {where}: the folder {p} is neither a save_to_disk folder nor readable by "
            f"datasets.load_dataset ({type(e).__name__}: {e}).") from e
    return _pick_split(obj, split, where)


def load_dataset_ref(spec: Any, split: str | None = None):
    """Load the dataset a config names.

    Args:
        spec: a local path (save_to_disk folder, data file or folder), a Hub id, a mapping
            ``{path, name, split, revision, data_files, data_dir, trust_remote_code}``, or a
            ``datasets.Dataset``/``DatasetDict``.
        split: the split to return from a dataset dictionary (``"test"``, ``"test[:100]"``); a
            ``split`` key in a mapping spec wins. None returns a ``DatasetDict`` unchanged.
    Returns:
        a ``datasets.Dataset`` when a split is selected (or the reference is a single dataset), else
        a ``datasets.DatasetDict``.
    Raises:
        ConfigError: malformed reference, unknown split, missing local path.
        CheckpointError: the data cannot be read, or the Hub cannot be reached.
    """
    import datasets

    if isinstance(spec, (datasets.Dataset, datasets.DatasetDict)):
        return _pick_split(spec, split, f"<{type(spec).__name__}>")
    extra: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        unknown = [k for k in spec if k not in _MAPPING_KEYS]
        if unknown:
            raise ConfigError(
                f"Unknown key '{unknown[0]}' in dataset reference {dict(spec)}.{did_you_mean(unknown[0], _MAPPING_KEYS)}")
        if "path" not in spec:
            raise ConfigError(f"Dataset reference {dict(spec)} has no 'path' (a local folder or a Hub id).")
        split = spec.get("split", split)
        extra = {k: spec[k] for k in ("name", "revision", "data_files", "data_dir", "trust_remote_code")
                 if spec.get(k) is not None}
        if "trust_remote_code" in extra and not isinstance(extra["trust_remote_code"], bool):
            raise ConfigError(f"trust_remote_code in dataset reference {dict(spec)} must be true or false, got "
                              f"{extra['trust_remote_code']!r}.")
        if extra.get("trust_remote_code") is False:
            del extra["trust_remote_code"]  # off is the default; only the user turns it on
        holdout = _check_holdout(spec.get("holdout"), spec)
        if holdout is not None:
            if split is None:
                raise ConfigError(f"Dataset reference {dict(spec)} has a holdout but no split; set split (e.g. train).")
            base = {k: v for k, v in spec.items() if k != "holdout"}
            ds = load_dataset_ref({**base, "split": split})
            return ds.select(holdout_indices(len(ds), **holdout))
        spec = spec["path"]
    if not isinstance(spec, (str, os.PathLike)):
        raise ConfigError(f"Dataset reference {spec!r} must be a path, a Hub id or a mapping with 'path'.")
    ref = str(spec)
    where = f"'{ref}'"
    p = Path(os.path.expanduser(ref))
    if p.exists():
        return _load_local(p, split, where, extra)
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1 or Path(ref).suffix.lower() in _FILE_BUILDERS:
        raise ConfigError(f"Dataset {where}: the local path {p} does not exist. Check the path (it is read "
                          "relative to the working directory).")
    return _load_hub(ref, split, extra)


def _check_holdout(h: Any, spec: Mapping[str, Any]) -> dict[str, Any] | None:
    if h is None:
        return None
    where = f"holdout of dataset reference {dict(spec)}"
    if not isinstance(h, Mapping):
        raise ConfigError(f"The {where} must be a mapping {{fraction: 0.1, seed: 0, part: validation}}.")
    unknown = [k for k in h if k not in _HOLDOUT_KEYS]
    if unknown:
        raise ConfigError(f"Unknown key '{unknown[0]}' in the {where}.{did_you_mean(unknown[0], _HOLDOUT_KEYS)}")
    fraction, seed, part = h.get("fraction", 0.1), h.get("seed", 0), h.get("part", "validation")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"holdout.fraction in the {where} must be a number in (0, 1), got {fraction!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"holdout.seed in the {where} must be an integer, got {seed!r}.")
    if part not in ("train", "validation"):
        raise ConfigError(f"holdout.part in the {where} must be 'train' or 'validation', got {part!r}.")
    return {"fraction": float(fraction), "seed": seed, "part": part}


def holdout_indices(n: int, fraction: float = 0.1, seed: int = 0, part: str = "validation") -> list[int]:
    """Row indices of one part of a seeded train/validation split of ``n`` rows.

    FusionBench's ``train_validation_split``: ``k = int(n * fraction)`` validation rows, and
    ``torch.utils.data.random_split(rows, [n - k, k], generator=torch.Generator().manual_seed(seed))``,
    i.e. a ``torch.randperm(n)`` under that generator whose first ``n - k`` entries are the training
    rows and whose last ``k`` are the validation rows (in permutation order).

    Args:
        n: rows in the split.
        fraction: share of rows held out as validation, in (0, 1).
        seed: seed of the torch generator.
        part: 'validation' (the held-out rows) or 'train' (the rest).
    """
    import torch

    k = int(n * fraction)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[n - k:] if part == "validation" else perm[:n - k]


def _load_hub(ref: str, split: str | None, extra: Mapping[str, Any]):
    import datasets

    try:
        return datasets.load_dataset(ref, split=split, **dict(extra))
    except Exception as e:
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (" The Hub is switched off here (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE=1)." if offline else "")
        raise CheckpointError(
            f"Dataset '{ref}' (split {split!r}) is not a local path and could not be loaded from the "
            f"Hugging Face Hub ({type(e).__name__}: {e}).{hint} Check the id and your network, or load it "
            "once where the Hub is reachable, save it with `save_to_disk(folder)` and give that folder."
        ) from e


# ----------------------------------------------------------------------------------------------
# identity and columns
# ----------------------------------------------------------------------------------------------
def _hash_file(h, f: Path) -> None:
    size = f.stat().st_size
    h.update(f"{f.name}:{size}".encode())
    with open(f, "rb") as fh:
        if size <= 256 << 20:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        else:  # large files: first, middle and last 4 MiB plus the size
            for off in (0, size // 2, max(0, size - (4 << 20))):
                fh.seek(off)
                h.update(fh.read(4 << 20))


def dataset_fingerprint(ds) -> str:
    """A stable identity of a ``datasets.Dataset``'s rows: the content hash of its Arrow files (when it
    is backed by files), ``datasets``' own fingerprint (which follows every transform), the row
    count and the features."""
    h = hashlib.sha256()
    files = [Path(c["filename"]) for c in getattr(ds, "cache_files", []) or [] if "filename" in c]
    if files and all(f.exists() for f in files):
        for f in files:
            _hash_file(h, f)
    # datasets' fingerprint follows every transform (select, map, cast, ...) deterministically; with
    # the file hash it also guards against in-memory changes over unchanged files
    h.update(str(getattr(ds, "_fingerprint", None) or id(ds)).encode())
    h.update(f"rows={len(ds)}".encode())
    h.update(repr(getattr(ds, "features", None)).encode())
    return h.hexdigest()[:32]


def find_image_column(ds, name: str | None = None, where: str = "dataset") -> str:
    """The image column: ``name`` when given (checked), else the first ``Image`` feature, else a usual name."""
    import datasets

    cols = list(ds.column_names)
    if name is not None:
        if name not in cols:
            raise ConfigError(f"{where} has no column '{name}' (columns: {cols}).{did_you_mean(name, cols)} "
                              "Set image_column to the column holding the images.")
        return name
    for c, f in ds.features.items():
        if isinstance(f, datasets.Image):
            return c
    for c in IMAGE_COLUMN_NAMES:
        if c in cols:
            return c
    raise ConfigError(f"{where}: cannot find the image column among {cols}; set image_column.")


def find_label_column(ds, name: str | None = None, where: str = "dataset") -> str:
    """The label column: ``name`` when given (checked), else the first ``ClassLabel``, else a usual name."""
    import datasets

    cols = list(ds.column_names)
    if name is not None:
        if name not in cols:
            raise ConfigError(f"{where} has no column '{name}' (columns: {cols}).{did_you_mean(name, cols)} "
                              "Set label_column to the column holding the class indices.")
        return name
    for c, f in ds.features.items():
        if isinstance(f, datasets.ClassLabel):
            return c
    for c in LABEL_COLUMN_NAMES:
        if c in cols:
            return c
    raise ConfigError(f"{where}: cannot find the label column among {cols}; set label_column.")


def class_names(ds, label_column: str) -> list[str] | None:
    """The ``ClassLabel`` names of ``label_column``, or None when it is not a ClassLabel."""
    import datasets

    f = ds.features.get(label_column)
    if isinstance(f, datasets.ClassLabel):
        return list(f.names)
    return None
