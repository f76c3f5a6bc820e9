"""Procedural image generators of the offline benchmark tasks (one function per task family).

Each generator is ``gen(rng, label) -> PIL.Image`` (RGB, IMAGE_SIZE x IMAGE_SIZE): it draws one image
of class ``label`` using only ``rng`` (a ``numpy.random.Generator``), so a sample is fixed by its seed.
Nuisance factors (font, size, rotation, position, colours, background, noise) are drawn per sample so
that a classifier must learn the class, not a template.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fusion_bench.benchmark.render import (
    IMAGE_SIZE,
    SUPERSAMPLE,
    compose,
    contrasting_colors,
    ellipse_mask,
    finish,
    fonts_with,
    glyph_mask,
    gradient_background,
    jitter_color,
    line_mask,
    luminance,
    polygon_mask,
    reduce_mask,
    regular_polygon,
    text_fonts,
    transform,
    value_noise,
)

S = IMAGE_SIZE

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")


def _background(rng: np.random.Generator, base: np.ndarray, spread: float = 0.25) -> np.ndarray:
    """A background near colour ``base``: flat, gradient, or smooth noise (chosen at random)."""
    kind = rng.integers(3)
    if kind == 0:
        return np.broadcast_to(base, (S, S, 3)).copy()
    other = jitter_color(rng, tuple(base), spread)
    if kind == 1:
        return gradient_background(rng, base, other)
    t = value_noise(rng, S, int(rng.integers(2, 6)))[..., None]
    return base[None, None, :] * (1 - t) + other[None, None, :] * t


# ---------------------------------------------------------------------------------------------
# characters


def letter_image(rng: np.random.Generator, label: int) -> Image.Image:
    """An upper-case letter in a random font, size, rotation, position and colours, sometimes with a
    clutter stroke."""
    ch = LETTERS[label].upper()
    font = text_fonts()[rng.integers(len(text_fonts()))]
    bg_c, fg_c = contrasting_colors(rng, 0.3)
    img = _background(rng, bg_c)
    if rng.random() < 0.1:  # a clutter stroke behind the letter
        p0, p1 = rng.random(2), rng.random(2)
        img = compose(img, line_mask(tuple(p0), tuple(p1), rng.uniform(0.03, 0.06)), jitter_color(rng, tuple(fg_c), 0.4))
    mask = glyph_mask(ch, font, rng.uniform(0.7, 0.88), rng.uniform(-8, 8),
                      (0.5 + rng.uniform(-0.05, 0.05), 0.5 + rng.uniform(-0.05, 0.05)))
    return finish(compose(img, mask, fg_c), rng, rng.uniform(0.0, 0.05))


def house_number_image(rng: np.random.Generator, label: int) -> Image.Image:
    """A street-number crop: the labelled digit centred, neighbour digits cut by the frame (SVHN-like)."""
    fonts = text_fonts()
    font = fonts[rng.integers(len(fonts))]
    bg_c, fg_c = contrasting_colors(rng, 0.25)
    img = _background(rng, bg_c, 0.3)
    h = rng.uniform(0.6, 0.85)
    angle = rng.uniform(-12, 12)
    cx, cy = 0.5 + rng.uniform(-0.05, 0.05), 0.5 + rng.uniform(-0.08, 0.08)
    gap = h * rng.uniform(0.6, 0.8)
    mask = glyph_mask(str(label), font, h, angle, (cx, cy))
    for side in (-1, 1):
        if rng.random() < 0.6:
            mask = np.maximum(mask, glyph_mask(str(rng.integers(10)), font, h, angle, (cx + side * gap, cy)))
    out = finish(compose(img, mask, fg_c), rng, 0.0)
    if rng.random() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    return finish(np.asarray(out, dtype=np.float64) / 255.0, rng, rng.uniform(0.0, 0.05))


# (class name, glyph) of the sign task; every glyph exists in at least the DejaVu Sans family.
SYMBOLS: tuple[tuple[str, str], ...] = (  # 24 symbols that stay distinct at 32x32 pixels
    ("plus sign", "+"), ("multiplication sign", "\u00d7"), ("equals sign", "="), ("less-than sign", "<"),
    ("greater-than sign", ">"), ("percent sign", "%"), ("ampersand", "&"), ("hash sign", "#"), ("dollar sign", "$"),
    ("question mark", "?"), ("exclamation mark", "!"), ("asterisk", "*"), ("infinity symbol", "\u221e"),
    ("pi", "\u03c0"), ("sigma", "\u03a3"), ("omega", "\u03a9"), ("square root sign", "\u221a"),
    ("left arrow", "\u2190"), ("up arrow", "\u2191"), ("heart", "\u2665"), ("diamond", "\u2666"),
    ("musical note", "\u266a"), ("lightning bolt", "\u26a1"), ("check mark", "\u2713"),
)

_SIGN_RIMS = ((0.8, 0.1, 0.1), (0.1, 0.25, 0.7), (0.1, 0.1, 0.1), (0.95, 0.75, 0.1))
_SIGN_FILLS = ((0.95, 0.95, 0.95), (0.95, 0.85, 0.2), (0.15, 0.35, 0.75), (0.9, 0.9, 0.85))


def _plate(kind: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    if kind == 0:
        return ellipse_mask(cx, cy, r, r)
    k = (3, 4, 8)[kind - 1]
    phase = math.pi / 4 if k == 4 else (math.pi / 8 if k == 8 else 0.0)
    rr = r * (1.25 if k == 3 else 1.0)
    return polygon_mask(transform(regular_polygon(k, rr, phase), angle, cx, cy + (0.08 * r if k == 3 else 0)))


def sign_image(rng: np.random.Generator, label: int) -> Image.Image:
    """A road-sign-like plate (random shape and colours) carrying the labelled symbol (GTSRB-like)."""
    name, ch = SYMBOLS[label]
    fonts = fonts_with(ch)
    font = fonts[rng.integers(len(fonts))]
    scene = _background(rng, rng.random(3), 0.5)
    kind = int(rng.integers(4))
    cx, cy = 0.5 + rng.uniform(-0.07, 0.07), 0.5 + rng.uniform(-0.07, 0.07)
    r = rng.uniform(0.4, 0.48)
    tilt = rng.uniform(-0.15, 0.15)
    rim = jitter_color(rng, _SIGN_RIMS[rng.integers(len(_SIGN_RIMS))], 0.1)
    fill = jitter_color(rng, _SIGN_FILLS[rng.integers(len(_SIGN_FILLS))], 0.1)
    img = compose(scene, _plate(kind, cx, cy, r, tilt), rim)
    img = compose(img, _plate(kind, cx, cy, r * 0.8, tilt), fill)
    ink = np.array([0.05, 0.05, 0.05]) if luminance(fill) > 0.45 else np.array([0.97, 0.97, 0.97])
    ink = jitter_color(rng, tuple(ink), 0.05)
    gy = cy + (0.06 if kind == 1 else 0.0)
    mask = glyph_mask(ch, font, rng.uniform(0.55, 0.66), math.degrees(-tilt) + rng.uniform(-4, 4), (cx, gy))
    img = compose(img, mask, ink)
    img = img * rng.uniform(0.7, 1.15)  # illumination
    return finish(img, rng, rng.uniform(0.0, 0.05))


# ---------------------------------------------------------------------------------------------
# textures (DTD-like)

TEXTURES = (
    "striped", "wavy", "zigzagged", "checkered", "grid", "crosshatched", "dotted", "polka-dotted",
    "speckled", "spiralled", "ringed", "honeycombed", "cracked", "blotchy", "marbled", "woven", "brick",
    "stratified", "fibrous", "bubbly", "sprinkled",
)

_T = S * 2  # textures are computed on a 2x grid, then averaged down


def _coords(rng: np.random.Generator, angle: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (in output pixels) rotated by ``angle`` (random when None), shifted at random."""
    a = rng.uniform(0, math.pi) if angle is None else angle
    y, x = np.mgrid[0:_T, 0:_T] / 2.0
    x = x + rng.uniform(0, 50)
    y = y + rng.uniform(0, 50)
    return x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)


