"""CART, PCB-Merging, Consensus TA, TALL masks and EMR-Merging against naive references written from the
papers' formulas (and the official code's exact choices), on a small pool: 3 tasks, a 6x5 matrix and a bias.

The references never call fusion_bench kernels: float64 numpy/torch arithmetic on the task vectors,
which are formed in float32 as the methods form them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fusion_bench.engine.streaming import merge_to_folder
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.methods import build_method
from fusion_bench.modelpool import build_modelpool
from fusion_bench.modelpool.base import ModelPool
from tests.test_streaming_helpers import load_sd, save_zoo

NAMES = ["t0", "t1", "t2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _pool_sds(seed: int = 0, scale: float = 0.1) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(6, generator=g)}
    sds = {"_pretrained_": base}
    for n in NAMES:
        sds[n] = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
    return sds


def _run(name: str, sds, **opts):
    return build_method({"name": name, **opts}).run(ModelPool({k: dict(v) for k, v in sds.items()}))


def _merged(res) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in res.model.state_dict().items()}


def _taus(sds, key) -> list[np.ndarray]:
    """Task vectors of one tensor, formed in float32 (as the methods do), as float64 arrays."""
    return [(sds[n][key] - sds["_pretrained_"][key]).double().numpy() for n in NAMES]


def _flat_taus(sds) -> np.ndarray:
    """The whole-model task vectors, flattened in the key order [w, b] (N x d)."""
    return np.stack([np.concatenate([_taus(sds, k)[i].reshape(-1) for k in ("w", "b")]) for i in range(len(NAMES))])


def _unflat(vec: np.ndarray, sds) -> dict[str, np.ndarray]:
    w = sds["_pretrained_"]["w"]
    return {"w": vec[: w.numel()].reshape(w.shape), "b": vec[w.numel():]}


# ----------------------------------------------------------------------------------------------
# CART
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frac,lam", [(0.08, 1.0), (0.4, 0.7), (1.0, 1.0)])
def test_cart_matches_reference(frac, lam):
    sds = _pool_sds()
    got = _merged(_run("cart", sds, rank_fraction=frac, scaling_factor=lam))
    for key in ("w", "b"):
        thetas = [sds[n][key].double().numpy() for n in NAMES]
        avg = sum(thetas) / len(thetas)
        if key == "w":
            k = max(1, int(frac * min(avg.shape)))
            acc = np.zeros_like(avg)
            for th in thetas:
                u, s, vt = np.linalg.svd(th - avg, full_matrices=False)
                acc += u[:, :k] @ np.diag(s[:k]) @ vt[:k]
            want = avg + lam * acc
        else:
            want = avg  # 1-D: the centered vectors sum to 0
        np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-5)


def test_cart_ignores_the_base_and_full_rank_is_the_average():
    sds = _pool_sds()
    no_base = {k: v for k, v in sds.items() if k != "_pretrained_"}
    a = _merged(_run("cart", sds, rank_fraction=0.4))
    b = _merged(_run("cart", no_base, rank_fraction=0.4))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    full = _merged(_run("cart", sds, rank_fraction=1.0, scaling_factor=5.0))
    avg = sum(sds[n]["w"].double().numpy() for n in NAMES) / 3
    np.testing.assert_allclose(full["w"], avg, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# PCB-Merging (official code: flattened whole model)
# ----------------------------------------------------------------------------------------------
def _pcb_reference(sds, ratio, lam, clip=1e-4):
    tau = torch.from_numpy(_flat_taus(sds))
    n, d = tau.shape

    def norm_rows(x):
        lo = x.min(1, keepdim=True).values
        hi = x.max(1, keepdim=True).values
        rng = hi - lo
        return torch.where(rng > 0, (x - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(x))

    def clamp_rows(x, lo_frac, hi_frac):
        s = x.sort(1).values
        return torch.maximum(torch.minimum(x, s[:, int(d * (1 - hi_frac) - 1)].unsqueeze(1)),
                             s[:, int(d * lo_frac)].unsqueeze(1))

    a = clamp_rows(tau.abs(), clip, clip)
    clipped = tau.sign() * a
    intra = torch.exp(n * norm_rows(a) ** 2)
    inter = torch.tanh(tau * tau.sum(0))
    score = intra * inter
    w = norm_rows(clamp_rows(score, 1 - ratio, 0))
    merged = lam * (clipped * w).sum(0) / (w.sum(0).clamp_min(1e-12))
    return _unflat(merged.numpy(), sds)


@pytest.mark.parametrize("ratio,lam,clip", [(0.1, 1.0, 1e-4), (0.3, 1.2, 0.05), (0.6, 0.8, 1e-4), (0.95, 1.0, 0.1)])
def test_pcb_matches_reference(ratio, lam, clip):
    sds = _pool_sds(seed=3)
    got = _merged(_run("pcb_merging", sds, pcb_ratio=ratio, scaling_factor=lam, clip_ratio=clip))
    want = _pcb_reference(sds, ratio, lam, clip)
    for key in ("w", "b"):
        delta = got[key] - sds["_pretrained_"][key].double().numpy()
        np.testing.assert_allclose(delta, want[key], rtol=1e-4, atol=1e-6)


def test_pcb_is_whole_model_not_per_tensor():
    """The bias alone would get other statistics: the whole-model result differs from a per-tensor one."""
    sds = _pool_sds(seed=3)
    whole = _merged(_run("pcb_merging", sds, pcb_ratio=0.3))
    only_b = {k: {"b": v["b"]} for k, v in sds.items()}
    per_tensor = _merged(_run("pcb_merging", only_b, pcb_ratio=0.3))
    assert not np.allclose(whole["b"], per_tensor["b"])


# ----------------------------------------------------------------------------------------------
# TALL masks / consensus
# ----------------------------------------------------------------------------------------------
def _tall(taus, mtl, lam):
    return [np.abs(t) > lam * np.abs(mtl - t) for t in taus]


@pytest.mark.parametrize("lam,k,alpha", [(0.4, 2, 0.3), (0.2, 1, 1.0), (0.6, 3, 0.5), (0.4, 0, 0.3)])
def test_consensus_ta_matches_reference(lam, k, alpha):
    sds = _pool_sds(seed=5)
    got = _merged(_run("consensus_task_arithmetic", sds, tall_mask_lambda=lam, consensus_k=k, scaling_factor=alpha))
    for key in ("w", "b"):
        taus = _taus(sds, key)
        mtl = sum(taus)
        count = sum(m.astype(int) for m in _tall(taus, mtl, lam))
        want = sds["_pretrained_"][key].double().numpy() + alpha * np.where(count >= k, mtl, 0.0)
        np.testing.assert_allclose(got[key], want, rtol=1e-6, atol=1e-6)


def _ties_dis_sum(tau: np.ndarray, density: float) -> np.ndarray:
    """TIES as the TALL-mask code runs it: keep |x| >= the (d - int(d*K))-th smallest magnitude of each row
    (whole model), elect sgn(sum) with zero votes set to the majority sign, sum the agreeing entries."""
    n, d = tau.shape
    trimmed = np.zeros_like(tau)
    for i in range(n):
        kth = np.sort(np.abs(tau[i]))[d - int(d * density) - 1]
        trimmed[i] = np.where(np.abs(tau[i]) >= kth, tau[i], 0.0)
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    keep = np.where(sign > 0, trimmed > 0, trimmed < 0)
    return (trimmed * keep).sum(0)


def test_consensus_ties_matches_reference():
    sds = _pool_sds(seed=6)
    got = _merged(_run("consensus_task_arithmetic", sds, base_merge="ties", consensus_k=2, scaling_factor=0.5,
                       tall_mask_lambda=0.3))
    tau = _flat_taus(sds)
    mtl = _ties_dis_sum(tau, 0.2)
    count = sum(m.astype(int) for m in _tall(list(tau), mtl, 0.3))
    want = _unflat(0.5 * np.where(count >= 2, mtl, 0.0), sds)
    for key in ("w", "b"):
        delta = got[key] - sds["_pretrained_"][key].double().numpy()
        np.testing.assert_allclose(delta, want[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lams", [{}, {"t1": 0.2, "t2": 0.9}])
def test_tall_mask_per_task_models(lams):
    sds = _pool_sds(seed=7)
    res = _run("tall_mask_task_arithmetic", sds, tall_mask_lambda=0.4, tall_mask_lambdas=lams)
    assert res.kind == "per_task" and list(res.models) == NAMES
    assert res.metadata["needs_task_id"] is True
    numel = 6 * 5 + 6
    assert res.metadata["extra_storage_bytes"] == 3 * math.ceil(numel / 8)
    for i, n in enumerate(NAMES):
        got = {k: v.double().numpy() for k, v in res.models[n].state_dict().items()}
        for key in ("w", "b"):
            taus = _taus(sds, key)
            mtl = sum(taus)
            lam = lams.get(n, 0.4)
            m = np.abs(taus[i]) > lam * np.abs(mtl - taus[i])
            want = sds["_pretrained_"][key].double().numpy() + np.where(m, mtl, 0.0)
            np.testing.assert_allclose(got[key], want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# EMR-Merging
# ----------------------------------------------------------------------------------------------
def _emr_reference(sds, rescale, zero_sign):
    keys = ("w", "b")
    uni, masks = {}, {}
    for key in keys:
        taus = _taus(sds, key)
        s = sum(taus)
        gamma = np.where(s > 0, 1.0, -1.0) if zero_sign == "negative" else np.sign(s)
        masks[key] = [t * gamma > 0 for t in taus]
        mag = np.zeros_like(s)
        for t, m in zip(taus, masks[key]):
            mag = np.maximum(mag, np.where(m, np.abs(t), 0.0))
        uni[key] = gamma * mag
    lams = []
    for i in range(len(NAMES)):
        agg = np.mean if rescale == "tensor_means" else np.sum
        a = sum(agg(np.abs(_taus(sds, k)[i])) for k in keys)
        b = sum(agg(np.abs(uni[k] * masks[k][i])) for k in keys)
        lams.append(a / b)
    return {n: {k: sds["_pretrained_"][k].double().numpy() + lams[i] * masks[k][i] * uni[k] for k in keys}
            for i, n in enumerate(NAMES)}, lams


@pytest.mark.parametrize("rescale", ["tensor_means", "model"])
@pytest.mark.parametrize("zero_sign", ["negative", "zero"])
def test_emr_matches_reference(rescale, zero_sign):
    sds = _pool_sds(seed=9)
    # an exact zero vote on some entries: t0 = -t1 and t2 = 0 there
    for n, f in (("t0", 1.0), ("t1", -1.0), ("t2", 0.0)):
        sds[n]["w"][0] = sds["_pretrained_"]["w"][0] + f * 0.25
    res = _run("emr_merging", sds, rescale=rescale, zero_sign=zero_sign)
    want, lams = _emr_reference(sds, rescale, zero_sign)
    assert res.kind == "per_task" and res.metadata["needs_task_id"] is True
    np.testing.assert_allclose([res.metadata["rescalers"][n] for n in NAMES], lams, rtol=1e-5)
    for n in NAMES:
        got = {k: v.double().numpy() for k, v in res.models[n].state_dict().items()}
        for key in ("w", "b"):
            np.testing.assert_allclose(got[key], want[n][key], rtol=1e-5, atol=1e-6)


def test_emr_one_model_gives_it_back():
    sds = _pool_sds(seed=2)
    one = {k: sds[k] for k in ("_pretrained_", "t0")}
    res = _run("emr_merging", one)
    for key, v in res.models["t0"].state_dict().items():
        torch.testing.assert_close(v, sds["t0"][key], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# options and errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,key,value", [
    ("cart", "rank_fraction", 0.0), ("cart", "rank_fraction", 1.5), ("cart", "scaling_factor", float("nan")),
    ("pcb_merging", "pcb_ratio", 0.0), ("pcb_merging", "pcb_ratio", 1.2), ("pcb_merging", "clip_ratio", 0.5),
    ("consensus_task_arithmetic", "consensus_k", -1), ("consensus_task_arithmetic", "base_merge", "sum"),
    ("consensus_task_arithmetic", "tall_mask_lambda", -0.1), ("consensus_task_arithmetic", "ties_density", 2.0),
    ("tall_mask_task_arithmetic", "tall_mask_lambda", -1.0),
    ("tall_mask_task_arithmetic", "tall_mask_lambdas", {"t0": -1.0}),
    ("emr_merging", "rescale", "global"), ("emr_merging", "zero_sign", "positive"),
])
def test_bad_options_name_the_key(name, key, value):
    with pytest.raises(ConfigError, match=key):
        build_method({"name": name, key: value})


@pytest.mark.parametrize("name", ["tall_mask_task_arithmetic", "consensus_task_arithmetic"])
def test_per_task_lambda_of_unknown_model_is_refused(name):
    with pytest.raises(ConfigError, match="tall_mask_lambdas"):
        _run(name, _pool_sds(), tall_mask_lambdas={"nope": 0.3})


@pytest.mark.parametrize("name", ["pcb_merging", "consensus_task_arithmetic", "tall_mask_task_arithmetic",
                                  "emr_merging"])
def test_base_model_required(name):
    sds = {k: v for k, v in _pool_sds().items() if k != "_pretrained_"}
    with pytest.raises(ModelMismatchError, match="_pretrained_"):
        _run(name, sds)


# ----------------------------------------------------------------------------------------------
# end to end: files on disk, Python API, streaming engine
# ----------------------------------------------------------------------------------------------
ALL = ["cart", "pcb_merging", "consensus_task_arithmetic", "tall_mask_task_arithmetic", "emr_merging"]


@pytest.mark.parametrize("name", ALL)
def test_toy_pool_from_files(tmp_path, name):
    from tests.conftest import make_toy

    toy = make_toy(tmp_path)
    res = build_method(name).run(build_modelpool(toy["pool"]))
    models = res.models.values() if res.kind == "per_task" else [res.model]
    for m in models:
        sd = m.state_dict()
        assert set(sd) == set(toy["base"])
        assert all(torch.isfinite(v).all() for v in sd.values())
        assert any(not torch.equal(sd[k], toy["base"][k]) for k in sd)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    return save_zoo(tmp_path_factory.mktemp("zoo"), "llama", n=3, dtype=torch.float32)


@pytest.mark.parametrize("name,opts", [("cart", {"rank_fraction": 0.2}), ("pcb_merging", {}),
                                       ("pcb_merging", {"pcb_ratio": 0.9}), ("consensus_task_arithmetic", {}),
                                       ("consensus_task_arithmetic", {"base_merge": "ties"})])
def test_streaming_equals_in_memory(zoo, tmp_path, name, opts):
    ref = build_method({"name": name, **opts}).run(build_modelpool({"type": "causal_lm", "models": zoo})).model
    ref = ref.state_dict()
    out = tmp_path / "merged"
    merge_to_folder(build_method({"name": name, **opts}), build_modelpool({"type": "causal_lm", "models": zoo}), out,
                    block_elements=200, max_shard_size="20KB")
    got = load_sd(out)
    assert set(got) <= set(ref)
    for k, v in got.items():
        assert torch.equal(v, ref[k]), f"{name}: tensor {k} differs"
    base = load_sd(zoo["_pretrained_"])
    assert any(not torch.equal(got[k], base[k]) for k in got)


@pytest.mark.parametrize("name", ["tall_mask_task_arithmetic", "emr_merging"])
def test_per_task_on_causal_lm_zoo(zoo, name):
    res = build_method(name).run(build_modelpool({"type": "causal_lm", "models": zoo}))
    assert res.kind == "per_task" and len(res.models) == 3
    base = load_sd(zoo["_pretrained_"])
    for m in res.models.values():
        sd = m.state_dict()
        assert any(not torch.equal(sd[k], base[k]) for k in base if k in sd)
