"""Data-dependent merges (fisher_merging, regmean, adamerging) against references written from the papers'
formulas on tiny problems: per-example gradient loops for the Fisher, numpy closed forms for RegMean,
theta_0 + sum lambda tau and a decreasing entropy for AdaMerging. Plus a tiny CLIP pool end to end."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.methods import build_method
from fusion_bench.modelpool.base import ModelPool

TASKS = ["a", "b", "c"]


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def task_data(seed: int, n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
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
def pool_parts():
    base = mlp(0)
    models = {t: fine_tuned(base, i + 1) for i, t in enumerate(TASKS)}
    data = {t: {"train": task_data(i), "test": task_data(i + 10)} for i, t in enumerate(TASKS)}
    return base, models, data


def make_pool(base, models, data, with_base=True) -> ModelPool:
    entries = ({"_pretrained_": base} if with_base else {}) | models
    return ModelPool(entries, datasets=data)


# ------------------------------------------------------------------------------------------------
# Fisher merging
# ------------------------------------------------------------------------------------------------
def reference_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """F = (1/N) sum_n (grad log p(y_n | x_n))^2, one backward pass per example."""
    model = copy.deepcopy(model)
    out = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for n in range(len(x)):
        model.zero_grad()
        logp = torch.log_softmax(model(x[n:n + 1]), -1)[0]
        label = int(logp.argmax()) if y is None else int(y[n])
        logp[label].backward()
        for k, p in model.named_parameters():
            out[k] += p.grad ** 2
    return {k: v / len(x) for k, v in out.items()}


@pytest.mark.parametrize("label_source,normalize", [("predicted", True), ("dataset", False)])
def test_fisher_merging_matches_per_example_reference(pool_parts, label_source, normalize):
    base, models, data = pool_parts
    eps = 1e-4
    res = build_method({"name": "fisher_merging", "num_fisher_examples": 10, "batch_size": 4,
                        "label_source": label_source, "normalize_fisher_weight": normalize,
                        "minimal_fisher_weight": eps, "progress": False}).run(make_pool(base, models, data))
    fishers = {}
    for t in TASKS:
        x, y = data[t]["train"]
        f = reference_fisher(models[t], x, y if label_source == "dataset" else None)
        if normalize:
            norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in f.values())))
            f = {k: v / norm for k, v in f.items()}
        fishers[t] = f
    got = res.model.state_dict()
    for k in got:
        num = sum((fishers[t][k] + eps) * models[t].state_dict()[k] for t in TASKS)
        den = sum(fishers[t][k] + eps for t in TASKS)
        torch.testing.assert_close(got[k], num / den, rtol=1e-4, atol=1e-6)
    # the Fisher weighting really differs from the simple average here
    avg = torch.stack([models[t].state_dict()["2.weight"] for t in TASKS]).mean(0)
    assert (got["2.weight"] - avg).abs().max() > 1e-3
    assert res.metadata["data_used"]["examples"] == 30
    assert res.metadata["data_used"]["labels_read"] == (label_source == "dataset")


def test_fisher_merging_identical_models_and_errors(pool_parts):
    base, _, data = pool_parts
    same = {t: copy.deepcopy(base) for t in TASKS}
    res = build_method({"name": "fisher_merging", "num_fisher_examples": 5, "progress": False}).run(
        make_pool(base, same, data))
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(v, base.state_dict()[k])
    with pytest.raises(ConfigError, match="modelpool.datasets has no task 'c'"):
        build_method({"name": "fisher_merging", "progress": False}).run(
            make_pool(base, same, {t: data[t] for t in TASKS[:2]}))
    with pytest.raises(ConfigError, match="num_fisher_examples"):
        build_method({"name": "fisher_merging", "num_fisher_examples": 0})
    with pytest.raises(ConfigError, match="no split 'validation'"):
        build_method({"name": "fisher_merging", "split": "validation", "progress": False}).run(
            make_pool(base, same, data))


# ------------------------------------------------------------------------------------------------
# RegMean
# ------------------------------------------------------------------------------------------------
def np_regmean(ws, xs, alpha):
    """W = (sum_i G~_i)^-1 sum_i G~_i W_i^T, G~ = alpha G + (1 - alpha) diag(G), in numpy float64."""
    gsum = 0
    rhs = 0
    for w, x in zip(ws, xs):
        g = x.T @ x
        gt = alpha * g + (1 - alpha) * np.diag(np.diag(g))
        gsum = gsum + gt
        rhs = rhs + gt @ w.T
    return np.linalg.solve(gsum, rhs).T


@pytest.mark.parametrize("alpha,include_bias", [(0.9, False), (1.0, True), (0.5, False)])
def test_regmean_matches_closed_form(pool_parts, alpha, include_bias):
    base, models, data = pool_parts
    res = build_method({"name": "regmean", "num_regmean_examples": 10, "batch_size": 3, "progress": False,
                        "reduce_non_diagonal_ratio": alpha, "include_bias": include_bias}).run(
        make_pool(base, models, data))
    got = res.model.state_dict()
    sds = {t: {k: v.double().numpy() for k, v in models[t].state_dict().items()} for t in TASKS}
    xs0 = [data[t]["train"][0].double().numpy() for t in TASKS]
    xs2 = [np.tanh(x @ sds[t]["0.weight"].T + sds[t]["0.bias"]) for x, t in zip(xs0, TASKS)]  # each model's own
    for layer, xs in (("0", xs0), ("2", xs2)):
        if include_bias:
            xs_aug = [np.concatenate([x, np.ones((len(x), 1))], 1) for x in xs]
            ws = [np.concatenate([sds[t][f"{layer}.weight"], sds[t][f"{layer}.bias"][:, None]], 1) for t in TASKS]
            ref = np_regmean(ws, xs_aug, alpha)
            np.testing.assert_allclose(got[f"{layer}.weight"].numpy(), ref[:, :-1], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(got[f"{layer}.bias"].numpy(), ref[:, -1], rtol=1e-4, atol=1e-5)
        else:
            ref = np_regmean([sds[t][f"{layer}.weight"] for t in TASKS], xs, alpha)
            np.testing.assert_allclose(got[f"{layer}.weight"].numpy(), ref, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(got[f"{layer}.bias"].numpy(),
                                       np.mean([sds[t][f"{layer}.bias"] for t in TASKS], 0), rtol=1e-5, atol=1e-6)
    assert res.metadata["regmean_layers"] == 2


def test_regmean_two_linear_models_and_exclude():
    """Two bare nn.Linear models with known inputs; excluded layers are simple-averaged."""
    torch.manual_seed(3)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    xa = torch.tensor([[1.0, 0, 0], [0, 2, 0], [1, 1, 1], [0, 0, 3]])
    xb = torch.tensor([[2.0, 1, 0], [0, 1, 1], [1, 0, 2], [3, 0, 0]])
    data = {"a": {"train": (xa, torch.zeros(4, dtype=torch.long))}, "b": {"train": (xb, torch.zeros(4, dtype=torch.long))}}
    res = build_method({"name": "regmean", "reduce_non_diagonal_ratio": 1.0, "progress": False}).run(
        ModelPool({"a": a, "b": b}, datasets=data))
    ref = np_regmean([a.weight.detach().double().numpy(), b.weight.detach().double().numpy()],
                     [xa.double().numpy(), xb.double().numpy()], 1.0)
    np.testing.assert_allclose(res.model.weight.detach().numpy(), ref, rtol=1e-5, atol=1e-6)
    # the least-squares solution fits both models' outputs on their inputs better than averaging does
    resx = build_method({"name": "regmean", "exclude": ["*"], "progress": False}).run(
        ModelPool({"a": a, "b": b}, datasets=data))
    torch.testing.assert_close(resx.model.weight, (a.weight + b.weight) / 2)


@pytest.mark.parametrize("include_bias", [False, True])
def test_regmean_conv1d_layers(include_bias):
    """GPT-2's transformers Conv1D (y = x W + b, W stored (in, out)) is merged like nn.Linear with W^T: the
    paper's regression on each model's layer inputs, checked against the closed form written in numpy."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(4)
    a, b = Conv1D(2, 3), Conv1D(2, 3)  # nf=2 outputs, nx=3 inputs
    for m in (a, b):
        nn.init.normal_(m.weight)
        nn.init.normal_(m.bias)
    xa = torch.tensor([[1.0, 0, 0], [0, 2, 0], [1, 1, 1], [0, 0, 3]])
    xb = torch.tensor([[2.0, 1, 0], [0, 1, 1], [1, 0, 2], [3, 0, 0]])
    data = {"a": {"train": (xa, torch.zeros(4, dtype=torch.long))}, "b": {"train": (xb, torch.zeros(4, dtype=torch.long))}}
    res = build_method({"name": "regmean", "reduce_non_diagonal_ratio": 1.0, "include_bias": include_bias,
                        "progress": False}).run(ModelPool({"a": a, "b": b}, datasets=data))
    assert res.metadata["regmean_layers"] == 1
    ws = [m.weight.detach().double().numpy().T for m in (a, b)]  # (out, in)
    xs = [xa.double().numpy(), xb.double().numpy()]
    if include_bias:  # the bias solved with the weight on inputs [x, 1]
        ws = [np.concatenate([w, m.bias.detach().double().numpy()[:, None]], 1) for w, m in zip(ws, (a, b))]
        xs = [np.concatenate([x, np.ones((len(x), 1))], 1) for x in xs]
    ref = np_regmean(ws, xs, 1.0)
    got_w = res.model.weight.detach().numpy()
    assert got_w.shape == (3, 2)  # Conv1D storage kept
    np.testing.assert_allclose(got_w.T, ref[:, :3], rtol=1e-5, atol=1e-6)
    bias = ref[:, 3] if include_bias else (a.bias + b.bias).detach().numpy() / 2
    np.testing.assert_allclose(res.model.bias.detach().numpy(), bias, rtol=1e-5, atol=1e-6)


