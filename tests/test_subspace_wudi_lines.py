"""WUDI-Merging, LiNeS, SVC, DOGE-TA, ExPO and magnitude-difference pruning: each against a naive reference
written from its paper's formula (plain autograd / Python loops, independent of the kernels), option
validation, and an end-to-end run on a tiny Llama pool in memory and through the streaming engine."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fusion_bench.errors import ConfigError, FusionBenchError, ModelMismatchError
from fusion_bench.kernels.subspace import lines as LK
from fusion_bench.methods import build_method
from fusion_bench.modelpool.base import ModelPool

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


class Stack(nn.Module):
    """embed -> 3 numbered blocks of one linear layer -> head (names layers.N.lin.weight)."""

    def __init__(self, d=6):
        super().__init__()
        self.embed = nn.Embedding(5, d)
        self.layers = nn.ModuleList(nn.ModuleDict({"lin": nn.Linear(d, d)}) for _ in range(3))
        self.head = nn.Linear(d, 4)


def _pool(n=3, dtype=torch.float64, scale=0.1, seed=0, cls=Stack):
    torch.manual_seed(seed)
    base = cls().to(dtype)
    models = {"_pretrained_": base}
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(n):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=dtype))
        models[f"m{i}"] = m
    return models


def _sd(models):
    return {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in models.items()}


def _run(name, models, **opts):
    with torch.no_grad():
        return build_method({"name": name, **opts}).run(ModelPool(dict(models))).model.state_dict()


# ----------------------------------------------------------------------------------------------
# WUDI
# ----------------------------------------------------------------------------------------------
def _wudi_reference(taus, steps, lr):
    """The paper's objective by autograd, Adam from the sum (the official loop, written here)."""
    tm = nn.Parameter(sum(t.clone() for t in taus))
    opt = torch.optim.Adam([tm], lr=lr)
    for _ in range(steps):
        loss = sum(((tm - t) @ t.T).pow(2).sum() / t.pow(2).sum() for t in taus)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tm.detach()


@pytest.mark.parametrize("shape", [(6, 5), (2, 20)])  # (2, 20): the factored product (2 N out < in)
def test_wudi_kernel_matches_autograd_loop(shape):
    from fusion_bench.kernels.subspace.wudi import wudi_merge_matrix, wudi_objective

    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    ref = _wudi_reference(taus, 60, 1e-2)
    got = wudi_merge_matrix(taus, iterations=60, lr=1e-2)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    assert wudi_objective(got, taus) < wudi_objective(sum(taus), taus)  # it optimised


def test_wudi_method_2d_optimised_other_tensors_averaged():
    models = _pool()
    sd = _sd(models)
    got = _run("wudi_merging", models, iterations=30, lr=1e-3)
    b = sd["_pretrained_"]
    for k, v in b.items():
        taus = [sd[f"m{i}"][k] - v for i in range(3)]
        exp = v + (_wudi_reference(taus, 30, 1e-3) if v.dim() == 2 else sum(taus) / 3)
        torch.testing.assert_close(got[k], exp, rtol=1e-9, atol=1e-9, msg=k)


# ----------------------------------------------------------------------------------------------
# LiNeS
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,idx", [
    ("model.layers.3.mlp.up_proj.weight", 3), ("bert.encoder.layer.11.output.dense.bias", 11),
    ("transformer.h.0.attn.c_attn.weight", 0), ("visual.transformer.resblocks.7.ln_1.weight", 7),
    ("blocks.2.attn.qkv.weight", 2), ("encoder.block.4.layer.1.DenseReluDense.wi.weight", 4),
    ("model.embed_tokens.weight", None), ("lm_head.weight", None), ("vision_model.post_layernorm.weight", None)])
def test_lines_layer_detection(key, idx):
    assert LK.layer_index(key) == idx


@pytest.mark.parametrize("base_method,base_options", [("task_arithmetic", {}), ("ties_merging", {"density": 0.5})])
def test_lines_matches_formula(base_method, base_options):
    models = _pool(n=3)
    sd = _sd(models)
    beta = 0.4
    got = _run("lines", models, beta=beta, base_method=base_method, base_options=base_options)
    merged = _run(base_method, models, scaling_factor=1.0, **base_options)  # the paper's unscaled tau_MTL
    b = sd["_pretrained_"]
    tmtl = {k: merged[k] - b[k] for k in b}
    l1_sum = sum(float(sum(sd[f"m{i}"][k] - b[k] for i in range(3)).abs().sum()) for k in b)
    l1_mtl = sum(float(t.abs().sum()) for t in tmtl.values())
    alpha = l1_sum / l1_mtl / 3
    for k in b:
        layer = int(k.split(".")[1]) if k.startswith("layers.") else None
        lam = alpha if layer is None else alpha + beta * layer / 2  # L = 3 blocks
        torch.testing.assert_close(got[k], b[k] + lam * tmtl[k], rtol=1e-9, atol=1e-12, msg=k)
    if base_method == "task_arithmetic":
        assert abs(alpha - 1 / 3) < 1e-12  # TA sum: alpha = 1/N


