"""Output ensembles against naive references: mean, weighted, and max-confidence per example."""

from __future__ import annotations

import math

import pytest
import torch

from fusion_bench.errors import ConfigError
from fusion_bench.methods import build_method
from fusion_bench.modelpool.base import ModelPool
from fusion_bench.models.ensemble import Ensemble
from fusion_bench.testing import tiny_pool_models


@pytest.fixture()
def pool_models():
    return tiny_pool_models(3, seed=4)  # _pretrained_ + model_0..model_2, distinct weights


def _x():
    return torch.randn(9, 8, generator=torch.Generator().manual_seed(1))


def _member_logits(models, x):
    with torch.no_grad():
        return {n: m(x) for n, m in models.items() if n != "_pretrained_"}


def test_simple_ensemble_is_the_mean_of_outputs(pool_models):
    res = build_method("simple_ensemble").run(ModelPool(pool_models))
    assert res.kind == "ensemble" and isinstance(res.model, Ensemble)
    assert res.model.member_names == ["model_0", "model_1", "model_2"]  # the base is not a member
    x = _x()
    z = _member_logits(pool_models, x)
    want = torch.zeros(9, 5)
    for b in range(9):
        for c in range(5):
            want[b, c] = sum(z[n][b, c] for n in z) / 3
    with torch.no_grad():
        got = res.model(x)
    assert torch.allclose(got, want, atol=1e-6)
    one = sum(p.numel() for p in pool_models["model_0"].parameters())
    assert res.metadata["extra_parameters"] == 2 * one
    assert res.metadata["parameters"]["total"] == 3 * one


@pytest.mark.parametrize("normalize", [True, False])
def test_weighted_ensemble_matches_reference(pool_models, normalize):
    w = [0.5, 2.0, 1.5]
    res = build_method("weighted_ensemble", weights=w, normalize=normalize).run(ModelPool(pool_models))
    x = _x()
    z = _member_logits(pool_models, x)
    ww = [v / sum(w) for v in w] if normalize else w
    want = torch.zeros(9, 5)
    for b in range(9):
        for c in range(5):
            want[b, c] = sum(wi * z[n][b, c] for wi, n in zip(ww, ["model_0", "model_1", "model_2"]))
    with torch.no_grad():
        got = res.model(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert res.metadata["weights"] == pytest.approx(ww)


def test_weighted_ensemble_config_errors(pool_models):
    with pytest.raises(ConfigError, match="one weight per model"):
        build_method("weighted_ensemble", weights=[1.0, 2.0]).run(ModelPool(pool_models))
    with pytest.raises(ConfigError, match="normalize=false"):
        build_method("weighted_ensemble", weights=[1.0, -1.0, 0.0]).run(ModelPool(pool_models))
    with pytest.raises(ConfigError, match="Did you mean 'weights'"):
        build_method("weighted_ensemble", weight=[1.0])


def test_max_model_predictor_picks_most_confident_member(pool_models):
    res = build_method("max_model_predictor").run(ModelPool(pool_models))
    x = _x() * 3  # spread the confidences
    z = _member_logits(pool_models, x)
    names = ["model_0", "model_1", "model_2"]
    with torch.no_grad():
        got = res.model(x)
    chosen = set()
    for b in range(9):
        conf = []
        for n in names:
            row = z[n][b].tolist()
            mx = max(row)
            exps = [math.exp(v - mx) for v in row]
            conf.append(max(exps) / sum(exps))  # max softmax probability
        best = max(range(3), key=lambda i: (conf[i], -i))  # first member on ties
        chosen.add(best)
        assert torch.allclose(got[b], z[names[best]][b], atol=1e-6)
    assert len(chosen) > 1  # the test input exercises more than one member


def test_ensemble_of_one_model_and_dtypes():
    models = tiny_pool_models(1, dtype=torch.bfloat16)
    res = build_method("simple_ensemble").run(ModelPool(models))
    assert res.metadata["extra_parameters"] == 0
    assert all(p.dtype == torch.bfloat16 for p in res.model.parameters())
    x = _x().bfloat16()
    with torch.no_grad():
        assert torch.allclose(res.model(x), models["model_0"](x).float())
