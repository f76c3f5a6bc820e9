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


# ------------------------------------------------------------------------------------------------
# RegMean++
# ------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 5)

    def forward(self, x, scale=None):
        return (x + self.fc2(torch.tanh(self.fc1(x))) * scale,)


class StackNet(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Linear(4, 5)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = b(h, scale=0.5)[0]
        return self.head(h)


def np_regmean(ws, gs, alpha):
    gt = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in gs]
    return np.linalg.solve(sum(gt), sum(g @ w.T for g, w in zip(gt, ws))).T


def np_regmean_pp(models: dict[str, dict[str, np.ndarray]], xs: dict[str, np.ndarray], alpha: float):
    """The paper's procedure written out: averaged embedding; per block, Gram matrices of model i's block on the
    merged model's activations of task i, RegMean per linear layer, biases averaged; merged block forward."""
    names = list(models)
    avg = {k: np.mean([models[n][k] for n in names], 0) for k in models[names[0]]}
    out = dict(avg)
    h = {n: xs[n] @ avg["emb.weight"].T + avg["emb.bias"] for n in names}
    for li in range(2):
        p = f"blocks.{li}."
        g1, g2 = [], []
        for n in names:
            m = models[n]
            a = h[n]
            g1.append(a.T @ a)
            z = np.tanh(a @ m[p + "fc1.weight"].T + m[p + "fc1.bias"])
            g2.append(z.T @ z)
        out[p + "fc1.weight"] = np_regmean([models[n][p + "fc1.weight"] for n in names], g1, alpha)
        out[p + "fc2.weight"] = np_regmean([models[n][p + "fc2.weight"] for n in names], g2, alpha)
        for n in names:
            z = np.tanh(h[n] @ out[p + "fc1.weight"].T + out[p + "fc1.bias"])
            h[n] = h[n] + 0.5 * (z @ out[p + "fc2.weight"].T + out[p + "fc2.bias"])
    return out


@pytest.mark.parametrize("alpha", [0.95, 1.0])
def test_regmean_plusplus_matches_layer_by_layer_reference(parts, alpha):
    _, _, data = parts
    base = StackNet(0)
    models = {t: fine_tuned(base, i + 1, 0.2) for i, t in enumerate(TASKS)}
    res = build_method({"name": "regmean_plusplus", "reduce_non_diagonal_ratio": alpha, "batch_size": 5,
                        "num_regmean_examples": 10, "progress": False}).run(make_pool(base, models, data))
    xs = {t: data[t]["train"][0][torch.tensor(_even(12, 10))].double().numpy() for t in TASKS}
    ref = np_regmean_pp({t: sd_np(models[t]) for t in TASKS}, xs, alpha)
    got = sd_np(res.model)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert res.metadata["block_stack"] == "blocks" and res.metadata["regmean_layers"] == 4
    assert res.metadata["data_used"]["examples"] == 30
    # the second block differs from plain RegMean (whose Gram matrices come from each model's own activations)
    plain = sd_np(build_method({"name": "regmean", "reduce_non_diagonal_ratio": alpha, "num_regmean_examples": 10,
                                "progress": False}).run(make_pool(base, models, data)).model)
    avg = np.mean([sd_np(models[t])["emb.weight"] for t in TASKS], 0)
    np.testing.assert_allclose(got["emb.weight"], avg, rtol=1e-6)  # outside the stack: averaged (RegMean solves it)
    assert np.abs(plain["emb.weight"] - avg).max() > 1e-4
    assert np.abs(plain["blocks.1.fc1.weight"] - got["blocks.1.fc1.weight"]).max() > 1e-4


def _even(n, k):
    from fusion_bench.data.images import subset_indices

    return subset_indices(n, k)


