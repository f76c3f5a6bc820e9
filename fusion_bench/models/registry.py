"""The model-class allow-list: the only classes a config may name (``modelpool.architecture.class``,
``modelpool.model_class``).

Configs are data: nothing named in a config is imported or called unless it is

- a class registered here by name (:func:`register_model_class`, from Python, by fusion_bench or a user),
- a ``transformers`` class that is an ``nn.Module`` (or a ``transformers.Auto*`` loader class), or a
  ``torch.nn`` module class, named by a dotted path whose module starts with ``transformers`` or
  ``torch.nn`` (the prefix is checked before anything is imported), or
- a shortcut of ``fusion_bench.modelpool.base.MODEL_CLASSES``.

Example::

    from fusion_bench.models.registry import register_model_class

    @register_model_class            # named 'MyNet' (and by its dotted path 'mypkg.nets.MyNet')
    class MyNet(nn.Module): ...

    register_model_class("my_net", MyNet)   # or under a chosen name
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from fusion_bench.errors import ConfigError, RegistryError, did_you_mean

_CLASSES: dict[str, type] = {}  # registered name -> class
_PATHS: dict[str, str] = {}  # 'module.QualName' of a registered class -> its registered name

#: fusion_bench's own modules that a pool may build from plain kwargs (name -> fixed dotted path in
#: this package; imported from these constants, never from a config value)
_BUILTIN: dict[str, str] = {
    "TinyNet": "fusion_bench.testing.check_method.TinyNet",
}

_ALLOWED_PREFIXES = ("transformers", "torch.nn")
_IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_model_class(name_or_cls: str | type | None = None, cls: type | None = None):
    """Put a model class on the allow-list, so configs may name it.

    Usable as ``@register_model_class``, ``@register_model_class("name")``,
    ``register_model_class(MyNet)`` or ``register_model_class("name", MyNet)``. A config then names it
    by the registered name (the class name by default) or by its dotted path ``module.QualName``.

    Args:
        name_or_cls: the name to register under, or the class itself (registered under its ``__name__``).
        cls: the class, when a name is given as the first argument (otherwise a decorator is returned).
    Raises:
        RegistryError: the name is already registered for a different class.
        TypeError: the object is not a class.
    """
    if isinstance(name_or_cls, type):
        return _register(name_or_cls.__name__, name_or_cls)
    if name_or_cls is not None and not isinstance(name_or_cls, str):
        raise TypeError(f"register_model_class takes a name or a class, not {type(name_or_cls).__name__}.")
    if cls is not None:
        return _register(name_or_cls or cls.__name__, cls)

    def deco(c: type) -> type:
        return _register(name_or_cls or c.__name__, c)

    return deco


def _register(name: str, cls: type) -> type:
    if not isinstance(cls, type):
        raise TypeError(f"register_model_class('{name}', ...) needs a class, got {type(cls).__name__}.")
    if not name or not isinstance(name, str):
        raise RegistryError("register_model_class needs a non-empty name.")
    old = _CLASSES.get(name)
    if old is not None and old is not cls:
        raise RegistryError(f"Model class '{name}' is already registered ({_dotted(old)}); choose another name.")
    _CLASSES[name] = cls
    _PATHS.setdefault(_dotted(cls), name)
    return cls


def unregister_model_class(name: str) -> None:
    """Remove a registered name (for tests and interactive sessions)."""
    cls = _CLASSES.pop(name, None)
    if cls is not None and _PATHS.get(_dotted(cls)) == name:
        del _PATHS[_dotted(cls)]


def _load_builtin(name: str) -> type | None:
    path = _BUILTIN.get(name)
    if path is None:
        return None
    if name not in _CLASSES:
        mod, _, attr = path.rpartition(".")
        _register(name, getattr(importlib.import_module(mod), attr))
    return _CLASSES[name]


def list_model_classes() -> list[str]:
    """Registered model-class names (fusion_bench's own and the user's), sorted."""
    for n in _BUILTIN:
        _load_builtin(n)
    return sorted(_CLASSES)


def registered_model_class(ref: str) -> type | None:
    """The registered class a config value names (registered name or dotted path), else None."""
    if ref in _CLASSES:
        return _CLASSES[ref]
    if ref in _BUILTIN:
        return _load_builtin(ref)
    if ref in _PATHS:
        return _CLASSES[_PATHS[ref]]
    for n, p in _BUILTIN.items():
        if p == ref:
            return _load_builtin(n)
    return None


def _fix(key: str) -> str:
    return ("Fix: register it from Python with fusion_bench.models.registry.register_model_class, or use a "
            "transformers class such as 'transformers.CLIPVisionModel'")


def is_allowed_ref(ref: Any, key: str, shortcuts: Mapping[str, str] | None = None) -> None:
    """Check, without importing anything, that a config value may name a class; raise ConfigError otherwise."""
    shortcuts = shortcuts or {}
    if isinstance(ref, type):
        if registered_model_class(_dotted(ref)) is ref or ref in _CLASSES.values():
            return
        raise ConfigError(f"{key}={_dotted(ref)!r} is not a registered model class. {_fix(key)}.")
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{key} must be a class name (a string), got {ref!r}. {_fix(key)}.")
    if ref in shortcuts or registered_model_class(ref) is not None:
        return
    mod, _, attr = ref.rpartition(".")
    parts = ref.split(".")
    if (not mod or not all(_IDENT.match(p) for p in parts)
            or not any(mod == p or mod.startswith(p + ".") for p in _ALLOWED_PREFIXES)):
        hint = did_you_mean(ref, [*shortcuts, *list_model_classes()]) if "." not in ref else ""
        short = f"shortcuts {', '.join(sorted(shortcuts))}, " if shortcuts else ""
        raise ConfigError(f"{key}={ref!r} is not an allowed model class (allowed: {short}registered names, "
                          f"transformers.* and torch.nn.* classes).{hint} {_fix(key)}.")


def resolve_class_ref(ref: Any, key: str, shortcuts: Mapping[str, str] | None = None,
                      loader: bool = False) -> type:
    """The class a config value names, resolved only through the allow-list.

    Args:
        ref: the config value: a shortcut, a registered name or dotted path, or a dotted path under
            ``transformers`` / ``torch.nn``.
        key: the config key, for error messages.
        shortcuts: short names -> dotted transformers paths.
        loader: True for ``model_class`` (the class must have ``from_pretrained``; ``transformers.Auto*``
            loader classes are allowed), False for ``architecture.class`` (an ``nn.Module`` subclass).
    Raises:
        ConfigError: one line naming the key, the value and the fix.
    """
    shortcuts = shortcuts or {}
    is_allowed_ref(ref, key, shortcuts)  # before any import
    if isinstance(ref, type):
        cls = ref
    else:
        cls = registered_model_class(ref)
        if cls is None:
            path = shortcuts.get(ref, ref)
            mod, _, attr = path.rpartition(".")
            if not any(mod == p or mod.startswith(p + ".") for p in _ALLOWED_PREFIXES):  # pragma: no cover
                raise ConfigError(f"{key}={ref!r} is not on the allow-list of model classes. {_fix(key)}.")
            try:
                cls = getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"{key}={ref!r}: cannot find {path} ({type(e).__name__}). Check the spelling, "
                                  "or your transformers version.") from e
            if not isinstance(cls, type):
                raise ConfigError(f"{key}={ref!r} is not a class. {_fix(key)}.")
            auto = mod.split(".")[0] == "transformers" and cls.__name__.startswith("Auto") and \
                hasattr(cls, "from_pretrained")
            if not (issubclass(cls, nn.Module) or (loader and auto)):
                raise ConfigError(f"{key}={ref!r} is not an nn.Module class"
                                  + (" (nor a transformers Auto class)" if loader else "") + f". {_fix(key)}.")
    if not isinstance(cls, type):  # pragma: no cover - registration checks this
        raise ConfigError(f"{key}={ref!r} is not a class. {_fix(key)}.")
    if loader and not hasattr(cls, "from_pretrained"):
        raise ConfigError(f"{key}={ref!r} names {cls.__name__}, which has no from_pretrained to load Hugging Face "
                          "checkpoints; use a transformers class, or modelpool.architecture for state-dict files.")
    if not loader and not issubclass(cls, nn.Module):
        raise ConfigError(f"{key}={ref!r} names {cls.__name__}, which is not an nn.Module class. {_fix(key)}.")
    return cls


def check_plain_data(value: Any, key: str) -> None:
    """Raise ConfigError unless ``value`` is plain data: None, bool, int, float, str, and lists/tuples/dicts
    (with string keys) of those."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain_data(v, f"{key}[{i}]")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{key} has a non-string key {k!r}; architecture kwargs must be plain data.")
            check_plain_data(v, f"{key}.{k}")
        return
    raise ConfigError(f"{key} is of type {type(value).__name__}; architecture kwargs must be plain data (numbers, "
                      "strings, bools, lists, dicts). Build such objects inside a registered class instead.")


__all__ = ["check_plain_data", "is_allowed_ref", "list_model_classes", "register_model_class",
           "registered_model_class", "resolve_class_ref", "unregister_model_class"]
