"""Testing utilities for fusion methods: the conformance suite :func:`check_method` and its tiny pools.

Third-party methods can run the same checks as the built-in ones::

    from fusion_bench.testing import check_method
    check_method(MyMethod)
"""

from fusion_bench.testing.check_method import (
    CHECKS,
    CheckOutcome,
    MethodCheckError,
    TinyNet,
    check_method,
    declared_kind,
    skip_reason,
    tiny_model,
    tiny_pool_models,
)

__all__ = ["CHECKS", "CheckOutcome", "MethodCheckError", "TinyNet", "check_method", "declared_kind", "skip_reason",
           "tiny_model", "tiny_pool_models"]
