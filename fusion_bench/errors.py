"""Exception types of fusion_bench.

Every error raised for bad user input is one of these, and its message names the model, the
tensor or the config key at fault and says how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FusionBenchError(Exception):
    """Base class of all fusion_bench errors."""


class ConfigError(FusionBenchError, ValueError):
    """A configuration key is unknown, misspelt, has the wrong type or an invalid value."""


class ModelMismatchError(FusionBenchError):
    """Models in a pool disagree: architecture, tensor names, shapes, dtypes or vocabularies."""


class CheckpointError(FusionBenchError):
    """A checkpoint cannot be found, read or written, or holds non-finite values."""


class RegistryError(FusionBenchError, KeyError):
    """A name is registered twice, or a looked-up name is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """Return the candidate closest to ``name`` (for 'did you mean' hints), or None."""
    cands = list(candidates)
    match = difflib.get_close_matches(name, cands, n=1, cutoff=0.5)
    if match:
        return match[0]
    low = {c.lower(): c for c in cands}
    match = difflib.get_close_matches(name.lower(), list(low), n=1, cutoff=0.4)
    return low[match[0]] if match else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A ' Did you mean 'x'?' suffix, or the list of valid names when nothing is close."""
    cands = sorted(candidates)
    best = closest(name, cands)
    if best is not None:
        return f" Did you mean '{best}'?"
    shown = ", ".join(cands[:30]) + (" ..." if len(cands) > 30 else "")
    return f" Valid names: {shown}."