def test_lines_explicit_alpha_and_refuses_unnumbered():
    models = _pool(n=2)
    sd = _sd(models)
    got = _run("lines", models, alpha=0.2, beta=0.6)
    b = sd["_pretrained_"]
    k = "layers.2.lin.weight"
    torch.testing.assert_close(got[k], b[k] + 0.8 * sum(sd[n][k] - b[k] for n in ("m0", "m1")))
    from fusion_bench.testing.check_method import tiny_pool_models

    with pytest.raises(ModelMismatchError, match="layer number"):
        _run("lines", tiny_pool_models(2))


# ----------------------------------------------------------------------------------------------
# SVC
# ----------------------------------------------------------------------------------------------
def _svc_reference(base, tensors, merged, alpha):
    """Algorithm 1 with numpy loops over directions r and tasks i."""
    b = base.double().numpy()
    dm = merged.double().numpy() - b
    u, s, vh = np.linalg.svd(dm, full_matrices=False)
    gam = np.zeros_like(s)
    for r in range(len(s)):
        a_m = u[:, r] @ dm
        tot = 0.0
        for t in tensors:
            a_i = u[:, r] @ (t.double().numpy() - b)
            s_ri = float(a_m @ a_i) / max(float(a_i @ a_i), 1e-12)
            tot += max(alpha, s_ri)
        gam[r] = len(tensors) / tot
    return torch.from_numpy(b + u @ np.diag(gam * s) @ vh)


def test_svc_matches_algorithm():
    models = _pool(n=3)
    sd = _sd(models)
    got = _run("svc", models, alpha=0.1)
    ta = _run("task_arithmetic", models, scaling_factor=0.3)
    b = sd["_pretrained_"]
    for k in b:
        if b[k].dim() == 2:
            exp = _svc_reference(b[k], [sd[f"m{i}"][k] for i in range(3)], ta[k], 0.1)
            torch.testing.assert_close(got[k], exp, rtol=1e-9, atol=1e-10, msg=k)
        else:
            assert torch.equal(got[k], ta[k]), k