def _step(z: np.ndarray, soft: float = 4.0) -> np.ndarray:
    return np.clip(0.5 + soft * z, 0.0, 1.0)


def _tri(z: np.ndarray) -> np.ndarray:
    """Triangle wave of period 1 in [-1, 1]."""
    return 4 * np.abs(z - np.floor(z + 0.5)) - 1


def _lines(u: np.ndarray, period: float, width: float) -> np.ndarray:
    d = np.abs(u - period * np.round(u / period))
    return np.clip(width / 2 + 0.5 - d, 0.0, 1.0)


def _disks(u: np.ndarray, v: np.ndarray, period: float, radius: float, stagger: bool) -> np.ndarray:
    row = np.floor(v / period)
    uu = u + (0.5 * period * (row % 2) if stagger else 0.0)
    du = uu - period * np.round(uu / period)
    dv = v - period * np.round(v / period)
    return np.clip(radius + 0.5 - np.hypot(du, dv), 0.0, 1.0)


def _draw_field(rng: np.random.Generator, draw_fn) -> np.ndarray:
    big = S * SUPERSAMPLE
    img = Image.new("L", (big, big), 0)
    draw_fn(ImageDraw.Draw(img), big)
    return reduce_mask(img)


def _texture_field(rng: np.random.Generator, name: str) -> np.ndarray | tuple[np.ndarray, list]:
    """Scalar field in [0, 1] (on the 2x grid, or already at output size for drawn textures)."""
    if name == "striped":
        u, _ = _coords(rng)
        return _step(np.sin(2 * math.pi * u / rng.uniform(4, 8)))
    if name == "wavy":
        u, v = _coords(rng)
        return _step(np.sin(2 * math.pi * (u + rng.uniform(1.0, 2.0) * np.sin(2 * math.pi * v / rng.uniform(10, 16))) / rng.uniform(5, 8)))
    if name == "zigzagged":
        u, v = _coords(rng)
        return _step(np.sin(2 * math.pi * (u + rng.uniform(1.6, 2.4) * _tri(v / rng.uniform(7, 10))) / rng.uniform(6, 8.5)))
    if name == "checkered":
        u, v = _coords(rng)
        p = rng.uniform(4, 8)
        return _step(np.sin(2 * math.pi * u / p) * np.sin(2 * math.pi * v / p), 6.0)
    if name == "grid":
        u, v = _coords(rng, rng.uniform(-0.17, 0.17))
        p, w = rng.uniform(5.5, 9), rng.uniform(0.8, 1.5)
        return np.maximum(_lines(u, p, w), _lines(v, p, w))
    if name == "crosshatched":
        a = rng.uniform(0, math.pi)
        d = rng.uniform(0.6, 1.05) * rng.choice([-1, 1])
        u1, _ = _coords(rng, a)
        u2, _ = _coords(rng, a + d)
        p, w = rng.uniform(3.8, 5.2), rng.uniform(0.7, 1.1)
        return np.maximum(_lines(u1, p, w), _lines(u2, p, w))
    if name == "dotted":
        u, v = _coords(rng)
        return _disks(u, v, rng.uniform(4, 5.5), rng.uniform(0.7, 1.1), bool(rng.random() < 0.5))
    if name == "polka-dotted":
        u, v = _coords(rng)
        p = rng.uniform(8, 11)
        return _disks(u, v, p, p * rng.uniform(0.22, 0.3), bool(rng.random() < 0.5))
    if name == "speckled":
        f = (rng.random((S, S)) < rng.uniform(0.1, 0.3)).astype(np.float64)
        return np.kron(f, np.ones((2, 2)))
    if name in ("spiralled", "ringed"):
        y, x = np.mgrid[0:_T, 0:_T] / 2.0
        cx, cy = rng.uniform(4, S - 4, 2)
        r = np.hypot(x - cx, y - cy)
        if name == "ringed":
            return _step(np.sin(2 * math.pi * r / rng.uniform(4, 6.5)))
        # a pinwheel spiral: many arms over a long radial period, so the arms sweep round the centre
        th = np.arctan2(y - cy, x - cx)
        arms = int(rng.integers(4, 7)) * rng.choice([-1, 1])
        return _step(np.sin(2 * math.pi * r / rng.uniform(7, 10) + arms * th))
    if name == "honeycombed":
        u, v = _coords(rng)
        k = 2 * math.pi / rng.uniform(6, 9)
        f = sum(np.cos(k * (u * math.cos(t) + v * math.sin(t))) for t in (0, 2 * math.pi / 3, 4 * math.pi / 3))
        return _step(-(f + 0.7), 2.0)
    if name == "cracked":
        n = int(rng.integers(12, 30))
        pts = rng.uniform(-4, S + 4, (n, 2))
        y, x = np.mgrid[0:_T, 0:_T] / 2.0
        d = np.sort(np.hypot(x[..., None] - pts[:, 0], y[..., None] - pts[:, 1]), axis=-1)
        return np.clip(1.2 - (d[..., 1] - d[..., 0]), 0.0, 1.0)
    if name == "blotchy":
        f = 0.7 * value_noise(rng, _T, int(rng.integers(3, 6))) + 0.3 * value_noise(rng, _T, int(rng.integers(8, 12)))
        return _step(f - np.median(f), 8.0)
    if name == "marbled":
        u, v = _coords(rng)
        turb = value_noise(rng, _T, 4) + 0.5 * value_noise(rng, _T, 8)
        return 0.5 + 0.5 * np.sin(2 * math.pi * u / rng.uniform(8, 14) + rng.uniform(5, 8) * turb)
    if name == "woven":
        u, v = _coords(rng, rng.uniform(-0.3, 0.3) + rng.integers(2) * math.pi / 4)
        b = rng.uniform(4, 6)
        block = (np.floor(u / b) + np.floor(v / b)) % 2
        return np.where(block == 0, _step(np.sin(2 * math.pi * u * 2 / b)), _step(np.sin(2 * math.pi * v * 2 / b)))
    if name == "brick":
        u, v = _coords(rng, rng.uniform(-0.2, 0.2) + rng.integers(2) * math.pi / 2)
        h = rng.uniform(3.5, 5)
        L = h * rng.uniform(2, 2.8)
        row = np.floor(v / h)
        uu = u + 0.5 * L * (row % 2)
        return np.maximum(_lines(v, h, 0.9), _lines(uu, L, 0.9))
    raise AssertionError(name)  # unreachable: drawn textures are handled by texture_image


