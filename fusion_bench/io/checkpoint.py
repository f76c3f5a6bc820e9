"""Lazy, read-only views of checkpoints as tensor sources.

A :class:`TensorSource` lists tensor names (in file order), tells each tensor's shape and dtype
without reading it, and reads one tensor at a time. Sources exist for safetensors files and
sharded folders (``model.safetensors.index.json``), ``.bin``/``.pt`` files (memory-mapped where
torch allows), in-memory state dicts and live ``nn.Module``s.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fusion_bench.errors import CheckpointError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _n, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_n] = getattr(torch, _attr)


#: bytes per element of each safetensors dtype (the format's own table, independent of torch)
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
#: the safetensors library's bound on the header length
MAX_HEADER_BYTES = 100_000_000
_FIX = "Re-download or re-save that file."


def one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, shortened: library errors can span pages."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if len(msg) > limit:
        msg = msg[:limit] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors header: dtype name, shape, data offsets (relative to the data section)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def parse_safetensors_header(path: str | os.PathLike, model: str) -> tuple[dict[str, str], list[HeaderEntry], int]:
    """Read and validate a safetensors header as strictly as the format (and the safetensors library) does.

    Checks: 8-byte length; header length within bounds and inside the file; UTF-8 JSON object
    without duplicate keys; ``__metadata__`` a str -> str map; every entry has exactly ``dtype``,
    ``shape``, ``data_offsets`` of the right types, a known dtype, a non-negative integer shape,
    ``begin <= end`` and ``end - begin == numel * itemsize``; entries sorted by offset cover the
    data section from 0 without holes or overlaps and end exactly at the end of the file.

    Args:
        path: the ``.safetensors`` file.
        model: the model name used in error messages.
    Returns:
        (metadata, entries in file order, absolute offset of the data section).
    Raises:
        CheckpointError: one line naming the model, the file and (where one is at fault) the tensor.
    """
    path = Path(path)

    def bad(why: str, tensor: str | None = None) -> CheckpointError:
        where = f", tensor '{tensor}'" if tensor is not None else ""
        return CheckpointError(f"Model '{model}': invalid safetensors file {path}{where}: {why}. {_FIX}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise bad(f"the file is {size} bytes, too short for the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n < 2 or n > MAX_HEADER_BYTES:
                raise bad(f"header length {n} is out of bounds (2 to {MAX_HEADER_BYTES} bytes)")
            if 8 + n > size:
                raise bad(f"header length {n} runs past the end of the {size}-byte file (truncated?)")
            raw = fh.read(n)
    except OSError as e:
        raise CheckpointError(f"Model '{model}': cannot read {path}: {one_line(e)}. {_FIX}") from e
    if len(raw) != n:
        raise bad("the file changed while being read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"the header is not UTF-8 ({e.reason} at byte {e.start})") from e
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise bad(f"the header names '{e.args[0]}' twice (readers would disagree on which entry counts)") from e
    except (ValueError, RecursionError) as e:
        raise bad(f"the header is not valid JSON ({one_line(e)})") from e
    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ must map strings to strings")
    entries = []
    for k, v in header.items():
        if not isinstance(v, dict) or set(v) != {"dtype", "shape", "data_offsets"}:
            got = sorted(v) if isinstance(v, dict) else type(v).__name__
            raise bad(f"entry must have exactly dtype, shape, data_offsets (got {got})", k)
        dt, shape, offs = v["dtype"], v["shape"], v["data_offsets"]
        if not isinstance(dt, str) or dt not in _ST_ITEMSIZE or dt not in _ST_DTYPES:
            raise bad(f"unsupported dtype {dt!r}", k)
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"shape {shape!r} is not a list of non-negative integers", k)
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) and o >= 0 for o in offs)):
            raise bad(f"data_offsets {offs!r} is not a pair of non-negative integers", k)
        b, e = offs
        if b > e:
            raise bad(f"data_offsets {offs} begin after they end", k)
        numel = 1
        for d in shape:
            numel *= d
        if e - b != numel * _ST_ITEMSIZE[dt]:
            raise bad(f"data_offsets {offs} hold {e - b} bytes but shape {shape} of {dt} needs "
                      f"{numel * _ST_ITEMSIZE[dt]}", k)
        entries.append(HeaderEntry(k, dt, tuple(shape), b, e))
    entries.sort(key=lambda t: (t.begin, t.end))
    pos = 0
    for t in entries:
        if t.begin != pos:
            why = "overlaps the previous tensor" if t.begin < pos else f"leaves a hole of {t.begin - pos} bytes"
            raise bad(f"data_offsets [{t.begin}, {t.end}] {why} (expected to start at {pos})", t.name)
        pos = t.end
    data_start = 8 + n
    if data_start + pos != size:
        raise bad(f"the tensors end at byte {data_start + pos} but the file has {size} bytes "
                  + ("(truncated)" if data_start + pos > size else "(trailing bytes)"))
    return meta, entries, data_start


def read_json_object(path: str | os.PathLike, model: str, what: str = "") -> dict:
    """Read a JSON file that must hold an object (``config.json``, shard indexes).

    Raises:
        CheckpointError: one line naming the model and the file when it cannot be read, is not UTF-8,
            not JSON (or nested too deeply), or not an object.
    """
    path = Path(path)
    what = what or path.name

    def bad(why: str, e: BaseException | None = None) -> CheckpointError:
        return CheckpointError(f"Model '{model}': {what} {path} {why}. {_FIX}")

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise bad(f"cannot be read ({one_line(e)})") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"is not UTF-8 ({e.reason} at byte {e.start})") from e
    try:
        obj = json.loads(text)
    except RecursionError as e:
        raise bad("is nested too deeply to be a valid JSON file") from e
    except ValueError as e:
        raise bad(f"is not valid JSON ({one_line(e)})") from e
    if not isinstance(obj, dict):
        raise bad(f"holds a JSON {type(obj).__name__}, not an object")
    return obj


def read_weight_map(index: str | os.PathLike, model: str) -> dict[str, str]:
    """The ``weight_map`` (tensor -> shard file name) of a shard index, checked.

    Raises:
        CheckpointError: the index is unreadable, not a JSON object, lacks a ``weight_map`` mapping
            tensor names to shard file names, or names a shard outside its folder.
    """
    index = Path(index)
    obj = read_json_object(index, model, "shard index")
    wm = obj.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"Model '{model}': shard index {index} has no 'weight_map' object (tensor name -> "
                              f"shard file). {_FIX}")
    for k, f in wm.items():
        if not isinstance(f, str) or not f or Path(f).name != f or f in (".", ".."):
            raise CheckpointError(f"Model '{model}': shard index {index} maps tensor '{k}' to {f!r}, not a shard "
                                  f"file name in that folder. {_FIX}")
    return wm


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def _load_weights_only(f: Path):
    """``torch.load`` with ``weights_only=True`` (tensors and plain containers only, never code); memory-mapped
    where the file's format allows (the legacy non-zip format does not)."""
    import zipfile

    mmap = zipfile.is_zipfile(f)
    return torch.load(f, map_location="cpu", mmap=mmap, weights_only=True)