def test_regmean_plusplus_keep_pretrained_identity_and_errors(parts):
    _, _, data = parts
    base = StackNet(0)
    models = {t: fine_tuned(base, i + 1, 0.2) for i, t in enumerate(TASKS)}
    res = build_method({"name": "regmean_plusplus", "keep_pretrained": ["head.*"], "num_regmean_examples": 6,
                        "progress": False}).run(make_pool(base, models, data))
    torch.testing.assert_close(res.model.head.weight, base.head.weight)
    same = build_method({"name": "regmean_plusplus", "num_regmean_examples": 6, "progress": False}).run(
        make_pool(base, {t: copy.deepcopy(models["a"]) for t in TASKS}, data))
    for k, v in same.model.state_dict().items():
        torch.testing.assert_close(v, models["a"].state_dict()[k], rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="method.layers"):
        build_method({"name": "regmean_plusplus", "layers": "nope", "progress": False}).run(
            make_pool(base, models, data))
    from fusion_bench.errors import ModelMismatchError

    with pytest.raises(ModelMismatchError, match="ModuleList"):
        build_method({"name": "regmean_plusplus", "progress": False}).run(
            make_pool(mlp(0), {t: mlp(i) for i, t in enumerate(TASKS)}, data))


# ------------------------------------------------------------------------------------------------
# a tiny CLIP pool end to end
# ------------------------------------------------------------------------------------------------
from tests.test_data_methods import clip_pool_spec  # noqa: E402,F401  (fixture)


@pytest.mark.parametrize("method", [
    {"name": "regmean_plusplus", "num_regmean_examples": 6, "batch_size": 4},
    {"name": "adamerging", "steps": 2, "batch_size": 4, "task_vectors": "ties"},
])
def test_clip_pool_end_to_end(clip_pool_spec, method):  # noqa: F811
    from transformers import CLIPVisionModel

    pool = ModelPool(config=clip_pool_spec)
    res = build_method({**method, "progress": False}).run(pool)
    assert isinstance(res.model, CLIPVisionModel)
    sd = res.model.state_dict()
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    a = pool.load_model("t1").state_dict()
    k = next(k for k in sd if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert not torch.equal(sd[k], a[k])
    if method["name"] == "regmean_plusplus":
        assert res.metadata["block_stack"].endswith("encoder.layers")
        assert res.metadata["regmean_layers"] == 6 * res.metadata["blocks"]


# ------------------------------------------------------------------------------------------------
# trust-region task arithmetic
# ------------------------------------------------------------------------------------------------
def np_trust_region(base, models, data, lam, q, zero_shot, n_samples):
    keys = [k for k, _ in base.named_parameters()]
    flat = lambda sd: np.concatenate([sd[k].ravel() for k in keys])  # noqa: E731
    b = flat(sd_np(base))
    taus = [flat(sd_np(models[t])) - b for t in TASKS]
    grads = []
    for i, t in enumerate(TASKS):
        if zero_shot:
            grads.append(np.abs(taus[i]))
            continue
        x, y = data[t]["train"]
        idx = _even(len(x), n_samples)
        acc = np.zeros_like(b)
        for j in idx:  # one backward pass per example
            m = copy.deepcopy(base)
            loss = torch.nn.functional.cross_entropy(m(x[j:j + 1]), y[j:j + 1])
            loss.backward()
            acc += np.concatenate([dict(m.named_parameters())[k].grad.double().numpy().ravel() for k in keys]).__abs__()
        grads.append(acc / len(idx))
    omega = sum(grads[i] * np.abs(taus[j]) for i in range(3) for j in range(3) if i != j)
    srt = np.sort(omega)
    thr = srt[max(0, min(int(len(omega) * q), len(omega) - 1))]
    merged = b + lam * sum(taus) * (omega < thr)
    out, off = {}, 0
    for k in keys:
        size = base.state_dict()[k].numel()
        out[k] = merged[off:off + size].reshape(base.state_dict()[k].shape)
        off += size
    return out, (omega < thr).mean()


@pytest.mark.parametrize("zero_shot", [False, True])
def test_trust_region_matches_reference(parts, zero_shot):
    base, models, data = parts
    res = build_method({"name": "trust_region_task_arithmetic", "scaling_factor": 0.4, "threshold_quantile": 0.8,
                        "zero_shot": zero_shot, "max_samples": 8, "batch_size": 3,
                        "progress": False}).run(make_pool(base, models, data))
    ref, kept = np_trust_region(base, models, data, 0.4, 0.8, zero_shot, 8)
    got = sd_np(res.model)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert res.metadata["kept_fraction"] == pytest.approx(kept)
    assert 0.7 < kept < 0.85  # about the quantile: the most conflicting entries are gone
    assert res.metadata["data_used"]["examples"] == (0 if zero_shot else 24)
    if not zero_shot:
        assert res.metadata["data_used"]["labels_read"] is True


# ------------------------------------------------------------------------------------------------
# Frank-Wolfe merging
# ------------------------------------------------------------------------------------------------
def ce_grad(state: dict[str, torch.Tensor], tasks, data, norm) -> dict[str, np.ndarray]:
    """Gradient of sum_t sum_n CE(f_theta(x_n), y_n) / norm over every train example of the tasks."""
    m = mlp(0)
    m.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in state.items()})
    loss = sum(torch.nn.functional.cross_entropy(m(data[t]["train"][0]), data[t]["train"][1], reduction="sum")
               for t in tasks) / norm
    loss.backward()
    return {k: p.grad.double().numpy() for k, p in m.named_parameters()}


