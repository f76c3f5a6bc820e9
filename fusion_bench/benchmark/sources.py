"""Image sources of the offline benchmark that come from real data sets: Fashion-MNIST and sklearn digits.

Fashion-MNIST is read from the IDX files of the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``), or from a folder named by the environment variable
``FUSION_BENCH_FASHION_MNIST_DIR``; when neither holds the files it is loaded from the Hugging Face
hub (``zalando-datasets/fashion_mnist``) if hub access is allowed.
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from fusion_bench.errors import FusionBenchError


class DataSourceError(FusionBenchError):
    """A data source of the benchmark tasks is missing or unreadable."""


FASHION_MNIST_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (the MNIST format; gzip-compressed when the name ends in .gz) into an array.

    Format: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), a byte with the number of dimensions, one big-endian uint32 per dimension, then the
    data in C order, big-endian.

    Args:
        path: the IDX file.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataSourceError(f"Cannot read IDX file {path}: {e}. Reinstall the data set files.") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataSourceError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()}).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataSourceError(f"IDX file {path} is truncated in its header.")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - header != count * dtype.itemsize:
        raise DataSourceError(
            f"IDX file {path} holds {len(raw) - header} data bytes, but its header announces shape {shape} "
            f"of {dtype} ({count * dtype.itemsize} bytes): the file is truncated or corrupt."
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_dirs() -> list[Path]:
    env = os.environ.get("FUSION_BENCH_FASHION_MNIST_DIR")
    return ([Path(env)] if env else []) + [Path(d) for d in FASHION_MNIST_DIRS]


def _fashion_from_idx() -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    for folder in _fashion_dirs():
        found = {split: [_find_idx(folder, s) for s in stems] for split, stems in _FASHION_FILES.items()}
        if all(p is not None for ps in found.values() for p in ps):
            out = {}
            for split, (img_p, lab_p) in found.items():
                images, labels = read_idx(img_p), read_idx(lab_p)
                if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                    raise DataSourceError(
                        f"Fashion-MNIST files in {folder} disagree: images {images.shape}, labels {labels.shape}."
                    )
                out[split] = (images.astype(np.uint8), labels.astype(np.int64))
            return out
    return None


def _fashion_from_hub() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import datasets

    dd = datasets.load_dataset(FASHION_MNIST_HUB_ID)
    out = {}
    for split in ("train", "test"):
        ds = dd[split]
        images = np.stack([np.asarray(im.convert("L"), dtype=np.uint8) for im in ds["image"]])
        out[split] = (images, np.asarray(ds["label"], dtype=np.int64))
    return out


@lru_cache(maxsize=1)
def load_fashion_mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST as ``{"train": (images uint8 (N, 28, 28), labels int64 (N,)), "test": ...}``.

    Looks for the IDX files first (local, offline), then the Hugging Face hub.
    """
    local = _fashion_from_idx()
    if local is not None:
        return local
    try:
        return _fashion_from_hub()
    except Exception as e:  # any failure of the hub path: offline, missing package, ...
        dirs = ", ".join(str(d) for d in _fashion_dirs())
        raise DataSourceError(
            f"Fashion-MNIST was not found: no IDX files (train-images-idx3-ubyte[.gz], ...) in {dirs}, and "
            f"loading '{FASHION_MNIST_HUB_ID}' from the Hugging Face hub failed ({type(e).__name__}: {e}). "
            "Fix: `apt-get install dataset-fashion-mnist`, or set FUSION_BENCH_FASHION_MNIST_DIR to a folder "
            "with the IDX files, or allow hub access (unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."
        ) from e


@lru_cache(maxsize=1)
def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 handwritten digits: (images float in [0, 1] (1797, 8, 8), labels)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float64), d.target.astype(np.int64)
