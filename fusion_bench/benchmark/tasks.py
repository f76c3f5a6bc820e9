"""Offline image-classification tasks of the CLIP benchmark (stand-ins for the eight FusionBench tasks).

The field's headline benchmark fine-tunes CLIP on SUN397, Stanford Cars, RESISC45, EuroSAT, SVHN, GTSRB,
MNIST and DTD. Those cannot be downloaded here, so each task below is built offline from data that ships
with installed packages, in the same spirit (digits vs textures vs objects vs scenes, 10 to 26 classes):

==============  =====================================================  ========  ==========================
task            images                                                 classes   stands in for
==============  =====================================================  ========  ==========================
letters         upper-case letters rendered from matplotlib's fonts         26   (character recognition)
fashion         Fashion-MNIST (Debian dataset-fashion-mnist / hub)          10   Stanford Cars (objects)
aerial          procedural satellite tiles (land use)                      12   RESISC45 / EuroSAT
shapes          procedural geometric shapes on cluttered backgrounds       14   SUN397 (objects in scenes)
house_numbers   rendered street numbers with neighbour digits              10   SVHN
signs           sign plates carrying rendered symbols                      24   GTSRB
digits          scikit-learn's 8x8 handwritten digits, upscaled            10   MNIST
textures        procedural textures (DTD adjectives)                       21   DTD
==============  =====================================================  ========  ==========================

All images are RGB PIL images of ``IMAGE_SIZE`` x ``IMAGE_SIZE``. A build is deterministic: the same
``(name, scale, seed)`` gives identical PNG bytes. Validation and test never share an image (by pixel
content) with train, nor with each other; for the procedural and digit tasks they also come from disjoint
random streams (digits: disjoint source images), for Fashion-MNIST from disjoint source rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fusion_bench.benchmark import procedural as P
from fusion_bench.benchmark.corruptions import CORRUPTIONS, build_corrupted_test, corrupt_image
from fusion_bench.benchmark.render import IMAGE_SIZE, compose, contrasting_colors, finish
from fusion_bench.benchmark.sources import (
    FASHION_CLASSES,
    DataSourceError,
    load_fashion_mnist,
    load_sklearn_digits,
)
from fusion_bench.errors import ConfigError, did_you_mean
from fusion_bench.io.atomic import atomic_dir, atomic_file

__all__ = [
    "CORRUPTIONS", "IMAGE_SIZE", "SCALES", "SPLITS", "TASK_NAMES", "TASKS_VERSION", "DataSourceError",
    "TaskSpec", "build_corrupted_test", "build_task_dataset", "corrupt_image", "dataset_hash",
    "get_task_spec", "list_tasks", "load_task", "load_task_meta", "pretraining_pairs", "save_task",
    "web_images",
    "split_sizes", "task_arrays",
]

TASKS_VERSION = 3  # bump when any generator changes its output
SPLITS: tuple[str, ...] = ("train", "validation", "test")
# a fourth random stream that no split uses: the extra, unlabelled-by-the-dataset "web" images of a task's
# domain that pre-training may draw on (see :func:`web_images`)
_STREAMS: tuple[str, ...] = (*SPLITS, "web")
# images per split at each scale; "tiny" is per class (a few dozen images, for tests)
SCALES: dict[str, tuple[int, int, int]] = {"small": (600, 200, 400), "full": (3000, 500, 1000)}
_TINY_PER_CLASS = (2, 1, 1)
_TINY_MIN = (24, 12, 12)


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its class names (words that go into captions), caption templates, provenance.

    Args:
        name: the task name.
        classnames: one meaningful word or phrase per class, in label order.
        templates: caption templates with one ``{}`` for the class name (CLIP-style prompts).
        description: one sentence about the images.
        source: where the images come from.
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    description: str
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


@dataclass(frozen=True)
class _Task:
    spec: TaskSpec
    build: Callable[[str, np.ndarray, int, int], list[Image.Image]]  # (split, labels, seed, key) -> images
    generic: tuple[str, ...]  # class-free captions of this domain (pre-training variety)
    synonyms: dict[str, tuple[str, ...]]
    phrase: str  # how a class is named inside a free-form caption, e.g. "the letter {}"


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def _task_key(name: str) -> int:
    return zlib.crc32(name.encode())


def _procedural(gen: Callable[[np.random.Generator, int], Image.Image]):
    def build(split: str, labels: np.ndarray, seed: int, key: int) -> list[Image.Image]:
        s = _STREAMS.index(split)
        return [gen(_rng(seed, key, s, i), int(lab)) for i, lab in enumerate(labels)]

    build.regenerate = lambda split, i, label, seed, key, attempt: gen(  # type: ignore[attr-defined]
        _rng(seed, key, _STREAMS.index(split), i, attempt), int(label)
    )
    return build


# ---- sklearn digits: split the 1797 source images first, then augment --------------------------


@lru_cache(maxsize=4)
def _digit_pools(seed: int, key: int) -> dict[str, list[np.ndarray]]:
    _, labels = load_sklearn_digits()
    perm = _rng(seed, key, 99).permutation(len(labels))
    n = len(perm)
    cuts = {"train": perm[: int(0.6 * n)], "validation": perm[int(0.6 * n): int(0.75 * n)], "test": perm[int(0.75 * n):]}
    return {s: [idx[labels[idx] == c] for c in range(10)] for s, idx in cuts.items()}


def _digit_render(rng: np.random.Generator, src: np.ndarray) -> Image.Image:
    size = int(rng.integers(19, 30))
    glyph = Image.fromarray((src * 255).astype(np.uint8), "L").resize((size, size), Image.BICUBIC)
    glyph = glyph.rotate(rng.uniform(-8, 8), resample=Image.BICUBIC, expand=False)
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    off = IMAGE_SIZE - size
    canvas.paste(glyph, (int(rng.integers(0, off + 1)), int(rng.integers(0, off + 1))))
    bg, fg = contrasting_colors(rng, 0.4)
    img = P._background(rng, bg, 0.2)
    return finish(compose(img, np.asarray(canvas, dtype=np.float64) / 255.0, fg), rng, rng.uniform(0.0, 0.04))


def _build_digits(split: str, labels: np.ndarray, seed: int, key: int) -> list[Image.Image]:
    images, _ = load_sklearn_digits()
    pools = _digit_pools(seed, key)["train" if split == "web" else split]  # web: new renders of train sources
    out = []
    for i, lab in enumerate(labels):
        rng = _rng(seed, key, _STREAMS.index(split), i)
        pool = pools[int(lab)]
        out.append(_digit_render(rng, images[pool[rng.integers(len(pool))]]))
    return out


def _regen_digits(split: str, i: int, label: int, seed: int, key: int, attempt: int) -> Image.Image:
    images, _ = load_sklearn_digits()
    pool = _digit_pools(seed, key)["train" if split == "web" else split][int(label)]
    rng = _rng(seed, key, _STREAMS.index(split), i, attempt)
    return _digit_render(rng, images[pool[rng.integers(len(pool))]])


_build_digits.regenerate = _regen_digits  # type: ignore[attr-defined]


# ---- Fashion-MNIST: disjoint source rows, de-duplicated by content -----------------------------

_FASHION_VAL_ROWS = 10000  # validation rows are drawn from the last 10000 rows of the official train set


@lru_cache(maxsize=2)
def _fashion_pools(seed: int, key: int) -> dict[str, list[np.ndarray]]:
    data = load_fashion_mnist()
    tr_x, tr_y = data["train"]
    te_x, te_y = data["test"]
    n_tr = len(tr_y) - _FASHION_VAL_ROWS
    rows = {
        "train": (tr_x[:n_tr], tr_y[:n_tr]),
        "validation": (tr_x[n_tr:], tr_y[n_tr:]),
        "test": (te_x, te_y),
    }
    seen: set[bytes] = set()
    pools = {}
    for s in SPLITS:
        x, y = rows[s]
        digests = [hashlib.blake2b(im.tobytes(), digest_size=16).digest() for im in x]
        keep = np.array([d not in seen for d in digests])
        seen.update(digests)
        rng = _rng(seed, key, 77, SPLITS.index(s))
        pools[s] = [x[rng.permutation(np.flatnonzero(keep & (y == c)))] for c in range(len(FASHION_CLASSES))]
    return pools


def _fashion_image(arr: np.ndarray) -> Image.Image:
    pad = (IMAGE_SIZE - arr.shape[0]) // 2
    big = np.pad(arr, ((pad, IMAGE_SIZE - arr.shape[0] - pad), (pad, IMAGE_SIZE - arr.shape[1] - pad)))
    return Image.fromarray(big, "L").convert("RGB")


def _build_fashion(split: str, labels: np.ndarray, seed: int, key: int) -> list[Image.Image]:
    if split == "web":  # the official train rows from the far end of each class's pool: the train split
        pools = [p[::-1] for p in _fashion_pools(seed, key)["train"]]  # takes them from the front
    else:
        pools = _fashion_pools(seed, key)[split]
    used = [0] * len(pools)
    out = []
    for lab in labels:
        pool = pools[int(lab)]
        if used[lab] >= len(pool):
            raise ConfigError(
                f"Task 'fashion' split '{split}' needs more than the {len(pool)} distinct Fashion-MNIST images "
                f"of class '{FASHION_CLASSES[lab]}'; use a smaller scale or fewer web images."
            )
        out.append(_fashion_image(pool[used[lab]]))
        used[lab] += 1
    return out


# ---- the task table -----------------------------------------------------------------------------

_DIGIT_SYNONYMS = {w: (str(i),) for i, w in enumerate(P.DIGIT_WORDS)}

_TASKS: dict[str, _Task] = {}


def _add(spec: TaskSpec, build, generic: Sequence[str], synonyms: dict[str, tuple[str, ...]], phrase: str) -> None:
    _TASKS[spec.name] = _Task(spec, build, tuple(generic), dict(synonyms), phrase)


_add(
    TaskSpec(
        "letters", P.LETTERS,
        ("a photo of the letter {}.", "the letter {}.", "a picture of the letter {}.",
         "the character {} in some font.", "a rendered letter {}.", "the letter {}, printed in colour."),
        "An upper-case Latin letter rendered in one of 21 fonts, rotated, shifted, coloured, "
        "sometimes with a clutter stroke, with pixel noise.",
        "rendered with PIL from matplotlib's bundled TrueType fonts (DejaVu, STIX, Computer Modern)",
    ),
    _procedural(P.letter_image), ("a letter.", "a character in some font.", "some text.", "a printed character."),
    {c: (c.upper(),) for c in P.LETTERS},
    "the letter {}",
)
_add(
    TaskSpec(
        "fashion", FASHION_CLASSES,
        ("a photo of a {}.", "a grayscale photo of a {}.", "a product photo of a {}.",
         "a low resolution photo of a {}.", "a photo of a {}, a fashion item.", "a black and white picture of a {}."),
        "A Fashion-MNIST product photo (28x28 grey, padded to 32x32, as RGB).",
        "Fashion-MNIST (Xiao et al. 2017): Debian package dataset-fashion-mnist, or the hub dataset "
        "zalando-datasets/fashion_mnist",
    ),
    _build_fashion, ("a piece of clothing.", "a grayscale product photo.", "a fashion item.", "something to wear."),
    {"t-shirt": ("tee", "t-shirt top"), "trouser": ("pair of trousers", "pants"), "pullover": ("sweater", "jumper"),
     "sneaker": ("trainer", "running shoe"), "bag": ("handbag",), "ankle boot": ("boot",), "coat": ("jacket",)},
    "a {}",
)
_add(
    TaskSpec(
        "aerial", P.AERIAL_SCENES,
        ("a centered satellite photo of {}.", "a satellite photo of {}.", "an aerial photo of {}.",
         "an aerial view of {}.", "a satellite image showing {}.", "a remote sensing image of {}."),
        "A procedurally drawn top-down satellite tile of a land-use class, random orientation, colours, "
        "illumination and noise.",
        "procedural (numpy value noise and geometry)",
    ),
    _procedural(P.aerial_image), ("a satellite image.", "an aerial photo of the ground.", "a view from above.",
                                  "a remote sensing tile."),
    {"forest": ("woodland", "trees"), "sea": ("the ocean", "open water"), "highway": ("a road", "a freeway"),
     "farmland": ("crop fields", "farm fields"), "residential area": ("houses", "a town"),
     "industrial area": ("factories", "warehouses"), "snowfield": ("snow", "a glacier"), "meadow": ("grassland",),
     "desert": ("sand dunes",), "beach": ("a coastline",), "lake": ("a pond",), "river": ("a stream",)},
    "{} seen from above",
)
_add(
    TaskSpec(
        "shapes", P.SHAPES,
        ("a drawing of a {}.", "a photo of a {} shape.", "a {} on a coloured background.", "a picture of a {}.",
         "a filled {}.", "a simple {} shape."),
        "A filled geometric shape of random colour, size, rotation and position on a flat, gradient or "
        "noisy background with small distractor blobs.",
        "procedural (PIL polygons)",
    ),
    _procedural(P.shape_image), ("a geometric shape.", "a coloured shape on a background.", "a simple drawing.",
                                 "clip art."),
    {"circle": ("disk",), "square": ("box",), "cross": ("plus",), "ring": ("donut", "annulus"),
     "crescent": ("moon",), "hourglass": ("bow tie",), "ellipse": ("oval",)},
    "a {}",
)
_add(
    TaskSpec(
        "house_numbers", P.DIGIT_WORDS,
        ('a photo of the number: "{}".', "a street number {}.", "a house number showing {}.",
         "the digit {} on a sign.", "a photo of the digit {}.", "a close-up photo of the number {}."),
        "A crop of a street number: the labelled digit centred, neighbouring digits cut by the frame, random "
        "font, colours, blur and noise.",
        "rendered with PIL from matplotlib's bundled TrueType fonts",
    ),
    _procedural(P.house_number_image), ("a street number.", "digits on a wall.", "a house number plate.",
                                        "numbers on a sign."),
    _DIGIT_SYNONYMS,
    "the number {}",
)
_add(
    TaskSpec(
        "signs", tuple(n for n, _ in P.SYMBOLS),
        ("a sign showing a {}.", "a photo of a sign with a {} on it.", "a road sign with the symbol: {}.",
         "a {} printed on a plate.", "a close-up photo of a {} on a sign.", "a traffic sign marked with a {}."),
        "A sign plate (circle, triangle, square or octagon; random rim and fill colours) carrying a symbol, "
        "on a random background, with illumination changes and noise.",
        "rendered with PIL from matplotlib's bundled DejaVu/STIX fonts",
    ),
    _procedural(P.sign_image), ("a road sign.", "a symbol on a sign.", "a traffic sign.", "a sign plate."),
    {"plus sign": ("plus",), "multiplication sign": ("times sign",), "equals sign": ("equal sign",),
     "hash sign": ("number sign", "hashtag"), "question mark": ("question sign",), "heart": ("heart symbol",),
     "check mark": ("tick",), "lightning bolt": ("lightning",), "musical note": ("music note",)},
    "a {} symbol",
)
_add(
    TaskSpec(
        "digits", P.DIGIT_WORDS,
        ('a photo of the number: "{}".', "a handwritten {}.", "a blurry drawing of the digit {}.",
         "a pixelated handwritten digit {}.", "a scan of the handwritten number {}.", "the digit {}, written by hand."),
        "A handwritten digit from scikit-learn's 8x8 digits, upscaled to a random size, rotated, placed "
        "at a random position, coloured, with noise.",
        "scikit-learn's bundled copy of the UCI optical recognition of handwritten digits data set",
    ),
    _build_digits, ("a handwritten digit.", "a number.", "a digit written by hand.", "a blurry number."),
    _DIGIT_SYNONYMS,
    "the digit {}",
)
_add(
    TaskSpec(
        "textures", P.TEXTURES,
        ("a photo of a {} texture.", "a photo of a {} pattern.", "a {} surface.", "a close-up photo of a {} pattern.",
         "a {} texture.", "a photo of a {} material."),
        "A procedural texture named by a DTD-style adjective, random colours, scale, orientation, phase, noise.",
        "procedural (numpy fields and PIL drawing)",
    ),
    _procedural(P.texture_image), ("a texture.", "a pattern.", "a close-up of a surface.", "a repeating pattern."),
    {"checkered": ("chequered", "checkerboard"), "striped": ("banded",), "dotted": ("spotted",),
     "zigzagged": ("zigzag",), "spiralled": ("spiral", "swirly"), "ringed": ("concentric",),
     "cracked": ("veined",), "honeycombed": ("hexagonal",), "woven": ("basket-woven",)},
    "a {} texture",
)

TASK_NAMES: tuple[str, ...] = ("letters", "fashion", "aerial", "shapes", "house_numbers", "signs", "digits",
                               "textures")

_GENERIC = ("an image.", "a small picture.", "a photo.", "a low resolution image.", "a tiny picture.")


def list_tasks() -> list[str]:
    """Names of all available tasks (the default eight first)."""
    return list(TASK_NAMES) + sorted(set(_TASKS) - set(TASK_NAMES))


def _task(name: str) -> _Task:
    if name not in _TASKS:
        raise ConfigError(f"Unknown benchmark task '{name}'.{did_you_mean(name, _TASKS)}")
    return _TASKS[name]


def get_task_spec(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of task ``name`` (ConfigError naming the closest task when unknown)."""
    return _task(name).spec


