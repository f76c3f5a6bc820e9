"""Drawing helpers for the offline benchmark tasks: fonts, glyph masks, colours, noise, polygons.

Everything is drawn with PIL and numpy from an explicit ``numpy.random.Generator``; nothing is
downloaded. Fonts are the TrueType files that ship with matplotlib (DejaVu, STIX, Computer Modern).
Shapes and glyphs are drawn on a supersampled canvas and reduced with a box filter (anti-aliasing).
"""

from __future__ import annotations

import math
import os
from functools import cache, lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fusion_bench.errors import FusionBenchError

IMAGE_SIZE: int = 32
SUPERSAMPLE: int = 3

# Fonts with real glyphs for letters and digits. LastResortHE draws placeholder boxes, the "Display"
# and STIX size/non-unicode variants and cmex/cmsy/cmmi hold symbols at ASCII positions: excluded.
_TEXT_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf", "cmti10.ttf",
)
# Fonts whose character maps are Unicode-correct (used for symbols, checked glyph by glyph).
_UNICODE_FONTS = tuple(f for f in _TEXT_FONTS if not f.startswith("cm"))


class RenderError(FusionBenchError):
    """Fonts needed to render the benchmark tasks are missing."""


def font_dir() -> str:
    """The folder of TrueType fonts bundled with matplotlib."""
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


@lru_cache(maxsize=1)
def text_fonts() -> tuple[str, ...]:
    """Paths of the fonts used for letters and digits (those present in this matplotlib)."""
    d = font_dir()
    found = tuple(os.path.join(d, f) for f in _TEXT_FONTS if os.path.exists(os.path.join(d, f)))
    if len(found) < 4:
        raise RenderError(
            f"Only {len(found)} of the matplotlib TrueType fonts were found in {d}; the benchmark tasks "
            "need matplotlib's bundled DejaVu/STIX fonts. Reinstall matplotlib (pip install --force-reinstall matplotlib)."
        )
    return found


@cache
def fonts_with(char: str) -> tuple[str, ...]:
    """Paths of the Unicode-correct fonts whose character map holds every character of ``char``."""
    from matplotlib.ft2font import FT2Font

    d = font_dir()
    out = []
    for f in _UNICODE_FONTS:
        p = os.path.join(d, f)
        if os.path.exists(p):
            cmap = FT2Font(p).get_charmap()
            if all(ord(c) in cmap for c in char):
                out.append(p)
    if not out:
        raise RenderError(f"No matplotlib font in {d} has a glyph for {char!r}; reinstall matplotlib.")
    return tuple(out)


@lru_cache(maxsize=2048)
def load_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    """A cached PIL TrueType font of ``size`` pixels."""
    return ImageFont.truetype(path, size)


# ---------------------------------------------------------------------------------------------
# colours and noise


def luminance(rgb: np.ndarray) -> float:
    """Relative luminance in [0, 1] of an RGB triple in [0, 1]."""
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def contrasting_colors(rng: np.random.Generator, min_diff: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Two random RGB colours in [0, 1] whose luminances differ by at least ``min_diff``."""
    a = rng.random(3)
    for _ in range(32):
        b = rng.random(3)
        if abs(luminance(a) - luminance(b)) >= min_diff:
            return a, b
    # fall back: push b to the far end of the luminance range
    b = np.full(3, 1.0) if luminance(a) < 0.5 else np.zeros(3)
    return a, b


def jitter_color(rng: np.random.Generator, base: tuple[float, float, float], amount: float) -> np.ndarray:
    """``base`` (RGB in [0, 1]) plus uniform noise of +-``amount`` per channel, clipped."""
    return np.clip(np.asarray(base, dtype=np.float64) + rng.uniform(-amount, amount, 3), 0.0, 1.0)


def value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1] of shape (size, size): a random ``cells`` x ``cells`` grid, bicubic-upsampled."""
    cells = max(2, int(cells))
    grid = (rng.random((cells + 1, cells + 1)) * 255).astype(np.uint8)
    img = Image.fromarray(grid, "L").resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float64) / 255.0