def _drawn_texture(rng: np.random.Generator, name: str, colors: list[np.ndarray]) -> np.ndarray:
    bg = colors[0]
    img = np.broadcast_to(bg, (S, S, 3)).copy()
    if name == "stratified":
        a = rng.uniform(-0.35, 0.35) + (math.pi / 2 if rng.random() < 0.5 else 0.0)
        _, v = _coords(rng, a)
        v = v[::2, ::2] + 1.5 * value_noise(rng, S, 3)
        edges = np.cumsum(rng.uniform(1, 6, 40))
        band = np.searchsorted(edges, v - v.min())
        pal = np.array([jitter_color(rng, tuple(colors[i % len(colors)]), 0.15) for i in range(41)])
        return pal[np.clip(band, 0, 40)]
    if name == "fibrous":
        a = rng.uniform(0, math.pi)

        def fib(d: ImageDraw.ImageDraw, b: int) -> None:
            for _ in range(int(rng.integers(30, 60))):
                x, y = rng.uniform(-0.2, 1.2, 2) * b
                aa = a + rng.normal(0, 0.15)
                ln = rng.uniform(0.3, 0.7) * b
                d.line([(x, y), (x + ln * math.cos(aa), y + ln * math.sin(aa))], fill=255, width=int(rng.integers(1, 3)))

        return compose(img, _draw_field(rng, fib), colors[1])
    if name == "bubbly":

        def bub(d: ImageDraw.ImageDraw, b: int) -> None:
            for _ in range(int(rng.integers(8, 18))):
                x, y = rng.uniform(0, 1, 2) * b
                r = rng.uniform(0.06, 0.18) * b
                d.ellipse([x - r, y - r, x + r, y + r], outline=255, width=max(2, int(0.02 * b)))

        return compose(img, _draw_field(rng, bub), colors[1])
    if name == "sprinkled":
        for _ in range(int(rng.integers(20, 40))):
            x, y = rng.uniform(0, 1, 2)
            aa = rng.uniform(0, math.pi)
            ln = rng.uniform(0.06, 0.12)
            m = line_mask((x, y), (x + ln * math.cos(aa), y + ln * math.sin(aa)), 0.05)
            img = compose(img, m, rng.random(3))
        return img
    raise AssertionError(name)


