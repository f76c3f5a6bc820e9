"""Checkpoint I/O: lazy tensor reading and atomic writing."""

from fusion_bench.io.atomic import atomic_dir, atomic_file, atomic_path
from fusion_bench.io.checkpoint import (
    ModuleSource,
    SafetensorsSource,
    StateDictSource,
    TensorMeta,
    TensorSource,
    TorchFileSource,
    open_checkpoint,
)

__all__ = [
    "atomic_dir", "atomic_file", "atomic_path", "TensorMeta", "TensorSource", "SafetensorsSource", "TorchFileSource",
    "StateDictSource", "ModuleSource", "open_checkpoint",
]
