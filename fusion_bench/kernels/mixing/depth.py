"""Layer index lists of depth up-scaling (Kim et al., "SOLAR 10.7B: Scaling Large Language Models with
Simple yet Effective Depth Up-Scaling", 2023).

SOLAR builds a deeper model from one base of L layers by concatenating two copies with their
overlap removed: layers ``[0, L-m)`` of the first copy then ``[m, L)`` of the second (L=32, m=8 gives
48 layers: ``[[0, 24], [8, 32]]``). The general form is any sequence of source layer indices: output
layer ``j`` is a copy of source layer ``indices[j]``. No averaging; continued pre-training follows
in the paper and is not part of this step.

Specifications are data, never evaluated: a list whose items are an integer ``i`` (one layer),
a pair ``[start, end]`` (layers ``start .. end-1``, end exclusive like ``range``), or a string
``"range(a, b)"`` / ``"range(b)"`` / ``"i"`` (FusionBench's spelling, parsed with a regular expression).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fusion_bench.errors import ConfigError

_RANGE_RX = re.compile(r"^\s*range\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?\)\s*$")


def parse_layer_indices(spec: Sequence[Any], num_layers: int, key: str = "method.layer_indices") -> list[int]:
    """Expand a layer specification into source layer indices (validated against ``num_layers``).

    Args:
        spec: items as described in the module docstring.
        num_layers: layers of the source model.
        key: the config key named in errors.
    """
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise ConfigError(f"{key} must be a list such as [[0, 24], [8, 32]] or [0, 1, 2, 2, 3], got {spec!r}.")
    out: list[int] = []
    for i, item in enumerate(spec):
        where = f"{key}[{i}]"
        if isinstance(item, bool):
            raise ConfigError(f"{where}={item!r} is not a layer index; use an integer or [start, end].")
        if isinstance(item, int):
            idx = [item]
        elif isinstance(item, str):
            s = item.strip()
            m = _RANGE_RX.match(s)
            if s.isdigit():
                idx = [int(s)]
            elif m:
                a, b = (0, int(m.group(1))) if m.group(2) is None else (int(m.group(1)), int(m.group(2)))
                idx = list(range(a, b))
                if not idx:
                    raise ConfigError(f"{where}={item!r} is empty; write range(start, end) with start < end.")
            else:
                raise ConfigError(f"{where}={item!r} is not understood (strings are never evaluated); write an "
                                  "integer, [start, end] or 'range(start, end)'.")
        elif isinstance(item, Sequence) and len(item) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                   for x in item):
            a, b = int(item[0]), int(item[1])
            if not 0 <= a < b:
                raise ConfigError(f"{where}={list(item)} must be [start, end] with 0 <= start < end (end exclusive).")
            idx = list(range(a, b))
        else:
            raise ConfigError(f"{where}={item!r} must be an integer, a pair [start, end] or 'range(start, end)'.")
        for j in idx:
            if not 0 <= j < num_layers:
                raise ConfigError(f"{where} names layer {j}, but the model has {num_layers} layers (0 .. "
                                  f"{num_layers - 1}); fix the index.")
        out += idx
    if not out:
        raise ConfigError(f"{key} selects no layer; give e.g. [[0, 24], [8, 32]].")
    return out


def runs_of(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs ``[start, end)`` of an index list (``[0,1,2,1,2]`` -> ``[(0,3), (1,3)]``)."""
    runs: list[tuple[int, int]] = []
    for j in indices:
        if runs and runs[-1][1] == j:
            runs[-1] = (runs[-1][0], j + 1)
        else:
            runs.append((j, j + 1))
    return runs
