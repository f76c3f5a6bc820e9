"""Devices: resolve ``device``/``devices``, place ensemble members, split batches, mixed precision.

The one place that knows device names. Everything else asks here (or :func:`fusion_bench.utils.resolve_device`,
which delegates here) and never spells a GPU backend itself; ``tests/test_devices.py`` enforces that by
scanning the sources.

- ``device``: ``auto`` (CUDA, then MPS, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ``mps``. A GPU that is not
  there falls back to the CPU with one warning: the results are the same, only slower.
- ``devices``: several devices for one evaluation, a list (``[cuda:0,cuda:1]``; ``[cpu,cpu]`` runs the
  multi-device code on one CPU, for tests), ``auto``/``all`` (every visible GPU, else ``[device]``) or a
  number N (the first N GPUs; on a machine without them, the CPU).
- Placement (:class:`DevicePlan`): with M models (ensemble members) and K device slots, member i runs on
  slot i mod K when M >= K (round-robin); with fewer members than slots, member i gets the slots
  j = i, i + M, i + 2M, ... and its batch is split evenly across them (data parallel: a replica of the member
  per slot, outputs gathered on the first slot in batch order). One model on K slots is plain data parallel.
  Slots run in threads, one per slot, so K GPUs work at once; each thread enters its own inference mode and
  autocast (both are thread-local in PyTorch).
- ``precision``: ``32`` (full float32, the exact reference numbers), ``bf16-mixed`` or ``16-mixed`` (autocast to
  bfloat16 / float16 for the forward passes, Lightning's names; both work on CPU in PyTorch >= 2.1,
  ``16-mixed`` is meant for GPUs). Outputs are cast back to float32 before losses and argmax.

Accelerate's utilities move and concatenate nested outputs (tensors, tuples, dicts, ``ModelOutput``); for models
too large for one GPU, :func:`dispatch_across` spreads the layers over the devices with accelerate's
``infer_auto_device_map`` / ``dispatch_model`` (pipeline-style model parallelism, no batch split).
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from fusion_bench.errors import ConfigError, did_you_mean

#: accepted ``precision`` values (Lightning's names) and the old names of the clip task pools
PRECISIONS: tuple[str, ...] = ("32", "32-true", "bf16-mixed", "16-mixed")
_PRECISION_ALIASES = {"32": "32", "32-true": "32", "float32": "32", "fp32": "32", "bf16-mixed": "bf16-mixed",
                      "bf16": "bf16-mixed", "16-mixed": "16-mixed", "16": "16-mixed"}
_DEVICE_RE = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")
_GPU_KINDS = ("cuda", "xpu", "mps")
_warned: set[str] = set()


def _gpu_kind() -> str | None:
    """The accelerator backend this PyTorch build can use now (None: CPU only)."""
    if torch.cuda.is_available():
        return "cuda"
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return "xpu"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return None


def _count(kind: str) -> int:
    if kind == "mps":
        return 1
    mod = getattr(torch, kind, None)
    return int(mod.device_count()) if mod is not None else 0


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def resolve_device(device: str | torch.device | None = "auto", key: str = "device") -> torch.device:
    """One device from ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps`` (or a torch.device).

    ``auto`` picks CUDA, then XPU, then MPS, else the CPU. A GPU device that this machine lacks falls back to
    the CPU with a warning (same results, slower); a malformed name is a ConfigError naming ``key``.
    """
    if isinstance(device, torch.device):
        return device
    name = "auto" if device is None else str(device).strip().lower()
    if name == "auto":
        kind = _gpu_kind()
        return torch.device(kind) if kind else torch.device("cpu")
    if not _DEVICE_RE.match(name):
        raise ConfigError(f"{key}={device!r} is not a device; use auto, cpu, cuda, cuda:1 or mps."
                          f"{did_you_mean(name, ['auto', 'cpu', 'cuda', 'mps'])}")
    kind, _, index = name.partition(":")
    if kind == "cpu":
        return torch.device("cpu")
    available = _gpu_kind() == kind or (kind == "cuda" and torch.cuda.is_available())
    if not available:
        _warn_once(f"{key}={name}: no {kind} device on this machine; running on the CPU instead (same results, "
                   "slower).")
        return torch.device("cpu")
    if index and int(index) >= _count(kind):
        raise ConfigError(f"{key}={name}: this machine has {_count(kind)} {kind} device(s) "
                          f"({kind}:0 .. {kind}:{_count(kind) - 1}); choose one of them or auto.")
    return torch.device(name)


def resolve_devices(device: str | torch.device | None = "auto", devices: Any = None,
                    key: str = "devices") -> list[torch.device]:
    """The device slots of a run: ``devices`` when given (a list, ``auto``/``all`` or a count), else ``[device]``.

    A list may repeat a device (``[cpu, cpu]``: two slots on the CPU, which runs the multi-device code paths
    on any machine). Unavailable GPUs fall back to the CPU like :func:`resolve_device`.
    """
    if devices is None or (isinstance(devices, (list, tuple)) and len(devices) == 0):
        return [resolve_device(device, key=key.removesuffix("s"))]
    if isinstance(devices, (list, tuple)):
        return [resolve_device(d, key=f"{key}[{i}]") for i, d in enumerate(devices)]
    name = str(devices).strip().lower()
    if name in ("auto", "all"):
        kind = _gpu_kind()
        if kind in ("cuda", "xpu") and _count(kind) > 0:
            return [torch.device(kind, i) for i in range(_count(kind))]
        return [resolve_device(device, key=key.removesuffix("s"))]
    if name.isdigit():
        n = int(name)
        if n < 1:
            raise ConfigError(f"{key}={devices!r} must be at least 1 (or a list of devices, or auto).")
        kind = _gpu_kind()
        have = _count(kind) if kind in ("cuda", "xpu") else 0
        if have == 0:
            _warn_once(f"{key}={n}: no GPU on this machine; running on the CPU instead (same results, slower).")
            return [torch.device("cpu")]
        if n > have:
            raise ConfigError(f"{key}={n}: this machine has {have} {kind} device(s); ask for at most {have}, or "
                              "devices=auto for all of them.")
        return [torch.device(kind, i) for i in range(n)]
    if _DEVICE_RE.match(name):
        return [resolve_device(name, key=key)]
    raise ConfigError(f"{key}={devices!r} is not a device list; give a list like [cuda:0,cuda:1], a number of GPUs, "
                      "or auto.")


def parse_precision(value: Any, key: str = "precision") -> str:
    """``32`` | ``bf16-mixed`` | ``16-mixed`` (also 32-true, float32, bf16, 16) -> the canonical name."""
    name = str(value).strip().lower() if value is not None else "32"
    if name not in _PRECISION_ALIASES:
        raise ConfigError(f"{key}={value!r} is not a precision; use 32, bf16-mixed or 16-mixed."
                          f"{did_you_mean(name, PRECISIONS)}")
    return _PRECISION_ALIASES[name]


def autocast(device: torch.device | str, precision: str = "32"):
    """The autocast context of ``precision`` on ``device`` (a no-op for 32)."""
    p = parse_precision(precision)
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if p == "32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if p == "bf16-mixed" else torch.float16
    return torch.autocast(dev.type, dtype=dtype)


def round_robin(n: int, devices: Sequence[torch.device]) -> list[torch.device]:
    """Device of each of ``n`` members: member i on ``devices[i % len(devices)]``."""
    if not devices:
        raise ValueError("round_robin needs at least one device")
    return [devices[i % len(devices)] for i in range(n)]


def assign_slots(n_members: int, n_slots: int) -> list[list[int]]:
    """Slots of each member: round-robin when members >= slots, else member i gets slots i, i + M, ...
    (its batch split across them)."""
    if n_members <= 0 or n_slots <= 0:
        raise ValueError("assign_slots needs at least one member and one slot")
    if n_members >= n_slots:
        return [[i % n_slots] for i in range(n_members)]
    return [list(range(i, n_slots, n_members)) for i in range(n_members)]


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for an empty module)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def to_device(data: Any, device: torch.device) -> Any:
    """Move a nested structure of tensors (tuples, dicts, ModelOutput) to ``device``."""
    if isinstance(data, torch.Tensor):
        return data.to(device)
    from accelerate.utils import send_to_device

    return send_to_device(data, device)


def concatenate(parts: Sequence[Any]) -> Any:
    """Concatenate nested outputs along the batch dimension (one part: returned as it is)."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(list(parts), dim=0)
    from accelerate.utils import concatenate as acc_concatenate

    return acc_concatenate(list(parts), dim=0)