def split_sizes(name: str, scale: str = "full") -> dict[str, int]:
    """Number of images per split of task ``name`` at ``scale`` ('tiny', 'small' or 'full')."""
    c = _task(name).spec.num_classes
    if scale == "tiny":
        sizes = tuple(max(k * c, m) for k, m in zip(_TINY_PER_CLASS, _TINY_MIN))
    elif scale in SCALES:
        sizes = SCALES[scale]
    else:
        raise ConfigError(f"Unknown task scale '{scale}'.{did_you_mean(scale, ['tiny', *SCALES])}")
    return dict(zip(SPLITS, sizes))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _pixel_digest(img: Image.Image) -> bytes:
    return hashlib.blake2b(img.tobytes(), digest_size=16).digest()


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"Task seed must be a non-negative integer, got {seed!r}.")
    return int(seed)


def _build_arrays(name: str, scale: str, seed: int) -> dict[str, tuple[list[Image.Image], np.ndarray]]:
    task = _task(name)
    seed = _check_seed(seed)
    key = _task_key(name)
    sizes = split_sizes(name, scale)
    c = task.spec.num_classes
    seen: set[bytes] = set()
    out = {}
    for s_idx, split in enumerate(SPLITS):
        n = sizes[split]
        labels = _rng(seed, key, 1000 + s_idx).permutation(np.arange(n) % c)
        images = task.build(split, labels, seed, key)
        seen.update(_redraw_seen(name, split, images, labels, seen, seed, key))
        out[split] = (images, labels)  # duplicates inside one split are allowed, across splits never
    return out


