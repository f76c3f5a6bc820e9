"""A small name -> class registry used for model pools and task pools (methods have their own,
richer one in :mod:`fusion_bench.methods.base`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from fusion_bench.errors import RegistryError, did_you_mean


class Registry:
    def __init__(self, kind: str, discover_module: str):
        self.kind = kind
        self._discover_module = discover_module
        self._items: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            if name in self._items and self._items[name] is not cls:
                raise RegistryError(
                    f"{self.kind} '{name}' is already registered by {self._items[name].__qualname__}; choose another name.")
            self._items[name] = cls
            cls.type_name = name
            return cls

        return deco

    def names(self) -> list[str]:
        importlib.import_module(self._discover_module)
        return sorted(self._items)

    def get(self, name: str) -> type:
        importlib.import_module(self._discover_module)
        if name not in self._items:
            raise RegistryError(f"Unknown {self.kind} '{name}'.{did_you_mean(name, self._items)}")
        return self._items[name]