def texture_image(rng: np.random.Generator, label: int) -> Image.Image:
    """A texture of the labelled kind with random colours, scale, orientation and phase."""
    name = TEXTURES[label]
    c0, c1 = contrasting_colors(rng, 0.22)
    if name in ("stratified", "fibrous", "bubbly", "sprinkled"):
        colors = [c0, c1] + [rng.random(3) for _ in range(2)]
        img = _drawn_texture(rng, name, colors)
    else:
        t = _texture_field(rng, name)
        t = t.reshape(S, 2, S, 2).mean(axis=(1, 3))
        img = compose(np.broadcast_to(c0, (S, S, 3)).copy(), t, c1)
    return finish(img, rng, rng.uniform(0.0, 0.05))


# ---------------------------------------------------------------------------------------------
# aerial scenes (EuroSAT / RESISC45-like)

AERIAL_SCENES = (
    "forest", "meadow", "farmland", "sea", "lake", "river", "highway", "residential area",
    "industrial area", "desert", "beach", "snowfield",
)


def _land(rng: np.random.Generator) -> np.ndarray:
    base = jitter_color(rng, ((0.35, 0.5, 0.25), (0.55, 0.5, 0.3), (0.4, 0.45, 0.3))[rng.integers(3)], 0.08)
    t = value_noise(rng, S, int(rng.integers(4, 9)))[..., None]
    return base * (0.85 + 0.3 * t)