def task_arrays(name: str, scale: str = "full", seed: int = 0) -> dict[str, tuple[list[Image.Image], list[int]]]:
    """The unshifted images and labels of every split of task ``name`` as generated: ``{split: (images, labels)}``.

    The same images as :func:`build_task_dataset` with ``shift=None`` (before PNG encoding, which is lossless).
    """
    return {split: (images, [int(v) for v in labels]) for split, (images, labels) in _build_arrays(name, scale, seed).items()}


def _redraw_seen(name: str, split: str, images: list[Image.Image], labels: np.ndarray, seen: set[bytes],
                 seed: int, key: int) -> list[bytes]:
    """Redraw (in place) every image whose pixels are in ``seen``; return the final images' digests."""
    regen = getattr(_task(name).build, "regenerate", None)
    digests = []
    for i, img in enumerate(images):
        d = _pixel_digest(img)
        attempt = 0
        while d in seen:
            attempt += 1
            if regen is None or attempt > 50:
                raise ConfigError(f"Task '{name}' could not draw a {split} image #{i} distinct from the other "
                                  "splits; use another seed" + (" or fewer web images." if split == "web" else "."))
            img = regen(split, i, int(labels[i]), seed, key, attempt)
            d = _pixel_digest(img)
        images[i] = img
        digests.append(d)
    return digests


