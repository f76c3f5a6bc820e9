"""The ``dummy`` method: no fusion, the base model as it is (FusionBench's ``method=dummy``)."""

from __future__ import annotations

import time
from typing import ClassVar

from fusion_bench.methods.base import FusionMethod, FusionResult, MethodConfig, register_method


@register_method
class Dummy(FusionMethod):
    """Return the pool's ``_pretrained_`` model, or its first model when there is none.

    Reference: FusionBench's ``DummyAlgorithm`` (``method=dummy``), used to evaluate one model
    (the pretrained one, or a single fine-tuned one) or to check a pool's wiring.

    Args:
        config: :class:`MethodConfig` (no options).
    """

    name = "dummy"
    config_class: ClassVar = MethodConfig
    family = "reference"
    summary = "No fusion: the pool's _pretrained_ model, else its first model (FusionBench method=dummy)."
    variant = "FusionBench DummyAlgorithm: modelpool.load_pretrained_or_first_model(), unchanged."
    identity_on_equal_inputs = False  # it returns the base, not the (equal) fine-tuned models
    permutation_invariant = False  # without a base, the first model

    def run(self, modelpool) -> FusionResult:
        t0 = time.perf_counter()
        name = modelpool.base_name()
        model = modelpool.load_model(name)
        return FusionResult("merged", model=model, metadata=self._metadata(t0, returned_model=name,
                                                                           extra_parameters=0))
