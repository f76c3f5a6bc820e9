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
                weight_map = json.loads(idx.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
                self.files = [path / f for f in files]
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
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
        except Exception as e:
            raise CheckpointError(f"Model '{self.name}': cannot read safetensors header of {f}: {e}") from e
        items = [(k, v) for k, v in header.items() if k != "__metadata__"]
        items.sort(key=lambda kv: kv[1]["data_offsets"][0])  # file order
        for k, v in items:
            if k in self._key_file:
                raise CheckpointError(f"Model '{self.name}': tensor '{k}' appears in two shards.")
            if v["dtype"] not in _ST_DTYPES:
                raise CheckpointError(f"Model '{self.name}': tensor '{k}' has unsupported dtype {v['dtype']}.")
            self._key_file[k] = f
            self._meta[k] = TensorMeta(tuple(v["shape"]), _ST_DTYPES[v["dtype"]])
            self._order.append(k)

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
            h = self._safe_open(str(f), framework="pt", device="cpu")
            self._handles[f] = h
        return h

    def get(self, key: str) -> torch.Tensor:
        if key not in self._key_file:
            raise self._missing(key)
        return self._handle(self._key_file[key]).get_tensor(key)

    def get_slice(self, key: str):
        """A lazily sliceable view (``view[a:b]`` reads only those rows)."""
        if key not in self._key_file:
            raise self._missing(key)
        return self._handle(self._key_file[key]).get_slice(key)

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
                files = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
                self.files = [path / f for f in files]
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
                obj = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise CheckpointError(
                    f"Model '{self.name}': cannot load {f} as a state dict ({e}). Only tensors are "
                    "loaded (weights_only=True); save the model's state_dict(), not the module."
                ) from e
            if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
                obj = obj["state_dict"]
            if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                raise CheckpointError(f"Model '{self.name}': {f} does not hold a mapping of names to tensors.")
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