def test_regmean_identical_models(pool_parts):
    base, _, data = pool_parts
    res = build_method({"name": "regmean", "progress": False}).run(
        make_pool(base, {t: copy.deepcopy(base) for t in TASKS}, data))
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(v, base.state_dict()[k], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# AdaMerging
# ------------------------------------------------------------------------------------------------
def total_entropy(model: nn.Module, data) -> float:
    tot = 0.0
    with torch.no_grad():
        for t in TASKS:
            p = torch.softmax(model(data[t]["test"][0]), -1)
            tot += float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())
    return tot


def ta_model(base, models, lam: dict[str, float] | dict[str, dict[str, float]]) -> nn.Module:
    out = copy.deepcopy(base)
    sd = base.state_dict()
    new = {}
    for k, v in sd.items():
        acc = v.clone()
        for t in TASKS:
            w = lam[t][k] if isinstance(lam[t], dict) else lam[t]
            acc = acc + w * (models[t].state_dict()[k] - v)
        new[k] = acc
    out.load_state_dict(new)
    return out


@pytest.mark.parametrize("granularity", ["task_wise", "layer_wise"])
def test_adamerging_result_and_objective(pool_parts, granularity):
    base, models, data = pool_parts
    res = build_method({"name": "adamerging", "granularity": granularity, "steps": 40, "lr": 0.05,
                        "batch_size": 10, "progress": False}).run(make_pool(base, models, data))
    lam = res.metadata["lambdas"]
    assert set(lam) == set(TASKS)
    expect = ta_model(base, models, lam)
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(v, expect.state_dict()[k], rtol=1e-5, atol=1e-6)
    init = ta_model(base, models, {t: 0.3 for t in TASKS})
    assert total_entropy(res.model, data) < total_entropy(init, data) - 1e-3
    assert res.metadata["entropy_last"] < res.metadata["entropy_first"]
    du = res.metadata["data_used"]
    assert du["unlabeled_inputs"] == 30 and du["labels_read"] is False and du["split"] == "test"


