"""Streaming (out-of-core) merge engine: checkpoints in, sharded safetensors folder out.

The engine plans the whole merge before reading any weight (every output tensor's name, shape,
dtype and sources; vocabulary policy; mismatches), then visits the tensors in the base model's
file order. A reader thread reads the inputs of the next work units (whole tensors, or row blocks
of large ones) with ``preadv`` into a bounded queue while the main thread merges the current unit
with the method's own :meth:`~fusion_bench.methods.base.TensorwiseMerge.merge_one` (so results
equal the in-memory engine) and writes it at its final offset in the output shard. Peak memory is
(queue depth + 1) x (number of inputs) x (largest unit), independent of the model size.

Row blocks: a tensor larger than ``block_elements`` is merged in blocks of rows when the method
says it can be. Either ``elementwise = True`` (the output at an index depends only on the inputs
at that index: ``merge_one`` is applied to each block), or the block protocol:

- ``begin_blocks(key, shape, names) -> state`` (optional): called once before the first block
  (e.g. per-model random generators whose streams continue from block to block);
- ``block_stats(key, base, tensor, name) -> stat`` (optional): a statistic of one model's whole
  tensor (e.g. a magnitude threshold), computed before any block; the engine reads one model at
  a time and passes the tensors in their stored dtype (the method chunks its own arithmetic);
- ``stats_from_blocks(key, dtype) -> bool``, ``block_stats_partial(key, base, block, name) -> part``,
  ``add_block_stats(part, part) -> part`` and ``combine_block_stats(key, part, name) -> stat``
  (optional): when the first says so, the statistic is built from row blocks instead (one partial
  per block, in any order, added up as they come; finished when a model's last block is in), so no
  whole tensor is held (e.g. a magnitude histogram);
- ``merge_block(key, base, tensors, names, ctx, rows) -> tensor``: merge rows ``[rows[0],
  rows[1])`` given ``ctx`` (:class:`BlockContext`: ``stats`` per model and ``state``); inputs in
  the compute dtype. Blocks are visited in row order.

The merged result must equal ``merge_one`` on the whole tensor (tested per method). Other
methods get whole tensors.

The output is written into a temporary folder beside the destination and renamed at the end; an
error or interruption leaves nothing at the destination.

Python API::

    from fusion_bench.engine.streaming import merge_to_folder, plan_merge
    info = merge_to_folder(method, modelpool, "out/merged")      # from_pretrained loads it
    print(plan_merge(method, modelpool).summary())                # dry run
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from fusion_bench.errors import CheckpointError, ConfigError, ModelMismatchError
from fusion_bench.io.checkpoint import SAFE_INDEX, TensorMeta, TensorSource
from fusion_bench.io.outputs import acquire_lock, check_output, output_dir, release_lock, safetensors_metadata
from fusion_bench.io.stream import ShardedWriter, StreamReader, dtype_size, iter_row_blocks

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool

#: elements of one input in one row block (1 Mi elements = 4 MiB in float32)
DEFAULT_BLOCK_ELEMENTS = 1 << 20
#: merging threads (each with one torch intra-op thread); the reader thread comes on top
DEFAULT_WORKERS = max(1, min(2, os.cpu_count() or 1))
#: resident memory of a Python process with torch and fusion_bench imported (for the dry-run estimate)
PROCESS_BASELINE_BYTES = 260 * 2**20
#: files copied from the base (or vocabulary source) folder beside the merged weights
SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")
TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "chat_template",
                           "spiece", "sentencepiece")


def parse_size(value: int | str, key: str = "max_shard_size") -> int:
    """'5GB', '500MB', '20KB', '2GiB' or an integer number of bytes."""
    if isinstance(value, int):
        return value
    s = str(value).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            try:
                return int(float(s[: -len(u)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ConfigError(f"{key}={value!r} is not a size; write e.g. '5GB', '500MB' or a number of bytes.") from None


def human_bytes(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


# ----------------------------------------------------------------------------------------------
# readers: one interface over safetensors files (preadv) and other tensor sources
# ----------------------------------------------------------------------------------------------
class SourceReader:
    """The reader interface (``keys``, ``meta``, ``read(key, rows)``) over any :class:`TensorSource`
    (state dicts, modules, .bin files): used where the checkpoint is not safetensors."""

    def __init__(self, source: TensorSource):
        self.source = source
        self.name = source.name

    def keys(self) -> list[str]:
        return self.source.keys()

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def meta(self, key: str) -> TensorMeta:
        return self.source.meta(key)

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = self.source.get(key)
        if rows is not None and t.dim() > 0:
            t = t[rows[0]:rows[1]]
        return t

    def total_bytes(self) -> int:
        return sum(self.meta(k).nbytes for k in self.keys())

    def close(self) -> None:
        pass


class ReaderSource(TensorSource):
    """A :class:`TensorSource` view of a reader (for methods' ``prepare`` pre-pass)."""

    def __init__(self, reader: Any):
        self.reader = reader
        self.name = reader.name

    def keys(self) -> list[str]:
        return self.reader.keys()

    def meta(self, key: str) -> TensorMeta:
        return self.reader.meta(key)

    def get(self, key: str) -> torch.Tensor:
        return self.reader.read(key)

    def content_hash(self) -> str:  # pragma: no cover - not used by the engine
        raise NotImplementedError


def checkpoint_folder(pool: ModelPool, name: str) -> Path | None:
    """The folder or file of checkpoint ``name`` when it is on disk (None for in-memory models)."""
    kind = pool.kind(name)
    if kind == "hf":
        return pool.hf_folder(name)
    if kind == "file":
        return Path(os.path.expanduser(str(pool.entry(name))))
    return None


def open_reader(pool: ModelPool, name: str) -> Any:
    """A reader of model ``name``: :class:`StreamReader` for safetensors on disk, else a
    :class:`SourceReader` over the pool's lazy source."""
    p = checkpoint_folder(pool, name)
    if p is not None and ((p.is_dir() and ((p / SAFE_INDEX).exists() or any(p.glob("*.safetensors"))))
                          or p.suffix == ".safetensors"):
        return StreamReader(p, name)
    return SourceReader(pool.source(name))


# ----------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One output tensor.

    ``mode="merge"``: rows ``[0, merge_rows)`` are ``method.merge_one`` of the inputs' rows (every
    model, plus the base); rows ``[merge_rows, shape[0])`` are copied from ``tail_from``.
    ``mode="copy"``: the tensor is ``inputs[copy_from]`` (cast to ``dtype``).
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    mode: Literal["merge", "copy"]
    inputs: dict[str, str]
    copy_from: str | None = None
    merge_rows: int | None = None
    tail_from: str | None = None
    blocks: list[tuple[int, int]] | None = None
    stats: bool = False
    stats_blocks: bool = False  # the stats come from row blocks (method.stats_from_blocks), not whole tensors
    in_dtype: torch.dtype | None = None
    protocol: bool = False  # merged with the method's merge_block (else merge_one per block)
    scale: float | None = None  # copy mode: the copied tensor times this (float32/float64 arithmetic)

    @property
    def out_bytes(self) -> int:
        n = dtype_size(self.dtype)
        for s in self.shape:
            n *= s
        return n


