"""Fusion methods. Every module in this package (and its sub-packages) is imported here, so a
method registers itself just by living in this folder and using ``@register_method``."""

import importlib
import pkgutil

from fusion_bench.methods.base import (
    FusionMethod,
    FusionResult,
    MethodConfig,
    TensorwiseConfig,
    TensorwiseMerge,
    build_method,
    get_method_class,
    list_methods,
    register_method,
)

for _m in pkgutil.walk_packages(__path__, prefix=__name__ + "."):
    if not _m.name.rsplit(".", 1)[-1].startswith("_"):
        importlib.import_module(_m.name)

__all__ = [
    "FusionMethod", "FusionResult", "MethodConfig", "TensorwiseConfig", "TensorwiseMerge", "build_method",
    "get_method_class", "list_methods", "register_method",
]