def _water(rng: np.random.Generator) -> np.ndarray:
    return jitter_color(rng, (0.12, 0.3, 0.5), 0.08)


def aerial_image(rng: np.random.Generator, label: int) -> Image.Image:
    """A top-down 'satellite' tile of the labelled land-use class, drawn procedurally."""
    name = AERIAL_SCENES[label]
    y, x = np.mgrid[0:S, 0:S] / (S - 1)
    ang = rng.uniform(0, 2 * math.pi)
    u = (x - 0.5) * math.cos(ang) + (y - 0.5) * math.sin(ang)
    v = -(x - 0.5) * math.sin(ang) + (y - 0.5) * math.cos(ang)
    if name == "forest":
        base = jitter_color(rng, (0.12, 0.3, 0.12), 0.05)
        t = 0.6 * value_noise(rng, S, int(rng.integers(10, 16))) + 0.4 * rng.random((S, S))
        img = base * (0.6 + 0.8 * t[..., None])
    elif name == "meadow":
        base = jitter_color(rng, (0.45, 0.6, 0.25), 0.08)
        img = base * (0.9 + 0.2 * value_noise(rng, S, 3)[..., None])
    elif name == "farmland":
        cuts_u = np.sort(rng.uniform(-0.7, 0.7, int(rng.integers(1, 4))))
        cuts_v = np.sort(rng.uniform(-0.7, 0.7, int(rng.integers(1, 4))))
        cell = np.searchsorted(cuts_u, u) * 10 + np.searchsorted(cuts_v, v)
        img = np.zeros((S, S, 3))
        for c in np.unique(cell):
            col = jitter_color(rng, ((0.5, 0.6, 0.2), (0.75, 0.65, 0.3), (0.5, 0.35, 0.2), (0.3, 0.5, 0.2))[rng.integers(4)], 0.07)
            rows = 0.9 + 0.15 * np.sin(2 * math.pi * (u if rng.random() < 0.5 else v) * S / rng.uniform(2, 3.5))
            img = np.where((cell == c)[..., None], col * rows[..., None], img)
    elif name == "sea":
        base = _water(rng)
        t = value_noise(rng, S, int(rng.integers(3, 7)))
        img = base * (0.85 + 0.3 * t[..., None]) + 0.05 * np.sin(2 * math.pi * u * S / rng.uniform(3, 6))[..., None]
    elif name == "lake":
        img = _land(rng)
        t = value_noise(rng, S, 3) + 1.2 * (1 - np.hypot(x - rng.uniform(0.3, 0.7), y - rng.uniform(0.3, 0.7)) / 0.5)
        img = compose(img, _step(t - np.quantile(t, rng.uniform(0.5, 0.75)), 10.0), _water(rng))
    elif name == "river":
        img = _land(rng)
        w = rng.uniform(0.06, 0.12)
        path = u - rng.uniform(0.05, 0.12) * np.sin(2 * math.pi * v * rng.uniform(1, 2.5) + rng.uniform(0, 6))
        img = compose(img, np.clip((w - np.abs(path)) * S, 0, 1), _water(rng))
    elif name == "highway":
        img = _land(rng)
        w = rng.uniform(0.08, 0.13)
        off = rng.uniform(-0.25, 0.25)
        img = compose(img, np.clip((w - np.abs(u - off)) * S, 0, 1), jitter_color(rng, (0.45, 0.45, 0.45), 0.06))
        dash = (np.sin(2 * math.pi * v * S / 5) > 0) * np.clip((0.012 - np.abs(u - off)) * S + 0.5, 0, 1)
        img = compose(img, dash, np.array([0.9, 0.9, 0.85]))
    elif name == "residential area":
        img = _land(rng) * 1.05
        p = rng.uniform(5, 7)
        uu, vv = u * S, v * S
        roads = np.maximum(_lines(uu, p * 2, 1.2), _lines(vv, p * 2, 1.2))
        img = compose(img, roads, jitter_color(rng, (0.55, 0.55, 0.55), 0.05))
        cellu, cellv = np.floor(uu / p), np.floor(vv / p)
        du, dv = uu - p * (cellu + 0.5), vv - p * (cellv + 0.5)
        house = ((np.abs(du) < p * 0.3) & (np.abs(dv) < p * 0.25)).astype(np.float64)
        hue = np.array([(0.65, 0.25, 0.2), (0.55, 0.4, 0.35), (0.7, 0.7, 0.7)])
        pick = ((cellu * 7 + cellv * 13 + rng.integers(3)) % 3).astype(int)
        img = img * (1 - house[..., None]) + hue[pick] * house[..., None]
    elif name == "industrial area":
        img = np.broadcast_to(jitter_color(rng, (0.5, 0.5, 0.48), 0.06), (S, S, 3)).copy()
        for _ in range(int(rng.integers(3, 7))):
            cx, cy = rng.uniform(-0.3, 0.3, 2)
            hw, hh = rng.uniform(0.08, 0.25, 2)
            m = ((np.abs(u - cx) < hw) & (np.abs(v - cy) < hh)).astype(np.float64)
            img = compose(img, m, jitter_color(rng, ((0.8, 0.8, 0.8), (0.35, 0.35, 0.38), (0.6, 0.62, 0.68))[rng.integers(3)], 0.05))
    elif name == "desert":
        base = jitter_color(rng, (0.85, 0.72, 0.5), 0.06)
        ripple = np.sin(2 * math.pi * (u * S / rng.uniform(4, 7) + 2 * value_noise(rng, S, 3)))
        img = base * (0.92 + 0.08 * ripple[..., None])
    elif name == "beach":
        edge = u - rng.uniform(-0.2, 0.2) - 0.06 * np.sin(2 * math.pi * v * rng.uniform(1, 2))
        sand = jitter_color(rng, (0.88, 0.8, 0.6), 0.05) * (0.95 + 0.1 * value_noise(rng, S, 6)[..., None])
        img = compose(sand, _step(edge * S, 1.0), _water(rng))
        img = compose(img, np.clip(1 - np.abs(edge * S) / 1.2, 0, 1), np.array([0.95, 0.95, 0.95]))
    elif name == "snowfield":
        base = jitter_color(rng, (0.9, 0.92, 0.96), 0.04)
        t = value_noise(rng, S, int(rng.integers(3, 8)))
        rock = _step(value_noise(rng, S, 5) - rng.uniform(0.75, 0.95), 6.0)
        img = compose(base * (0.85 + 0.15 * t[..., None]), rock, jitter_color(rng, (0.4, 0.4, 0.42), 0.05))
    else:  # pragma: no cover
        raise AssertionError(name)
    img = img * rng.uniform(0.8, 1.15) + rng.uniform(-0.04, 0.04, 3)  # illumination and haze
    return finish(img, rng, rng.uniform(0.01, 0.04))