def test_adamerging_identity_seed_and_errors(pool_parts):
    base, models, data = pool_parts
    res = build_method({"name": "adamerging", "steps": 3, "progress": False}).run(
        make_pool(base, {t: copy.deepcopy(base) for t in TASKS}, data))
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(v, base.state_dict()[k])
    cfg = {"name": "adamerging", "steps": 5, "lr": 0.05, "batch_size": 4, "progress": False}
    r1 = build_method(cfg).run(make_pool(base, models, data))
    r2 = build_method(cfg).run(make_pool(base, models, data))
    assert r1.metadata["lambdas"] == r2.metadata["lambdas"]  # seeded
    with pytest.raises(ModelMismatchError, match="_pretrained_"):
        build_method(cfg).run(make_pool(base, models, data, with_base=False))
    with pytest.raises(ConfigError, match="granularity"):
        build_method({"name": "adamerging", "granularity": "layerwise"})


def test_test_labels_never_read(pool_parts):
    """AdaMerging works on inputs alone: labels that are not class indices do not matter."""
    base, models, data = pool_parts

    class NoLabels(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], -1

    d2 = {t: {"test": NoLabels(data[t]["test"][0])} for t in TASKS}
    res = build_method({"name": "adamerging", "steps": 2, "progress": False}).run(make_pool(base, models, d2))
    assert res.metadata["data_used"]["unlabeled_inputs"] == 30


