"""WEMoE, sparse WEMoE and rank-one MoE against references written from the formulas on small modules, the
mixed-model report (parameters, inference cost, routing, plot), the CLI on the tiny CLIP zoo and the leaderboard's
mixed-model columns."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench.kernels.mixing.rankone import rank_one_experts, rank_one_merge, soft_top_k
from fusion_bench.kernels.mixing.wemoe import kept_count, magnitude_prune, sample_routing, weight_ensemble
from fusion_bench.methods import build_method
from fusion_bench.modelpool.base import ModelPool
from fusion_bench.models.moe import (
    RankOneMoE,
    WeightEnsemblingMoE,
    WeightEnsemblingRouter,
    fixed_routing,
    moe_layers,
    recording,
)

pytestmark = pytest.mark.usefixtures("one_thread")
TASKS = ["a", "b", "c"]
D, L = 6, 5


class MLP(nn.Module):
    def __init__(self, d: int = D, h: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.attn = nn.Linear(D, D)
        self.mlp = MLP()

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(self.ln(x))


class Toy(nn.Module):
    """Token inputs (B, L, 4) -> two blocks -> mean over tokens -> 3 logits."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = self.embed(x)
        for b in self.layers:
            h = b(h)
        return self.head(h.mean(1))


def perturbed(m: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    m = copy.deepcopy(m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture()
def toy_pool():
    torch.manual_seed(0)
    base = Toy()
    models = {t: perturbed(base, i + 1) for i, t in enumerate(TASKS)}
    g = torch.Generator().manual_seed(5)
    data = {t: {"test": (torch.randn(24, L, 4, generator=g), torch.randint(0, 3, (24,), generator=g))} for t in TASKS}
    return base, models, data


def pool_of(base, models, data):
    return ModelPool({"_pretrained_": base, **models}, datasets=data)


def direct_mlp(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
def test_weight_ensemble_and_sample_routing_against_loops():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 3, generator=g)
    tv = torch.randn(5, 4, 3, generator=g)
    w = torch.randn(7, 5, generator=g)
    got = weight_ensemble(base, tv, w)
    for b in range(7):
        ref = base.clone()
        for i in range(5):
            ref = ref + w[b, i] * tv[i]
        torch.testing.assert_close(got[b], ref)
    torch.testing.assert_close(weight_ensemble(base, tv.bfloat16(), w[0]), base + (w[0, :, None, None] * tv.bfloat16().float()).sum(0))
    tok = torch.randn(2, 3, 5, generator=g)
    torch.testing.assert_close(sample_routing(tok), torch.stack([tok[b].mean(0) for b in range(2)]))
    torch.testing.assert_close(sample_routing(tok, batch_reduce=True), tok.reshape(-1, 5).mean(0))


@pytest.mark.parametrize("shape,ratio", [((10, 7), 0.9), ((33,), 0.5), ((8, 8), 0.0), ((8, 8), 1.0), ((5, 3), 0.25)])
def test_magnitude_prune_keeps_the_exact_fraction_of_largest_entries(shape, ratio):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(shape, generator=g)
    out = magnitude_prune(t, ratio)
    n = t.numel()
    k = int((1 - ratio) * n + 0.5)
    assert kept_count(n, ratio) == k
    assert int(torch.count_nonzero(out)) == k
    kept = out != 0
    assert torch.equal(out[kept], t[kept])  # values untouched
    if 0 < k < n:
        assert t[kept].abs().min() >= t[~kept].abs().max()  # the largest magnitudes are the kept ones


def test_rank_one_experts_reconstruct_and_merge():
    g = torch.Generator().manual_seed(2)
    tau = torch.randn(6, 4, generator=g)
    u, svh = rank_one_experts(tau, 4)
    torch.testing.assert_close(u.T @ svh, tau, atol=1e-5, rtol=1e-5)  # full rank: exact
    u2, svh2 = rank_one_experts(tau, 2)
    U, S, Vh = torch.linalg.svd(tau, full_matrices=False)
    torch.testing.assert_close(u2.T @ svh2, (U[:, :2] * S[:2]) @ Vh[:2], atol=1e-5, rtol=1e-5)  # Eckart-Young
    base = torch.randn(6, 4, generator=g)
    w = torch.randn(3, 2, generator=g)
    got = rank_one_merge(base, u2, svh2, w)
    for b in range(3):
        ref = base + sum(w[b, e] * torch.outer(u2[e], svh2[e]) for e in range(2))
        torch.testing.assert_close(got[b], ref)
    s = torch.tensor([[0.1, 0.5, 0.3, 0.2]])
    thr = 0.3  # 2nd largest
    torch.testing.assert_close(soft_top_k(s, 2), s * torch.sigmoid(100 * (s - thr)))
    assert torch.equal(soft_top_k(s, -1), s)


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------
def _moe(depth=2, batch_reduce=False, seed=0):
    torch.manual_seed(seed)
    base = MLP()
    fts = [perturbed(base, 10 + i) for i in range(3)]
    tvs = {n: torch.stack([dict(f.named_parameters())[n].detach() - p.detach() for f in fts])
           for n, p in base.named_parameters()}
    router = WeightEnsemblingRouter(D, 3, 0.3, depth, generator=torch.Generator().manual_seed(3))
    return WeightEnsemblingMoE(copy.deepcopy(base), tvs, router, batch_reduce=batch_reduce), base, fts, tvs


def test_router_initialisation_outputs_about_init_lambda():
    r = WeightEnsemblingRouter(D, 4, 0.3, 2, generator=torch.Generator().manual_seed(0))
    out = r(torch.randn(8, L, D))
    assert out.shape == (8, L, 4) and (out - 0.3).abs().max() < 0.01
    assert torch.equal(r.fc2.bias, torch.full((4,), 0.3)) and torch.equal(r.fc1.bias, torch.zeros(D))
    assert torch.equal(WeightEnsemblingRouter(D, 4, 0.7, 0)(None), torch.full((4,), 0.7))


@pytest.mark.parametrize("batch_reduce", [False, True])
def test_wemoe_forward_equals_direct_weight_ensemble(batch_reduce):
    moe, base, fts, tvs = _moe(batch_reduce=batch_reduce)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, L, D, generator=g)
    got = moe(x)
    r_tok = moe.router(x)  # (B, L, T)
    r = r_tok.mean(1)
    if batch_reduce:
        r = r.mean(0, keepdim=True).expand(4, -1)
    p0 = dict(base.named_parameters())
    for b in range(4):
        w = {n: p0[n] + sum(r[b, i] * tvs[n][i] for i in range(3)) for n in p0}
        ref = direct_mlp(x[b], w["fc1.weight"], w["fc1.bias"], w["fc2.weight"], w["fc2.bias"])
        torch.testing.assert_close(got[b], ref, atol=1e-5, rtol=1e-5)


def test_one_hot_routing_gives_the_finetuned_mlp():
    moe, base, fts, _ = _moe(depth=1)
    x = torch.randn(3, L, D)
    for i in range(3):
        with torch.no_grad():  # a router whose output is exactly one-hot on task i
            moe.router.fc.weight.zero_()
            moe.router.fc.bias.copy_(F.one_hot(torch.tensor(i), 3).float())
        torch.testing.assert_close(moe(x), fts[i](x), atol=1e-5, rtol=1e-5)
        with fixed_routing(moe, F.one_hot(torch.tensor((i + 1) % 3), 3).float()):
            torch.testing.assert_close(moe(x), fts[(i + 1) % 3](x), atol=1e-5, rtol=1e-5)


def test_rank_one_moe_forward_equals_direct():
    torch.manual_seed(0)
    base = MLP()
    fts = [perturbed(base, 20 + i) for i in range(2)]
    p0 = dict(base.named_parameters())
    tv = {n: [dict(f.named_parameters())[n].detach() - p0[n].detach() for f in fts] for n in p0}
    k = 3
    experts = {}
    for n in ("fc1.weight", "fc2.weight"):
        us, ss = zip(*(rank_one_experts(t, k) for t in tv[n]))
        experts[n] = (torch.cat(us), torch.cat(ss))
    fixed = {n: 0.3 * sum(tv[n]) for n in ("fc1.bias", "fc2.bias")}
    router = WeightEnsemblingRouter(D, 2 * k, 0.3, 1, generator=torch.Generator().manual_seed(1))
    for select_k in (-1, 2):
        moe = RankOneMoE(copy.deepcopy(base), experts, fixed, router, select_k=select_k, rank_k=k)
        x = torch.randn(3, L, D)
        got = moe(x)
        w = soft_top_k(router(x).mean(1), select_k)
        for b in range(3):
            W = {n: p0[n] + sum(w[b, e] * torch.outer(experts[n][0][e], experts[n][1][e]) for e in range(2 * k))
                 for n in experts}
            ref = direct_mlp(x[b], W["fc1.weight"], p0["fc1.bias"] + fixed["fc1.bias"], W["fc2.weight"],
                             p0["fc2.bias"] + fixed["fc2.bias"])
            torch.testing.assert_close(got[b], ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# methods on a toy pool (generic adapter)
# ------------------------------------------------------------------------------------------------
def test_wemoe_method_structure_frozen_parts_and_entropy_decrease(toy_pool):
    base, models, data = toy_pool
    res = build_method({"name": "we_moe", "steps": 40, "lr": 0.02, "batch_size": 8, "merge_lambda": 0.2,
                        "progress": False, "cost_repeats": 1}).run(pool_of(base, models, data))
    model, meta = res.model, res.metadata
    layers = moe_layers(model)
    assert [n for n, _ in layers] == ["layers.0.mlp", "layers.1.mlp"]
    # outside the MLPs: task arithmetic with merge_lambda
    sd, b0 = model.state_dict(), base.state_dict()
    for k in ("embed.weight", "layers.0.attn.weight", "layers.1.ln.bias", "head.bias"):
        ref = b0[k] + 0.2 * sum(m.state_dict()[k] - b0[k] for m in models.values())
        torch.testing.assert_close(sd[k], ref)
    # the MoE modules hold theta_0 and the task vectors, untouched by training
    moe = layers[0][1]
    torch.testing.assert_close(moe.task_vector("fc1.weight")[1],
                               models["b"].layers[0].mlp.fc1.weight - base.layers[0].mlp.fc1.weight)
    torch.testing.assert_close(moe.base.fc2.bias, base.layers[0].mlp.fc2.bias)
    # entropy minimisation reduced the summed entropy
    assert meta["entropy_last"] < meta["entropy_first"] - 0.05
    # the report blocks
    mm = meta["mixed_model"]
    one = sum(p.numel() for p in base.parameters())
    mlp = sum(p.numel() for p in base.layers[0].mlp.parameters())
    router = sum(p.numel() for p in moe.router.parameters())
    assert mm["one_model_parameters"] == one
    assert mm["total_parameters"] == one + 2 * (3 * mlp + router)
    assert mm["extra_parameters"] == meta["extra_parameters"] == 2 * (3 * mlp + router)
    assert mm["applied_parameters_per_input"] == one + 2 * router
    assert mm["inference_cost_ratio"] > 0 and mm["inference"]["batch_size"] == 24
    r = meta["routing"]
    assert r["experts"] == TASKS and set(r["per_task"]) == set(TASKS)
    assert len(r["per_task"]["a"]["layers"]["layers.1.mlp"]) == 3
    # the recorded routing equals the routers' mean output on the task's inputs
    with recording(model) as rec:
        model(data["a"]["test"][0])
    torch.testing.assert_close(torch.tensor(r["per_task"]["a"]["layers"]["layers.0.mlp"]),
                               rec["layers.0.mlp"][0].mean(0), atol=1e-5, rtol=1e-5)
    assert all(not p.requires_grad for p in model.parameters())  # the returned model is frozen


def test_wemoe_identity_on_equal_models_and_seed(toy_pool):
    base, _, data = toy_pool
    same = {t: copy.deepcopy(base) for t in TASKS}
    res = build_method({"name": "we_moe", "steps": 3, "progress": False, "cost_repeats": 0}).run(pool_of(base, same, data))
    x = data["a"]["test"][0]
    torch.testing.assert_close(res.model(x), base(x), atol=1e-5, rtol=1e-5)
    _, models, _ = toy_pool
    cfg = {"name": "we_moe", "steps": 4, "lr": 0.01, "progress": False, "cost_repeats": 0, "seed": 3}
    a = build_method(cfg).run(pool_of(base, models, data)).model(x)
    b = build_method(cfg).run(pool_of(base, models, data)).model(x)
    assert torch.equal(a, b)


def test_sparse_wemoe_prunes_exactly_and_shares_the_router(toy_pool):
    base, models, data = toy_pool
    res = build_method({"name": "sparse_we_moe", "steps": 3, "progress": False, "cost_repeats": 0,
                        "tv_prune_ratio": 0.8}).run(pool_of(base, models, data))
    layers = moe_layers(res.model)
    assert layers[0][1].router is layers[1][1].router  # shared gate
    nz = 0
    for _, m in layers:
        for n, p in m.base.named_parameters():
            tv = m.task_vector(n)
            for i in range(3):
                assert int(torch.count_nonzero(tv[i])) == kept_count(p.numel(), 0.8)
                nz += kept_count(p.numel(), 0.8)
    mm = res.metadata["mixed_model"]
    one = sum(p.numel() for p in base.parameters())
    router = sum(p.numel() for p in layers[0][1].router.parameters())
    assert mm["total_parameters"] == one + nz + router
    assert res.metadata["extra_storage_bytes"] < 4 * (3 * 2 * sum(p.numel() for p in base.layers[0].mlp.parameters()))
    pe = build_method({"name": "sparse_we_moe", "steps": 1, "progress": False, "cost_repeats": 0,
                       "position_encoding": True, "position_encoding_dim": 4}).run(pool_of(base, models, data))
    lay = moe_layers(pe.model)
    assert lay[0][1].router.fc1.in_features == D + 4 and not torch.equal(lay[0][1].position_encoding,
                                                                         lay[1][1].position_encoding)


def test_rankone_moe_method(toy_pool):
    base, models, data = toy_pool
    res = build_method({"name": "rankone_moe", "steps": 5, "lr": 0.01, "rank_k": 4, "progress": False,
                        "cost_repeats": 0}).run(pool_of(base, models, data))
    (_, m0), _ = moe_layers(res.model)
    assert m0.num_weights == 3 * 4 and m0.rank_k == 4 and m0.router.fc.out_features == 12
    assert res.metadata["routing"]["experts"] == TASKS  # reported per task (mean of its rank-one experts)
    assert len(res.metadata["routing"]["per_task"]["b"]["mean"]) == 3
    # biases: fixed theta_0 + init_lambda * sum tau
    b = m0.merged_params(torch.zeros(12))["fc1.bias"]
    ref = base.layers[0].mlp.fc1.bias + 0.3 * sum(m.layers[0].mlp.fc1.bias - base.layers[0].mlp.fc1.bias
                                                  for m in models.values())
    torch.testing.assert_close(b, ref)


def test_config_errors(toy_pool):
    from fusion_bench.errors import ConfigError, ModelMismatchError

    base, models, data = toy_pool
    with pytest.raises(ConfigError, match="moe_modules"):
        build_method({"name": "we_moe", "moe_modules": ["*.ffn"], "progress": False}).run(pool_of(base, models, data))
    with pytest.raises(ConfigError, match="eval_routing"):
        build_method({"name": "we_moe", "eval_routing": "per_token"})
    with pytest.raises(ModelMismatchError, match="_pretrained_"):
        build_method({"name": "we_moe", "progress": False}).run(ModelPool(models, datasets=data))


# ------------------------------------------------------------------------------------------------
# the tiny CLIP zoo: CLI, report, plot, leaderboard columns
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_zoo(tiny_clip_zoo):
    """The session's tiny zoo (tests/conftest.py)."""
    return tiny_clip_zoo


@pytest.mark.parametrize("method", ["we_moe", "sparse_we_moe", "rankone_moe"])
def test_cli_on_tiny_zoo(tiny_zoo, tmp_path, capsys, method):
    from tests.conftest import run_cli

    rep = tmp_path / "report.json"
    code, out, err = run_cli([f"method={method}", "modelpool=clip_zoo_tiny", "taskpool=clip_zoo_tiny",
                              f"modelpool.root={tiny_zoo.root}", f"taskpool.root={tiny_zoo.root}",
                              "modelpool.build=false", "taskpool.build=false", "method.steps=2",
                              "method.max_test_samples=16", "method.cost_repeats=1", "method.progress=false",
                              "taskpool.max_samples=16", f"report_path={rep}"], capsys)
    assert code == 0, err
    r = json.loads(rep.read_text())
    mm = r["metadata"]["mixed_model"]
    assert mm["total_parameters"] > mm["one_model_parameters"] > 0
    assert r["cost"]["extra_parameters"] == mm["extra_parameters"]
    assert mm["inference_cost_ratio"] > 0
    routing = r["metadata"]["routing"]
    assert set(routing["per_task"]) == set(tiny_zoo.tasks) and len(routing["experts"]) == len(tiny_zoo.tasks)
    png = tmp_path / "report_routing.png"
    assert r["artifacts"]["routing_plot"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"
    assert 0 <= r["evaluation"]["average"]["accuracy"] <= 1


def test_leaderboard_mixed_model_columns(tiny_zoo, tmp_path):
    from fusion_bench.benchmark.leaderboard import main, run_leaderboard

    doc = run_leaderboard("tiny", str(tiny_zoo.root), tmp_path / "lb", methods=["task_arithmetic", "we_moe"],
                          max_samples=16, log=lambda s: None,
                          method_options={"we_moe": {"steps": 2, "max_test_samples": 16, "cost_repeats": 1,
                                                     "progress": False}})
    rows = {r["method"]: r for r in doc["rows"]}
    we = rows["we_moe"]
    assert we["hyperparameters"]["steps"] == 2
    rep = json.loads((tmp_path / "lb" / "reports" / "we_moe.json").read_text())
    mm = rep["metadata"]["mixed_model"]
    assert we["total_parameters"] == mm["total_parameters"]
    assert we["active_parameters"] == mm["active_parameters_per_input"]
    assert we["inference_cost_ratio"] == mm["inference_cost_ratio"]
    ta = rows["task_arithmetic"]
    assert ta["total_parameters"] == mm["one_model_parameters"] and ta["inference_cost_ratio"] == 1.0
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "total params" in md and "inference ×" in md
    assert (tmp_path / "lb" / "reports" / "we_moe_routing.png").exists()
    # --set METHOD.KEY=VALUE on the command line; values are YAML scalars, unknown methods are errors
    from fusion_bench.benchmark.leaderboard import parse_method_options
    from fusion_bench.errors import ConfigError

    assert parse_method_options(["we_moe.steps=3", "we_moe.merge_lambda=0.05", "we_moe.eval_routing=per_batch"]) == {
        "we_moe": {"steps": 3, "merge_lambda": 0.05, "eval_routing": "per_batch"}}
    with pytest.raises(ConfigError, match="--set"):
        parse_method_options(["steps=3"])
    with pytest.raises(ConfigError, match="we_moe"):
        main(["--scale", "tiny", "--root", str(tiny_zoo.root), "--out", str(tmp_path / "x"), "--methods",
              "task_arithmetic", "--set", "we_mo.steps=2"])