def device_context(device: torch.device):
    """Make ``device`` the current GPU of this thread (CUDA), a no-op elsewhere."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


class DevicePlan:
    """Members placed on device slots for evaluation: round-robin, or replicated with the batch split.

    Args:
        members: the models (one, or an ensemble's members); moved to their first slot's device.
        devices: the device slots (see :func:`resolve_devices`); the first gathers the outputs.
        precision: ``32``, ``bf16-mixed`` or ``16-mixed`` (autocast inside each slot's thread).
        inference: run the forwards under ``torch.inference_mode`` (evaluation).
    """

    def __init__(self, members: Sequence[nn.Module], devices: Sequence[torch.device], precision: str = "32",
                 inference: bool = True):
        if not devices:
            raise ValueError("DevicePlan needs at least one device")
        self.devices = list(devices)
        self.main = self.devices[0]
        self.precision = parse_precision(precision)
        self.inference = inference
        self.slots = assign_slots(len(members), len(self.devices))
        self.members = list(members)
        self._replicas: dict[tuple[int, int], nn.Module] = {}
        for i, (m, slots) in enumerate(zip(self.members, self.slots)):
            # the member itself serves its first slot; further slots get copies (on the CPU too, so that the
            # threaded multi-device path is the one tested), made before the member moves: a member loaded on the
            # CPU is copied there, not on its first GPU
            for s in slots[1:]:
                self._replicas[(i, s)] = copy.deepcopy(m).to(self.devices[s])
            self._replicas[(i, slots[0])] = m.to(self.devices[slots[0]])

    def placements(self) -> list[list[str]]:
        """Device names of each member's slots (for reports)."""
        return [[str(self.devices[s]) for s in slots] for slots in self.slots]

    @property
    def parallel(self) -> bool:
        return len(self.devices) > 1

    def _run_slot(self, jobs: list[Callable[[], Any]], device: torch.device) -> list[Any]:
        grad = torch.inference_mode() if self.inference else contextlib.nullcontext()
        with device_context(device), grad, autocast(device, self.precision):
            return [job() for job in jobs]

    def map(self, fn: Callable[[int, nn.Module, Any], Any], x: torch.Tensor, prepare: Callable[[int, torch.Tensor], Any]
            | None = None) -> list[Any]:
        """Each member's output on the batch ``x``, gathered on the main device in batch order.

        Args:
            fn: ``fn(member_index, module, x_chunk) -> output`` (tensors or a nested structure of tensors); the
                module is the member or its replica on the chunk's device.
            x: the batch (first dimension: examples).
            prepare: optional ``prepare(member_index, x_chunk)`` applied to each chunk on its device
                (e.g. a dtype cast).
        """
        by_slot: dict[int, list[tuple[int, int]]] = {}  # slot -> [(member, chunk index)]
        chunks: dict[int, list[torch.Tensor]] = {}
        for i, slots in enumerate(self.slots):
            chunks[i] = list(torch.tensor_split(x, len(slots), dim=0)) if len(slots) > 1 else [x]
            for c, s in enumerate(slots):
                by_slot.setdefault(s, []).append((i, c))
        results: dict[tuple[int, int], Any] = {}

        def job(i: int, c: int, s: int) -> Callable[[], Any]:
            def run() -> Any:
                dev = self.devices[s]
                xc = chunks[i][c].to(dev, non_blocking=True)
                if prepare is not None:
                    xc = prepare(i, xc)
                return fn(i, self._replicas[(i, s)], xc)
            return run

        work = {s: [job(i, c, s) for i, c in pairs] for s, pairs in by_slot.items()}
        if len(work) == 1:
            (s, jobs), = work.items()
            outs = {s: self._run_slot(jobs, self.devices[s])}
        else:
            with ThreadPoolExecutor(max_workers=len(work)) as ex:
                futures = {s: ex.submit(self._run_slot, jobs, self.devices[s]) for s, jobs in work.items()}
                outs = {s: f.result() for s, f in futures.items()}
        for s, pairs in by_slot.items():
            for (i, c), out in zip(pairs, outs[s]):
                results[(i, c)] = to_device(out, self.main)
        return [concatenate([results[(i, c)] for c in range(len(self.slots[i]))]) for i in range(len(self.members))]

    def release(self) -> None:
        """Drop the replicas (the members themselves stay where they were placed)."""
        for (i, s), r in list(self._replicas.items()):
            if r is not self.members[i]:
                del self._replicas[(i, s)]


def place_round_robin(modules: Sequence[nn.Module], devices: Sequence[torch.device]) -> list[torch.device]:
    """Move module i to ``devices[i % len(devices)]`` (an ensemble's members across GPUs); return the devices."""
    placed = round_robin(len(modules), devices)
    for m, d in zip(modules, placed):
        m.to(d)
    return placed


def dispatch_across(model: nn.Module, devices: Sequence[torch.device], no_split: Sequence[str] | None = None) -> nn.Module:
    """Spread one large model's layers over several GPUs (accelerate's balanced device map); on one device or
    the CPU the model is just moved there. Not tested on GPUs here (no GPU in CI)."""
    devs = list(devices)
    if len(devs) <= 1 or any(d.type == "cpu" for d in devs):
        return model.to(devs[0] if devs else torch.device("cpu"))
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    idx = [d.index if d.index is not None else 0 for d in devs]
    names = list(no_split or getattr(model, "_no_split_modules", None) or [])
    memory = get_balanced_memory(model, no_split_module_classes=names)
    memory = {k: v for k, v in memory.items() if k in idx or k == "cpu"}
    device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=names)
    return dispatch_model(model, device_map=device_map)


def device_options(top: dict[str, Any], section: dict[str, Any], fields: set[str]) -> dict[str, Any]:
    """A pool's or method's config with the run's ``device``, ``devices`` and ``precision`` filled in where the
    section has the option and leaves it at its default (``auto`` / null / 32): the run-wide options apply
    unless the section sets its own."""
    out = dict(section)
    defaults = {"device": ("auto", None), "devices": (None,), "precision": ("32", 32, "float32", None)}
    for key, blank in defaults.items():
        if key not in fields or key not in top:
            continue
        value = top[key]
        if value in blank or (isinstance(value, (list, tuple)) and not value):
            continue
        if out.get(key) in blank:
            out[key] = value
    return out


def run_device_options(cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The method's and the task pool's configs of a run (:class:`fusion_bench.programs.fusion.ProgramConfig`)
    with the run-wide ``device``/``devices``/``precision`` filled in where they have the option unset."""
    import dataclasses

    from fusion_bench.taskpool.base import TASKPOOLS

    top = {"device": cfg.device, "devices": cfg.devices, "precision": cfg.precision}
    method = dict(cfg.method or {})
    taskpool = dict(cfg.taskpool or {})
    try:
        from fusion_bench.methods import get_method_class

        mcls = get_method_class(method["name"]).config_class if "name" in method else None
    except Exception:  # an unknown method name: build_method gives the error
        mcls = None
    if mcls is not None and dataclasses.is_dataclass(mcls):
        # the run-wide device does not move a method's own computation: only its devices (placement) option
        method = device_options({"devices": top["devices"]}, method, {f.name for f in dataclasses.fields(mcls)})
    try:
        tcls = TASKPOOLS.get(taskpool.get("type", "parameter_count")).config_class
    except Exception:
        tcls = None
    if tcls is not None and dataclasses.is_dataclass(tcls):
        fields = {f.name for f in dataclasses.fields(tcls)}
        # device: build_taskpool passes it when the pool's config leaves it out; here also when it says auto
        taskpool = device_options(top, taskpool, fields)
    return method, taskpool