# ------------------------------------------------------------------------------------------------
# a tiny CLIP pool end to end (zero-shot heads from the pool's full CLIP, shared image preprocessing)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_pool_spec(tmp_path_factory):
    from transformers import CLIPModel

    from tests.test_taskpool_clip import build_image_dataset, build_tiny_clip

    root = tmp_path_factory.mktemp("clip_data_methods")
    clip_dir = build_tiny_clip(root / "clip")
    ds_dir = build_image_dataset(root / "ds", n_per_class=4)
    clip = CLIPModel.from_pretrained(clip_dir)
    from fusion_bench.methods.training.clip_finetune import vision_from_clip

    vis = {}
    for i, t in enumerate(["t1", "t2"]):
        v = vision_from_clip(clip)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in v.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        v.save_pretrained(root / t)
        vis[t] = str(root / t)
    ds = {"path": str(ds_dir), "split": "test"}
    return {"models": {"_pretrained_": str(clip_dir), **vis}, "model_class": "clip_vision",
            "datasets": {t: {"train": ds, "test": ds} for t in vis}}


@pytest.mark.parametrize("method", [
    {"name": "fisher_merging", "num_fisher_examples": 6, "batch_size": 3},
    {"name": "regmean", "num_regmean_examples": 6},
    {"name": "adamerging", "steps": 2, "batch_size": 4, "granularity": "layer_wise"},
])
def test_clip_pool_end_to_end(clip_pool_spec, method):
    from transformers import CLIPVisionModel

    pool = ModelPool(config=clip_pool_spec)
    res = build_method({**method, "progress": False}).run(pool)
    assert isinstance(res.model, CLIPVisionModel)
    assert res.metadata["adapter"] == "clip"
    sd = res.model.state_dict()
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    a, b = pool.load_model("t1").state_dict(), pool.load_model("t2").state_dict()
    k = next(k for k in sd if k.endswith("q_proj.weight"))
    assert not torch.equal(sd[k], a[k]) and not torch.equal(sd[k], b[k])


def test_clip_fisher_matches_generic_path(clip_pool_spec):
    """The CLIP adapter's Fisher (vmap per-example gradients) equals a per-example loop on the same classifier."""
    from fusion_bench.methods._task_data import CLIPTaskData
    from fusion_bench.methods.data.fisher_merging import per_example_squared_grads

    pool = ModelPool(config=clip_pool_spec)
    adapter = CLIPTaskData(pool)
    model = pool.load_model("t1").float()
    data = adapter.examples("t1", "train", 4, with_labels=True)
    clf = adapter.classifier(model, "t1")
    params = {f"vision.{k}": p for k, p in model.named_parameters()}
    got = per_example_squared_grads(clf, params, data.inputs, data.labels, 2, torch.device("cpu"))
    ref = {k: torch.zeros_like(p) for k, p in params.items()}
    for n in range(len(data)):
        clf.zero_grad()
        F.log_softmax(clf(data.inputs[n:n + 1]), -1)[0, int(data.labels[n])].backward()
        for k, p in params.items():
            if p.grad is not None:
                ref[k] += p.grad ** 2
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-3, atol=1e-7)
    assert Path(clip_pool_spec["models"]["t1"]).exists()