def np_cos(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float((a * b).sum() / (na * nb))


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_frank_wolfe_hard_matches_reference(parts, granularity):
    base, models, data = parts
    res = build_method({"name": "frank_wolfe_hard", "max_iters": 3, "step_size": 0.5, "scaling_factor": 0.4,
                        "dataset_size": 12, "batch_size": 5, "granularity": granularity,
                        "progress": False}).run(make_pool(base, models, data))
    b = sd_np(base)
    cands = {t: sd_np(models[t]) for t in TASKS}
    theta = {k: b[k] + 0.4 * sum(cands[t][k] - b[k] for t in TASKS) for k in b}
    cands["initial"] = dict(theta)
    for it in range(3):
        g = ce_grad(theta, TASKS, data, 12 * 3)
        if granularity == "task":
            scores = {c: sum(np_cos(g[k], w[k]) for k in b) for c, w in cands.items()}
            best = min(scores, key=scores.get)
            pick = {k: best for k in b}
            assert res.metadata["iterations"][it]["selected"] == best
        else:
            pick = {k: min(cands, key=lambda c: np_cos(g[k], cands[c][k])) for k in b}
        gamma = 2 / (it + 2) * 0.5 * 0.4
        theta = {k: theta[k] + gamma * (cands[pick[k]][k] - theta[k]) for k in b}
    got = sd_np(res.model)
    for k in b:
        np.testing.assert_allclose(got[k], theta[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert res.metadata["data_used"]["examples"] == 36 and res.metadata["data_used"]["labels_read"]


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_frank_wolfe_soft_selection_and_steps(parts, granularity):
    """With a vanishing AdaMerging learning rate the coefficients stay at their initial values: one iteration gives
    theta_0 + 0.3 sum_s (theta_s - theta_0) over the picked checkpoints (each picked once), which must be the
    oracle's picks from per-task gradients at theta_0, excluding earlier picks."""
    base, models, data = parts
    res = build_method({"name": "frank_wolfe_soft", "max_iters": 2, "dataset_size": 12, "batch_size": 5,
                        "ada_iters": 2, "ada_lr": 1e-12, "ada_init": 0.3, "ada_coeff": 0.0,
                        "granularity": granularity, "progress": False}).run(make_pool(base, models, data))
    b = sd_np(base)
    cands = {t: sd_np(models[t]) for t in TASKS}
    taken: dict[str, set] = {k: set() for k in b}
    picks = []
    for t in TASKS:
        g = ce_grad(b, [t], data, 12 * 3)
        if granularity == "task":
            allowed = [c for c in cands if c not in taken["0.weight"]]
            best = min(allowed, key=lambda c: sum(np_cos(g[k], cands[c][k]) for k in b))
            pick = {k: best for k in b}
        else:
            pick = {k: min([c for c in cands if c not in taken[k]], key=lambda c: np_cos(g[k], cands[c][k]))
                    for k in b}
        for k, c in pick.items():
            taken[k].add(c)
        picks.append(pick)
    if granularity == "task":
        assert res.metadata["iterations"][0]["selected"] == [p["0.weight"] for p in picks]
    assert all(len(v) == 3 for v in taken.values())  # each checkpoint once per tensor
    expect = {k: b[k] + 0.3 * sum(cands[p[k]][k] - b[k] for p in picks) for k in b}
    got = sd_np(res.model)
    for k in b:
        np.testing.assert_allclose(got[k], expect[k], rtol=1e-5, atol=1e-6, err_msg=k)
    du = res.metadata["data_used"]
    assert du["labels_read"] and du["examples"] == 36


# ------------------------------------------------------------------------------------------------
# Representation Surgery
# ------------------------------------------------------------------------------------------------
def test_surgery_training_matches_reference_loop():
    """train_surgery against the paper's objective written as a plain loop: z' = z - up(relu(down z)), up = 0 at
    start, L1 to the target, one Adam over every adapter, one step per task per iteration."""
    from fusion_bench.methods.test_time.surgery import train_surgery
    from fusion_bench.utils import seeded_generator

    g = torch.Generator().manual_seed(0)
    zm = {t: torch.nn.functional.normalize(torch.randn(20, 6, generator=g), dim=-1) for t in TASKS}
    zt = {t: torch.nn.functional.normalize(zm[t] + 0.3 * torch.randn(20, 6, generator=g), dim=-1) for t in TASKS}
    got = train_surgery(zm, zt, hidden=4, steps=25, lr=0.01, batch_size=8, seed=5)
    downs, ups = {}, {}
    for t in TASKS:
        gen = seeded_generator(5, "surgery", t)
        downs[t] = ((torch.rand(4, 6, generator=gen) * 2 - 1) / np.sqrt(6)).requires_grad_(True)
        ups[t] = torch.zeros(6, 4, requires_grad=True)
    opt = torch.optim.Adam([p for t in TASKS for p in (downs[t], ups[t])], lr=0.01)
    gen = seeded_generator(5, "surgery", "batches")
    for _ in range(25):
        for t in TASKS:
            idx = torch.randint(0, 20, (8,), generator=gen)
            z = zm[t][idx]
            loss = (z - torch.relu(z @ downs[t].T) @ ups[t].T - zt[t][idx]).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for t in TASKS:
        torch.testing.assert_close(got[t].down.weight, downs[t].detach())
        torch.testing.assert_close(got[t].up.weight, ups[t].detach())
        before = (zm[t] - zt[t]).abs().mean()
        with torch.no_grad():
            after = (got[t](zm[t]) - zt[t]).abs().mean()
        assert after < before


def test_surgery_clip_end_to_end(clip_pool_spec):  # noqa: F811
    from fusion_bench.models.clip import image_features

    pool = ModelPool(config=clip_pool_spec)
    res = build_method({"name": "representation_surgery", "base_method": "task_arithmetic",
                        "base_options": {"scaling_factor": 0.5}, "surgery_steps": 30, "lr": 0.01, "batch_size": 4,
                        "hidden_dim": 4, "progress": False}).run(pool)
    assert res.kind == "per_task" and set(res.models) == {"t1", "t2"}
    md = res.metadata
    assert md["extra_parameters"] == 2 * 2 * 4 * res.models["t1"].visual_projection.projection.out_features
    assert md["base"]["method"] == "task_arithmetic" and md["data_used"]["labels_read"] is False
    assert all(md["l1_to_finetuned_after"][t] < md["l1_to_finetuned_before"][t] for t in ("t1", "t2"))
    m = res.models["t1"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        z = image_features(m.vision_model, m.visual_projection.projection, x)
        expect = z - m.visual_projection.surgery.up(torch.relu(m.visual_projection.surgery.down(z)))
        torch.testing.assert_close(m(x), expect)
    with pytest.raises(ConfigError, match="base_method"):
        build_method({"name": "representation_surgery", "base_method": "representation_surgery"})


# ------------------------------------------------------------------------------------------------
# Concrete subspace masks
# ------------------------------------------------------------------------------------------------
def test_concrete_mask_sampling():
    from fusion_bench.kernels.data.concrete import sample_concrete_mask

    lg = {"w": torch.linspace(-3, 3, 12).reshape(3, 4), "b": torch.zeros(5)}
    m = sample_concrete_mask(lg, 0.5, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    for k, v in lg.items():
        u = torch.rand(v.shape, generator=g)
        raw = torch.sigmoid((v + torch.log(u) - torch.log(1 - u)) / 0.5)
        torch.testing.assert_close(m[k], raw / raw.mean())
    big = {"w": torch.full((20000,), 1.0)}
    d = sample_concrete_mask(big, 0.5, torch.Generator().manual_seed(2), discrete=True)["w"]
    keep = float((d > 0).float().mean())
    assert abs(keep - float(torch.sigmoid(torch.tensor(1.0)))) < 0.02  # Bernoulli(sigmoid(l))
    assert float(d.mean()) == pytest.approx(1.0)  # normalised by its mean


def ref_concrete(base, models, data, cfg, adamerging: bool):
    """The concrete methods' loop written out on the MLP (functional forward)."""
    from fusion_bench.utils import seeded_generator

    name = "concrete_adamerging" if adamerging else "concrete_task_arithmetic"
    keys = [k for k, _ in base.named_parameters()]
    th0 = {k: v.detach().float() for k, v in base.state_dict().items()}
    taus = {t: {k: models[t].state_dict()[k].float() - th0[k] for k in keys} for t in TASKS}
    logits = {k: torch.zeros_like(th0[k], requires_grad=True) for k in keys}
    noise, batches = seeded_generator(0, name, "mask"), seeded_generator(0, name, "batches")
    x_test = {t: data[t]["test"][0] for t in TASKS}

    def sample(discrete=False):
        out = {}
        for k in keys:
            u = torch.rand(th0[k].shape, generator=noise).clamp(1.1920929e-07, 1 - 1.1920929e-07)
            m = ((u < torch.sigmoid(logits[k])).float() if discrete else
                 torch.sigmoid((logits[k] + torch.log(u) - torch.log1p(-u)) / cfg["temperature"]))
            out[k] = m / m.mean()
        return out

    def forward(theta, x):
        h = torch.tanh(x @ theta["0.weight"].T + theta["0.bias"])
        return h @ theta["2.weight"].T + theta["2.bias"]

    def merged(lam, mask):
        return {k: th0[k] + mask[k] * sum((lam[i, j] if lam.ndim == 2 else lam[i]) * taus[t][k]
                                          for i, t in enumerate(TASKS)) for j, k in enumerate(keys)}

    def loss_of(theta):
        tot = 0
        for t in TASKS:
            idx = torch.randint(0, 12, (min(cfg["batch_size"], 12),), generator=batches)
            p = torch.log_softmax(forward(theta, x_test[t][idx]), -1)
            tot = tot + (-(p.exp() * p).sum(-1).mean())
        return tot

    opt = torch.optim.Adam(list(logits.values()), lr=cfg["lr"])
    if not adamerging:
        lam = torch.full((3,), cfg["scaling_factor"])
        for _ in range(cfg["max_steps"]):
            loss = loss_of(merged(lam, sample()))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return merged(lam, {k: v.detach() for k, v in sample().items()})
    lam = torch.full((3, len(keys)), 0.3, requires_grad=True)
    base_opt = torch.optim.Adam([lam], lr=cfg["base_lr"])
    for _ in range(cfg["max_steps"]):
        mask = sample()
        inner = loss_of(merged(lam, {k: v.detach() for k, v in mask.items()}))
        base_opt.zero_grad()
        inner.backward()
        with torch.no_grad():
            lam.fill_(0.3)
        base_opt.step()
        outer = loss_of(merged(lam.detach(), mask))
        opt.zero_grad()
        outer.backward()
        opt.step()
    mask = {k: v.detach() for k, v in sample().items()}
    with torch.no_grad():
        lam.fill_(0.3)
    ada = torch.optim.Adam([lam], lr=cfg["adamerging_lr"])
    for _ in range(cfg["max_adamerging_steps"]):
        loss = loss_of(merged(lam, mask))
        ada.zero_grad()
        loss.backward()
        ada.step()
    return merged(lam.detach(), mask)


@pytest.mark.parametrize("adamerging", [False, True])
def test_concrete_matches_reference_loop(parts, adamerging):
    base, models, data = parts
    cfg = {"temperature": 0.5, "lr": 0.05, "max_steps": 4, "batch_size": 5}
    if adamerging:
        cfg |= {"base_lr": 0.5, "adamerging_lr": 0.01, "max_adamerging_steps": 3}
        name = "concrete_adamerging"
    else:
        cfg |= {"scaling_factor": 0.3}
        name = "concrete_task_arithmetic"
    res = build_method({"name": name, **cfg, "progress": False}).run(make_pool(base, models, data))
    ref = ref_concrete(base, models, data, cfg, adamerging)
    for k, v in ref.items():
        torch.testing.assert_close(res.model.state_dict()[k], v.detach(), rtol=1e-4, atol=1e-5)
    assert res.metadata["data_used"]["labels_read"] is False
    same = build_method({"name": name, **cfg, "progress": False}).run(
        make_pool(base, {t: copy.deepcopy(base) for t in TASKS}, data))
    for k, v in same.model.state_dict().items():  # no task vector: the mask changes nothing
        torch.testing.assert_close(v, base.state_dict()[k])


def test_adamerging_cross_entropy_diagnostic(parts):
    """objective=cross_entropy reads the split's labels and lowers the labelled loss (the supervised diagnostic)."""
    base, models, data = parts

    def ce(model):
        with torch.no_grad():
            return sum(float(torch.nn.functional.cross_entropy(model(data[t]["validation"][0]),
                                                               data[t]["validation"][1])) for t in TASKS)

    res = build_method({"name": "adamerging", "objective": "cross_entropy", "split": "validation", "steps": 30,
                        "lr": 0.05, "batch_size": 12, "progress": False}).run(make_pool(base, models, data))
    b = sd_np(base)
    init = mlp(0)
    init.load_state_dict({k: torch.as_tensor(b[k] + 0.3 * sum(sd_np(models[t])[k] - b[k] for t in TASKS),
                                             dtype=torch.float32) for k in b})
    assert ce(res.model) < ce(init) - 1e-3
    assert res.metadata["data_used"]["labels_read"] is True and res.metadata["objective"] == "cross_entropy"


# ------------------------------------------------------------------------------------------------
# DAWE
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("merge_mode", ["task_wise", "layer_wise"])
def test_dawe_per_input_merge_matches_formula(parts, merge_mode):
    base, models, data = parts
    res = build_method({"name": "dawe", "merge_mode": merge_mode, "max_steps": 20, "learning_rate": 0.05,
                        "batch_size": 4, "progress": False}).run(make_pool(base, models, data))
    m = res.model
    assert res.metadata["data_used"]["labels_read"] is False
    x = data["a"]["test"][0][:5]
    b = sd_np(base)
    keys = [k for k, _ in base.named_parameters()]
    with torch.no_grad():
        out = m(x)
        feats = base(x)  # phi: the frozen pretrained model (its logits for a plain classifier)
        codes = m.gate(feats)
    for i in range(5):
        c = codes[i].numpy().astype(np.float64)
        c = c if merge_mode == "task_wise" else c.reshape(3, len(keys))
        theta = {k: b[k] + sum((c[t] if c.ndim == 1 else c[t, j]) * (sd_np(models[u])[k] - b[k])
                               for t, u in enumerate(TASKS)) for j, k in enumerate(keys)}
        h = np.tanh(x[i].double().numpy() @ theta["0.weight"].T + theta["0.bias"])
        np.testing.assert_allclose(out[i].double().numpy(), h @ theta["2.weight"].T + theta["2.bias"], rtol=1e-4,
                                   atol=1e-5)
    assert res.metadata["entropy_last"] < res.metadata["entropy_first"]
    assert codes.std(0).max() > 0  # coefficients depend on the input
    n_model = sum(p.numel() for p in base.parameters())
    assert res.metadata["extra_parameters"] == 3 * n_model + n_model + sum(p.numel() for p in m.gate.parameters())


def test_dawe_clip_end_to_end(clip_pool_spec):  # noqa: F811
    pool = ModelPool(config=clip_pool_spec)
    res = build_method({"name": "dawe", "max_steps": 2, "batch_size": 2, "progress": False}).run(pool)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = res.model(pixel_values=x)
        one = res.model(pixel_values=x[1:2])
    assert out.pooler_output.shape[0] == 3
    torch.testing.assert_close(out.pooler_output[1:2], one.pooler_output, rtol=1e-4, atol=1e-5)  # per input