def web_images(name: str, n: int, seed: int = 0, *, held_out: Sequence[Image.Image] | None = None,
               scale: str = "full") -> tuple[list[Image.Image], np.ndarray]:
    """``n`` more images of task ``name``'s domain, in no split: the stand-in for web images for pre-training.

    They come from a random stream that no split uses (procedural tasks), new renders of the train
    split's source digits (digits), or official Fashion-MNIST train rows from the other end of each class's
    pool (fashion). None is pixel-identical to a validation or test image: those are redrawn. Labels are
    balanced (``i % num_classes``, shuffled) and the same ``(name, n, seed)`` gives the same images.

    Args:
        name: a task from :func:`list_tasks`.
        n: number of images (non-negative).
        seed: the seed of the task build.
        held_out: the task's validation and test images, when they are already built (the zoo passes its
            saved data); otherwise the splits of ``(name, scale, seed)`` are built to check against.
        scale: the task scale whose held-out splits to check against when ``held_out`` is not given.
    """
    if n < 0:
        raise ConfigError(f"web_images: n must be a non-negative integer, got {n}.")
    task = _task(name)
    seed = _check_seed(seed)
    key = _task_key(name)
    labels = _rng(seed, key, 1000 + _STREAMS.index("web")).permutation(np.arange(n) % task.spec.num_classes)
    if n == 0:
        return [], labels
    if held_out is None:
        arrays = _build_arrays(name, scale, seed)
        held_out = [*arrays["validation"][0], *arrays["test"][0]]
    images = task.build("web", labels, seed, key)
    _redraw_seen(name, "web", images, labels, {_pixel_digest(img) for img in held_out}, seed, key)
    return images, labels


