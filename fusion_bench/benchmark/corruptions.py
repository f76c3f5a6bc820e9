"""Image corruptions for the robustness splits of the offline CLIP benchmark.

After Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations" (ICLR 2019; ImageNet-C / CIFAR-10-C), re-implemented here with numpy/PIL for 32x32 images
(FusionBench's robustness study uses motion blur, impulse noise, Gaussian noise, pixelate, spatter,
contrast and JPEG compression). Severity runs from 1 (mild) to 5 (strong); the parameter per severity
is in ``SEVERITY_PARAMS``. Pixel values are handled as floats in [0, 1] and clipped at the end.
"""

from __future__ import annotations

import io
import math
import zlib

import numpy as np
from PIL import Image

from fusion_bench.errors import ConfigError, did_you_mean

# parameter of each corruption at severities 1..5 (CIFAR-10-C values where one exists, else chosen so
# that severity 5 still leaves a 32x32 image recognisable to a person)
SEVERITY_PARAMS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std of additive N(0, s^2)
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # fraction of values set to 0 or 1
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),  # std of multiplicative x * (1 + N(0, s^2))
    "motion_blur": (3, 4, 5, 6, 7),  # length in pixels of the line kernel
    "defocus_blur": (0.75, 1.0, 1.25, 1.5, 2.0),  # radius in pixels of the disk kernel
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # size factor of the box-downsample, nearest-upsample
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor c of (x - mean) * c + mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the HSV value channel
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
    "spatter": (0.05, 0.1, 0.15, 0.2, 0.25),  # fraction of the image covered by mud blobs
}
CORRUPTIONS: tuple[str, ...] = tuple(SEVERITY_PARAMS)


