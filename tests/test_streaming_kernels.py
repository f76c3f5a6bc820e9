"""Kernels of the streaming-era methods against naive references written from the papers' formulas:
sparsifications (magnitude, Model Breadcrumbs, DARE, DELLA), generalized task arithmetic, Karcher mean."""

from __future__ import annotations

import math

import pytest
import torch

from fusion_bench.kernels.merging import sparsify as K
from fusion_bench.kernels.merging.karcher import karcher_mean
from fusion_bench.methods import build_method

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _desc_magnitudes(t: torch.Tensor) -> list[float]:
    return sorted((abs(float(x)) for x in t.reshape(-1)), reverse=True)


def _ranked(t: torch.Tensor) -> list[int]:
    """Flat indices by magnitude descending, ties by flat index ascending (the kernels' tie-break)."""
    flat = t.reshape(-1).tolist()
    return sorted(range(len(flat)), key=lambda j: (-abs(flat[j]), j))


def _keep_ranks(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    keep = set(_ranked(t)[r0:r1])
    flat = t.reshape(-1).tolist()
    return torch.tensor([flat[j] if j in keep else 0.0 for j in range(len(flat))]).reshape(t.shape)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.37, 0.5, 0.99, 1.0])
def test_magnitude_sparsify_naive(density):
    tau = _rand((7, 5), 1)
    tau[0, :3] = 0.25  # ties
    tau[2, 1] = -0.25
    tau[4, 4] = 0.25
    n = tau.numel()
    k = int(density * n)
    expect = tau.clone() if density >= 1 else _keep_ranks(tau, 0, k)
    got = K.sparsify(tau, "magnitude", density)
    assert torch.equal(got, expect)
    assert int((got != 0).sum()) == (n if density >= 1 else k)


@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.9, 0.05), (0.8, 0.3), (0.3, 0.0)])
def test_breadcrumbs_sparsify_naive(density, gamma):
    tau = _rand((6, 6), 2)
    n = tau.numel()
    keep = math.floor(density * n)
    top = math.floor(gamma * n)
    if n - keep - top < 0:  # not enough entries: remove fewer outliers
        top = n - keep
    expect = _keep_ranks(tau, top, top + keep)
    got = K.sparsify(tau, "breadcrumbs", density, gamma=gamma)
    assert torch.equal(got, expect)
    assert int((got != 0).sum()) == keep
    # the older rule (tie_break='all'): lo <= |tau| < hi, the same here (no ties)
    mags = _desc_magnitudes(tau)
    hi = mags[top - 1] if top > 0 else math.inf
    lo = mags[top + keep - 1] if keep > 0 else math.inf
    assert torch.equal(K.sparsify(tau, "breadcrumbs", density, thresholds=(lo, hi)), expect)


@pytest.mark.parametrize("method,density,gamma", [("magnitude", 0.2, 0.0), ("magnitude", 0.55, 0.0),
                                                  ("breadcrumbs", 0.5, 0.1), ("breadcrumbs", 0.3, 0.25)])
