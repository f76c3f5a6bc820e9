"""Domain shifts of the CLIP benchmark's task images: the look the pretrained encoder never saw.

Real CLIP's zero-shot failures on SVHN, GTSRB, EuroSAT or MNIST are *soft*: the encoder's features fit
those datasets' images poorly, and fine-tuning adapts them. The offline zoo reproduces that by showing
the pretraining only unshifted images and applying a shift to every split of the tasks (train, validation,
test), so fine-tuning has a domain to adapt to (docs/benchmark.md, third- and fourth-round lab notes).

Each kind is ``f(PIL image, numpy Generator) -> PIL image``; several kinds joined by ``+`` apply in order
(``grid+blur``). :func:`shift_images` draws image ``i`` of a split from ``(seed, task, split, i)``, so a
shifted split is the same on every machine and does not depend on the other images.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from fusion_bench.errors import ConfigError, did_you_mean

__all__ = ["SHIFTS", "apply_shift", "check_shift", "shift_images"]


def _arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def _img(a: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")


def _blur(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    a = _arr(im.filter(ImageFilter.GaussianBlur(1.3)))
    return _img(a.mean() + 0.6 * (a - a.mean()))


def _grid(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    a = _arr(im).copy()
    colour = rng.random(3)
    period = int(rng.integers(5, 8))
    offset = int(rng.integers(0, period))
    a[offset::period] = 0.5 * a[offset::period] + 0.5 * colour
    a[:, offset::period] = 0.5 * a[:, offset::period] + 0.5 * colour
    return _img(a)


def _lowcontrast(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    a = _arr(im)
    return _img(a.mean() + 0.35 * (a - a.mean()) + rng.normal(0, 0.03, a.shape))


def _shrink(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    s = int(rng.integers(15, 21))
    a = _arr(im)
    canvas = np.ones_like(a) * np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]).mean(0)
    x, y = rng.integers(0, a.shape[0] - s + 1, 2)
    canvas[y:y + s, x:x + s] = _arr(im.resize((s, s), Image.BILINEAR))
    return _img(canvas)


def _warp(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    a = _arr(im)
    h = a.shape[0]
    yy, xx = np.mgrid[0:h, 0:h].astype(np.float32)
    period, phase = rng.uniform(8, 14), rng.uniform(0, 2 * np.pi)
    xs = np.clip(xx + 2.5 * np.sin(2 * np.pi * yy / period + phase), 0, h - 1).round().astype(int)
    ys = np.clip(yy + 2.5 * np.sin(2 * np.pi * xx / period + 1.3 * phase), 0, h - 1).round().astype(int)
    return _img(a[ys, xs])


#: per-image domain shifts: name -> f(PIL image, numpy Generator) -> PIL image
SHIFTS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "none": lambda im, rng: im,
    "invert": lambda im, rng: _img(1 - _arr(im)),
    "rot180": lambda im, rng: im.rotate(180),
    "blur": _blur,  # gaussian blur sigma 1.3, contrast x0.6
    "grid": _grid,  # a line grid of a random colour every 5-7 px at a random offset, half opacity
    "lowcontrast": _lowcontrast,  # contrast x0.35 plus pixel noise
    "pixelate": lambda im, rng: im.resize((12, 12), Image.BOX).resize(im.size, Image.NEAREST),
    "shrink": _shrink,  # content scaled to 15-20 px at a random place on the edge colour
    "warp": _warp,  # sine displacement of 2.5 px
}


def check_shift(kind: str, where: str = "domain_shift") -> str:
    """``kind`` when every part of it (joined by ``+``) is in :data:`SHIFTS`; else a ConfigError naming ``where``."""
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"{where}: a shift is a name of {', '.join(SHIFTS)} (several joined by '+'), got {kind!r}.")
    for part in kind.split("+"):
        if part not in SHIFTS:
            raise ConfigError(f"{where}: unknown shift '{part}'; kinds: {', '.join(SHIFTS)}.{did_you_mean(part, SHIFTS)}")
    return kind


def _steps(kind: str) -> list[Callable[[Image.Image, np.random.Generator], Image.Image]]:
    return [SHIFTS[part] for part in check_shift(kind).split("+")]


def apply_shift(kind: str, im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """``kind`` of :data:`SHIFTS`, or several joined by ``+`` applied in order, to one RGB image."""
    for step in _steps(kind):
        im = step(im, rng)
    return im


def shift_images(images: Sequence[Image.Image], kind: str, task: str, split: str, seed: int) -> list[Image.Image]:
    """The images of ``split`` of ``task`` under shift ``kind``; image ``i``'s draw is seeded by
    ``(seed, task, split, i)`` alone."""
    steps = _steps(kind)  # the kind is checked once, not per image
    key = zlib.crc32(f"{task}/{split}".encode())
    out = []
    for i, im in enumerate(images):
        rng = np.random.default_rng([int(seed), key, i])
        im = im.convert("RGB")
        for step in steps:
            im = step(im, rng)
        out.append(im)
    return out