def build_task_dataset(name: str, scale: str = "full", seed: int = 0, shift: str | None = None):
    """Build task ``name`` as a ``datasets.DatasetDict`` with splits train / validation / test.

    Features: ``image`` (``datasets.Image``, RGB PNG of IMAGE_SIZE x IMAGE_SIZE) and ``label``
    (``ClassLabel(names=classnames)``). Labels are balanced (``i % num_classes``, shuffled). The same
    ``(name, scale, seed, shift)`` gives byte-identical PNGs.

    Args:
        name: a task from :func:`list_tasks`.
        scale: 'tiny' (a few dozen images per split, for tests), 'small' or 'full' (see ``SCALES``).
        seed: non-negative integer; different seeds give different images (and, for Fashion-MNIST, a
            different draw of rows).
        shift: a domain shift of :mod:`fusion_bench.benchmark.shifts` applied to every image of every
            split (``None``: the images as generated); image ``i`` of a split is drawn from
            ``(seed, name, split, i)``.
    """
    import datasets

    from fusion_bench.benchmark.shifts import check_shift, shift_images

    spec = get_task_spec(name)
    if shift is not None:
        check_shift(shift, f"task '{name}': shift")
    arrays = _build_arrays(name, scale, seed)
    if shift is not None:
        arrays = {split: (shift_images(images, shift, name, split, seed), labels)
                  for split, (images, labels) in arrays.items()}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(spec.classnames))})
    splits = {}
    for split, (images, labels) in arrays.items():
        splits[split] = datasets.Dataset.from_dict(
            {"image": [{"bytes": _png(im), "path": None} for im in images], "label": [int(v) for v in labels]},
            features=features,
            info=datasets.DatasetInfo(description=spec.description, features=features),
            split=datasets.NamedSplit(split),
        )
    return datasets.DatasetDict(splits)


