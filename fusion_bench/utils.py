"""Small shared helpers: devices, dtypes, seeds, timing and memory measurement, hashing."""

from __future__ import annotations

import hashlib
import os
import resource
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from fusion_bench.errors import ConfigError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def parse_dtype(value: str | torch.dtype | None, key: str = "dtype") -> torch.dtype | None:
    """Turn 'bf16', 'float32', torch.float16 or None into a torch dtype (None stays None)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).lower().removeprefix("torch.")
    if name in ("none", "null", "auto", ""):
        return None
    if name not in _DTYPES:
        from fusion_bench.errors import did_you_mean

        raise ConfigError(f"{key}={value!r} is not a dtype.{did_you_mean(name, _DTYPES)}")
    return _DTYPES[name]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks CUDA when available, then MPS, else CPU; a GPU this machine lacks falls back to the CPU
    (see :func:`fusion_bench.engine.devices.resolve_device`, the one device helper)."""
    from fusion_bench.engine.devices import resolve_device as _resolve

    return _resolve(device)


def seeded_generator(seed: int, *names: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a tuple of names (e.g. a tensor name).

    The same (seed, names) always gives the same stream, independent of visiting order, so a
    random method gives identical results in memory and when streamed tensor by tensor.
    """
    h = hashlib.sha256(repr((int(seed), *names)).encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless index batches of size ``min(batch_size, n)``: a fresh permutation of ``range(n)`` each
    epoch, the incomplete tail of an epoch dropped. Draws from ``generator`` only when a new epoch starts."""
    bs = min(batch_size, n)
    perm, pos = torch.randperm(n, generator=generator), 0
    while True:
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos:pos + bs]
        pos += bs


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(ru if sys.platform == "darwin" else ru * 1024)


def current_rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:  # pragma: no cover - psutil is a dependency, this is a fallback
        return peak_rss_bytes()


@dataclass
class Measurement:
    wall_time_s: float = 0.0
    peak_rss_bytes: int = 0
    peak_rss_delta_bytes: int = 0
    peak_cuda_bytes: int | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {
            "wall_time_s": round(self.wall_time_s, 4),
            "peak_rss_mb": round(self.peak_rss_bytes / 2**20, 1),
            "peak_rss_delta_mb": round(self.peak_rss_delta_bytes / 2**20, 1),
        }
        if self.peak_cuda_bytes is not None:
            d["peak_cuda_mb"] = round(self.peak_cuda_bytes / 2**20, 1)
        return d


class _RssSampler(threading.Thread):
    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = current_rss_bytes()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, current_rss_bytes())
        return self.peak


@contextmanager
def measure():
    """Measure wall time and peak memory (RSS sampled; on GPUs the sum over the visible GPUs of each one's peak
    allocated bytes) of a block."""
    m = Measurement()
    start_rss = current_rss_bytes()
    sampler = _RssSampler()
    sampler.start()
    gpus = range(torch.cuda.device_count()) if torch.cuda.is_available() else range(0)
    for d in gpus:  # every visible GPU: a run may spread over several (fusion_bench.engine.devices)
        torch.cuda.reset_peak_memory_stats(d)
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        m.wall_time_s = time.perf_counter() - t0
        peak = sampler.stop()
        m.peak_rss_bytes = max(peak, start_rss)
        m.peak_rss_delta_bytes = max(0, peak - start_rss)
        if len(gpus):  # the sum of the GPUs' peaks (each GPU's own peak is in extra["peak_cuda_bytes_per_device"])
            per = [int(torch.cuda.max_memory_allocated(d)) for d in gpus]
            m.peak_cuda_bytes = sum(per)
            if len(per) > 1:
                m.extra["peak_cuda_bytes_per_device"] = per


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes and bytes), order independent."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def count_parameters(model: torch.nn.Module) -> dict:
    """Parameter counts; ``weights`` counts every floating-point tensor of the state dict once
    (parameters and float buffers, tied tensors once), which is what a merge produces."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": int(total), "trainable": int(trainable), "weights": float_numel(model)}


def float_numel(model: torch.nn.Module) -> int:
    seen = set()
    n = 0
    for t in model.state_dict().values():
        if not t.is_floating_point():
            continue
        key = (t.data_ptr(), t.numel()) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        n += t.numel()
    return int(n)