def gradient_background(rng: np.random.Generator, c0: np.ndarray, c1: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """A linear gradient from ``c0`` to ``c1`` in a random direction: float array (size, size, 3)."""
    ang = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1) - 0.5
    t = np.clip(0.5 + x * math.cos(ang) + y * math.sin(ang), 0, 1)[..., None]
    return c0[None, None, :] * (1 - t) + c1[None, None, :] * t


def finish(arr: np.ndarray, rng: np.random.Generator, noise: float = 0.0) -> Image.Image:
    """Float RGB array in [0, 1] (H, W, 3) plus Gaussian pixel noise of std ``noise`` -> PIL RGB image."""
    if noise > 0:
        arr = arr + rng.normal(0.0, noise, arr.shape)
    return Image.fromarray((np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")


def compose(background: np.ndarray, mask: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Paint ``color`` over ``background`` (H, W, 3) with coverage ``mask`` (H, W) in [0, 1]."""
    m = mask[..., None]
    return background * (1.0 - m) + np.asarray(color)[None, None, :] * m


def reduce_mask(img: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """A supersampled 'L' mask reduced to (size, size) floats in [0, 1] with a box filter."""
    return np.asarray(img.resize((size, size), Image.BOX), dtype=np.float64) / 255.0


# ---------------------------------------------------------------------------------------------
# glyphs and polygons


def glyph_mask(
    text: str,
    font_path: str,
    height: float,
    angle: float = 0.0,
    center: tuple[float, float] = (0.5, 0.5),
    size: int = IMAGE_SIZE,
    stroke: int = 0,
) -> np.ndarray:
    """Coverage mask (size, size) in [0, 1] of ``text`` drawn with the font at ``height`` (fraction of the
    image), rotated by ``angle`` degrees around its centre placed at ``center`` (fractions of the image)."""
    big = size * SUPERSAMPLE
    font = load_font(font_path, max(6, int(round(height * big))))
    # draw on a larger square canvas so that rotation and offset never clip the glyph
    pad = 2 * big
    canvas = Image.new("L", (pad, pad), 0)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad / 2, pad / 2), text, fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255)
    if angle:
        canvas = canvas.rotate(angle, resample=Image.BICUBIC, center=(pad / 2, pad / 2))
    left = int(round(pad / 2 - center[0] * big))
    top = int(round(pad / 2 - center[1] * big))
    crop = canvas.crop((left, top, left + big, top + big))
    return reduce_mask(crop, size)


def polygon_mask(points: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Coverage mask of a filled polygon whose vertices are given in image fractions, shape (k, 2)."""
    big = size * SUPERSAMPLE
    img = Image.new("L", (big, big), 0)
    ImageDraw.Draw(img).polygon([(float(x) * big, float(y) * big) for x, y in points], fill=255)
    return reduce_mask(img, size)


def ellipse_mask(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, size: int = IMAGE_SIZE) -> np.ndarray:
    """Coverage mask of a filled ellipse (centre and radii in image fractions, rotated by ``angle`` rad)."""
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    return polygon_mask(transform(np.stack([rx * np.cos(t), ry * np.sin(t)], 1), angle, cx, cy), size)


def transform(points: np.ndarray, angle: float, cx: float, cy: float, scale: float = 1.0) -> np.ndarray:
    """Rotate ``points`` (k, 2) by ``angle`` radians, scale, then translate to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return points @ rot.T * scale + np.array([cx, cy])


def regular_polygon(k: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    """Vertices of a regular ``k``-gon of ``radius`` around the origin, shape (k, 2)."""
    t = phase + np.arange(k) * 2 * math.pi / k - math.pi / 2
    return radius * np.stack([np.cos(t), np.sin(t)], 1)


def line_mask(p0: tuple[float, float], p1: tuple[float, float], width: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Coverage mask of a straight segment between two points (image fractions), ``width`` in fractions."""
    big = size * SUPERSAMPLE
    img = Image.new("L", (big, big), 0)
    ImageDraw.Draw(img).line([(p0[0] * big, p0[1] * big), (p1[0] * big, p1[1] * big)], fill=255,
                             width=max(1, int(round(width * big))))
    return reduce_mask(img, size)
