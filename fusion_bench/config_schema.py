"""Typed configuration dataclasses and their validation.

Every method, model pool and task pool declares its options as a dataclass; field ``metadata``
holds ``help`` (the documentation) and optionally ``choices`` and a numeric ``range``
(``ge``/``gt``/``le``/``lt``). :func:`build_config` turns a plain mapping (from YAML, the command line or
Python) into that dataclass, rejecting unknown keys with the closest valid key, wrong types, NaN/inf
numbers and values outside the declared range with the key and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from fusion_bench.errors import ConfigError, did_you_mean

T = TypeVar("T")


#: the valid range of seeds: what torch.manual_seed, numpy (seed % 2**32) and random all accept
SEED_RANGE: dict[str, int] = {"ge": 0, "le": 2**63 - 1}


def option(default: Any = dataclasses.MISSING, *, help: str, choices: tuple | None = None,
           ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
           **kw) -> Any:
    """A dataclass field with documentation (``help``), optional allowed values (``choices``) and, for
    numbers (and each element of a list of numbers), an optional valid range: ``ge`` (>=), ``gt`` (>),
    ``le`` (<=), ``lt`` (<). The range is stored in the field metadata as ``range`` and checked by
    :func:`build_config`."""
    md: dict[str, Any] = {"help": help}
    if choices is not None:
        md["choices"] = tuple(choices)
    rng = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if rng:
        md["range"] = rng
    if isinstance(default, (list, dict, set)):
        val = default
        return dataclasses.field(default_factory=lambda: type(val)(val), metadata=md, **kw)
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=md, **kw)
    return dataclasses.field(default=default, metadata=md, **kw)


def _num(v: float) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        if v == 2**63 - 1:
            return "2**63 - 1"
        return str(v)
    return f"{v:g}"


def range_text(rng: Mapping[str, float] | None) -> str:
    """A declared range as text: ``[0, 1]``, ``(0, 1]``, ``>= 1``, ``> 0`` ('' when none)."""
    if not rng:
        return ""
    lo = ("[", rng["ge"]) if "ge" in rng else (("(", rng["gt"]) if "gt" in rng else None)
    hi = ("]", rng["le"]) if "le" in rng else ((")", rng["lt"]) if "lt" in rng else None)
    if lo and hi:
        return f"{lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
    return f"{'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"


def in_range(value: float, rng: Mapping[str, float]) -> bool:
    """True when ``value`` satisfies every bound of ``rng``."""
    return not (("ge" in rng and not value >= rng["ge"]) or ("gt" in rng and not value > rng["gt"])
                or ("le" in rng and not value <= rng["le"]) or ("lt" in rng and not value < rng["lt"]))


def check_range(value: Any, rng: Mapping[str, float] | None, where: str) -> None:
    """Raise ConfigError naming ``where``, the value and the valid range when a number (or an element of a
    list of numbers, or a value of a mapping to numbers) is outside ``rng``; None and non-numbers pass."""
    if not rng or value is None:
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            check_range(v, rng, f"{where}.{k}")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_range(v, rng, f"{where}[{i}]")
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not in_range(value, rng):
        raise ConfigError(f"{where}={value!r} is out of range: it must be in {range_text(rng)}.")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert lossless cases (int->float, list->tuple)."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:  # Optional[X]: X's own message (e.g. 'not a finite number')
            return _coerce(value, non_none[0], where)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}={value!r} has the wrong type: expected {_type_name(tp)}.")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r} is not allowed.{did_you_mean(str(value), map(str, args))}")
        return value
    if origin in (list, tuple, typing.Sequence, typing.List) or tp in (list, tuple):  # noqa: UP006
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            # OmegaConf ListConfig is not a list; accept anything iterable but not a string/mapping
            if hasattr(value, "__iter__") and not isinstance(value, (str, bytes, Mapping)):
                value = list(value)
            else:
                raise ConfigError(f"{where}={value!r} has the wrong type: expected a list.")
        inner = args[0] if args and args[-1] is not Ellipsis or len(args) == 2 else Any
        if args and len(args) == 2 and args[1] is Ellipsis:
            inner = args[0]
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin in (dict, typing.Mapping) or tp is dict:
        if not isinstance(value, Mapping) and not hasattr(value, "items"):
            raise ConfigError(f"{where}={value!r} has the wrong type: expected a mapping.")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where}={value!r} has the wrong type: expected true or false.")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} has the wrong type: expected a number.")
        f = None
        if isinstance(value, (int, float)):
            try:
                f = float(value)
            except OverflowError:
                f = math.inf
        elif isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                pass
        if f is None:
            raise ConfigError(f"{where}={value!r} has the wrong type: expected a number.")
        if not math.isfinite(f):
            raise ConfigError(f"{where}={value} is not a finite number; give a finite value.")
        return f
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} has the wrong type: expected an integer.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}={value!r} has the wrong type: expected an integer.")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}={value!r} has the wrong type: expected a string.")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}={value!r} has the wrong type: expected {_type_name(tp)}.")
    return value


def to_plain(obj: Any) -> Any:
    """OmegaConf containers and dataclasses -> plain python (dict/list/scalars)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def build_config(cls: type[T], values: Mapping[str, Any] | T | None = None, *, prefix: str = "",
                 ignore: tuple[str, ...] = (), **overrides: Any) -> T:
    """Validate ``values`` (plus keyword ``overrides``) against dataclass ``cls`` and build it.

    Args:
        cls: the config dataclass.
        values: a mapping (YAML/CLI), an instance of ``cls`` or None for defaults.
        prefix: the dotted path of this config in the full configuration, used in messages
            (e.g. ``method``).
        ignore: keys accepted and dropped (e.g. ``name`` for a method config).
        overrides: keyword values that win over ``values``.
    """
    if isinstance(values, cls):
        values = {f.name: getattr(values, f.name) for f in dataclasses.fields(cls)}
    raw = dict(to_plain(values) or {})
    raw.update(overrides)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    pre = f"{prefix}." if prefix else ""
    for key, val in raw.items():
        if key in ignore:
            continue
        if key not in fields:
            raise ConfigError(
                f"Unknown config key '{pre}{key}' for {cls.__name__}.{did_you_mean(key, fields)}"
            )
        f = fields[key]
        tp = typing.get_type_hints(cls).get(key, Any)
        val = _coerce(val, tp, f"{pre}{key}")
        choices = f.metadata.get("choices")
        if choices is not None and val not in choices:
            raise ConfigError(f"{pre}{key}={val!r} is not one of {list(choices)}.{did_you_mean(str(val), map(str, choices))}")
        check_range(val, f.metadata.get("range"), f"{pre}{key}")
        kwargs[key] = val
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"Missing required config key(s) {', '.join(pre + m for m in missing)} for {cls.__name__}.")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Invalid {prefix or cls.__name__} config: {e}") from e


def describe(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for every field: the documentation of a config dataclass. A declared
    range is appended to the help as ``(range: [0, 1])``."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            d = f.default
        elif f.default_factory is not dataclasses.MISSING:
            d = f.default_factory()
        else:
            d = "<required>"
        help_ = f.metadata.get("help", "")
        rng = f.metadata.get("range")
        if rng:
            help_ = f"{help_} (range: {range_text(rng)})"
        out.append((f.name, _type_name(hints.get(f.name, Any)), d, help_))
    return out
