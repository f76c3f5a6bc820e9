"""arcee_fusion, nearswap, ram, ramplus_tl: kernels against per-element references written from the formulas
(mergekit 0.1.5's definitions), the registered methods on a pool, and the mergekit front end (per-tensor
parameters, dtype)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from fusion_bench.compat.mergekit import load_mergekit_config, main
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.kernels.merging.arcee_fusion import arcee_fusion
from fusion_bench.kernels.merging.nearswap import nearswap
from fusion_bench.kernels.merging.ram import ram, ramplus_tl
from fusion_bench.methods import build_method
from fusion_bench.modelpool import build_modelpool
from tests.test_streaming_helpers import load_sd, save_zoo

pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ---------------------------------------------------------------------------------------------- references
def ref_arcee(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    b, t = base.tolist(), tuned.tolist()
    rows_b, rows_t = (b, t) if base.dim() == 2 else ([b], [t])
    imp = []
    for rb, rt in zip(rows_b, rows_t):
        zb, zt = sum(math.exp(x) for x in rb), sum(math.exp(x) for x in rt)
        p = [math.exp(x) / zt + 1e-8 for x in rt]
        q = [math.exp(x) / zb + 1e-8 for x in rb]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        imp.append([abs(x - y) * kl for x, y in zip(rt, rb)])
    flat = sorted(v for r in imp for v in r)
    n = len(flat)
    q1, q2, q3 = (flat[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    thr = q2 + 1.5 * (q3 - q1)
    out = [[y + (x - y) * (1.0 if v >= thr else 0.0) for x, y, v in zip(rt, rb, ri)]
           for rt, rb, ri in zip(rows_t, rows_b, imp)]
    return torch.tensor(out if base.dim() == 2 else out[0], dtype=torch.float64)


def ref_nearswap(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    out = []
    for x, y in zip(a.flatten().tolist(), b.flatten().tolist()):
        w = min(1.0, max(0.0, t / max(abs(x - y), 1e-6)))
        out.append(w * y + (1 - w) * x)
    return torch.tensor(out, dtype=torch.float64).reshape(a.shape)


def ref_ram(base, tensors, eps, plus=None):
    b = base.flatten().tolist()
    taus = [[x - y for x, y in zip(t.flatten().tolist(), b)] for t in tensors]
    contrib = [[abs(v) > eps for v in tau] for tau in taus]
    counts = [sum(c[j] for c in contrib) for j in range(len(b))]
    lam = [1.0] * len(tensors)
    if plus is not None:
        r, alpha = plus
        for i in range(len(tensors)):
            shared = sum(1 for j in range(len(b)) if contrib[i][j] and counts[j] > 1)
            unique = sum(1 for j in range(len(b)) if contrib[i][j] and counts[j] == 1)
            lam[i] = 1 + r * min(alpha, max(0.0, shared / max(unique, eps)))
    out = []
    for j in range(len(b)):
        if counts[j] == 0:
            out.append(b[j])
        elif counts[j] == 1:
            i = next(i for i in range(len(tensors)) if contrib[i][j])
            out.append(b[j] + lam[i] * taus[i][j])
        else:
            out.append(b[j] + sum(taus[i][j] for i in range(len(tensors)) if contrib[i][j]) / counts[j])
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


# ---------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("shape", [(7, 5), (11,)])
def test_arcee_fusion_kernel(shape):
    base = _rand(*shape, seed=1)
    tuned = base + _rand(*shape, seed=2, scale=0.3) ** 3  # dense, heavy-tailed changes
    got = arcee_fusion(base, tuned)
    want = ref_arcee(base, tuned)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    kept = (got != base).sum()
    assert 0 < kept < (tuned != base).sum()  # some, not all, changes kept


def test_arcee_fusion_sample_is_seeded():
    base, tuned = _rand(40, 50, seed=4), _rand(40, 50, seed=5)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = arcee_fusion(base, tuned, sample_size=500, generator=g1)
    assert torch.equal(a, arcee_fusion(base, tuned, sample_size=500, generator=g2))
    full = arcee_fusion(base, tuned)
    assert (a != full).float().mean() < 0.1  # a sample's quantiles are close to the tensor's


def test_nearswap_kernel():
    a = _rand(6, 4, seed=6)
    b = a + _rand(6, 4, seed=7, scale=0.01)
    b[0, 0] = a[0, 0]  # |a - b| below 1e-6
    for t in (0.0, 0.002, 0.01, 1.0):
        torch.testing.assert_close(nearswap(a, b, t), ref_nearswap(a, b, t), rtol=1e-12, atol=1e-12)
    assert torch.equal(nearswap(a, b, 1.0), b)


@pytest.mark.parametrize("n", [1, 3])
def test_ram_kernels(n):
    base = _rand(5, 6, seed=8)
    tensors = [base + _rand(5, 6, seed=9 + i, scale=0.1) * (_rand(5, 6, seed=20 + i) > 0.3) for i in range(n)]
    torch.testing.assert_close(ram(base, tensors, 0.02), ref_ram(base, tensors, 0.02), rtol=1e-12, atol=1e-12)
    got = ramplus_tl(base, tensors, 0.5, 0.3, 0.02)
    torch.testing.assert_close(got.double(), ref_ram(base, tensors, 0.02, (0.5, 0.3)), rtol=1e-6, atol=1e-7)
    assert torch.equal(ram(base, [], 0.1), base)


# ---------------------------------------------------------------------------------------------- methods
@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return save_zoo(tmp_path_factory.mktemp("anrzoo"), "llama", n=3, dtype=torch.float32)


def test_registered_methods(zoo):
    sds = {k: load_sd(v) for k, v in zoo.items()}
    base = sds["_pretrained_"]
    pool = build_modelpool({"type": "causal_lm", "models": zoo})
    got = build_method({"name": "ram", "epsilon": 0.02}).run(pool).model.state_dict()
    k = "model.layers.1.mlp.up_proj.weight"
    fts = [sds[f"ft{i}"][k].double() for i in range(3)]
    torch.testing.assert_close(got[k].double(), ref_ram(base[k].double(), fts, 0.02), rtol=1e-6, atol=1e-6)
    got = build_method({"name": "nearswap", "t": 0.01, "model": "ft1"}).run(pool).model.state_dict()
    torch.testing.assert_close(got[k].double(), ref_nearswap(base[k].double(), fts[1], 0.01), rtol=1e-6, atol=1e-6)
    got = build_method({"name": "arcee_fusion", "model": "ft2"}).run(pool).model.state_dict()
    torch.testing.assert_close(got[k].double(), ref_arcee(base[k].double(), fts[2]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ModelMismatchError, match="exactly one"):
        build_method({"name": "arcee_fusion"}).run(pool)


# ---------------------------------------------------------------------------------------------- front end
def _run(tmp_path, doc, name="m"):
    p = tmp_path / f"{name}.yml"
    p.write_text(yaml.safe_dump(doc))
    main([str(p), str(tmp_path / name)])
    return load_sd(tmp_path / name)


def test_front_end_nearswap_gradient_t(zoo, tmp_path):
    base, ft = load_sd(zoo["_pretrained_"]), load_sd(zoo["ft0"])
    got = _run(tmp_path, {"merge_method": "nearswap", "base_model": zoo["_pretrained_"],
                          "parameters": {"t": [{"filter": "mlp", "value": [0.001, 0.05]}, {"value": 0.01}]},
                          "models": [{"model": zoo["ft0"]}]})
    for k, v in got.items():
        t = (0.05 if ".layers.1." in k else 0.001) if "mlp" in k else 0.01
        torch.testing.assert_close(v.double(), ref_nearswap(base[k].double(), ft[k].double(), t), rtol=1e-6, atol=1e-6)


def test_front_end_ramplus_bf16_writes_float32(tmp_path):
    z = save_zoo(tmp_path / "z16", "llama", n=2, dtype=torch.bfloat16)
    got = _run(tmp_path, {"merge_method": "ramplus_tl", "base_model": z["_pretrained_"], "dtype": "bfloat16",
                          "parameters": {"epsilon": 0.02, "r": 0.5, "alpha": 0.3},
                          "models": [{"model": z["ft0"]}, {"model": z["ft1"]}]})
    base, fts = load_sd(z["_pretrained_"]), [load_sd(z["ft0"]), load_sd(z["ft1"])]
    for k, v in got.items():
        assert v.dtype == torch.float32  # mergekit: float32 lambdas make the result float32
        assert torch.equal(v, ramplus_tl(base[k], [f[k] for f in fts], 0.5, 0.3, 0.02))


def test_front_end_errors(zoo):
    b, f = zoo["_pretrained_"], zoo["ft0"]
    with pytest.raises(ConfigError, match="'t' is missing"):
        load_mergekit_config({"merge_method": "nearswap", "base_model": b, "models": [{"model": f}]})
    with pytest.raises(ConfigError, match="exactly one model"):
        load_mergekit_config({"merge_method": "arcee_fusion", "base_model": b,
                              "models": [{"model": f}, {"model": zoo["ft1"]}]})
    with pytest.raises(ConfigError, match="top-level"):
        load_mergekit_config({"merge_method": "ram", "base_model": b,
                              "models": [{"model": f, "parameters": {"epsilon": 0.1}}]})
    with pytest.raises(ConfigError, match="out of range"):
        load_mergekit_config({"merge_method": "ramplus_tl", "base_model": b, "parameters": {"r": -1},
                              "models": [{"model": f}]})
    with pytest.raises(ConfigError, match="needs base_model"):
        load_mergekit_config({"merge_method": "ram", "models": [{"model": f}]})