def test_generic_adapter_outputs(pool_parts):
    """Hugging Face style outputs with .logits are accepted; anything but (batch, classes) logits is an error."""
    base, models, data = pool_parts

    class Out:
        def __init__(self, logits):
            self.logits = logits

    class HFLike(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return Out(self.inner(x))

    wrapped = {t: HFLike(m) for t, m in models.items()}
    r1 = build_method({"name": "regmean", "progress": False}).run(make_pool(HFLike(base), wrapped, data))
    r2 = build_method({"name": "regmean", "progress": False}).run(make_pool(base, models, data))
    for k, v in r2.model.state_dict().items():
        torch.testing.assert_close(r1.model.state_dict()[f"inner.{k}"], v)

    class Features(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)[:, None, :]  # (batch, 1, classes): not logits

    with pytest.raises(ModelMismatchError, match="model\\(x\\) -> logits"):
        build_method({"name": "fisher_merging", "progress": False}).run(
            make_pool(base, {t: Features(m) for t, m in models.items()}, data))


def test_clip_pool_detected_without_model_class(clip_pool_spec):
    from fusion_bench.methods._task_data import is_clip_pool

    assert is_clip_pool(ModelPool(config={**clip_pool_spec, "model_class": "auto"}))
    assert not is_clip_pool(ModelPool({"a": mlp(0)}))


@pytest.mark.parametrize("name", ["fisher_merging", "regmean", "adamerging"])
def test_custom_adapter_without_pool_datasets(pool_parts, name):
    """A TaskDataAdapter set on the method supplies data and per-task classifiers (no modelpool.datasets)."""
    from fusion_bench.methods._task_data import TaskDataAdapter, TaskExamples

    base, models, data = pool_parts
    calls: list[str] = []

    class Adapter(TaskDataAdapter):
        kind = "custom"

        def examples(self, task, split, max_examples, with_labels=True):
            x, y = data[task]["test" if split == "test" else "train"]
            return TaskExamples(x[:max_examples], y[:max_examples] if with_labels else None)

        def classifier(self, model, task):
            calls.append(task)
            return nn.Sequential(model, nn.Linear(3, 2).requires_grad_(False))  # a task head on top

    method = build_method({"name": name, "progress": False, **({"steps": 2} if name == "adamerging" else {})})
    method.adapter = Adapter()
    res = method.run(ModelPool({"_pretrained_": base, **models}))
    assert res.metadata["adapter"] == "custom" and set(calls) == set(TASKS)
    assert all(torch.isfinite(v).all() for v in res.model.state_dict().values())


def test_kernels_against_loops():
    """The list kernels (used by the incremental sums) against element loops / numpy."""
    from fusion_bench.kernels.data.fisher import fisher_weighted_average
    from fusion_bench.kernels.data.regmean import regmean_linear

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(3, 2, generator=g) for _ in range(3)]
    fs = [torch.rand(3, 2, generator=g) for _ in range(3)]
    fs[0][0, 0] = fs[1][0, 0] = fs[2][0, 0] = 0.0  # no information: the simple average
    got = fisher_weighted_average(ts, fs, 1e-6)
    for i in range(3):
        for j in range(2):
            w = [float(f[i, j]) + 1e-6 for f in fs]
            ref = sum(wk * float(t[i, j]) for wk, t in zip(w, ts)) / sum(w)
            assert abs(float(got[i, j]) - ref) < 1e-5
    assert abs(float(got[0, 0]) - float(sum(t[0, 0] for t in ts)) / 3) < 1e-5
    xs = [torch.randn(7, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    ws = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    got = regmean_linear(ws, [x.T @ x for x in xs], 0.7)
    np.testing.assert_allclose(got.numpy(), np_regmean([w.numpy() for w in ws], [x.numpy() for x in xs], 0.7),
                               rtol=1e-10, atol=1e-12)


def test_clip_examples_lazy_take_equals_materialised(clip_pool_spec):
    from fusion_bench.methods._task_data import CLIPTaskData

    ex = CLIPTaskData(ModelPool(config=clip_pool_spec)).examples("t1", "test", None, with_labels=False)
    idx = torch.tensor([5, 0, 3])
    torch.testing.assert_close(ex.take(idx), ex.inputs[idx])
    torch.testing.assert_close(ex.take(slice(2, 4)), ex.inputs[2:4])
    assert ex.labels is None and len(ex) == 12