@dataclass
class MergePlan:
    """What a streaming merge will do, computed before any weight is read."""

    method: str
    base: str | None
    models: list[str]
    jobs: list[Job]
    mismatches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bytes_read: int = 0
    bytes_written: int = 0
    peak_unit_bytes: int = 0
    peak_memory_bytes: int = 0
    config_updates: dict[str, Any] = field(default_factory=dict)
    config_from: str | None = None

    def summary(self) -> str:
        lines = [
            f"streaming plan for method '{self.method}': {len(self.jobs)} output tensors, "
            f"{len(self.models)} models" + (f" + base '{self.base}'" if self.base else ""),
            f"  bytes to read:    {human_bytes(self.bytes_read)}",
            f"  bytes to write:   {human_bytes(self.bytes_written)}",
            f"  planned peak RSS: {human_bytes(self.peak_memory_bytes)} (estimate: process baseline "
            f"{human_bytes(PROCESS_BASELINE_BYTES)} + buffers of the largest work unit, "
            f"{human_bytes(self.peak_unit_bytes)})",
            f"  merged in row blocks: {sum(1 for j in self.jobs if j.blocks and len(j.blocks) > 1)} tensors; "
            f"copied: {sum(1 for j in self.jobs if j.mode == 'copy')}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        if self.mismatches:
            lines.append(f"  {len(self.mismatches)} mismatch(es) (the merge would stop before reading any weight):")
            lines += [f"    - {m}" for m in self.mismatches]
        else:
            lines.append("  names and shapes agree across models")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "base": self.base, "models": self.models, "tensors": len(self.jobs),
                "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "planned_peak_rss_bytes": self.peak_memory_bytes, "mismatches": list(self.mismatches),
                "notes": list(self.notes)}


@dataclass
class BlockContext:
    """What ``merge_block`` gets besides the inputs: per-model ``stats`` (or None) and ``state``."""

    stats: list[Any] | None = None
    state: Any = None
    #: stats computed so far (the engine's bookkeeping: stats of one tensor may run on several workers)
    done: int = 0
    #: per model, the sum of the partial stats of its row blocks so far, and how many blocks are in
    #: (methods with ``stats_from_blocks``)
    partials: dict[int, Any] = field(default_factory=dict)
    parts_done: dict[int, int] = field(default_factory=dict)


def _blockable(method: Any) -> tuple[bool, bool]:
    """(row blocks allowed, needs the whole-tensor statistics pass)."""
    if callable(getattr(method, "merge_block", None)):
        needs = getattr(method, "needs_block_stats", None)
        return True, callable(getattr(method, "block_stats", None)) and (needs() if callable(needs) else True)
    if getattr(method, "elementwise", False):
        return True, False
    return False, False


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype_size(dtype)
    for s in shape:
        n *= s
    return n