def _check_shards_exist(files: list[Path], idx: Path, model: str) -> None:
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"Model '{model}': shard {missing[0]} named in {idx} does not exist; the download "
                              "is incomplete. Re-download the model.")


class TensorSource:
    """Base class: a named, read-only collection of tensors."""

    name: str = "<model>"

    def keys(self) -> list[str]:
        raise NotImplementedError

    def meta(self, key: str) -> TensorMeta:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def content_hash(self) -> str:
        """A hash of the checkpoint content (file hashes for files, tensor bytes otherwise)."""
        raise NotImplementedError

    # conveniences
    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def metas(self) -> dict[str, TensorMeta]:
        return {k: self.meta(k) for k in self.keys()}

    def to_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in self.keys()}

    def close(self) -> None:
        pass

    def _missing(self, key: str) -> CheckpointError:
        from fusion_bench.errors import did_you_mean

        return CheckpointError(f"Model '{self.name}' has no tensor '{key}'.{did_you_mean(key, self.keys())}")


def _hash_files(files: list[Path]) -> str:
    """Hash of files by content. Large files are hashed by size + sampled blocks to stay fast."""
    h = hashlib.sha256()
    for f in sorted(files):
        size = f.stat().st_size
        h.update(f.name.encode())
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            if size <= 64 << 20:
                h.update(fh.read())
            else:  # first, middle and last 4 MiB plus the size: a fingerprint, stated as such
                for off in (0, size // 2, max(0, size - (4 << 20))):
                    fh.seek(off)
                    h.update(fh.read(4 << 20))
    return h.hexdigest()


class SafetensorsSource(TensorSource):
    """A safetensors file, or a folder of them (sharded with an index, or a single model file)."""

    def __init__(self, path: str | os.PathLike, name: str | None = None):
        from safetensors import safe_open

        self._safe_open = safe_open
        path = Path(path)
        self.path = path
        self.name = name or path.name
        if path.is_dir():
            idx = path / SAFE_INDEX
            if idx.exists():
                weight_map = read_weight_map(idx, self.name)
                files = sorted(set(weight_map.values()))
                self.files = [path / f for f in files]
                _check_shards_exist(self.files, idx, self.name)
            else:
                self.files = sorted(path.glob("*.safetensors"))
            if not self.files:
                raise CheckpointError(f"Model '{self.name}': no .safetensors files in {path}.")
        elif path.is_file():
            self.files = [path]
        else:
            raise CheckpointError(f"Model '{self.name}': checkpoint path {path} does not exist.")
        self._key_file: dict[str, Path] = {}
        self._meta: dict[str, TensorMeta] = {}
        self._order: list[str] = []
        for f in self.files:
            self._read_header(f)
        self._handles: dict[Path, object] = {}

    def _read_header(self, f: Path) -> None:
        _meta, entries, _start = parse_safetensors_header(f, self.name)  # strict: before any tensor byte
        for t in entries:  # file order
            if t.name in self._key_file:
                raise CheckpointError(f"Model '{self.name}': tensor '{t.name}' appears in two shards "
                                      f"({self._key_file[t.name].name} and {f.name}). {_FIX}")
            self._key_file[t.name] = f
            self._meta[t.name] = TensorMeta(t.shape, _ST_DTYPES[t.dtype])
            self._order.append(t.name)

    def keys(self) -> list[str]:
        return list(self._order)

    def meta(self, key: str) -> TensorMeta:
        if key not in self._meta:
            raise self._missing(key)
        return self._meta[key]

    def file_of(self, key: str) -> Path:
        return self._key_file[key]

    def _handle(self, f: Path):
        h = self._handles.get(f)
        if h is None:
            try:
                h = self._safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:
                raise CheckpointError(f"Model '{self.name}': cannot open {f} ({one_line(e)}). {_FIX}") from e
            self._handles[f] = h
        return h

    def get(self, key: str) -> torch.Tensor:
        if key not in self._key_file:
            raise self._missing(key)
        f = self._key_file[key]
        try:
            return self._handle(f).get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"Model '{self.name}': cannot read tensor '{key}' from {f} ({one_line(e)}). "
                                  f"{_FIX}") from e

    def get_slice(self, key: str):
        """A lazily sliceable view (``view[a:b]`` reads only those rows)."""
        if key not in self._key_file:
            raise self._missing(key)
        f = self._key_file[key]
        try:
            return self._handle(f).get_slice(key)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"Model '{self.name}': cannot read tensor '{key}' from {f} ({one_line(e)}). "
                                  f"{_FIX}") from e

    def content_hash(self) -> str:
        return _hash_files(self.files)

    def close(self) -> None:
        self._handles.clear()