# ---------------------------------------------------------------------------------------------
# geometric shapes

SHAPES = (
    "circle", "ellipse", "square", "rectangle", "triangle", "trapezoid", "hexagon", "star", "cross",
    "heart", "crescent", "ring", "arrow", "hourglass",
)


def _shape_outline(name: str) -> np.ndarray | None:
    t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    if name == "square":
        return regular_polygon(4, 1.0, math.pi / 4) * 0.85
    if name == "rectangle":
        return np.array([[-1, -0.5], [1, -0.5], [1, 0.5], [-1, 0.5]]) * 0.95
    if name == "triangle":
        return regular_polygon(3, 1.0) + np.array([0, 0.2])
    if name == "trapezoid":
        return np.array([[-1.0, 0.55], [1.0, 0.55], [0.35, -0.55], [-0.35, -0.55]])
    if name == "hexagon":
        return regular_polygon(6, 1.0)
    if name == "star":
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        a = np.arange(10) * math.pi / 5 - math.pi / 2
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if name == "cross":
        a, b = 0.3, 0.95
        return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a],
                         [-b, a], [-b, -a], [-a, -a]])
    if name == "heart":
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y + 2], 1) / 17.0
    if name == "arrow":
        return np.array([[-1, -0.22], [0.15, -0.22], [0.15, -0.6], [1, 0], [0.15, 0.6], [0.15, 0.22], [-1, 0.22]])
    if name == "hourglass":
        return np.array([[-0.7, -1.0], [0.7, -1.0], [0.12, 0.0], [0.7, 1.0], [-0.7, 1.0], [-0.12, 0.0]])
    if name == "ellipse":
        return np.stack([np.cos(t), 0.5 * np.sin(t)], 1)
    return None


