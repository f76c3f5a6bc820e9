"""The dry run's checks: everything a real run will need, short of fusing.

``fusion_bench dry_run=true`` must not say "valid" for a run that then fails on its inputs. It checks,
in this order, and stops at the first failure with one error naming the culprit:

1. every model of the pool resolves (local path, or the hub / its local cache) and its checkpoint
   headers are readable; Hugging Face models have one architecture;
2. merging methods: every model holds every tensor of the base with the same shape (the streaming
   engine also plans the merge);
3. every floating-point tensor of every model is finite (read tensor by tensor, never a whole model);
4. the method's own needs (:meth:`FusionMethod.check_ready`): the datasets of data-based methods;
5. the outputs: ``merged_model_path`` and ``report_path`` may be written (they do not exist, or
   ``overwrite=true`` and they are outputs of fusion_bench that hold no input).

It returns what it checked and what it could not check, for the plan it prints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fusion_bench.errors import CheckpointError

#: tensors at most this large are checked in one piece; larger ones are read in row blocks
_SCAN_BLOCK_ELEMENTS = 1 << 24


def scan_finite(modelpool, names: list[str], progress: Callable[[str], None] | None = None) -> int:
    """Read every floating-point tensor of ``names`` once and raise CheckpointError at the first
    non-finite value (naming the model and the tensor). Returns the number of tensors read."""
    n = 0
    for name in names:
        src = modelpool.source(name)
        if progress is not None:
            progress(name)
        for key in src.keys():
            meta = src.meta(key)
            if not meta.dtype.is_floating_point:
                continue
            t = src.get(key)
            flat = t.reshape(-1)
            for s in range(0, flat.numel(), _SCAN_BLOCK_ELEMENTS):
                block = flat[s:s + _SCAN_BLOCK_ELEMENTS]
                if not bool(torch.isfinite(block).all()):
                    bad = block[~torch.isfinite(block)][0].item()
                    raise CheckpointError(
                        f"Model '{name}': tensor '{key}' holds a non-finite value ({bad}). Fix or re-download that "
                        "checkpoint; fusion_bench never merges non-finite weights.")
            n += 1
    return n


def check_run(cfg: Any, method: Any, modelpool: Any, taskpool: Any, *, merges: bool,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the dry run's checks (see the module docstring); return ``{"checked": [...], "not_checked": [...]}``."""
    checked: list[str] = []
    not_checked: list[str] = []
    out: dict[str, Any] = {"checked": checked, "not_checked": not_checked}
    names = list(dict.fromkeys([modelpool.base_name(), *modelpool.names]))
    for name in names:
        modelpool.source(name)
    modelpool.check_architectures(names)
    checked.append(f"{len(names)} model(s) found and their checkpoint headers read")
    if merges:
        keys = modelpool.validate()
        out.setdefault("tensors", len(keys))
        checked.append(f"{len(keys)} tensor(s) present in every model with one shape")
    n = scan_finite(modelpool, names, progress=lambda nm: log(f"dry run: reading every tensor of '{nm}'"))
    checked.append(f"{n} floating-point tensor(s) read: all finite")
    notes = method.check_ready(modelpool)
    not_checked.extend(notes)
    if method.uses_data and not notes:
        checked.append("the method's datasets open")
    if getattr(taskpool, "tasks", None):
        not_checked.append("task pool data is opened only when the evaluation starts")
    return out


__all__ = ["check_run", "scan_finite"]