class TorchFileSource(TensorSource):
    """A ``.bin``/``.pt``/``.pth`` state dict file (or a sharded ``pytorch_model.bin`` folder)."""

    def __init__(self, path: str | os.PathLike, name: str | None = None):
        path = Path(path)
        self.path = path
        self.name = name or path.name
        if path.is_dir():
            idx = path / BIN_INDEX
            if idx.exists():
                files = sorted(set(read_weight_map(idx, self.name).values()))
                self.files = [path / f for f in files]
                _check_shards_exist(self.files, idx, self.name)
            else:
                self.files = sorted(list(path.glob("*.bin")) + list(path.glob("*.pt")) + list(path.glob("*.pth")))
            if not self.files:
                raise CheckpointError(f"Model '{self.name}': no .bin/.pt files in {path}.")
        elif path.is_file():
            self.files = [path]
        else:
            raise CheckpointError(f"Model '{self.name}': checkpoint path {path} does not exist.")
        self._sd: dict[str, torch.Tensor] = {}
        for f in self.files:
            try:
                obj = _load_weights_only(f)
            except Exception as e:  # never unpickles code: weights_only=True refuses anything but tensors
                import pickle

                why = ("it holds pickled objects other than tensors, refused because unpickling them could run code"
                       if isinstance(e, pickle.UnpicklingError) else one_line(e))
                raise CheckpointError(
                    f"Model '{self.name}': cannot load {f} as a state dict ({why}). Only tensors are "
                    "loaded (weights_only=True): re-save that file with torch.save(model.state_dict()), or "
                    "re-download it."
                ) from e
            if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
                obj = obj["state_dict"]
            if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
                raise CheckpointError(f"Model '{self.name}': {f} does not hold a mapping of names to tensors. "
                                      "Re-save it with torch.save(model.state_dict()).")
            self._sd.update(obj)

    def keys(self) -> list[str]:
        return list(self._sd)

    def meta(self, key: str) -> TensorMeta:
        if key not in self._sd:
            raise self._missing(key)
        t = self._sd[key]
        return TensorMeta(tuple(t.shape), t.dtype)

    def get(self, key: str) -> torch.Tensor:
        if key not in self._sd:
            raise self._missing(key)
        return self._sd[key]

    def content_hash(self) -> str:
        return _hash_files(self.files)