def shape_image(rng: np.random.Generator, label: int) -> Image.Image:
    """A filled geometric shape of random colour, size, rotation and position on a random background."""
    name = SHAPES[label]
    bg_c, fg_c = contrasting_colors(rng, 0.25)
    img = _background(rng, bg_c, 0.3)
    for _ in range(int(rng.integers(0, 3))):  # small distractor blobs
        img = compose(img, ellipse_mask(*rng.uniform(0.05, 0.95, 2), *rng.uniform(0.03, 0.06, 2)), rng.random(3))
    r = rng.uniform(0.32, 0.44)
    cx, cy = 0.5 + rng.uniform(-0.08, 0.08, 2)
    ang = rng.uniform(0, 2 * math.pi)
    if name == "circle":
        mask = ellipse_mask(cx, cy, r * 0.9, r * 0.9)
    elif name == "ring":
        mask = ellipse_mask(cx, cy, r * 0.9, r * 0.9) * (1 - ellipse_mask(cx, cy, r * 0.5, r * 0.5))
    elif name == "crescent":
        dx, dy = 0.45 * r * math.cos(ang), 0.45 * r * math.sin(ang)
        mask = ellipse_mask(cx, cy, r * 0.9, r * 0.9) * (1 - ellipse_mask(cx + dx, cy + dy, r * 0.8, r * 0.8))
    else:
        mask = polygon_mask(transform(_shape_outline(name), ang, cx, cy, r))
    return finish(compose(img, mask, fg_c), rng, rng.uniform(0.0, 0.05))