def dataset_hash(dd) -> str:
    """SHA-256 over every split's (name, labels, PNG bytes) in order: identifies a task build's content."""
    import datasets

    h = hashlib.sha256()
    for split in dd:
        raw = dd[split].cast_column("image", datasets.Image(decode=False))
        h.update(f"split:{split}:{len(raw)}".encode())
        for row in raw:
            b = row["image"]["bytes"]
            if b is None:
                with open(row["image"]["path"], "rb") as f:
                    b = f.read()
            h.update(int(row["label"]).to_bytes(4, "little"))
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


_META = "task.json"


def load_task_meta(name: str, root: str | os.PathLike) -> dict:
    """The ``task.json`` written by :func:`save_task` for task ``name`` under ``root``."""
    path = Path(root) / name / _META
    if not path.is_file():
        raise DataSourceError(
            f"Task '{name}' is not saved under {Path(root)} (no {path.name}); build it with "
            f"fusion_bench.benchmark.tasks.save_task('{name}', root)."
        )
    return json.loads(path.read_text())


def save_task(name: str, root: str | os.PathLike, scale: str = "full", seed: int = 0, overwrite: bool = False,
              shift: str | None = None) -> Path:
    """Build task ``name`` and save it under ``root/name`` atomically (``save_to_disk`` + ``task.json``).

    ``task.json`` records the spec, scale, seed, shift, generator version, split sizes and :func:`dataset_hash`.
    An existing folder with the same name, scale, seed, shift and version is kept (returned as is) unless
    ``overwrite``.

    Args:
        name: the task.
        root: the folder holding saved tasks.
        scale: 'tiny', 'small' or 'full'.
        seed: the build seed.
        overwrite: rebuild even when a matching build exists.
        shift: the domain shift of every split (see :func:`build_task_dataset`).
    """
    spec = get_task_spec(name)
    split_sizes(name, scale)  # validate before any work
    seed = _check_seed(seed)
    dest = Path(root) / name
    if not overwrite and (dest / _META).is_file():
        meta = json.loads((dest / _META).read_text())
        if (meta.get("name"), meta.get("scale"), meta.get("seed"), meta.get("version"), meta.get("shift")) == \
                (name, scale, seed, TASKS_VERSION, shift):
            return dest
    dd = build_task_dataset(name, scale, seed, shift)
    meta = {
        "name": name,
        "scale": scale,
        "seed": seed,
        "shift": shift,
        "version": TASKS_VERSION,
        "image_size": IMAGE_SIZE,
        "spec": asdict(spec),
        "splits": {s: len(dd[s]) for s in dd},
        "content_hash": dataset_hash(dd),
    }
    from datasets.utils import logging as ds_logging

    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # quiet: a task saves in well under a second
    try:
        with atomic_dir(dest) as tmp:
            dd.save_to_disk(str(tmp))
            with atomic_file(tmp / _META, "w") as f:
                json.dump(meta, f, indent=2)
    finally:
        if bars:
            ds_logging.enable_progress_bar()
    return dest


def load_task(name: str, root: str | os.PathLike, verify: bool = False):
    """Load task ``name`` saved by :func:`save_task` under ``root`` (a ``datasets.DatasetDict``).

    Args:
        name: the task.
        root: the folder holding saved tasks.
        verify: recompute the content hash and compare it with ``task.json``.
    """
    import datasets

    meta = load_task_meta(name, root)
    if meta.get("name") != name:
        raise DataSourceError(f"{Path(root) / name / _META} describes task '{meta.get('name')}', not '{name}'; rebuild it "
                              f"with save_task('{name}', root, overwrite=True).")
    dd = datasets.load_from_disk(str(Path(root) / name))
    if verify and dataset_hash(dd) != meta.get("content_hash"):
        raise DataSourceError(f"Saved task '{name}' under {root} does not match its recorded content hash; rebuild "
                              f"it with save_task('{name}', root, overwrite=True).")
    return dd


# ---- image-caption pairs for CLIP pre-training ---------------------------------------------------