class StateDictSource(TensorSource):
    """An in-memory mapping of names to tensors."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], name: str = "<state_dict>"):
        self._sd = dict(state_dict)
        self.name = name

    def keys(self) -> list[str]:
        return list(self._sd)

    def meta(self, key: str) -> TensorMeta:
        if key not in self._sd:
            raise self._missing(key)
        t = self._sd[key]
        return TensorMeta(tuple(t.shape), t.dtype)

    def get(self, key: str) -> torch.Tensor:
        if key not in self._sd:
            raise self._missing(key)
        return self._sd[key]

    def content_hash(self) -> str:
        from fusion_bench.utils import sha256_tensors

        return sha256_tensors(self._sd)


class ModuleSource(StateDictSource):
    """A live ``nn.Module`` (its ``state_dict()``, tensors shared, not copied)."""

    def __init__(self, module: torch.nn.Module, name: str = "<module>"):
        super().__init__({k: v.detach() for k, v in module.state_dict().items()}, name=name)


def open_checkpoint(path: str | os.PathLike, name: str | None = None) -> TensorSource:
    """Open a checkpoint file or folder as a lazy tensor source, choosing the format by its files."""
    p = Path(path)
    if p.is_dir():
        if (p / SAFE_INDEX).exists() or any(p.glob("*.safetensors")):
            return SafetensorsSource(p, name)
        return TorchFileSource(p, name)
    if p.suffix == ".safetensors":
        return SafetensorsSource(p, name)
    if p.suffix in (".bin", ".pt", ".pth"):
        return TorchFileSource(p, name)
    if not p.exists():
        raise CheckpointError(f"Model '{name or p.name}': checkpoint path {p} does not exist.")
    raise CheckpointError(
        f"Model '{name or p.name}': unknown checkpoint format {p.suffix!r}; use .safetensors, .bin, .pt or a folder."
    )