# ----------------------------------------------------------------------------------------------
# DOGE-TA
# ----------------------------------------------------------------------------------------------
def _doge_reference(sd, keys, lamda, subspace, keep, steps, lr):
    names = sorted(n for n in sd if n != "_pretrained_")
    b = sd["_pretrained_"]
    tv = {n: {k: sd[n][k] - b[k] for k in keys} for n in names}
    out = {}
    # global mask per task: entries >= the (d - floor(keep d))-th smallest |tau| of the sorted concatenation
    masks = {}
    for n in names:
        flat = torch.cat([tv[n][k].reshape(-1) for k in sorted(keys)]).abs()
        d = flat.numel()
        kth = torch.sort(flat).values[d - int(d * keep) - 1]
        masks[n] = {k: tv[n][k].abs() >= kth for k in keys}
    for k in keys:
        vs = [tv[n][k] for n in names]
        lams = [lamda / v.norm() for v in vs]
        m = min(vs[0].shape)
        r = m // len(vs)
        su = torch.zeros(vs[0].shape[0], m, dtype=vs[0].dtype)
        for i, v in enumerate(vs):
            su[:, i * r:(i + 1) * r] = torch.linalg.svd(v, full_matrices=False)[0][:, :r]
        uu = torch.linalg.svd(su, full_matrices=False)[0][:, : m // subspace]
        proj = uu @ uu.T
        delta = nn.Parameter(torch.zeros_like(vs[0]))
        opt = torch.optim.Adam([delta], lr=lr)
        for _ in range(steps):
            s_all = sum(lm * v for lm, v in zip(lams, vs))
            sd_all = sum(lm * delta for lm in lams)
            loss = sum((-v * s_all - v * sd_all + v * v).sum(dim=1).pow(2).sum() for v in vs)
            opt.zero_grad()
            loss.backward()
            delta.grad = delta.grad - proj @ delta.grad
            opt.step()
        out[k] = b[k] + sum(lm * (v + delta.detach()) * masks[n][k] for lm, v, n in zip(lams, vs, names))
    return out


def test_doge_matches_reference():
    models = _pool(n=3, scale=0.1)
    sd = _sd(models)
    got = _run("doge_ta", models, iterations=40, lr=1e-2, keep_ratio=0.4, subspace=2, lamda=0.5)
    keys = [k for k, v in sd["_pretrained_"].items() if v.dim() == 2 and "embed" not in k]
    exp = _doge_reference(sd, keys, 0.5, 2, 0.4, 40, 1e-2)
    for k, v in sd["_pretrained_"].items():
        if k in exp:
            torch.testing.assert_close(got[k], exp[k], rtol=1e-8, atol=1e-10, msg=k)
        else:
            assert torch.equal(got[k], v), k  # not selected: pretrained


# ----------------------------------------------------------------------------------------------
# ExPO and magnitude-difference pruning
# ----------------------------------------------------------------------------------------------
def test_expo_formula_and_pool_rules():
    models = _pool(n=2)
    sd = _sd(models)
    got = _run("expo", models, alpha=0.3, model="m1")
    for k, v in sd["_pretrained_"].items():
        torch.testing.assert_close(got[k], sd["m1"][k] + 0.3 * (sd["m1"][k] - v))
    with pytest.raises(ModelMismatchError, match="exactly one aligned model"):
        _run("expo", models)
    with pytest.raises(ConfigError, match="method.model"):
        _run("expo", models, model="nope")


@pytest.mark.parametrize("prune_type,rescale", [("minor", {}), ("major", {"rescale": True}),
                                                ("minor", {"rescale_factor": 2.0})])
def test_magnitude_diff_matches_rowwise_loop(prune_type, rescale):
    models = _pool(n=1)
    # ties in magnitude: the stable order prunes the lower column first
    with torch.no_grad():
        w = models["m0"].layers[0].lin.weight
        w[0, :3] = models["_pretrained_"].layers[0].lin.weight[0, :3] + 0.05
    sd = _sd(models)
    got = _run("magnitude_diff_pruning", models, prune_ratio=0.5, prune_type=prune_type, **rescale)
    factor = rescale.get("rescale_factor", 2.0 if rescale.get("rescale") else 1.0)
    for k, v in sd["_pretrained_"].items():
        if v.dim() != 2 or "embed" in k:
            assert torch.equal(got[k], v), k  # unselected: pretrained (FusionBench)
            continue
        d = (sd["m0"][k] - v).numpy()
        exp = d.copy()
        n_prune = int(d.shape[1] * 0.5)
        for row in range(d.shape[0]):
            sign = 1 if prune_type == "minor" else -1
            order = sorted(range(d.shape[1]), key=lambda j: (sign * abs(d[row, j]), j))
            for j in order[:n_prune]:
                exp[row, j] = 0.0
        torch.testing.assert_close(got[k], v + factor * torch.from_numpy(exp), msg=k)


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,opts,key", [
    ("wudi_merging", {"lr": 0.0}, "method.lr"), ("wudi_merging", {"iterations": -1}, "method.iterations"),
    ("lines", {"beta": float("nan")}, "method.beta"), ("lines", {"layer_pattern": "layers\\.\\d+"}, "method.layer_pattern"),
    ("lines", {"base_method": "nope"}, "method.base_method"), ("lines", {"base_method": "simple_average"}, "method.base_method"),
    ("lines", {"base_options": {"scaling_factr": 1.0}}, "method.base_options.scaling_factr"),
    ("svc", {"alpha": -1.0}, "method.alpha"), ("doge_ta", {"subspace": 0}, "method.subspace"),
    ("doge_ta", {"keep_ratio": 1.5}, "method.keep_ratio"), ("expo", {"alpha": -0.1}, "method.alpha"),
    ("magnitude_diff_pruning", {"prune_ratio": 2.0}, "method.prune_ratio"),
    ("magnitude_diff_pruning", {"extract_names": ["("]}, "method.extract_names"),
    ("magnitude_diff_pruning", {"prune_type": "minr"}, "method.prune_type"),
])
def test_bad_options_name_the_key(name, opts, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_method({"name": name, **opts})


def test_doge_refuses_empty_selection():
    with pytest.raises(FusionBenchError, match="method.include"):
        _run("doge_ta", _pool(n=2), include=["*nothing*"])


# ----------------------------------------------------------------------------------------------
# end to end: tiny Llama pool, in memory == streaming
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from tests.test_streaming_helpers import save_zoo

    return save_zoo(tmp_path_factory.mktemp("zoo13"), "llama", n=3, dtype=torch.float32)


@pytest.mark.parametrize("name,opts", [
    ("wudi_merging", {"iterations": 20}), ("lines", {"beta": 0.5}),
    ("lines", {"base_method": "ties_merging", "base_options": {"density": 0.3}}), ("svc", {}),
    ("doge_ta", {"iterations": 20}), ("expo", {"model": "ft1"}), ("magnitude_diff_pruning", {"model": "ft0"}),
])
def test_streaming_equals_in_memory(zoo, tmp_path, name, opts):
    from fusion_bench.engine.streaming import merge_to_folder
    from fusion_bench.modelpool import build_modelpool
    from tests.test_streaming_helpers import load_sd

    ref = build_method({"name": name, **opts}).run(build_modelpool({"type": "causal_lm", "models": zoo})).model
    ref = ref.state_dict()
    out = tmp_path / "merged"
    merge_to_folder(build_method({"name": name, **opts}), build_modelpool({"type": "causal_lm", "models": zoo}), out,
                    block_elements=200, max_shard_size="20KB")
    got = load_sd(out)
    base = load_sd(zoo["_pretrained_"])
    assert set(got) <= set(ref)
    for k, v in got.items():
        assert torch.equal(v, ref[k]), f"{name}: {k} differs"
    assert any(not torch.equal(got[k], base[k]) for k in got)