def pretraining_pairs(
    scale: str = "full",
    seed: int = 0,
    n: int | None = None,
    *,
    tasks: Sequence[str] = TASK_NAMES,
    generic_prob: float = 0.3,
    label_noise: float = 0.1,
    synonym_prob: float = 0.25,
    train: Mapping[str, tuple[Sequence[Image.Image], Sequence[int]]] | None = None,
    task_generic_prob: Mapping[str, float] | None = None,
    hidden_class_fraction: float = 0.0,
    hidden_name_prob: float = 0.0,
    web_images_per_task: int = 0,
    held_out: Mapping[str, Sequence[Image.Image]] | None = None,
    progress: Callable[[str], None] | None = None,
    workers: int = 1,
) -> list[tuple[Image.Image, str]]:
    """Image-caption pairs for pre-training the benchmark's CLIP: the tasks' TRAIN splits (and web images), never
    a validation or test image.

    Each train image gets one caption: with probability ``generic_prob`` a class-free caption (of its domain,
    e.g. "a satellite image.", or fully generic, e.g. "a small picture."); otherwise a template (the task's
    templates plus paraphrases) filled with its class name, a synonym (probability ``synonym_prob``) or, with
    probability ``label_noise``, another class of the same task. So zero-shot transfer is possible but imperfect.
    Pairs of all tasks are shuffled together; ``n`` takes the first ``n`` (cycling with fresh captions when
    ``n`` exceeds the number of train images).

    Args:
        scale: task scale of the train splits used ('tiny', 'small', 'full').
        seed: seed of the task builds and of the captions.
        n: number of pairs (default: one per train image).
        tasks: the tasks to draw from.
        generic_prob: probability of a class-free caption.
        label_noise: probability of naming a wrong class of the same task.
        synonym_prob: probability of a synonym instead of the class name, when the class has one.
        task_generic_prob: per-task ``generic_prob`` overriding the global one, e.g. ``{"aerial": 0.9}``: web
            captions of some domains rarely name the class, and their zero-shot accuracy is lower.
        hidden_class_fraction: the fraction of each task's classes (a fixed random subset, see
            :func:`hidden_classes`) whose name never appears in a caption: their images are captioned with
            an alias, a made-up word (:func:`class_alias`), as web captions name things in words a dataset
            does not use. The encoder still learns to tell those classes apart, but the zero-shot head
            built from the dataset's class names does not know them: fine-tuning has to align them.
        hidden_name_prob: the probability that a hidden class's caption uses its real name after all (else
            its alias): the name is rare rather than absent, so the zero-shot head knows it only vaguely.
        train: the train splits as ``{task: (images, labels)}`` when they are already built (the zoo passes
            its saved data entries); tasks missing from it are built here. The images must be the
            task's train split for ``(scale, seed)``: the pairs are then the same as when built here.
        web_images_per_task: this many more images per task from :func:`web_images` (in no split, never
            equal to a validation or test image) join the train images: a pre-training corpus larger than
            the fine-tuning data, as CLIP's is, so the encoder learns features that generalise instead of
            memorising the train images.
        held_out: the tasks' validation and test images as ``{task: images}`` when already built, for the
            web images' distinctness check (tasks missing from it are built here).
        progress: called with the task name once that task's images are ready.
        workers: processes drawing the web images (the pairs do not depend on it).
    """
    for key, p in (("generic_prob", generic_prob), ("label_noise", label_noise), ("synonym_prob", synonym_prob),
                   ("hidden_class_fraction", hidden_class_fraction), ("hidden_name_prob", hidden_name_prob)):
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"pretraining_pairs: {key} must be in [0, 1], got {p}.")
    if isinstance(web_images_per_task, bool) or not isinstance(web_images_per_task, int) or web_images_per_task < 0:
        raise ConfigError(f"pretraining_pairs: web_images_per_task must be a non-negative integer, got "
                          f"{web_images_per_task!r}.")
    if n is not None and n < 1:
        raise ConfigError(f"pretraining_pairs: n must be a positive integer or None, got {n}.")
    per_task = dict(task_generic_prob or {})
    for name, p in per_task.items():
        if name not in tasks:
            raise ConfigError(f"pretraining_pairs: task_generic_prob names task '{name}', which is not among the "
                              f"tasks {list(tasks)}.{did_you_mean(name, tasks)}")
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"pretraining_pairs: task_generic_prob[{name!r}] must be in [0, 1], got {p}.")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"pretraining_pairs: workers must be a positive integer, got {workers!r}.")
    def held(name: str) -> Sequence[Image.Image] | None:
        return held_out.get(name) if held_out is not None else None

    web_jobs: dict[str, Any] = {}
    executor = None
    if web_images_per_task and workers > 1 and len(tasks) > 1:
        # the web images of different tasks are independent draws: other processes make them while this
        # one reads the train splits (spawned, not forked: the parent may hold torch's thread pools)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        executor = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context("spawn"))
    try:
        if executor is not None:
            web_jobs = {name: executor.submit(web_images, name, web_images_per_task, seed, held_out=held(name),
                                              scale=scale) for name in tasks}
        pool: list[tuple[Image.Image, str, int]] = []
        for name in tasks:
            if train is not None and name in train:
                images, labels = train[name]
                if len(images) != len(labels):
                    raise ConfigError(f"pretraining_pairs: task '{name}' has {len(images)} train images but "
                                      f"{len(labels)} labels.")
            else:
                images, labels = _build_arrays(name, scale, seed)["train"]
            pool.extend((img, name, int(lab)) for img, lab in zip(images, labels))
            if web_images_per_task:
                images, labels = (web_jobs[name].result() if name in web_jobs else
                                  web_images(name, web_images_per_task, seed, held_out=held(name), scale=scale))
                pool.extend((img, name, int(lab)) for img, lab in zip(images, labels))
            if progress is not None:
                progress(name)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    aliases = {name: {c: class_alias(name, c, seed) for c in hidden_classes(name, hidden_class_fraction, seed)}
               for name in tasks}
    rng = _rng(seed, 4242)
    order = rng.permutation(len(pool))
    total = len(pool) if n is None else n
    pairs = []
    for j in range(total):
        img, name, lab = pool[order[j % len(pool)]]
        pairs.append((img, _caption(rng, _TASKS[name], lab, per_task.get(name, generic_prob), label_noise,
                                    synonym_prob, aliases[name], hidden_name_prob)))
    return pairs


