"""Out-of-core safetensors I/O: a reader of byte ranges without mmap, and a sharded writer.

The reader parses the safetensors headers itself and reads tensors (or ranges of rows) with
``os.preadv`` into freshly allocated buffers, so the process only holds what it asked for: pages
of the input files stay in the kernel's page cache and never count in this process's RSS (as
they do with ``safe_open``, which memory-maps the files).

The writer knows every output tensor's name, shape and dtype before the first byte is written
(the streaming engine plans the merge first). It assigns tensors to shards, writes each shard's
complete header up front and then writes each tensor's bytes (or a range of its rows) at their
final offset with ``os.pwrite``: no output buffer, no header patching, no copy at the end. The
safetensors layout is: 8-byte little-endian header length, JSON header whose ``data_offsets`` are
relative to the end of the header, then the data.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fusion_bench.errors import CheckpointError
from fusion_bench.io.atomic import os_error_message
from fusion_bench.io.checkpoint import (
    _FIX,
    _ST_DTYPES,
    SAFE_INDEX,
    HeaderEntry,
    TensorMeta,
    parse_safetensors_header,
    read_weight_map,
)

_DTYPE_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's bytes are: file, absolute byte offset, shape and dtype."""

    file: Path
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def meta(self) -> TensorMeta:
        return TensorMeta(self.shape, self.dtype)

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (one index of the first dimension); the whole tensor for scalars."""
        n = dtype_size(self.dtype)
        for s in self.shape[1:]:
            n *= s
        return n

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.row_bytes * self.rows if self.shape else dtype_size(self.dtype)


def _read_header(path: Path, model: str) -> tuple[dict[str, str], list[HeaderEntry], int]:
    """The validated header of ``path``: (metadata, entries in file order, data start); see
    :func:`fusion_bench.io.checkpoint.parse_safetensors_header` (as strict as the safetensors library)."""
    return parse_safetensors_header(path, model)


class StreamReader:
    """Read tensors, or ranges of their rows, from safetensors files with ``preadv`` (no mmap).

    Args:
        path: a ``.safetensors`` file, or a folder (sharded with ``model.safetensors.index.json``, or
            holding ``*.safetensors`` files).
        name: the model name used in error messages.
    """

    def __init__(self, path: str | os.PathLike, name: str | None = None):
        path = Path(path)
        self.name = name or path.name
        self._fds: dict[Path, int] = {}
        if path.is_dir():
            idx = path / SAFE_INDEX
            if idx.exists():
                weight_map = read_weight_map(idx, self.name)
                files = [path / f for f in dict.fromkeys(weight_map.values())]
                missing = [f for f in files if not f.is_file()]
                if missing:
                    raise CheckpointError(f"Model '{self.name}': shard {missing[0]} named in {idx} does not exist; "
                                          "the download is incomplete.")
            else:
                files = sorted(path.glob("*.safetensors"))
        elif path.is_file():
            files = [path]
        else:
            raise CheckpointError(f"Model '{self.name}': checkpoint path {path} does not exist.")
        if not files:
            raise CheckpointError(f"Model '{self.name}': no .safetensors files in {path}; convert the checkpoint "
                                  "to safetensors for streaming merges.")
        self.path = path
        self.files = files
        self.metadata: dict[str, str] = {}
        self._loc: dict[str, TensorLocation] = {}
        for f in files:
            meta, entries, data_start = _read_header(f, self.name)  # validated before any tensor byte is read
            self.metadata.update(meta)
            for t in entries:
                if t.name in self._loc:
                    raise CheckpointError(f"Model '{self.name}': tensor '{t.name}' appears in two shards ({f.name} "
                                          f"and {self._loc[t.name].file.name}). {_FIX}")
                loc = TensorLocation(f, data_start + t.begin, t.shape, _ST_DTYPES[t.dtype])
                if t.end - t.begin != loc.nbytes:  # itemsize tables agree; kept as a guard
                    raise CheckpointError(f"Model '{self.name}': tensor '{t.name}' in {f} has inconsistent "
                                          f"offsets. {_FIX}")
                self._loc[t.name] = loc
        self._fds: dict[Path, int] = {}

    # -- queries ---------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names in file order (shard by shard, by offset)."""
        return list(self._loc)

    def __contains__(self, key: str) -> bool:
        return key in self._loc

    def location(self, key: str) -> TensorLocation:
        loc = self._loc.get(key)
        if loc is None:
            from fusion_bench.errors import did_you_mean

            raise CheckpointError(f"Model '{self.name}' has no tensor '{key}'.{did_you_mean(key, self._loc)}")
        return loc

    def meta(self, key: str) -> TensorMeta:
        return self.location(key).meta

    def total_bytes(self) -> int:
        return sum(loc.nbytes for loc in self._loc.values())

    # -- reading ---------------------------------------------------------------------------------
    def _fd(self, f: Path) -> int:
        fd = self._fds.get(f)
        if fd is None:
            fd = os.open(f, os.O_RDONLY)
            self._fds[f] = fd
        return fd

    def _pread_into(self, f: Path, offset: int, buf: torch.Tensor) -> None:
        view = memoryview(buf.numpy()).cast("B")
        fd = self._fd(f)
        done, total = 0, len(view)
        while done < total:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"Model '{self.name}': unexpected end of file in {f} at byte {offset + done}.")
            done += n

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read tensor ``key`` (or rows ``[start, stop)`` of its first dimension) into new memory."""
        loc = self.location(key)
        if rows is None or not loc.shape:
            start, stop = 0, loc.rows
            shape = loc.shape
        else:
            start, stop = rows
            if not 0 <= start <= stop <= loc.rows:
                raise CheckpointError(f"Rows {rows} out of range for tensor '{key}' of shape {list(loc.shape)}.")
            shape = (stop - start, *loc.shape[1:])
        nbytes = (stop - start) * loc.row_bytes if loc.shape else loc.nbytes
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self._pread_into(loc.file, loc.offset + start * loc.row_bytes, buf)
        return buf.view(loc.dtype).view(shape)

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def __del__(self) -> None:  # pragma: no cover - best effort
        self.close()


def shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


class ShardedWriter:
    """Write planned tensors into sharded safetensors files (headers first, data by ``pwrite``).

    Args:
        folder: where the shards (and ``model.safetensors.index.json`` for more than one) go; it
            must exist (the engine passes the temporary folder of an atomic output).
        plan: ``(name, shape, dtype)`` of every output tensor, in the order they are laid out.
        max_shard_bytes: a shard is closed before a tensor that would make it larger (a tensor larger
            than this gets a shard of its own).
        metadata: the ``__metadata__`` of every shard (``{"format": "pt"}`` by default, which
            transformers expects).
        dest: the final output path named in error messages (default ``folder``); an OSError while
            writing (disk full, read-only filesystem) becomes a one-line CheckpointError naming it.
    """

    def __init__(self, folder: str | os.PathLike, plan: Sequence[tuple[str, Sequence[int], torch.dtype]],
                 max_shard_bytes: int = 5 * 2**30, metadata: dict[str, str] | None = None,
                 dest: str | os.PathLike | None = None):
        self.folder = Path(folder)
        self.dest = Path(dest) if dest is not None else self.folder
        self.metadata = {"format": "pt", **(metadata or {})}
        groups: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        seen: set[str] = set()
        for name, shape, dtype in plan:
            if name in seen:
                raise CheckpointError(f"Output tensor '{name}' is planned twice.")
            seen.add(name)
            if dtype not in _DTYPE_NAMES:
                raise CheckpointError(f"Output tensor '{name}' has dtype {dtype} that safetensors cannot store.")
            shape = tuple(int(s) for s in shape)
            nb = dtype_size(dtype)
            for s in shape:
                nb *= s
            if groups[-1] and size + nb > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, shape, dtype, nb))
            size += nb
        n = len(groups)
        self.files: list[Path] = []
        self._loc: dict[str, TensorLocation] = {}
        self._fds: list[int] = []
        self._written: dict[str, int] = {}
        self.total_size = 0
        try:
            for i, g in enumerate(groups):
                path = self.folder / shard_name(i, n)
                header: dict = {"__metadata__": self.metadata}
                off = 0
                for name, shape, dtype, nb in g:
                    header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + nb]}
                    off += nb
                hb = json.dumps(header, separators=(",", ":")).encode()
                hb += b" " * (-len(hb) % 8)
                data_start = 8 + len(hb)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                os.pwrite(fd, len(hb).to_bytes(8, "little") + hb, 0)
                os.ftruncate(fd, data_start + off)
                self.files.append(path)
                for name, shape, dtype, _nb in g:
                    s = header[name]["data_offsets"][0]
                    self._loc[name] = TensorLocation(path, data_start + s, shape, dtype)
                    self._written[name] = 0
                self.total_size += off
        except OSError as e:
            self.close()
            raise CheckpointError(os_error_message(e, self.dest, "merged model")) from e
        self._fd_of = dict(zip(self.files, self._fds))
        self._lock = threading.Lock()

    def location(self, key: str) -> TensorLocation:
        if key not in self._loc:
            raise CheckpointError(f"Output tensor '{key}' was not planned.")
        return self._loc[key]

    def write(self, key: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        """Write ``tensor`` as tensor ``key`` (or as its rows from ``row_start`` on)."""
        loc = self.location(key)
        if tensor.dtype != loc.dtype:
            raise CheckpointError(f"Output tensor '{key}': got dtype {tensor.dtype}, planned {loc.dtype}.")
        expect = loc.shape[1:] if loc.shape else ()
        got = tuple(tensor.shape[1:]) if loc.shape else tuple(tensor.shape)
        nrows = tensor.shape[0] if loc.shape else 1
        if got != expect or row_start + nrows > loc.rows:
            raise CheckpointError(f"Output tensor '{key}': got shape {list(tensor.shape)} at row {row_start}, "
                                  f"planned {list(loc.shape)}.")
        t = tensor.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if nbytes:
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            fd = self._fd_of[loc.file]
            off = loc.offset + row_start * loc.row_bytes
            done = 0
            try:
                while done < nbytes:
                    done += os.pwrite(fd, view[done:], off + done)
            except OSError as e:
                raise CheckpointError(os_error_message(e, self.dest, "merged model")) from e
        with self._lock:  # several merging threads write concurrently (pwrite itself is positional)
            self._written[key] += nrows

    def missing(self) -> list[str]:
        """Planned tensors not (completely) written yet."""
        return [k for k, loc in self._loc.items() if self._written[k] < loc.rows]

    def finish(self) -> dict[str, str]:
        """Check that everything was written, flush, write the index (several shards); return the weight map."""
        missing = self.missing()
        if missing:
            raise CheckpointError(f"Output tensors {missing[:5]} were planned but not written.")
        weight_map = {k: loc.file.name for k, loc in self._loc.items()}
        try:
            for fd in self._fds:
                os.fsync(fd)
            self.close()
            if len(self.files) > 1:
                index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
                (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2))
        except OSError as e:
            self.close()
            raise CheckpointError(os_error_message(e, self.dest, "merged model")) from e
        return weight_map

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


def iter_row_blocks(rows: int, row_elems: int, max_block_elems: int) -> Iterable[tuple[int, int]]:
    """Split ``rows`` rows of ``row_elems`` elements into ``[start, stop)`` blocks of at most
    ``max_block_elems`` elements (at least one row per block)."""
    per = max(1, max_block_elems // max(1, row_elems))
    for s in range(0, rows, per):
        yield s, min(rows, s + per)