def _check(name: str, severity: int) -> float:
    if name not in SEVERITY_PARAMS:
        raise ConfigError(f"Unknown corruption '{name}'.{did_you_mean(name, CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ConfigError(f"Corruption severity must be an integer from 1 to 5, got {severity!r} (for '{name}').")
    return SEVERITY_PARAMS[name][int(severity) - 1]


def convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate each channel of ``x`` (H, W, C) with ``kernel`` (k, k; odd k), edges replicated."""
    k = kernel.shape[0]
    r = k // 2
    pad = np.pad(x, ((r, r), (r, r), (0, 0)), mode="edge")
    h, w = x.shape[:2]
    out = np.zeros_like(x, dtype=np.float64)
    for dy, dx in zip(*np.nonzero(kernel)):
        out += kernel[dy, dx] * pad[dy: dy + h, dx: dx + w]
    return out


def motion_kernel(length: int, angle: float) -> np.ndarray:
    """Normalised line kernel: the ``length`` pixels of a digital line through the centre at ``angle`` rad.

    The pixels hit by points sampled densely along the segment of ``length - 1`` pixels (centre to centre)
    get equal weight.
    """
    length = int(length)
    half = (length - 1) / 2
    k = 2 * int(math.ceil(half)) + 1
    ker = np.zeros((k, k))
    for t in np.linspace(-half, half, 8 * length + 1):
        xi, yi = int(math.floor(k // 2 + t * math.cos(angle) + 0.5)), int(math.floor(k // 2 + t * math.sin(angle) + 0.5))
        if 0 <= xi < k and 0 <= yi < k:
            ker[yi, xi] = 1.0
    return ker / ker.sum()


def disk_kernel(radius: float) -> np.ndarray:
    """Normalised disk kernel: pixel weight = fraction of the pixel inside the circle (8x8 supersampled)."""
    r = int(math.ceil(radius))
    k = 2 * r + 1
    ss = 8
    off = (np.arange(ss) + 0.5) / ss - 0.5
    ker = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            yy = i - r + off[:, None]
            xx = j - r + off[None, :]
            ker[i, j] = np.mean(xx**2 + yy**2 <= radius**2)
    return ker / ker.sum()


def _mud(rng: np.random.Generator, h: int, w: int, coverage: float) -> np.ndarray:
    cells = 5
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    field = np.asarray(Image.fromarray(grid, "L").resize((w, h), Image.BICUBIC), dtype=np.float64)
    field += rng.normal(0, 8, field.shape)
    thr = np.quantile(field, 1.0 - coverage)
    return np.clip((field - thr) / 6.0, 0.0, 1.0)


def corrupt_image(img: Image.Image, name: str, severity: int, rng: np.random.Generator | int) -> Image.Image:
    """Apply corruption ``name`` at ``severity`` (1..5) to ``img``; returns an RGB image of the same size.

    Variants (x in [0, 1]): gaussian_noise x + N(0, s^2); impulse_noise sets a fraction s of the values to
    0 or 1 (equal odds); speckle_noise x * (1 + N(0, s^2)); motion_blur correlates with a line kernel of
    length s at a random angle; defocus_blur with a disk of radius s; pixelate box-downsamples to s times
    the size and upsamples with nearest; contrast (x - mean) * s + mean (mean over the image); brightness
    adds s to the HSV value; jpeg_compression re-encodes with quality s; spatter paints brown mud blobs
    covering a fraction s (thresholded smooth noise).

    Args:
        img: a PIL image (converted to RGB).
        name: one of ``CORRUPTIONS``.
        severity: 1 (mild) to 5 (strong).
        rng: a ``numpy.random.Generator`` or an integer seed (random angle, noise, blobs).
    """
    p = _check(name, severity)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    img = img.convert("RGB")
    w, h = img.size
    if name == "pixelate":
        small = img.resize((max(1, int(round(w * p))), max(1, int(round(h * p)))), Image.BOX)
        return small.resize((w, h), Image.NEAREST)
    if name == "jpeg_compression":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(p))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if name == "brightness":
        hsv = np.asarray(img.convert("HSV"), dtype=np.float64) / 255.0
        hsv[..., 2] = np.clip(hsv[..., 2] + p, 0.0, 1.0)
        return Image.fromarray((hsv * 255.0 + 0.5).astype(np.uint8), "HSV").convert("RGB")
    x = np.asarray(img, dtype=np.float64) / 255.0
    if name == "gaussian_noise":
        x = x + rng.normal(0.0, p, x.shape)
    elif name == "impulse_noise":
        hit = rng.random(x.shape) < p
        x = np.where(hit, (rng.random(x.shape) < 0.5).astype(np.float64), x)
    elif name == "speckle_noise":
        x = x + x * rng.normal(0.0, p, x.shape)
    elif name == "motion_blur":
        x = convolve(x, motion_kernel(p, rng.uniform(0, math.pi)))
    elif name == "defocus_blur":
        x = convolve(x, disk_kernel(p))
    elif name == "contrast":
        m = x.mean()
        x = (x - m) * p + m
    elif name == "spatter":
        mask = _mud(rng, h, w, p)[..., None]
        color = np.array([0.4, 0.3, 0.2]) + rng.uniform(-0.05, 0.05, 3)
        x = x * (1 - mask) + color * mask
    return Image.fromarray((np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")


def build_corrupted_test(ds, corruption: str, severity: int = 3, seed: int = 0):
    """A copy of ``ds`` (a ``datasets.Dataset`` with an ``image`` column) with every image corrupted.

    Deterministic: sample ``i`` uses the random stream (seed, corruption, severity, i). Other columns and
    the features are kept.

    Args:
        ds: the clean split (usually a task's test split).
        corruption: one of ``CORRUPTIONS``.
        severity: 1 to 5.
        seed: seed of the random parts (noise, angles, blobs).
    """
    import datasets

    _check(corruption, severity)
    if "image" not in ds.column_names:
        raise ConfigError(
            f"build_corrupted_test needs a dataset with an 'image' column; this one has {ds.column_names}."
        )
    key = zlib.crc32(corruption.encode())
    data = {c: ds[c] for c in ds.column_names if c != "image"}
    images = []
    for i, im in enumerate(ds["image"]):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), key, int(severity), i]))
        out = corrupt_image(im, corruption, severity, rng)
        buf = io.BytesIO()
        out.save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
    data["image"] = images
    features = ds.features.copy()
    features["image"] = datasets.Image()
    return datasets.Dataset.from_dict({c: data[c] for c in ds.column_names}, features=features, info=ds.info)