def test_exact_k_on_bf16_ties(method, density, gamma):
    """bf16 task vectors with few distinct magnitudes: exactly the rule's number of entries, the naive ranks;
    row blocks (with the whole tensor's band) give the same entries."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(30, 17, generator=g).to(torch.bfloat16)
    ft = (base.float() + torch.randint(-2, 3, base.shape, generator=g) * 0.0625).to(torch.bfloat16)
    tau = ft.float() - base.float()
    n = tau.numel()
    mags = _desc_magnitudes(tau)
    keep = math.floor(density * n)
    top = min(math.floor(gamma * n), n - keep)
    assert sum(m == mags[top + keep - 1] for m in mags) > 20  # massive ties at the lower bound
    expect = _keep_ranks(tau, top, top + keep)
    got = K.sparsify(tau, method, density, gamma=gamma)
    assert torch.equal(got, expect) and int((got != 0).sum()) == int((expect != 0).sum())
    assert int((got != 0).sum()) == keep - sum(1 for j in _ranked(tau)[top:top + keep] if tau.reshape(-1)[j] == 0)
    band = K.magnitude_band(tau, method, density, gamma)
    blocks = [K.sparsify(tau[r:r + 7], method, density, band=band, offset=r * 17) for r in range(0, 30, 7)]
    assert torch.equal(torch.cat(blocks), expect)


@pytest.mark.parametrize("rescale", [True, False])
def test_random_sparsify_naive(rescale):
    tau = _rand((4, 9), 3)
    d = 0.6
    u = torch.rand((4, 9), generator=torch.Generator().manual_seed(7))
    expect = torch.zeros_like(tau)
    for i in range(4):
        for j in range(9):
            if float(u[i, j]) >= 1 - d:
                expect[i, j] = tau[i, j] / d if rescale else tau[i, j]
    got = K.sparsify(tau, "random", d, rescale=rescale, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


def test_della_sparsify_naive():
    tau = _rand((3, 6), 4)
    tau[1, 2] = tau[1, 4]  # a tie: broken by position
    d, eps = 0.5, 0.2
    u = torch.rand((3, 6), generator=torch.Generator().manual_seed(9))
    expect = torch.zeros_like(tau)
    for i in range(3):
        row = [abs(float(x)) for x in tau[i]]
        order = sorted(range(6), key=lambda j: (row[j], j))
        rank = {j: r for r, j in enumerate(order)}
        for j in range(6):
            p = d - eps + 2 * eps * rank[j] / 5
            if float(u[i, j]) < p:
                expect[i, j] = tau[i, j] / p
    got = K.sparsify(tau, "della", d, rescale=True, epsilon=eps, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-7)
    # a 1-D tensor is one row
    v = _rand((5,), 5)
    p = K.della_keep_prob(v, d, eps)
    ranks = sorted(range(5), key=lambda j: (abs(float(v[j])), j))
    for r, j in enumerate(ranks):
        assert abs(float(p[j]) - (d - eps + 2 * eps * r / 4)) < 1e-6


@pytest.mark.parametrize("consensus", ["none", "sum", "count"])
@pytest.mark.parametrize("normalize", [False, True])
def test_gta_merge_naive(consensus, normalize):
    base = _rand((3, 4), 10)
    taus = [_rand((3, 4), 11 + i) * (i + 1) for i in range(3)]
    taus[0][0, 0] = 0.0
    w = [0.5, 1.5, -0.25]
    lam = 0.7
    got = K.gta_merge(base, taus, w, consensus=consensus, normalize=normalize, scaling_factor=lam)
    expect = torch.zeros_like(base)
    for i in range(3):
        for j in range(4):
            wt = [w[m] * float(taus[m][i, j]) for m in range(3)]
            if consensus == "none":
                mask = [1.0] * 3
                div = sum(w)
            else:
                vote = sum(wt) if consensus == "sum" else sum((x > 0) - (x < 0) for x in wt)
                elected = 1 if vote >= 0 else -1
                mask = [1.0 if ((x > 0) - (x < 0)) == elected else 0.0 for x in wt]
                div = sum(w[m] * mask[m] for m in range(3)) or 1.0
            delta = sum(wt[m] * mask[m] for m in range(3))
            if normalize:
                delta /= div
            expect[i, j] = float(base[i, j]) + lam * delta
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


def _karcher_naive(vectors, weights, iters=10, tol=1e-5):
    """Riemannian mean on the sphere with python floats (Karcher 1977, unit gradient steps)."""
    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    def norm(a):
        return math.sqrt(dot(a, a))

    norms = [norm(v) for v in vectors]
    xs = [[x / n for x in v] for v, n in zip(vectors, norms)]
    ws = sum(weights)
    u = [sum(w * x[i] for w, x in zip(weights, xs)) for i in range(len(xs[0]))]
    un = norm(u)
    u = [x / un for x in u]
    for _ in range(iters):
        g = [0.0] * len(u)
        for w, x in zip(weights, xs):
            c = max(-1.0, min(1.0, dot(u, x)))
            th = math.acos(c)
            f = th / math.sin(th) if th >= 1e-7 else 1.0
            for i in range(len(u)):
                g[i] += w / ws * (x[i] - c * u[i]) * f
        gn = norm(g)
        if gn < tol:
            break
        u = [math.cos(gn) * a + math.sin(gn) / gn * b for a, b in zip(u, g)]
        n = norm(u)
        u = [a / n for a in u]
    mean_norm = sum(w * n for w, n in zip(weights, norms)) / ws
    return [a * mean_norm for a in u]


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
def test_karcher_naive(weights):
    ts = [_rand((2, 3), 20 + i) for i in range(3)]
    got = karcher_mean([t.double() for t in ts], weights, max_iter=10, tol=1e-9)
    expect = _karcher_naive([t.reshape(-1).tolist() for t in ts], weights or [1.0] * 3, iters=10, tol=1e-9)
    torch.testing.assert_close(got.reshape(-1), torch.tensor(expect, dtype=torch.float64), rtol=1e-9, atol=1e-10)


def test_karcher_closed_forms():
    x = torch.tensor([3.0, 0.0])
    y = torch.tensor([0.0, 1.0])
    got = karcher_mean([x, y], max_iter=50, tol=1e-9)
    # geodesic midpoint of the directions, scaled by the mean norm 2
    torch.testing.assert_close(got, torch.tensor([2 / math.sqrt(2), 2 / math.sqrt(2)]), rtol=1e-5, atol=1e-6)
    t = _rand((4, 4), 3)
    torch.testing.assert_close(karcher_mean([t, t, t]), t, rtol=1e-6, atol=1e-6)
    assert torch.equal(karcher_mean([torch.zeros(3), torch.zeros(3)]), torch.zeros(3))


def test_methods_match_kernel_composition():
    """model_breadcrumbs and della = task vectors -> sparsify -> gta_merge with their defaults."""
    base = _rand((8, 8), 30)
    ts = [base + 0.1 * _rand((8, 8), 31 + i) for i in range(3)]
    names = ["a", "b", "c"]
    m = build_method({"name": "model_breadcrumbs", "density": 0.7, "gamma": 0.05, "scaling_factor": 0.4})
    got = m.merge_tensor("k", base, ts, names)
    taus = [_keep_ranks(t - base, 3, 3 + 44) for t in ts]  # n_top = int(0.05 * 64) = 3, int(0.7 * 64) = 44 kept
    expect = base + 0.4 * sum(taus)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)
    from fusion_bench.utils import seeded_generator

    d = build_method({"name": "della", "density": 0.6, "epsilon": 0.1, "seed": 5})
    got = d.merge_tensor("k", base, ts, names)
    taus = [K.sparsify(t - base, "della", 0.6, rescale=True, epsilon=0.1, generator=seeded_generator(5, "k", n))
            for t, n in zip(ts, names)]
    expect = K.gta_merge(base, taus, [1.0] * 3, consensus="sum", normalize=True)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


def test_config_errors():
    from fusion_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="epsilon"):
        build_method({"name": "della", "density": 0.1, "epsilon": 0.2})
    with pytest.raises(ConfigError, match="sparsification"):
        build_method({"name": "generalized_task_arithmetic", "sparsification": "magnitud"})
    with pytest.raises(ConfigError, match="max_iter"):
        build_method({"name": "karcher_mean", "max_iter": 0})


@pytest.mark.parametrize("n", [100, 9000, 70000])
def test_kth_largest_abs_diff_naive(n):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, generator=g).to(torch.bfloat16)  # many ties in bf16
    b = torch.randn(n, generator=g).to(torch.bfloat16) * 0.1
    vals = sorted((abs(float(x) - float(y)) for x, y in zip(a.float(), b.float())), reverse=True)
    ks = [0, 1, 2, n // 3, n // 2, n - 1, n, n + 1]
    expect = [math.inf if k <= 0 else (0.0 if k > n else vals[k - 1]) for k in ks]
    assert K.kth_largest_abs_diff(a, b, ks) == expect
    assert K.kth_largest_abs_diff((a.float() - b.float()), None, ks) == expect


def test_kth_largest_bracket_miss_falls_back():
    """Adversarial data: every sampled position is 0, the rest large; the exact fallback answers."""
    n = 100_000
    size = min(K.SAMPLE, n // 8)
    x = torch.arange(1, n + 1, dtype=torch.float32)
    x[torch.linspace(0, n - 1, size, dtype=torch.float64).long()] = 0.0
    vals = sorted(x.tolist(), reverse=True)
    ks = [10, n // 2, n - size - 5]
    assert K.kth_largest_abs_diff(x, None, ks) == [vals[k - 1] for k in ks]


@pytest.mark.parametrize("opts", [{"name": "ties_merging", "density": 0.2},
                                  {"name": "ties_merging", "density": 0.2, "trim_scope": "tensor"},
                                  {"name": "ties_merging", "density": 0.3, "zero_vote": "majority"},
                                  {"name": "dare_ties_merging", "density": 0.3, "sparsity_ratio": 0.3},
                                  {"name": "model_breadcrumbs", "density": 0.6, "gamma": 0.05},
                                  {"name": "generalized_task_arithmetic", "sparsification": "magnitude",
                                   "density": 0.3, "consensus": "sum"}],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_exact_k_streaming_equals_in_memory_bf16(tmp_path, opts):
    """bf16 checkpoints tie massively at the trim thresholds: the streaming engine (row blocks, tensors in
    its own order) keeps the same entries as the in-memory engine, bit for bit."""
    from fusion_bench.engine.streaming import merge_to_folder
    from fusion_bench.modelpool import build_modelpool
    from tests.test_streaming_helpers import load_sd, save_zoo

    zoo = save_zoo(tmp_path / "zoo", "llama", n=3, dtype=torch.bfloat16)
    ref = build_method(dict(opts)).run(build_modelpool({"type": "causal_lm", "models": zoo})).model.state_dict()
    out = tmp_path / "merged"
    merge_to_folder(build_method(dict(opts)), build_modelpool({"type": "causal_lm", "models": zoo}), out,
                    block_elements=200, max_shard_size="20KB")
    got = load_sd(out)
    for k, v in got.items():
        assert torch.equal(v, ref[k]), k
    if opts["name"] == "ties_merging" and "zero_vote" not in opts:  # the trim alone keeps exactly k
        one = {"_pretrained_": zoo["_pretrained_"], "ft0": zoo["ft0"]}
        m = build_method({**opts, "merge_func": "sum", "scaling_factor": 1.0})
        sd = m.run(build_modelpool({"type": "causal_lm", "models": one})).model.state_dict()
        base, ft = load_sd(zoo["_pretrained_"]), load_sd(zoo["ft0"])
        keys = [k for k in base if base[k].is_floating_point()]
        kept = {k: int((sd[k].float() != base[k].float()).sum()) for k in keys}
        nz = {k: int((ft[k].float() != base[k].float()).sum()) for k in keys}
        if opts.get("trim_scope") == "tensor":
            assert all(kept[k] == min(math.floor(0.2 * base[k].numel() + 0.5), nz[k]) for k in keys)
        else:
            total = sum(base[k].numel() for k in keys)
            assert sum(kept.values()) == min(math.floor(0.2 * total + 0.5), sum(nz.values()))


@pytest.mark.parametrize("kind", ["bf16_values", "rounded_with_zeros", "float32", "bf16_tensor"])
def test_rank_band_bit_histogram_path(kind):
    """Tensors above FAST_BAND_MIN take the bit-histogram path; the kept ranks must be exactly those of a stable
    descending sort of the magnitudes (ties: the lower flat index first)."""
    from fusion_bench.kernels.merging import sparsify as K

    g = torch.Generator().manual_seed(7)
    n = K.FAST_BAND_MIN + 12345
    x = torch.randn(n, generator=g) * 0.02
    if kind == "bf16_values":
        x = x.bfloat16().float()
    elif kind == "bf16_tensor":
        x = x.bfloat16()
        x[::97] = 0
    elif kind == "rounded_with_zeros":
        x = (x * 40).round() / 40
    order = torch.sort(-x.abs(), stable=True).indices  # written independently of the kernel
    for r0, r1 in [(0, n // 5), (n // 100, n // 100 + n // 5), (0, n), (3, 4), (n // 2, n)]:
        band = K.rank_band(x, r0, r1)
        m = K.rank_band_mask(x, band)
        ref = torch.zeros(n, dtype=torch.bool)
        ref[order[r0:r1]] = True
        if band[2] and band[2][-1][0] == 0.0:  # zeros at the cut: kept or not changes nothing
            ref |= x == 0
            m |= x == 0
        assert torch.equal(m, ref), (kind, r0, r1)
        # blocks see the same band
        blocks = torch.cat([K.rank_band_mask(x[s:s + 20000], band, offset=s) for s in range(0, n, 20000)])
        assert torch.equal(blocks | (x == 0) if band[2] and band[2][-1][0] == 0.0 else blocks, m)


@pytest.mark.parametrize("r", [(0, 0.2), (0.01, 0.3), (0, 1.0), (0.5, 1.0)])
def test_ordinal_band_from_block_histograms(r):
    """Histograms of row blocks summed, then masks applied block by block with running tie ordinals: exactly the
    ranks of a stable descending sort of the magnitudes (the lower flat index first among ties)."""
    from fusion_bench.kernels.merging import sparsify as K

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(50_000, generator=g) * 0.01).bfloat16()
    x[::13] = 0
    n = x.numel()
    r0, r1 = int(r[0] * n), int(r[1] * n)
    blocks = [x[s:s + 4096] for s in range(0, n, 4096)]
    counts = sum(K.bf16_magnitude_histogram(b) for b in blocks)
    assert int(counts.sum()) == n
    band = K.ordinal_band(counts, r0, r1)
    seen = [0] * len(band[2])
    m = torch.cat([K.ordinal_band_mask(b, band, seen) for b in blocks])
    ref = torch.zeros(n, dtype=torch.bool)
    ref[torch.sort(-x.float().abs(), stable=True).indices[r0:r1]] = True
    zero = x == 0
    assert torch.equal(m & ~zero, ref & ~zero)
    assert int((m & ~zero).sum()) == int((ref & ~zero).sum())