def plan_merge(method: Any, pool: ModelPool, *, block_elements: int = DEFAULT_BLOCK_ELEMENTS,
               prefetch: int = 1, readers: dict[str, Any] | None = None) -> MergePlan:
    """Plan a streaming merge: output tensors, row blocks, bytes, peak memory and mismatches.

    Nothing but headers is read. Mismatches are collected (not raised) so that a dry run can list
    them all; :func:`merge_to_folder` raises on the first.

    Args:
        method: a :class:`~fusion_bench.methods.base.TensorwiseMerge`, or a method with a
            ``stream_plan(pool, readers, out_dtype)`` (e.g. passthrough / layer stacking).
        pool: the model pool.
        block_elements: elements per input in one row block.
        prefetch: work units read ahead of the merge.
        readers: already opened readers (name -> reader), else opened here.
    """
    from fusion_bench.methods.base import TensorwiseMerge

    own = readers is None
    readers = readers if readers is not None else {}
    names = pool.model_names
    base = pool.base_name()
    for n in [base, *names]:
        if n not in readers:
            readers[n] = open_reader(pool, n)
    check_architectures = getattr(pool, "check_architectures", None)
    if callable(check_architectures):  # config.json model_type must agree (raises ModelMismatchError)
        check_architectures([base, *names])
    out_dtype = getattr(pool, "dtype", None)
    plan = MergePlan(method=method.name, base=base if pool.has_pretrained else None, models=list(names), jobs=[])
    if callable(getattr(method, "stream_plan", None)):
        jobs, updates = method.stream_plan(pool, readers, out_dtype)
        plan.jobs, plan.config_updates = jobs, updates
        plan.config_from = getattr(method, "config_source", lambda p: None)(pool)
    elif isinstance(method, TensorwiseMerge):
        method.check_pool(names, pool.has_pretrained)
        _plan_tensorwise(method, pool, readers, plan, out_dtype, block_elements)
    else:
        raise ConfigError(f"Method '{method.name}' does not merge tensor by tensor, so it cannot run in the "
                          "streaming engine; use engine=memory.")
    # figures
    n_in = len(names) + (1 if pool.has_pretrained else 0)
    peak_unit = 0
    for j in plan.jobs:
        plan.bytes_written += j.out_bytes
        in_dt = j.in_dtype or j.dtype
        if j.mode == "copy":
            plan.bytes_read += _nbytes(j.shape, in_dt)
            unit_elems = (j.blocks[0][1] - j.blocks[0][0]) * (j.out_bytes // max(1, j.shape[0] * dtype_size(j.dtype))) \
                if j.blocks and j.shape else max(1, j.out_bytes // dtype_size(j.dtype))
            unit = unit_elems * (dtype_size(in_dt) * (prefetch + 1) + 4)
        else:
            rows = j.merge_rows if j.merge_rows is not None else (j.shape[0] if j.shape else 1)
            row_elems = 1
            for s in j.shape[1:]:
                row_elems *= s
            plan.bytes_read += n_in * rows * row_elems * dtype_size(in_dt) * (2 if j.stats else 1)
            unit_rows = max(b - a for a, b in j.blocks) if j.blocks else rows
            unit_elems = unit_rows * row_elems
            # native inputs in the queue and in hand, their float32 copies, the method's workspace
            unit = unit_elems * n_in * 4 * (prefetch + 2 * DEFAULT_WORKERS + 1)
            if j.stats and not j.stats_blocks:
                full = rows * row_elems
                unit = max(unit, full * (dtype_size(in_dt) * 2 * (prefetch + DEFAULT_WORKERS) + 4 * 4 * DEFAULT_WORKERS))
        peak_unit = max(peak_unit, unit)
    plan.peak_unit_bytes = peak_unit
    plan.peak_memory_bytes = PROCESS_BASELINE_BYTES + peak_unit
    if own:
        for r in readers.values():
            r.close()
    return plan


def _plan_tensorwise(method: Any, pool: ModelPool, readers: dict[str, Any], plan: MergePlan,
                     out_dtype: torch.dtype | None, block_elements: int) -> None:
    names = pool.model_names
    base = pool.base_name()
    ref = readers[base]
    rules: dict[str, Any] = {}
    vocab_rules = getattr(pool, "vocab_rules", None)
    if callable(vocab_rules):
        rules, notes, problems = vocab_rules(readers)
        plan.notes += notes
        plan.mismatches += problems
        plan.config_updates.update(getattr(pool, "vocab_config_updates", lambda: {})())
        plan.config_from = getattr(pool, "config_source", lambda: None)()
    can_block, stats = _blockable(method)
    ref_keys = ref.keys()
    ref_set = set(ref_keys)
    for n in names:
        if n == base:
            continue
        r = readers[n]
        keys = r.keys()
        missing = [k for k in ref_keys if k not in r]
        extra = [k for k in keys if k not in ref_set]
        for k in missing:
            plan.mismatches.append(f"model '{n}' lacks tensor '{k}' that base model '{base}' has")
        for k in extra:
            plan.mismatches.append(f"model '{n}' has tensor '{k}' that base model '{base}' lacks")
        for k in ref_keys:
            if k not in r:
                continue
            a, b = ref.meta(k), r.meta(k)
            rule = rules.get(k)
            if a.shape != b.shape and not (rule is not None and a.shape[1:] == b.shape[1:]):
                plan.mismatches.append(f"tensor '{k}' has shape {list(b.shape)} in model '{n}' but "
                                       f"{list(a.shape)} in base model '{base}'")
            if a.dtype.is_floating_point != b.dtype.is_floating_point:
                plan.mismatches.append(f"tensor '{k}' is {b.dtype} in model '{n}' but {a.dtype} in base '{base}'")
    for k in ref_keys:
        meta = ref.meta(k)
        rule = rules.get(k)
        in_dtype = meta.dtype
        dt = out_dtype if (out_dtype is not None and meta.dtype.is_floating_point) else meta.dtype
        shape = meta.shape
        row_elems = 1
        for s in shape[1:]:
            row_elems *= s
        if rule is not None and rule.mode == "copy":
            src_shape = readers[rule.source].meta(k).shape
            blocks = list(iter_row_blocks(src_shape[0], row_elems, block_elements)) if src_shape else None
            plan.jobs.append(Job(k, src_shape, dt, "copy", {rule.source: k}, copy_from=rule.source, blocks=blocks,
                                 in_dtype=readers[rule.source].meta(k).dtype))
            continue
        if not method.should_merge(k, meta.dtype):
            blocks = list(iter_row_blocks(shape[0], row_elems, block_elements)) if shape else None
            plan.jobs.append(Job(k, shape, dt, "copy", {base: k}, copy_from=base, blocks=blocks, in_dtype=in_dtype))
            continue
        inputs = {n: k for n in ([base] if pool.has_pretrained else []) + names}
        merge_rows = None
        tail_from = None
        if rule is not None and rule.mode == "shared_rows":
            merge_rows = rule.rows
            tail_from = rule.source
            shape = (readers[rule.source].meta(k).shape[0], *shape[1:])
        rows = merge_rows if merge_rows is not None else (shape[0] if shape else 1)
        blocks = None
        if shape and rows * row_elems > block_elements and can_block:
            blocks = list(iter_row_blocks(rows, row_elems, block_elements))
        elif shape and merge_rows is not None:
            blocks = [(0, merge_rows)]
        use_blocks = blocks is not None and len(blocks) > 1
        from_blocks = getattr(method, "stats_from_blocks", None)
        stats_blocks = stats and use_blocks and callable(from_blocks) and bool(from_blocks(k, in_dtype))
        plan.jobs.append(Job(k, shape, dt, "merge", inputs, merge_rows=merge_rows, tail_from=tail_from,
                             blocks=blocks, stats=stats and use_blocks, stats_blocks=stats_blocks, in_dtype=in_dtype,
                             protocol=use_blocks and callable(getattr(method, "merge_block", None))))
        big = rows * row_elems > block_elements and not can_block
        if big and len(plan.notes) < 50:
            plan.notes.append(f"tensor '{k}' ({rows * row_elems} elements) is merged whole: method "
                              f"'{method.name}' cannot merge row blocks")


# ----------------------------------------------------------------------------------------------
# execution
# ----------------------------------------------------------------------------------------------
_END = object()


class _Prefetcher(threading.Thread):
    """Reads work units ahead of the merge into a bounded queue (overlaps I/O with compute)."""

    def __init__(self, units: Iterator[tuple], depth: int):
        super().__init__(daemon=True, name="fusion_bench-prefetch")
        self.units = units
        self.q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            for u in self.units:
                while not self.stop.is_set():
                    try:
                        self.q.put(u, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def _put(self, item: Any) -> None:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[tuple]:
        while True:
            item = self.q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.stop.set()
        while True:  # drain so that the producer is not blocked
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
        self.join(timeout=5)


class _Workers:
    """Merging threads fed by the dispatcher (the main thread). Protocol jobs keep worker affinity
    (their blocks carry state and must run in order); other units go to the least busy worker."""

    def __init__(self, runner: Any, n: int):
        self.runner = runner
        self.qs: list[queue.Queue] = [queue.Queue(maxsize=1) for _ in range(n)]
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.affinity: dict[int, int] = {}
        self.next = 0
        runner.stop = self.stop
        self.threads = [threading.Thread(target=self._work, args=(q,), daemon=True, name=f"fusion_bench-merge{i}")
                        for i, q in enumerate(self.qs)]
        for t in self.threads:
            t.start()

    def _work(self, q: queue.Queue) -> None:
        with torch.no_grad():
            while True:
                unit = q.get()
                if unit is _END:
                    return
                if self.error is not None:
                    continue
                try:
                    self.runner.handle(unit)
                except BaseException as e:
                    if self.error is None:  # the first error is the cause; later ones are waits it ended
                        self.error = e
                    self.stop.set()

    def _put(self, i: int, unit: Any) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.qs[i].put(unit, timeout=0.1)
                return
            except queue.Full:
                continue

    def submit(self, unit: tuple) -> None:
        if self.error is not None:
            raise self.error
        job = unit[1]
        if len(self.qs) == 1:
            i = 0
        elif job.protocol and unit[0] != "stats":  # a tensor's stats may spread; its blocks keep order
            i = self.affinity.get(id(job))
            if i is None:
                i = self.affinity[id(job)] = self._least_busy()
        else:
            i = self._least_busy()
        self._put(i, unit)

    def _least_busy(self) -> int:
        n = len(self.qs)
        order = [(self.next + k) % n for k in range(n)]
        self.next = (self.next + 1) % n
        return min(order, key=lambda i: self.qs[i].qsize())

    def finish(self) -> None:
        for i in range(len(self.qs)):
            self._put(i, _END)
        for t in self.threads:
            t.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.stop.set()
        if self.error is None and any(t.is_alive() for t in self.threads):
            self.error = RuntimeError("merge stopped")
        for q in self.qs:
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
            try:
                q.put_nowait(_END)
            except queue.Full:
                pass
        for t in self.threads:
            t.join(timeout=10)


def _units(plan: MergePlan, readers: dict[str, Any], base: str | None, names: list[str],
           widen: Any = None) -> Iterator[tuple]:
    """Work units in plan order: ('copy', job, row_start, tensor), ('stats', job, i, base, tensor),
    ('merge', job, row_start, base, tensors). Inputs of merge units are converted to the method's
    compute dtype here, in the reader thread (``widen``), so the conversion overlaps the merge."""
    def read(n: str, key: str, rows: tuple[int, int] | None) -> torch.Tensor:
        t = readers[n].read(key, rows)
        return widen(t) if widen is not None else t

    for j in plan.jobs:
        if j.mode == "copy":
            r = readers[j.copy_from]
            src_key = j.inputs[j.copy_from]
            if j.blocks:
                for s, e in j.blocks:
                    yield ("copy", j, s, r.read(src_key, (s, e)))
            else:
                yield ("copy", j, 0, r.read(src_key))
            continue
        key_of = j.inputs
        if j.stats and j.stats_blocks:  # one unit per (row block, model); the base block is read once
            for rows in j.blocks:
                b = readers[base].read(key_of[base], rows) if base is not None else None
                for i, n in enumerate(names):
                    yield ("stats", j, i, b, readers[n].read(key_of[n], rows))
                del b
        elif j.stats:
            full = (0, j.merge_rows) if j.merge_rows is not None else None
            b = readers[base].read(key_of[base], full) if base is not None else None
            for i, n in enumerate(names):
                yield ("stats", j, i, b, readers[n].read(key_of[n], full))
            del b
        for rows in (j.blocks or [None]):
            b = read(base, key_of[base], rows) if base is not None else None
            ts = [read(n, key_of[n], rows) for n in names]
            yield ("merge", j, rows[0] if rows else 0, b, ts)
        if j.tail_from is not None and j.merge_rows is not None and j.merge_rows < j.shape[0]:
            row_elems = max(1, j.out_bytes // max(1, j.shape[0] * dtype_size(j.dtype)))
            for s, e in iter_row_blocks(j.shape[0] - j.merge_rows, row_elems, DEFAULT_BLOCK_ELEMENTS):
                rows = (j.merge_rows + s, j.merge_rows + e)
                yield ("copy", j, rows[0], readers[j.tail_from].read(j.inputs.get(j.tail_from, j.key), rows))


def _check_finite(key: str, names: list[str], tensors: list[torch.Tensor]) -> None:
    from fusion_bench.methods.base import all_finite

    for n, t in zip(names, tensors):
        if not all_finite(t):
            raise ModelMismatchError(
                f"Model '{n}' has non-finite values (NaN/inf) in tensor '{key}'; fix or drop that checkpoint.")


class _Runner:
    def __init__(self, method: Any, plan: MergePlan, writer: ShardedWriter, names: list[str]):
        self.method = method
        self.plan = plan
        self.writer = writer
        self.names = names
        self.ctx: dict[str, BlockContext] = {}
        # the stats of one tensor (one unit per model) may run on different workers; its first merge block
        # waits here until all of them are in
        self.cond = threading.Condition()
        self.stop: threading.Event | None = None  # set by _Workers: a failed worker ends the waits here

    def _context(self, job: Job) -> BlockContext:
        with self.cond:
            ctx = self.ctx.get(job.key)
            if ctx is None:
                begin = getattr(self.method, "begin_blocks", None)
                rows = job.merge_rows if job.merge_rows is not None else job.shape[0]
                state = begin(job.key, (rows, *job.shape[1:]), self.names) if callable(begin) else None
                stats = [None] * len(self.names) if job.stats else None
                ctx = self.ctx[job.key] = BlockContext(stats=stats, state=state)
            return ctx

    def _await_stats(self, ctx: BlockContext) -> None:
        with self.cond:
            while ctx.stats is not None and ctx.done < len(ctx.stats):
                self.cond.wait(timeout=0.1)
                if self.stop is not None and self.stop.is_set():
                    raise RuntimeError("merge stopped")

    def handle(self, unit: tuple) -> None:
        kind, job = unit[0], unit[1]
        if kind == "copy":
            t = unit[3]
            if job.scale is not None and job.mode == "copy":
                t = (t.double() if t.dtype == torch.float64 else t.float()) * job.scale
            self.writer.write(job.key, t.to(job.dtype), row_start=unit[2])
            return
        m = self.method
        if kind == "stats":
            _, _, i, b, t = unit
            name = self.names[i]
            _check_finite(job.key, [name], [t])
            ctx = self._context(job)
            if job.stats_blocks:  # a partial statistic of one row block, added up; the model's last block finishes it
                part = m.block_stats_partial(job.key, b, t, name)
                with self.cond:
                    prev = ctx.partials.get(i)
                    acc = ctx.partials[i] = part if prev is None else m.add_block_stats(prev, part)
                    ctx.parts_done[i] = ctx.parts_done.get(i, 0) + 1
                    complete = ctx.parts_done[i] == len(job.blocks)
                if not complete:
                    return
                stat = m.combine_block_stats(job.key, acc, name)
            else:
                stat = m.block_stats(job.key, b, t, name)
            with self.cond:
                ctx.stats[i] = stat
                ctx.done += 1
                self.cond.notify_all()
            return
        _, _, row_start, b, ts = unit
        if job.protocol:
            ref = b if b is not None else ts[0]
            _check_finite(job.key, self.names, ts)
            cd = m.compute_dtype(ref.dtype)
            rows = (row_start, row_start + ref.shape[0])
            ctx = self._context(job)
            self._await_stats(ctx)
            out = m.merge_block(job.key, b.to(cd) if b is not None else None, [t.to(cd) for t in ts], self.names,
                                ctx, rows).to(ref.dtype)
            if job.blocks and rows[1] == job.blocks[-1][1]:
                self.ctx.pop(job.key, None)
        else:
            out = m.merge_one(job.key, b, ts, self.names)  # checked finite in its own dtype
        final = out.to(job.dtype)
        if job.protocol or final.dtype != out.dtype:  # a merged block is checked before it is written
            from fusion_bench.checks import check_merged_tensor

            check_merged_tensor(m, job.key, final)
        self.writer.write(job.key, final, row_start=row_start)


def _copy_side_files(pool: ModelPool, plan: MergePlan, folder: Path, tokenizer: bool = True) -> list[str]:
    """config.json (updated), generation config and (with ``tokenizer``) tokenizer files beside the weights."""
    copied: list[str] = []
    cfg_name = plan.config_from or pool.base_name()
    src = checkpoint_folder(pool, cfg_name) if cfg_name in pool else None
    if src is not None and src.is_dir():
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix in SIDE_FILE_SUFFIXES and not f.name.endswith(".index.json") and (
                    tokenizer or not f.name.startswith(TOKENIZER_FILE_PREFIXES)):
                shutil.copy2(f, folder / f.name)
                copied.append(f.name)
    tok = getattr(pool.config, "tokenizer", None)
    if tok and tokenizer:
        tp = Path(os.path.expanduser(str(tok)))
        if not tp.is_dir():
            from fusion_bench.modelpool.base import resolve_hf_path

            tp = resolve_hf_path(str(tok), "tokenizer")
        for f in sorted(tp.iterdir()):
            if f.is_file() and f.name.startswith(TOKENIZER_FILE_PREFIXES):
                shutil.copy2(f, folder / f.name)
                copied.append(f.name)
    cfg_path = folder / "config.json"
    if cfg_path.exists():
        from fusion_bench.io.checkpoint import read_json_object

        cfg = read_json_object(cfg_path, cfg_name)
        cfg.update(plan.config_updates)
        dtypes = {j.dtype for j in plan.jobs if j.dtype.is_floating_point}
        if len(dtypes) == 1:
            dname = str(next(iter(dtypes))).removeprefix("torch.")
            if "torch_dtype" in cfg:
                cfg["torch_dtype"] = dname
            cfg["dtype"] = dname
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return copied


def _widener(method: Any):
    """float16/bfloat16 -> float32 when that is the method's compute dtype (as merge_one would do)."""
    cd = getattr(method, "compute_dtype", None)
    if not callable(cd):
        return None
    targets = {dt for dt in (torch.float16, torch.bfloat16) if cd(dt) == torch.float32}

    def widen(t: torch.Tensor) -> torch.Tensor:
        return t.float() if t.dtype in targets else t

    return widen if targets else None


_MALLOPT_DONE = False


def _keep_freed_memory() -> None:
    """Let glibc keep freed blocks for reuse instead of unmapping them (no page faults on every new
    block buffer; RSS stays bounded by the peak of live buffers). Best effort, Linux glibc only."""
    global _MALLOPT_DONE
    if _MALLOPT_DONE or not sys.platform.startswith("linux"):
        return
    _MALLOPT_DONE = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: large blocks from the heap, not fresh mmaps
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: do not return freed heap memory at once
        libc.mallopt(-8, 2)  # M_ARENA_MAX: threads share two arenas, so freed blocks are reused across threads
    except Exception:  # pragma: no cover - other libc
        pass


def pool_input_paths(pool: Any) -> dict[str, Path]:
    """The pool's checkpoints on local disk (name -> path): an output never replaces them."""
    fn = getattr(pool, "input_paths", None)
    return dict(fn()) if callable(fn) else {}


def _progress(total: int, enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeRemainingColumn(), transient=True, disable=not enabled)


def merge_to_folder(method: Any, pool: ModelPool, out_dir: str | os.PathLike, *,
                    block_elements: int = DEFAULT_BLOCK_ELEMENTS, max_shard_size: int | str = "5GB",
                    prefetch: int = 1, overwrite: bool = False, progress: bool | None = None,
                    copy_side_files: bool | str = True, threads: int | None = 1,
                    workers: int = DEFAULT_WORKERS, overwrite_hint: str = "overwrite=True") -> dict[str, Any]:
    """Merge ``pool`` with ``method`` tensor by tensor and write the result to ``out_dir``.

    Args:
        method: a tensor-wise method (or one with ``stream_plan``).
        pool: the model pool (``_pretrained_`` is the base).
        out_dir: the output folder (sharded safetensors, config, generation config, tokenizer);
            written under a temporary name and renamed at the end.
        block_elements: elements per input in one row block of a large tensor.
        max_shard_size: maximum shard size ('5GB', '500MB', bytes).
        prefetch: work units read ahead (each holds one unit of every input).
        overwrite: replace an existing ``out_dir`` (only after the merge succeeded), and only if fusion_bench
            wrote it (it holds a ``.fusion_bench_output`` marker) and it holds no input of the merge. Without
            it an existing ``out_dir`` is refused before any work starts (see :mod:`fusion_bench.io.outputs`).
        progress: show a progress bar (default: when stderr is a terminal).
        copy_side_files: copy config.json, generation_config.json and tokenizer files ("no_tokenizer": all but the
            tokenizer files).
        threads: torch intra-op threads of the merging thread during the merge (None: unchanged).
            Default 1: the reader thread (I/O and dtype conversion) takes the other core, and
            single-threaded kernels avoid OpenMP hand-off costs on small blocks and busy machines.
        workers: merging threads. Units of different tensors (and row blocks of element-wise merges)
            run in parallel, and so do the per-model statistics of one tensor (e.g. the 8 magnitude
            rankings of a TIES merge); the row blocks of a tensor merged with the block protocol stay in
            order on one worker.
        overwrite_hint: how the caller's user passes ``overwrite`` (named in the error message).
    Returns:
        information on the merge: plan figures, wall time, shards written.
    """
    t0 = time.perf_counter()
    _keep_freed_memory()
    out_dir = Path(out_dir)
    guard = {"overwrite": overwrite, "inputs": pool_input_paths(pool), "what": "merged model folder",
             "hint": overwrite_hint}
    check_output(out_dir, kind="dir", **guard)  # before any work: no hour of merging lost to this error
    if block_elements < 1:
        raise ConfigError(f"block_elements={block_elements} must be positive.")
    shard_bytes = parse_size(max_shard_size)
    names = pool.model_names
    base = pool.base_name()
    readers = {n: open_reader(pool, n) for n in dict.fromkeys([base, *names])}
    locked = False
    try:
        acquire_lock(out_dir, guard["what"])  # held for the whole merge: a second run to out_dir fails now
        locked = True
        plan = plan_merge(method, pool, block_elements=block_elements, prefetch=prefetch, readers=readers)
        if plan.mismatches:
            more = f" (and {len(plan.mismatches) - 1} more; run a dry run to list them)" if len(plan.mismatches) > 1 else ""
            raise ModelMismatchError(f"Cannot merge: {plan.mismatches[0]}{more}. Use checkpoints of one "
                                     "architecture, or for a vocabulary-size difference use modelpool.type=causal_lm "
                                     "with modelpool.vocab_policy.")
        if callable(getattr(method, "prepare", None)) and not callable(getattr(method, "stream_plan", None)):
            merge_keys = [j.key for j in plan.jobs if j.mode == "merge"]
            method.prepare(ReaderSource(readers[base]) if pool.has_pretrained else None,
                           [ReaderSource(readers[n]) for n in names], names, merge_keys)
        in_base = base if pool.has_pretrained else None
        if callable(getattr(method, "stream_plan", None)):
            in_base = None
        show = sys.stderr.isatty() if progress is None else progress
        with output_dir(out_dir, **guard) as tmp:
            writer = ShardedWriter(tmp, [(j.key, j.shape, j.dtype) for j in plan.jobs], max_shard_bytes=shard_bytes,
                                   metadata=safetensors_metadata("merged model"), dest=out_dir)
            try:
                runner = _Runner(method, plan, writer, names)
                pre = _Prefetcher(_units(plan, readers, in_base, names, _widener(method)), prefetch)
                threads_before = torch.get_num_threads()
                if threads is not None:
                    torch.set_num_threads(max(1, threads))
                pre.start()
                pool_ = _Workers(runner, max(1, workers))
                try:
                    with torch.no_grad(), _progress(len(plan.jobs), show) as prog:
                        task = prog.add_task(f"merging ({method.name})", total=len(plan.jobs))
                        last = None
                        for unit in pre:
                            pool_.submit(unit)
                            if unit[1] is not last:
                                prog.advance(task)
                                last = unit[1]
                        pool_.finish()
                finally:
                    pool_.close()
                    pre.close()
                    torch.set_num_threads(threads_before)
                weight_map = writer.finish()
            finally:
                writer.close()
            side = _copy_side_files(pool, plan, tmp, tokenizer=copy_side_files != "no_tokenizer") \
                if copy_side_files else []
            shards = sorted({v for v in weight_map.values()})
    finally:
        for r in readers.values():
            r.close()
        if locked:
            release_lock(out_dir)
    info = plan.as_dict()
    info.update({"engine": "streaming", "output": str(out_dir), "shards": shards, "side_files": side,
                 "merge_wall_time_s": round(time.perf_counter() - t0, 4), "block_elements": block_elements})
    return info


# ----------------------------------------------------------------------------------------------
# program integration
# ----------------------------------------------------------------------------------------------
def streaming_applicable(method: Any, pool: ModelPool) -> bool:
    """True when ``method`` merges tensor by tensor (or has a stream plan) and every model is on disk."""
    from fusion_bench.methods.base import TensorwiseMerge

    if not (isinstance(method, TensorwiseMerge) or callable(getattr(method, "stream_plan", None))):
        return False
    return all(checkpoint_folder(pool, n) is not None for n in pool.names) and _files_are_the_module(pool)


def _files_are_the_module(pool: ModelPool) -> bool:
    """False when the checkpoints hold different tensor names but the in-memory engine can map them to
    the merged module: a CLIP vision tower of a full CLIP base, or names that differ by a prefix. The
    streaming engine merges the base checkpoint's tensors under their file names and would stop."""
    from fusion_bench.engine.validate import aligned_sources, validate_sources

    sources = {n: pool.source(n) for n in pool.names}
    base = pool.base_name()
    base_keys = set(sources[base].keys())
    if all(set(src.keys()) == base_keys for src in sources.values()):
        return True
    keys_of = getattr(pool, "module_state_keys", None)
    module_keys = keys_of(base) if callable(keys_of) else None
    aligned = aligned_sources(base, sources, module_keys) if module_keys is not None else None
    if aligned is None:
        return True  # the streaming plan reports the mismatches
    views, key_map = aligned
    try:
        validate_sources(base, views, keys=[key_map[k] for k in module_keys])
    except ModelMismatchError:
        return True  # a real mismatch: the streaming plan reports it
    return False


class StreamedModel(torch.nn.Module):
    """Stand-in for a merged model that was streamed to disk: parameters on the meta device (shapes
    only, no memory) so that reports can count them; load the folder to use the model."""

    def __init__(self, plan: MergePlan, folder: str | os.PathLike):
        super().__init__()
        self.folder = str(folder)
        self._names = []
        for i, j in enumerate(plan.jobs):
            if j.dtype.is_floating_point:
                self.register_parameter(f"p{i}", torch.nn.Parameter(torch.empty(j.shape, dtype=j.dtype, device="meta"),
                                                                    requires_grad=False))
                self._names.append(j.key)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - not callable by design
        raise TypeError(f"The merged model was streamed to {self.folder}; load it with from_pretrained.")


def run_streaming(method: Any, pool: ModelPool, out_dir: str | os.PathLike, *, load: bool = False,
                  **kwargs: Any) -> Any:
    """Stream the merge to ``out_dir`` and return a FusionResult (the model loaded from the folder when
    ``load``, else a :class:`StreamedModel` of meta tensors)."""
    from fusion_bench.methods.base import FusionResult
    from fusion_bench.modelpool.base import resolve_model_class

    info = merge_to_folder(method, pool, out_dir, **kwargs)
    readers = {n: open_reader(pool, n) for n in dict.fromkeys([pool.base_name(), *pool.model_names])}
    try:
        base_numel = sum(readers[pool.base_name()].meta(k).numel for k in readers[pool.base_name()].keys()
                         if readers[pool.base_name()].meta(k).dtype.is_floating_point)
        plan = plan_merge(method, pool, readers=readers) if not load else None
    finally:
        for r in readers.values():
            r.close()
    if load:
        cls = resolve_model_class(getattr(pool.config, "model_class", "auto"))
        try:
            model = cls.from_pretrained(out_dir).eval()
        except Exception as e:
            raise CheckpointError(f"The merged folder {out_dir} does not load with {cls.__name__}: {e}") from e
        out_numel = sum(p.numel() for p in model.parameters())
    else:
        model = StreamedModel(plan, out_dir)
        out_numel = sum(p.numel() for p in model.parameters())
    meta = {"method": method.name, "variant": method.variant, "hyperparameters": method.hyperparameters(),
            "method_wall_time_s": info["merge_wall_time_s"], "extra_parameters": int(out_numel - base_numel),
            "streaming": info}
    more = getattr(method, "streaming_metadata", None)  # figures only the method knows (e.g. active parameters)
    if callable(more):
        meta.update(more())
    return FusionResult("merged", model=model, metadata=meta)
