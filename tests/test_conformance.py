"""Every registered method through the conformance suite (fusion_bench.testing.check_method).

Parametrised over ``list_methods()`` x the checks, so a method added later is tested without being
named here. Methods that need data or training are skipped with the reason the suite gives.
The second half checks that the suite itself catches broken methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from fusion_bench.config_schema import option
from fusion_bench.errors import ConfigError
from fusion_bench.methods import TensorwiseConfig, TensorwiseMerge, get_method_class, list_methods
from fusion_bench.methods.base import FusionMethod, FusionResult, MethodConfig
from fusion_bench.testing import CHECKS, MethodCheckError, check_method, skip_reason


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("name", list_methods())
def test_registered_method_conforms(name, check):
    reason = skip_reason(get_method_class(name))
    if reason:
        pytest.skip(reason)
    (outcome,) = check_method(name, checks=[check], raise_on_failure=False)
    if outcome.status == "skipped":
        pytest.skip(f"{name}/{check}: {outcome.message}")
    assert outcome.status == "passed", f"{name}/{check}: {outcome.message}"


@pytest.mark.parametrize("config", [{"trim_scope": "tensor", "density": 0.4}, {"sign_election": "count",
                                                                               "merge_func": "max"}])
def test_ties_variants_conform(config):
    # tensor-scope trim streams through the row-block protocol with per-tensor statistics
    check_method("ties_merging", config=config, checks=["streaming", "permutation", "determinism", "identity"])


def test_dare_streaming_row_blocks_equal_in_memory():
    # the random masks drawn block by block equal one draw over the whole tensor
    check_method("dare_ties", config={"sparsity_ratio": 0.7, "seed": 3}, checks=["streaming", "determinism"])
    check_method("dare_task_arithmetic", config={"sparsity_ratio": 0.2, "rescale": False}, checks=["streaming"])


def test_slerp_named_models_conform():
    check_method("slerp", config={"t": 0.3, "models": ["model_1", "_pretrained_"]},
                 checks=["result", "dtypes", "streaming", "identity"])


# ----------------------------------------------------------------------------------------------
# the suite catches broken methods
# ----------------------------------------------------------------------------------------------
class _Broken(TensorwiseMerge):
    name = "broken"
    variant = "test double"

    def merge_tensor(self, key, base, tensors, names):
        return sum(tensors) / len(tensors)


class NotIdentity(_Broken):
    def merge_tensor(self, key, base, tensors, names):
        return super().merge_tensor(key, base, tensors, names) * 1.01


class OrderDependent(_Broken):
    def merge_tensor(self, key, base, tensors, names):
        return 0.7 * tensors[0] + 0.3 * tensors[-1]


class LosesDtype(_Broken):
    def run(self, modelpool):
        res = super().run(modelpool)
        res.model.float()  # returns a float32 model for bf16/fp16 pools
        return res


class Unseeded(_Broken):
    def merge_tensor(self, key, base, tensors, names):
        return tensors[0] + 1e-3 * torch.randn(tensors[0].shape) * (tensors[0] - tensors[-1]).abs().amax()


class ModifiesInputs(_Broken):
    def merge_tensor(self, key, base, tensors, names):
        return tensors[0]

    def merge_one(self, key, base, tensors, names):
        if tensors[1].is_floating_point():
            tensors[1].mul_(1.5)
        return super().merge_one(key, base, tensors, names)


class FalselyElementwise(_Broken):
    elementwise = True  # but it uses a whole-tensor statistic

    def merge_tensor(self, key, base, tensors, names):
        avg = super().merge_tensor(key, base, tensors, names)
        return avg - avg.mean()


class NeedsBaseButCrashes(_Broken):
    def merge_tensor(self, key, base, tensors, names):
        return base + (tensors[0] - base)  # no requires_pretrained: a TypeError without a base


class NeedsBaseDeclared(NeedsBaseButCrashes):
    requires_pretrained = True

    def check_pool(self, names, has_pretrained):  # forgets the base's own pre-flight check
        pass


@dataclass
class _SwallowConfig(MethodConfig):
    scale: float = option(1.0, help="a scale")


class SwallowsUnknownKeys(FusionMethod):
    name = "swallows"
    variant = "test double"
    config_class: ClassVar = _SwallowConfig

    def __init__(self, config=None, **kwargs):
        cfg = dict(config or {})
        self.config = _SwallowConfig(scale=float(cfg.get("scale", 1.0)))

    def run(self, modelpool):
        return FusionResult("merged", model=modelpool.load_model(modelpool.model_names[0]))


class WrongKind(_Broken):
    def run(self, modelpool):
        res = super().run(modelpool)
        return FusionResult("per_task", models={"t": res.model})


@pytest.mark.parametrize("cls,check", [
    (NotIdentity, "identity"), (OrderDependent, "permutation"), (LosesDtype, "dtypes"),
    (Unseeded, "determinism"), (ModifiesInputs, "inputs_unchanged"), (FalselyElementwise, "streaming"),
    (NeedsBaseDeclared, "missing_base"), (SwallowsUnknownKeys, "unknown_key"), (WrongKind, "result"),
])
def test_suite_catches_broken_method(cls, check):
    (outcome,) = check_method(cls, checks=[check], raise_on_failure=False)
    assert outcome.status == "failed", outcome
    with pytest.raises(MethodCheckError, match=check):
        check_method(cls, checks=[check])


def test_suite_passes_a_correct_unregistered_method_and_reports():
    outcomes = check_method(_Broken)  # a plain average: passes everything it claims
    status = {o.check: o.status for o in outcomes}
    assert status["identity"] == status["permutation"] == status["streaming"] == "passed"
    assert status["missing_base"] == "skipped"


def test_suite_rejects_unknown_check_name():
    with pytest.raises(ConfigError, match="Did you mean 'identity'"):
        check_method("simple_average", checks=["identiy"])


def test_training_methods_are_skipped_with_a_reason():
    @dataclass
    class _Cfg(TensorwiseConfig):
        pass

    class Trains(_Broken):
        family = "training"

    class UsesData(_Broken):
        uses_data = True

    for cls in (Trains, UsesData):
        outcomes = check_method(cls, raise_on_failure=False)
        assert {o.status for o in outcomes} == {"skipped"}
        assert all(o.message for o in outcomes)
