"""Model pools: named checkpoints with ``_pretrained_`` as the base, loaded lazily."""

import importlib as _importlib
import pkgutil as _pkgutil

from fusion_bench.modelpool.base import PRETRAINED, ModelPool, ModelPoolConfig, TensorBag, build_modelpool

for _m in _pkgutil.iter_modules(__path__):  # specialised pools register themselves (modelpool.type=...)
    if _m.name not in ("base", "registry") and not _m.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["PRETRAINED", "ModelPool", "ModelPoolConfig", "TensorBag", "build_modelpool"]