def hidden_classes(name: str, fraction: float, seed: int = 0) -> list[int]:
    """The labels of task ``name`` whose class names pre-training captions never use (sorted).

    ``round(fraction * num_classes)`` labels drawn without replacement by a generator seeded with
    ``seed`` and the task: the same for every call.
    """
    c = _task(name).spec.num_classes
    k = int(round(fraction * c))
    if k == 0:
        return []
    return sorted(int(v) for v in _rng(seed, _task_key(name), 7777).choice(c, size=k, replace=False))


_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "pl", "st")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")


def class_alias(name: str, label: int, seed: int = 0) -> str:
    """A made-up two- or three-syllable word standing for class ``label`` of task ``name`` (deterministic)."""
    rng = _rng(seed, _task_key(name), 8888, label)
    n = 2 + int(rng.integers(2))
    return "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] for _ in range(n))


_EXTRA_TEMPLATES = ("an image of {}.", "{}.", "a picture showing {}.", "this is {}.", "a small image of {}.")


def _caption(rng: np.random.Generator, task: _Task, label: int, generic_prob: float, label_noise: float,
             synonym_prob: float, aliases: Mapping[int, str] | None = None, hidden_name_prob: float = 0.0) -> str:
    if rng.random() < generic_prob:
        choices = task.generic + _GENERIC
        return choices[rng.integers(len(choices))]
    spec = task.spec
    if rng.random() < label_noise and spec.num_classes > 1:
        label = int((label + rng.integers(1, spec.num_classes)) % spec.num_classes)
    cname = spec.classnames[label]
    syn = task.synonyms.get(cname, ())
    if syn and rng.random() < synonym_prob:
        cname = syn[rng.integers(len(syn))]
    if aliases and label in aliases and (hidden_name_prob <= 0.0 or rng.random() >= hidden_name_prob):
        cname = aliases[label]  # a hidden class: neither its name nor a synonym, its alias
    if rng.random() < 0.2:
        t = _EXTRA_TEMPLATES[rng.integers(len(_EXTRA_TEMPLATES))]
        return _articles(t.format(task.phrase.format(cname)))
    t = spec.templates[rng.integers(len(spec.templates))]
    return _articles(t.format(cname))


def _articles(caption: str) -> str:
    """Fix 'a' before a vowel sound ('a infinity symbol' -> 'an infinity symbol')."""
    return re.sub(r"\b([Aa]) (?=[aeio]|u(?!n|s|r))", r"\1n ", caption)


def main(argv: Sequence[str] | None = None) -> int:
    """Build and save tasks, printing classes, split sizes, build time and content hash per task.

    Usage: ``python -m fusion_bench.benchmark.tasks --root DIR [--scale full] [--seed 0] [--tasks a b]``
    """
    import argparse
    import time

    ap = argparse.ArgumentParser(prog="python -m fusion_bench.benchmark.tasks", description=main.__doc__)
    ap.add_argument("--root", required=True, help="folder that receives one sub-folder per task")
    ap.add_argument("--scale", default="full", choices=["tiny", *SCALES])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", nargs="*", default=list(TASK_NAMES))
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--shift", default=None, help="a domain shift of every split (fusion_bench.benchmark.shifts)")
    args = ap.parse_args(argv)
    for name in args.tasks:
        t0 = time.perf_counter()
        save_task(name, args.root, args.scale, args.seed, overwrite=args.overwrite, shift=args.shift)
        meta = load_task_meta(name, args.root)
        print(f"{name:14s} classes={len(meta['spec']['classnames']):3d} splits={meta['splits']} "
              f"time={time.perf_counter() - t0:.1f}s hash={meta['content_hash'][:12]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
