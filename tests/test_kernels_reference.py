"""Each data-free merging kernel against a naive reference written from its paper's formula.

References use Python loops over entries (numpy float64 for the arithmetic after the task vectors
are formed in float32, the kernels' compute dtype), on small random tensors, plus edge cases.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.kernels.merging import dare as D
from fusion_bench.kernels.merging import magmax as MM
from fusion_bench.kernels.merging import model_stock as MS
from fusion_bench.kernels.merging import slerp as SL
from fusion_bench.kernels.merging import ties as T
from fusion_bench.methods import build_method
from fusion_bench.modelpool.base import ModelPool
from fusion_bench.utils import seeded_generator


def _rand(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _taus32(base, tensors):
    """Task vectors formed in float32 (as the kernels do), then float64 numpy for the reference."""
    return [(t.float() - base.float()).double().numpy().reshape(-1) for t in tensors]


def _sgn(x: float) -> int:
    return int(x > 0) - int(x < 0)


# ----------------------------------------------------------------------------------------------
# TIES
# ----------------------------------------------------------------------------------------------
def ref_keep_count(n: int, density: float) -> int:
    return min(n, max(0, int(math.floor(density * n + 0.5 + 1e-9))))


def ref_threshold(values: list[float], k: int) -> float:
    """k-th largest magnitude by a full Python sort (inf when nothing is kept)."""
    if k <= 0:
        return math.inf
    return sorted((abs(v) for v in values), reverse=True)[k - 1]


def ref_top_k(values, k: int) -> list[bool]:
    """The paper's top-k% trim, exactly k entries: sort the entries by (magnitude descending, position
    ascending) and keep the first k, so among equal magnitudes the lower flat index wins."""
    order = sorted(range(len(values)), key=lambda j: (-abs(float(values[j])), j))
    keep = [False] * len(values)
    for j in order[:max(k, 0)]:
        keep[j] = True
    return keep


def ref_ties_entries(taus: list[np.ndarray], thresholds: list[float] | None, election: str, merge: str,
                     masks: list[list[bool]] | None = None) -> np.ndarray:
    """TIES Algorithm 1 (Yadav et al. 2023) entry by entry, from already-formed task vectors; the trim keeps
    the entries of ``masks`` or, without masks, |tau| >= the threshold (every tie)."""
    n, p = len(taus), taus[0].size
    if masks is None:
        masks = [[abs(taus[i][j]) >= thresholds[i] for j in range(p)] for i in range(n)]
    trimmed = [[taus[i][j] if masks[i][j] else 0.0 for j in range(p)] for i in range(n)]
    out = np.zeros(p)
    for j in range(p):
        col = [trimmed[i][j] for i in range(n)]
        vote = sum(col) if election == "mass" else sum(_sgn(v) for v in col)
        gamma = _sgn(vote)
        agree = [v for v in col if v != 0 and _sgn(v) == gamma]
        if not agree:
            out[j] = 0.0
        elif merge == "mean":
            out[j] = sum(agree) / len(agree)
        elif merge == "sum":
            out[j] = sum(agree)
        else:
            out[j] = gamma * max(abs(v) for v in agree)
    return out


def ref_ties_tensor(base, tensors, density, lam, election="mass", merge="mean"):
    taus = _taus32(base, tensors)
    k = ref_keep_count(taus[0].size, density)
    merged = ref_ties_entries(taus, None, election, merge, masks=[ref_top_k(t, k) for t in taus])
    return base.double().numpy().reshape(-1) + lam * merged


@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("election,merge", [("mass", "mean"), ("count", "mean"), ("mass", "sum"), ("mass", "max")])
def test_ties_per_tensor_matches_reference(density, election, merge):
    base = _rand((6, 7), 0)
    tensors = [base + _rand((6, 7), s, 0.3) for s in (1, 2, 3)]
    got = T.ties_merge(base, tensors, density=density, scaling_factor=0.7, sign_election=election, merge=merge)
    want = ref_ties_tensor(base, tensors, density, 0.7, election, merge)
    np.testing.assert_allclose(got.double().numpy().reshape(-1), want, rtol=1e-6, atol=1e-6)
    if density == 0.0:
        assert torch.equal(got, base)


def test_chunked_and_threaded_paths_match_reference(monkeypatch):
    """Tiny chunks and the Python-thread split (TIES, MagMax, selector) give the reference's results."""
    monkeypatch.setattr(T, "CHUNK", 7)
    monkeypatch.setattr(T, "PARALLEL_MIN", 5)
    monkeypatch.setattr(T, "_SERIAL_CHUNK", 5)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    base = _rand((6, 7), 0)
    tensors = [base + _rand((6, 7), s, 0.3) for s in (1, 2, 3)]
    for election, merge in (("mass", "mean"), ("count", "max")):
        got = T.ties_merge(base, tensors, density=0.3, scaling_factor=0.7, sign_election=election, merge=merge)
        want = ref_ties_tensor(base, tensors, 0.3, 0.7, election, merge)
        np.testing.assert_allclose(got.double().numpy().reshape(-1), want, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(MM, "CHUNK", 7)
    np.testing.assert_allclose(MM.magmax(base, tensors, 0.5).double().numpy().reshape(-1),
                               ref_magmax(base, tensors, 0.5), rtol=1e-6, atol=1e-6)
    x = torch.randn(5000, generator=torch.Generator().manual_seed(3))
    sel = _select([[x[:2000], x[2000:]]], [1234], sample_stride=7, min_sampled=100)
    assert sel.values()[0] == sorted(x.abs().tolist(), reverse=True)[1233]
    sel = T.KthLargestSelector([1234], torch.float32, totals=[5000], sample_stride=7, min_sampled=100)
    zero = torch.zeros(5000)
    while not sel.done:  # add_delta: differences formed chunk by chunk inside the selector
        sel.start_pass()
        assert sel.add_delta(0, x, zero)
        sel.finish_pass()
    assert sel.values()[0] == sorted(x.abs().tolist(), reverse=True)[1233]
    bad = x.clone()
    bad[4321] = float("inf")
    sel = T.KthLargestSelector([10], torch.float32, totals=[5000], sample_stride=7, min_sampled=100)
    sel.start_pass()
    assert sel.add_delta(0, bad, zero)  # sampling pass: entry 4321 is not on the stride
    sel.finish_pass()
    sel.start_pass()
    assert sel.add_delta(0, bad, zero) is False  # the full pass reports the non-finite difference


def test_ties_edge_cases():
    base = _rand((4, 5), 0)
    # all-zero task vectors: the base comes back exactly
    assert torch.equal(T.ties_merge(base, [base.clone(), base.clone()], density=0.5, scaling_factor=1.0), base)
    # a tie in the sign vote (+a and -a): elected sign 0, merged entry 0
    a = torch.zeros(4, 5)
    a[0, 0] = 0.5
    out = T.ties_merge(base, [base + a, base - a], density=1.0, scaling_factor=1.0)
    assert torch.equal(out, base)
    # ties in magnitude at the threshold: exactly k kept, lower flat index first (k = 1 of 4 equal: the first)
    b = torch.zeros(4)
    t1 = torch.tensor([1.0, -1.0, 1.0, 1.0])
    out = T.ties_merge(b, [t1], density=0.25, scaling_factor=1.0)
    assert torch.equal(out, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    out = T.ties_merge(b, [torch.tensor([0.5, -1.0, 1.0, 1.0])], density=0.5, scaling_factor=1.0)
    assert torch.equal(out, torch.tensor([0.0, -1.0, 1.0, 0.0]))
    # with explicit thresholds and no tie ends every tie is kept (FusionBench's >= rule)
    assert torch.equal(T.ties_merge(b, [t1], thresholds=[1.0], scaling_factor=1.0), t1)
    # density 1.0, agreeing signs: the plain mean; disagreeing minority dropped
    t = [torch.tensor([1.0, 2.0, -1.0]), torch.tensor([3.0, -1.0, -3.0]), torch.tensor([2.0, -2.0, 1.0])]
    out = T.ties_merge(torch.zeros(3), t, density=1.0, scaling_factor=1.0)
    # entry 0: all +, mean 2; entry 1: mass 2-1-2=-1 -> '-', mean(-1,-2)=-1.5; entry 2: mass -3 -> '-', mean(-1,-3)=-2
    assert torch.allclose(out, torch.tensor([2.0, -1.5, -2.0]))


def test_keep_count_rounding():
    assert T.keep_count(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in binary
    assert T.keep_count(10, 0.2) == 2
    assert T.keep_count(10, 0.25) == 3  # round half up
    assert T.keep_count(7, 1.0) == 7 and T.keep_count(7, 0.0) == 0
    for n in (1, 3, 17, 1000):
        for d in (0.01, 0.1, 0.33, 0.5, 0.9):
            assert T.keep_count(n, d) == ref_keep_count(n, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_largest_exact(dtype):
    g = torch.Generator().manual_seed(5)
    for n in (3001, 70001):  # torch.kthvalue path and radix-select path
        x = torch.randn(n, generator=g, dtype=dtype)
        x[::7] = x[3]  # many duplicates
        x[::11] = 0.0
        vals = sorted(x.abs().tolist(), reverse=True)
        for k in (1, 2, 50, 429, n // 2, n - 1, n):
            assert T.kth_largest_abs(x, k) == vals[k - 1]
        assert T.kth_largest_abs(x, 0) == math.inf
        assert T.kth_largest_abs(x, n + 1) == 0.0  # more than there are: everything is kept


def test_selector_streams_and_chunks():
    """Several streams fed in chunks over the passes give each stream's exact k-th largest."""
    g = torch.Generator().manual_seed(9)
    data = [[torch.randn(n, generator=g) * (s + 1) for n in (13, 200, 1, 77)] for s in range(3)]
    ks = [1, 100, 291]
    sel = T.KthLargestSelector(ks, torch.float32)
    passes = 0
    while not sel.done:
        sel.start_pass()
        for chunk in range(4):
            for s in range(3):
                sel.add(s, data[s][chunk])
        sel.finish_pass()
        passes += 1
    assert passes == 2
    for s, k in enumerate(ks):
        allv = sorted(torch.cat(data[s]).abs().tolist(), reverse=True)
        assert sel.values()[s] == allv[k - 1]


def _select(chunks_per_stream, ks, **kw):
    """Drive a KthLargestSelector over per-stream chunk lists, slicing by its stride like a caller."""
    sel = T.KthLargestSelector(ks, torch.float32, totals=[sum(c.numel() for c in cs) for cs in chunks_per_stream],
                               **kw)
    while not sel.done:
        sel.start_pass()
        for s, cs in enumerate(chunks_per_stream):
            for c in cs:
                sel.add(s, c.reshape(-1)[:: sel.stride])
        sel.finish_pass()
    return sel


def test_selector_sample_and_bracket_exact():
    g = torch.Generator().manual_seed(11)
    data = [[torch.randn(n, generator=g) * 0.01 for n in (60_000, 7, 40_003)], [torch.randn(100_010, generator=g)]]
    for ks in ([1, 1], [20_002, 30_000], [20_002, 500], [99_000, 100_010]):
        sel = _select(data, ks, sample_stride=31, min_sampled=1000)
        # sampling pass + one full pass (+ one radix pass inside a coarse bin when the sample is weak)
        assert sel.passes <= 3
        for s, k in enumerate(ks):
            want = sorted(torch.cat(data[s]).abs().tolist(), reverse=True)[k - 1]
            assert sel.values()[s] == want


def test_selector_massive_ties_exact():
    # bf16-like task vectors: few distinct magnitudes, the k-th largest tied with many others
    g = torch.Generator().manual_seed(4)
    x = 1.0 + torch.randint(0, 100, (200_000,), generator=g) * 2.0**-10  # ~100 distinct values in [1, 1.1)
    x[::2] *= -1
    sel = _select([[x]], [30_000], sample_stride=31, min_sampled=1000)
    assert sel.passes == 2
    assert sel.values()[0] == sorted(x.abs().tolist(), reverse=True)[29_999]


def test_selector_bracket_miss_falls_back_exactly():
    # the sampled entries (every 31st) are huge, the others small: the sampled bracket holds only the
    # huge values, the 10000-th largest is not among them, so the stream falls back to radix select
    # (still exact); the second stream's bracket holds
    x = 0.5 + torch.arange(31 * 4000) * 1e-6
    x[::31] = 1e3
    y = torch.randn(50_000, generator=torch.Generator().manual_seed(2))
    sel = _select([[x], [y]], [10_000, 777], sample_stride=31, min_sampled=1000)
    assert sel.passes == 4  # sample, bracket, two radix passes
    assert sel.values()[0] == sorted(x.abs().tolist(), reverse=True)[9999]
    assert sel.values()[1] == sorted(y.abs().tolist(), reverse=True)[776]


def _pool(n_models=3, seed=0, shapes=None):
    shapes = shapes or {"a.weight": (5, 4), "a.bias": (5,), "b.weight": (3, 5), "pos": None}
    base = {}
    for i, (k, s) in enumerate(shapes.items()):
        base[k] = torch.arange(4) if s is None else _rand(s, seed + i)
    models = {"_pretrained_": base}
    for m in range(n_models):
        models[f"m{m}"] = {k: v + _rand(v.shape, 100 * (m + 1) + j, 0.2) if v.is_floating_point() else v.clone()
                           for j, (k, v) in enumerate(base.items())}
    return models


@pytest.mark.parametrize("density", [0.1, 0.3, 1.0])
def test_ties_method_global_trim_matches_reference(density):
    """trim_scope=global: the threshold of each model is over its whole flattened task vector."""
    models = _pool()
    res = build_method("ties_merging", density=density, scaling_factor=0.5).run(ModelPool(models))
    base = models["_pretrained_"]
    keys = [k for k in base if base[k].is_floating_point()]
    names = [n for n in models if n != "_pretrained_"]
    flat = {n: np.concatenate(_taus32(torch.cat([base[k].reshape(-1) for k in keys]),
                                      [torch.cat([models[n][k].reshape(-1) for k in keys])])) for n in names}
    k = ref_keep_count(flat[names[0]].size, density)
    thr = [ref_threshold(list(flat[n]), k) for n in names]
    got_thr = res.metadata["trim_thresholds"]
    if density < 1.0:
        assert got_thr == dict(zip(names, thr))  # exact: the k-th largest value itself
    else:  # keep everything: any threshold at or below the smallest magnitude is the same trim
        assert all(got_thr[n] <= t for n, t in zip(names, thr))
    merged = ref_ties_entries([flat[n] for n in names], None, "mass", "mean",
                              masks=[ref_top_k(flat[n], k) for n in names])
    want = np.concatenate([base[k].double().numpy().reshape(-1) for k in keys]) + 0.5 * merged
    sd = res.model.state_dict()
    got = np.concatenate([sd[k].double().numpy().reshape(-1) for k in keys])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(sd["pos"], base["pos"])


def _bf16_tied_pool(seed=0):
    """bf16 checkpoints whose task vectors take few distinct magnitudes (many ties at any threshold)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"z.weight": (24, 16), "a.weight": (32, 20), "m.bias": (40,)}  # names not in sorted order
    base = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
    models = {"_pretrained_": base}
    for m in range(3):
        models[f"m{m}"] = {k: (v.float() + torch.randint(-3, 4, v.shape, generator=g) * 0.125).to(torch.bfloat16)
                           for k, v in base.items()}
    return models


def _flat_taus_sorted(models, name):
    """A model's task vector over the whole model, tensors in name order (the tie-break's order), float32."""
    base = models["_pretrained_"]
    return torch.cat([(models[name][k].float() - base[k].float()).reshape(-1) for k in sorted(base)])


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("density", [0.2, 0.37])
def test_ties_exact_k_on_bf16_ties(scope, density):
    """bf16 task vectors with massive ties: exactly k entries survive the trim (k = round(density n) per model
    over the whole model, or per tensor), chosen as the naive reference chooses them; the whole merge equals
    the reference; the streaming engine (row blocks) gives the same bytes."""
    models = _bf16_tied_pool()
    base = models["_pretrained_"]
    names = ["m0", "m1", "m2"]
    flat_k = ref_keep_count(sum(v.numel() for v in base.values()), density)
    ties_at_thr = [int((_flat_taus_sorted(models, n).abs() == ref_threshold(_flat_taus_sorted(models, n).tolist(),
                                                                            flat_k)).sum()) for n in names]
    assert max(ties_at_thr) > 50  # the test data does tie massively at the threshold
    # the trim alone (lambda = 1, sum of one model): exactly k non-zero entries
    for n in names:
        res = build_method("ties_merging", density=density, scaling_factor=1.0, trim_scope=scope,
                           merge_func="sum").run(ModelPool({"_pretrained_": base, n: models[n]}))
        sd = res.model.state_dict()
        kept = {k: int(((sd[k].float() - base[k].float()) != 0).sum()) for k in base}
        nz = {k: int(((models[n][k].float() - base[k].float()) != 0).sum()) for k in base}
        if scope == "global":
            assert sum(kept.values()) == min(flat_k, sum(nz.values()))
        else:
            assert all(kept[k] == min(ref_keep_count(base[k].numel(), density), nz[k]) for k in base)
    # the merge against the naive reference (bf16 results: compare after rounding the reference to bf16)
    res = build_method("ties_merging", density=density, scaling_factor=0.5, trim_scope=scope).run(ModelPool(models))
    sd = res.model.state_dict()
    keys = sorted(base)
    if scope == "global":
        flat = [_flat_taus_sorted(models, n).double().numpy() for n in names]
        merged = ref_ties_entries(flat, None, "mass", "mean", masks=[ref_top_k(f, flat_k) for f in flat])
        want = torch.cat([base[k].double().reshape(-1) for k in keys]) + 0.5 * torch.from_numpy(merged)
    else:
        want = torch.cat([torch.from_numpy(ref_ties_tensor(base[k], [models[n][k] for n in names], density, 0.5))
                          for k in keys])
    got = torch.cat([sd[k].reshape(-1) for k in keys])
    assert torch.equal(got, want.to(torch.bfloat16))
    from fusion_bench.engine.streaming import merge_to_folder  # noqa: F401  (streaming equality: test_streaming)


def test_ties_method_global_trim_sampled_path(monkeypatch):
    """The sample-and-bracket pre-pass (strided reads of the checkpoints) gives the exact thresholds."""
    monkeypatch.setattr(T, "MIN_SAMPLED", 10)
    monkeypatch.setattr(T, "SAMPLE_STRIDE", 3)
    models = _pool(shapes={"a": (40, 30), "b": (30,), "c": (25, 20)})
    res = build_method("ties_merging", density=0.25).run(ModelPool(models))
    base = models["_pretrained_"]
    for n in ("m0", "m1", "m2"):
        taus = np.concatenate(_taus32(torch.cat([base[k].reshape(-1) for k in "abc"]),
                                      [torch.cat([models[n][k].reshape(-1) for k in "abc"])]))
        assert res.metadata["trim_thresholds"][n] == ref_threshold(list(taus), ref_keep_count(taus.size, 0.25))


def test_ties_method_tensor_scope_matches_kernel():
    models = _pool()
    res = build_method("ties_merging", density=0.3, trim_scope="tensor").run(ModelPool(models))
    base = models["_pretrained_"]
    for k in ("a.weight", "b.weight"):
        want = ref_ties_tensor(base[k], [models[n][k] for n in ("m0", "m1", "m2")], 0.3, 0.3)
        np.testing.assert_allclose(res.model.state_dict()[k].double().numpy().reshape(-1), want, rtol=1e-6, atol=1e-6)


def test_ties_config_errors():
    with pytest.raises(ConfigError, match="density"):
        build_method("ties_merging", density=1.5)
    with pytest.raises(ConfigError, match="trim_scope"):
        build_method("ties_merging", trim_scope="layer")
    with pytest.raises(ModelMismatchError, match="_pretrained_"):
        build_method("ties_merging").run(ModelPool({"a": _pool()["m0"], "b": _pool()["m1"]}))


def test_ties_nonfinite_input_named():
    models = _pool()
    models["m1"]["b.weight"][0, 0] = float("nan")
    with pytest.raises(ModelMismatchError, match="m1.*b.weight"):
        build_method("ties_merging").run(ModelPool(models))


# ----------------------------------------------------------------------------------------------
# DARE
# ----------------------------------------------------------------------------------------------
def ref_dare(tau: np.ndarray, u: np.ndarray, p: float, rescale: bool) -> np.ndarray:
    """DARE (Yu et al. 2024, Eq. 1-2): m_j ~ Bernoulli(p) drops entry j; kept entries / (1 - p)."""
    out = np.zeros_like(tau)
    for j in range(tau.size):
        if u[j] < p:
            out[j] = 0.0
        else:
            out[j] = tau[j] / (1 - p) if rescale else tau[j]
    return out


def _uniforms(seed, key, name, shape):
    return torch.rand(shape, generator=seeded_generator(seed, key, name)).double().numpy().reshape(-1)


@pytest.mark.parametrize("p,rescale", [(0.0, True), (0.3, True), (0.9, True), (0.5, False)])
def test_dare_task_arithmetic_method_matches_reference(p, rescale):
    models = _pool()
    res = build_method("dare_task_arithmetic", sparsity_ratio=p, rescale=rescale, scaling_factor=0.6, seed=3).run(
        ModelPool(models))
    base = models["_pretrained_"]
    for k in ("a.weight", "a.bias", "b.weight"):
        taus = _taus32(base[k], [models[n][k] for n in ("m0", "m1", "m2")])
        total = sum(ref_dare(t, _uniforms(3, k, n, base[k].shape), p, rescale) for t, n in zip(taus, ("m0", "m1", "m2")))
        want = base[k].double().numpy().reshape(-1) + 0.6 * total
        np.testing.assert_allclose(res.model.state_dict()[k].double().numpy().reshape(-1), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_dare_ties_method_matches_reference(p):
    models = _pool()
    res = build_method("dare_ties", sparsity_ratio=p, scaling_factor=1.0, seed=1).run(ModelPool(models))
    base = models["_pretrained_"]
    names = ("m0", "m1", "m2")
    for k in ("a.weight", "b.weight"):
        taus = _taus32(base[k], [models[n][k] for n in names])
        dared = [ref_dare(t, _uniforms(1, k, n, base[k].shape), p, True) for t, n in zip(taus, names)]
        merged = ref_ties_entries(dared, [0.0] * 3, "mass", "mean")  # no magnitude trim
        want = base[k].double().numpy().reshape(-1) + merged
        np.testing.assert_allclose(res.model.state_dict()[k].double().numpy().reshape(-1), want, rtol=1e-6, atol=1e-6)


def test_dare_statistics_and_edges():
    tau = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    out = D.dare(tau, 0.3, seeded_generator(0, "w", "m"), rescale=True)
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - 0.3) < 0.01  # about 45 standard deviations of binomial noise apart from failure
    kept = out != 0
    assert torch.allclose(out[kept], tau[kept] / 0.7)
    assert torch.equal(D.dare(tau, 0.0, None), tau)  # p = 0: unchanged
    assert torch.equal(D.dare(tau, 1.0, seeded_generator(0, "w", "m"), rescale=False), torch.zeros_like(tau))
    zeros = torch.zeros(10)
    assert torch.equal(D.dare(zeros, 0.5, seeded_generator(0, "w", "m")), zeros)  # all-zero task vector


def test_dare_order_independent_and_config_errors():
    models = _pool()
    r1 = build_method("dare_task_arithmetic", seed=5).run(ModelPool(models))
    # visiting the tensors in another order (reversed dict) gives the same result
    rev = {n: dict(reversed(list(sd.items()))) for n, sd in models.items()}
    r2 = build_method("dare_task_arithmetic", seed=5).run(ModelPool(rev))
    for k, v in r1.model.state_dict().items():
        assert torch.equal(v, r2.model.state_dict()[k])
    r3 = build_method("dare_task_arithmetic", seed=6).run(ModelPool(models))
    assert not torch.equal(r1.model.state_dict()["a.weight"], r3.model.state_dict()["a.weight"])
    with pytest.raises(ConfigError, match="sparsity_ratio"):
        build_method("dare_ties", sparsity_ratio=1.0)
    with pytest.raises(ConfigError, match="sparsity_ratio"):
        build_method("dare_task_arithmetic", sparsity_ratio=-0.1)


# ----------------------------------------------------------------------------------------------
# MagMax
# ----------------------------------------------------------------------------------------------
def ref_magmax(base, tensors, lam):
    """MagMax (Marczak et al. 2024): per entry, the task-vector value of largest magnitude
    (ties in magnitude: the larger signed value)."""
    taus = _taus32(base, tensors)
    out = np.zeros(taus[0].size)
    for j in range(out.size):
        best = None
        for t in taus:
            v = t[j]
            if best is None or abs(v) > abs(best) or (abs(v) == abs(best) and v > best):
                best = v
        out[j] = best
    return base.double().numpy().reshape(-1) + lam * out


def test_magmax_matches_reference():
    base = _rand((5, 6), 0)
    tensors = [base + _rand((5, 6), s, 0.4) for s in (1, 2, 3, 4)]
    for lam in (1.0, 0.5):
        got = MM.magmax(base, tensors, lam)
        np.testing.assert_allclose(got.double().numpy().reshape(-1), ref_magmax(base, tensors, lam), rtol=1e-6,
                                   atol=1e-6)


def test_magmax_ties_and_zeros():
    base = torch.zeros(3)
    a, b = torch.tensor([0.5, -2.0, 0.0]), torch.tensor([-0.5, 1.0, 0.0])
    assert torch.equal(MM.magmax(base, [a, b]), torch.tensor([0.5, -2.0, 0.0]))
    assert torch.equal(MM.magmax(base, [b, a]), torch.tensor([0.5, -2.0, 0.0]))  # order-independent tie rule
    models = _pool()
    res = build_method("magmax").run(ModelPool(models))
    k = "a.weight"
    want = ref_magmax(models["_pretrained_"][k], [models[n][k] for n in ("m0", "m1", "m2")], 1.0)
    np.testing.assert_allclose(res.model.state_dict()[k].double().numpy().reshape(-1), want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# SLERP
# ----------------------------------------------------------------------------------------------
def ref_slerp(a, b, t, eps=SL.COLINEAR_EPS):
    """Shoemake's slerp on the flattened tensors; linear interpolation when (nearly) colinear or zero."""
    x, y = a.double().numpy().reshape(-1), b.double().numpy().reshape(-1)
    na, nb = math.sqrt(sum(v * v for v in x)), math.sqrt(sum(v * v for v in y))
    if na == 0 or nb == 0:
        return (1 - t) * x + t * y
    c = sum(p * q for p, q in zip(x, y)) / (na * nb)
    c = max(-1.0, min(1.0, c))
    if abs(c) > 1 - eps:
        return (1 - t) * x + t * y
    om = math.acos(c)
    return (math.sin((1 - t) * om) * x + math.sin(t * om) * y) / math.sin(om)


def test_slerp_geometry_and_reference():
    # quarter circle: the midpoint of two orthogonal unit vectors is (cos 45, sin 45)
    got = SL.slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    assert torch.allclose(got, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    # norms are interpolated too (raw tensors): |slerp| stays on the arc between radii 1 and 3
    got = SL.slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0]), 1 / 3)
    assert torch.allclose(got, torch.tensor([math.sin(math.pi / 3), 3 * math.sin(math.pi / 6)]) / 1.0, atol=1e-6)
    a, b = _rand((4, 6), 1), _rand((4, 6), 2)
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        np.testing.assert_allclose(SL.slerp(a, b, t).double().numpy().reshape(-1), ref_slerp(a, b, t), rtol=1e-5,
                                   atol=1e-6)
    assert torch.allclose(SL.slerp(a, b, 0.0), a) and torch.allclose(SL.slerp(a, b, 1.0), b, atol=1e-6)


def test_slerp_fallbacks():
    a = _rand((3, 3), 3)
    for b in (2 * a, -a, a + 1e-5 * _rand((3, 3), 4), torch.zeros(3, 3)):  # colinear, opposite, nearly, zero
        got = SL.slerp(a, b, 0.3)
        assert torch.allclose(got, 0.7 * a + 0.3 * b, atol=1e-6)
        np.testing.assert_allclose(got.double().numpy().reshape(-1), ref_slerp(a, b, 0.3), rtol=1e-5, atol=1e-6)


def test_slerp_method_named_models_and_errors():
    models = _pool()
    res = build_method("slerp", t=0.3, models=["m2", "_pretrained_"]).run(ModelPool(models))
    k = "a.weight"
    want = ref_slerp(models["m2"][k], models["_pretrained_"][k], 0.3)
    np.testing.assert_allclose(res.model.state_dict()[k].double().numpy().reshape(-1), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="two models"):
        build_method("slerp").run(ModelPool(models))  # three models and no method.models
    with pytest.raises(ConfigError, match="Did you mean 'm1'"):
        build_method("slerp", models=["m0", "m11"]).run(ModelPool(models))


# ----------------------------------------------------------------------------------------------
# Model Stock
# ----------------------------------------------------------------------------------------------
def ref_model_stock(base, tensors):
    """Model Stock (Jang et al. 2024), per tensor: t = N cos / (1 + (N-1) cos), cos = mean pairwise
    cosine of the task vectors (0 for zero norms, clamped to [0, 1])."""
    taus = _taus32(base, tensors)
    n = len(taus)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            ni = math.sqrt(sum(v * v for v in taus[i]))
            nj = math.sqrt(sum(v * v for v in taus[j]))
            cos.append(sum(p * q for p, q in zip(taus[i], taus[j])) / (ni * nj) if ni > 0 and nj > 0 else 0.0)
    c = min(1.0, max(0.0, sum(cos) / len(cos)))
    t = n * c / (1 + (n - 1) * c)
    avg = sum(x.double().numpy().reshape(-1) for x in tensors) / n
    return t * avg + (1 - t) * base.double().numpy().reshape(-1), t


def test_model_stock_matches_reference():
    base = _rand((5, 4), 0)
    shared = _rand((5, 4), 9, 0.3)  # a common direction so that the cosines are positive
    tensors = [base + shared + _rand((5, 4), s, 0.3) for s in (1, 2, 3)]
    got, t = MS.model_stock(base, tensors)
    want, t_ref = ref_model_stock(base, tensors)
    assert 0 < t_ref < 1 and t == pytest.approx(t_ref, rel=1e-9)
    np.testing.assert_allclose(got.double().numpy().reshape(-1), want, rtol=1e-6, atol=1e-6)


def test_model_stock_known_angle_and_edges():
    base = torch.zeros(2)
    # two task vectors 60 degrees apart: cos = 1/2, t = 2 * 0.5 / (1 + 0.5) = 2/3
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.5, math.sqrt(3) / 2])
    got, t = MS.model_stock(base, [a, b])
    assert t == pytest.approx(2 / 3)
    assert torch.allclose(got, (a + b) / 2 * (2 / 3))
    # opposite task vectors: cos clamped to 0, t = 0, the base
    got, t = MS.model_stock(torch.ones(2), [torch.ones(2) + a, torch.ones(2) - a])
    assert t == 0.0 and torch.equal(got, torch.ones(2))
    # a zero task vector contributes cosine 0
    got, t = MS.model_stock(base, [a, base.clone(), a * 2])
    want, t_ref = ref_model_stock(base, [a, base.clone(), a * 2])
    assert t == pytest.approx(t_ref) and t_ref == pytest.approx(3 * (1 / 3) / (1 + 2 / 3))
    # all-zero task vectors: the base
    got, t = MS.model_stock(a, [a.clone(), a.clone()])
    assert t == 0.0 and torch.equal(got, a)
    with pytest.raises(ValueError):
        MS.model_stock(base, [a])
    models = _pool(n_models=1)
    with pytest.raises(ModelMismatchError, match="at least 2"):
        build_method("model_stock").run(ModelPool(models))
