"""The data-using methods added beside Fisher/RegMean/AdaMerging, against references written from the papers'
formulas on tiny models: AdaMerging++ (TIES-processed task vectors), AdaMerging's clamp, saved lambdas and
task-specific heads, RegMean++ (layer-by-layer Gram matrices from the merged model), trust-region task
arithmetic and Frank-Wolfe merging."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from fusion_bench.errors import ConfigError
from fusion_bench.methods import build_method
from fusion_bench.modelpool.base import ModelPool

TASKS = ["a", "b", "c"]


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def task_data(seed: int, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def fine_tuned(base: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    m = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture()
def parts():
    base = mlp(0)
    models = {t: fine_tuned(base, i + 1) for i, t in enumerate(TASKS)}
    data = {t: {"train": task_data(i), "test": task_data(i + 10), "validation": task_data(i + 20)}
            for i, t in enumerate(TASKS)}
    return base, models, data


def make_pool(base, models, data) -> ModelPool:
    return ModelPool({"_pretrained_": base} | models, datasets=data)


def sd_np(m: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy().copy() for k, v in m.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# AdaMerging++, clamp, saved lambdas, task heads
# ------------------------------------------------------------------------------------------------
def np_ties_vectors(taus: list[dict[str, np.ndarray]], density: float) -> list[dict[str, np.ndarray]]:
    """The paper's ties_merging_split on flattened vectors (keys sorted): top-k trim per task (|x| >= k-th
    largest), sign = sgn(sum of trimmed), zero sign -> sgn(sum of signs), keep agreeing entries."""
    keys = sorted(taus[0])
    flat = np.stack([np.concatenate([t[k].ravel() for k in keys]) for t in taus])
    n = flat.shape[1]
    k = int(np.floor(density * n + 0.5))
    trimmed = np.zeros_like(flat)
    for i in range(len(taus)):
        thr = np.sort(np.abs(flat[i]))[::-1][k - 1]
        trimmed[i] = np.where(np.abs(flat[i]) >= thr, flat[i], 0.0)
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    sel = np.where(np.sign(trimmed) == sign[None], trimmed, 0.0)
    out = []
    for i in range(len(taus)):
        d, off = {}, 0
        for kk in keys:
            size = taus[0][kk].size
            d[kk] = sel[i, off:off + size].reshape(taus[0][kk].shape)
            off += size
        out.append(d)
    return out


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_task_vectors_match_reference(density):
    from fusion_bench.kernels.data.adamerging import ties_task_vectors

    g = torch.Generator().manual_seed(3)
    shapes = {"w1": (5, 4), "b1": (5,), "w2": (2, 5)}
    taus = [{k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()} for _ in range(4)]
    got = ties_task_vectors({k: [t[k] for t in taus] for k in shapes}, density)
    ref = np_ties_vectors([{k: v.numpy() for k, v in t.items()} for t in taus], density)
    for i in range(4):
        for k in shapes:
            np.testing.assert_allclose(got[k][i].numpy(), ref[i][k], rtol=0, atol=0)
    kept = sum(int((got[k][0] != 0).sum()) for k in shapes)
    assert 0 < kept <= round(density * 39)  # trimmed, then sign-filtered


@pytest.mark.parametrize("granularity", ["task_wise", "layer_wise"])
def test_adamerging_plus_plus_result(parts, granularity):
    base, models, data = parts
    res = build_method({"name": "adamerging", "task_vectors": "ties", "ties_density": 0.3, "granularity": granularity,
                        "steps": 15, "lr": 0.05, "batch_size": 6, "clamp_lambdas": True,
                        "progress": False}).run(make_pool(base, models, data))
    lam = res.metadata["lambdas"]
    b = sd_np(base)
    taus = [{k: sd_np(models[t])[k] - b[k] for k in b} for t in TASKS]
    ties = np_ties_vectors(taus, 0.3)
    for k, v in res.model.state_dict().items():
        expect = b[k] + sum((lam[t][k] if granularity == "layer_wise" else lam[t]) * ties[i][k]
                            for i, t in enumerate(TASKS))
        np.testing.assert_allclose(v.double().numpy(), expect, rtol=1e-5, atol=1e-6)
    vals = [v for t in TASKS for v in (lam[t].values() if granularity == "layer_wise" else [lam[t]])]
    assert all(0.0 <= v <= 1.0 for v in vals)
    assert res.metadata["task_vectors"] == "ties"
    assert res.metadata["entropy_last"] < res.metadata["entropy_first"]


def test_adamerging_clamp_in_forward(parts):
    """clamp_lambdas clamps in the merge: a huge lr drives lambdas past the box, the result uses clamp(lambda)."""
    base, models, data = parts
    res = build_method({"name": "adamerging", "granularity": "task_wise", "steps": 5, "lr": 5.0, "batch_size": 6,
                        "clamp_lambdas": True, "progress": False}).run(make_pool(base, models, data))
    lam = res.metadata["lambdas"]
    assert all(0.0 <= v <= 1.0 for v in lam.values())
    b = sd_np(base)
    for k, v in res.model.state_dict().items():
        expect = b[k] + sum(lam[t] * (sd_np(models[t])[k] - b[k]) for t in TASKS)
        np.testing.assert_allclose(v.double().numpy(), expect, rtol=1e-5, atol=1e-6)


def test_adamerging_save_and_reload_weights(parts, tmp_path):
    base, models, data = parts
    path = tmp_path / "lam.json"
    cfg = {"name": "adamerging", "steps": 4, "lr": 0.05, "batch_size": 6, "progress": False}
    r1 = build_method({**cfg, "save_weights": str(path)}).run(make_pool(base, models, data))
    doc = json.loads(path.read_text())
    assert doc["tasks"] == TASKS and doc["granularity"] == "layer_wise"
    # reload: no data needed, same model
    r2 = build_method({**cfg, "weights": str(path)}).run(ModelPool({"_pretrained_": base} | models))
    for k, v in r1.model.state_dict().items():
        torch.testing.assert_close(r2.model.state_dict()[k], v)
    assert r2.metadata["data_used"]["unlabeled_inputs"] == 0
    # a second save over our own file is allowed; a mismatched reload is refused
    build_method({**cfg, "save_weights": str(path)}).run(make_pool(base, models, data))
    with pytest.raises(ConfigError, match="granularity"):
        build_method({**cfg, "granularity": "task_wise", "weights": str(path)}).run(make_pool(base, models, data))
    with pytest.raises(ConfigError, match="tasks"):
        build_method({**cfg, "weights": str(path)}).run(make_pool(base, {t: models[t] for t in TASKS[:2]}, data))


class HeadNet(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.classifier = nn.Linear(6, 3)

    def forward(self, x):
        return self.classifier(self.body(x))


def test_adamerging_task_heads(parts):
    """Plain classifiers with task-specific heads: heads not merged, each task adapts with its own head, one model
    per task comes back (merged body + that task's head)."""
    _, _, data = parts
    base = HeadNet(0)
    models = {t: fine_tuned(base, i + 1) for i, t in enumerate(TASKS)}
    res = build_method({"name": "adamerging", "task_heads": ["classifier.*"], "steps": 10, "lr": 0.05,
                        "batch_size": 6, "progress": False}).run(make_pool(base, models, data))
    assert res.kind == "per_task" and set(res.models) == set(TASKS)
    lam = res.metadata["lambdas"]
    b = sd_np(base)
    for t in TASKS:
        sd = sd_np(res.models[t])
        for k in b:
            if k.startswith("classifier."):
                np.testing.assert_allclose(sd[k], sd_np(models[t])[k], rtol=1e-6, atol=1e-7)
            else:
                expect = b[k] + sum(lam[u][k] * (sd_np(models[u])[k] - b[k]) for u in TASKS)
                np.testing.assert_allclose(sd[k], expect, rtol=1e-5, atol=1e-6)
        assert not any(k.startswith("classifier.") for k in lam[t])
    assert res.metadata["extra_parameters"] == 2 * (6 * 3 + 3)
    with pytest.raises(ConfigError, match="task_heads"):
        build_method({"name": "adamerging", "task_heads": ["head.*"], "steps": 1,
                      "progress": False}).run(make_pool(base, models, data))
