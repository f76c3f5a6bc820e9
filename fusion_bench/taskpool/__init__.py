"""Task pools: evaluate(model) -> per-task metrics and averages. Modules here self-register."""

import importlib
import pkgutil

from fusion_bench.taskpool.base import TASKPOOLS, TaskPool, build_taskpool, register_taskpool

for _m in pkgutil.walk_packages(__path__, prefix=__name__ + "."):
    if not _m.name.rsplit(".", 1)[-1].startswith("_"):
        importlib.import_module(_m.name)

__all__ = ["TASKPOOLS", "TaskPool", "build_taskpool", "register_taskpool"]
