"""TSV-M, TSV-C, Iso-C and Iso-CTS against naive references written from the papers' formulas.

The references use numpy float64 and follow the authors' code layout (e.g. TSV-M places each task's top-r
singular vectors in an m x k matrix padded with zero columns before orthogonalising it); they do not call the
kernels. The methods run on float64 state-dict pools, so they compute in float64 too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion_bench.errors import ConfigError, FusionBenchError
from fusion_bench.kernels.subspace import iso as ISO
from fusion_bench.kernels.subspace import tsv as TSV
from fusion_bench.methods import build_method
from fusion_bench.modelpool.base import ModelPool

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _rand(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _pool(shapes: dict[str, tuple], n: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """A float64 base and ``n`` fine-tunes (base + noise) as state dicts."""
    base = {k: _rand(s, seed + i) for i, (k, s) in enumerate(shapes.items())}
    fts = [{k: v + _rand(v.shape, 100 * (j + 1) + i, 0.1) for i, (k, v) in enumerate(base.items())}
           for j in range(n)]
    return base, fts


def _run(name, base, fts, **opts):
    pool = ModelPool({"_pretrained_": base, **{f"task{j}": ft for j, ft in enumerate(fts)}})
    return build_method({"name": name, **opts}).run(pool)


def _deltas(base, fts, key):
    return [(ft[key] - base[key]).numpy() for ft in fts]


# ----------------------------------------------------------------------------------------------
# references (numpy float64, from the papers' formulas / the authors' code layout)
# ----------------------------------------------------------------------------------------------
def ref_polar(a: np.ndarray) -> np.ndarray:
    """Nearest orthogonal matrix P Q^T (P S Q^T the thin SVD of ``a``)."""
    p, _, qh = np.linalg.svd(a, full_matrices=False)
    return p @ qh


def ref_polar_eig(a: np.ndarray) -> np.ndarray:
    """The same polar factor for a full-column-rank ``a``, by another route: a (a^T a)^(-1/2)."""
    w, q = np.linalg.eigh(a.T @ a)
    return a @ (q @ np.diag(w ** -0.5) @ q.T)


def ref_tsv_m(deltas: list[np.ndarray]) -> np.ndarray:
    """TSV-M (Gargiulo et al. 2025), laid out as the authors' code: zero-padded m x k U, k x n V^T."""
    t = len(deltas)
    m, n = deltas[0].shape
    k = min(m, n)
    r = int(k * (1 / t))
    su, ss, sv = np.zeros((m, k)), np.zeros(k), np.zeros((k, n))
    for i, d in enumerate(deltas):
        u, s, vh = np.linalg.svd(d, full_matrices=False)
        su[:, i * r:(i + 1) * r] = u[:, :r]
        ss[i * r:(i + 1) * r] = s[:r]
        sv[i * r:(i + 1) * r, :] = vh[:r, :]
    return ref_polar(su) @ np.diag(ss) @ ref_polar(sv)


def ref_tsv_c(delta: np.ndarray, t: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    r = int(min(delta.shape) * (1 / t))
    return u[:, :r] @ np.diag(s[:r]) @ vh[:r, :]


def ref_iso_c(deltas: list[np.ndarray]) -> np.ndarray:
    """Iso-C (Marczak et al. 2025): sum of task matrices with all singular values set to their mean."""
    u, s, vh = np.linalg.svd(sum(deltas), full_matrices=False)
    return u @ np.diag(np.full_like(s, s.mean())) @ vh


def ref_iso_cts(deltas: list[np.ndarray], f: float) -> np.ndarray:
    """Iso-CTS (Marczak et al. 2025), as the authors' code lays it out (task blocks first, common block last)."""
    t = len(deltas)
    m, n = deltas[0].shape
    k = min(m, n)
    c = int(k * f)
    c = k - round((k - c) / t) * t
    p = int((k - c) / t)
    u, s, vh = np.linalg.svd(sum(deltas), full_matrices=False)
    uc, sc, vc = u[:, :c], s[:c], vh[:c, :]
    au, as_, av = np.zeros((m, k)), np.zeros(k), np.zeros((k, n))
    for i, d in enumerate(deltas):
        w = d - uc @ uc.T @ d
        ut, st, vt = np.linalg.svd(w, full_matrices=False)
        au[:, i * p:(i + 1) * p] = ut[:, :p]
        as_[i * p:(i + 1) * p] = st[:p]
        av[i * p:(i + 1) * p, :] = vt[:p, :]
    au[:, t * p:t * p + c] = uc
    as_[t * p:t * p + c] = sc
    av[t * p:t * p + c, :] = vc
    return ref_polar(au) @ np.diag(np.full(k, as_.mean())) @ ref_polar(av)


def _close(got: torch.Tensor, want: np.ndarray, tol: float = 1e-9):
    np.testing.assert_allclose(got.double().numpy(), want, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------
# TSV-M
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,n", [((6, 5), 3), ((6, 9), 3), ((8, 7), 4), ((5, 12), 2)])
def test_tsv_merging_matches_reference(shape, n):
    base, fts = _pool({"w": shape, "b": (shape[0],)}, n)
    res = _run("tsv_merging", base, fts, scaling_factor=0.7)
    sd = res.model.state_dict()
    d = _deltas(base, fts, "w")
    _close(sd["w"], base["w"].numpy() + 0.7 * ref_tsv_m(d))
    _close(sd["b"], base["b"].numpy() + 0.7 * np.mean(_deltas(base, fts, "b"), axis=0))


def test_polar_factor_two_routes_agree():
    a = _rand((9, 4), 3).numpy()
    _close(TSV.nearest_orthogonal(torch.from_numpy(a)), ref_polar_eig(a))


def test_tsv_rank_zero_gives_base_and_rank_rule():
    base, fts = _pool({"w": (4, 3)}, 4)  # k = 3 < T = 4: no singular value per task
    sd = _run("tsv_merging", base, fts).model.state_dict()
    assert torch.equal(sd["w"], base["w"])
    assert TSV.per_task_rank(768, 8) == 96 and TSV.per_task_rank(768, 20) == 38
    assert TSV.per_task_rank(49, 49) == int(49 * (1 / 49))  # the authors' float expression (0 here)


def test_tsv_merge_is_invariant_to_task_order_and_signs():
    d = [_rand((7, 6), s) for s in range(3)]
    ref = TSV.tsv_merge_delta(d)
    torch.testing.assert_close(TSV.tsv_merge_delta(d[::-1]), ref, rtol=1e-10, atol=1e-12)
    # negating every task matrix flips singular-vector signs only: the merge is negated
    torch.testing.assert_close(TSV.tsv_merge_delta([-x for x in d]), -ref, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# TSV-C
# ----------------------------------------------------------------------------------------------
def test_tsv_compress_per_task_matches_reference():
    base, fts = _pool({"w": (6, 5), "v": (9, 6), "b": (6,)}, 3)
    res = _run("tsv_compress", base, fts)
    assert res.kind == "per_task" and set(res.models) == {"task0", "task1", "task2"}
    assert res.metadata["needs_task_id"] is True
    for j in range(3):
        sd = res.models[f"task{j}"].state_dict()
        for key in ("w", "v"):
            delta = (fts[j][key] - base[key]).numpy()
            _close(sd[key], base[key].numpy() + ref_tsv_c(delta, 3))
        assert torch.equal(sd["b"], fts[j]["b"])  # not 2-D: the task's own tensor
    # storage: r (m + n + 1) per 2-D tensor and task (r = 1 for 6x5, 2 for 9x6) + the full bias, float64
    per_task = 1 * (6 + 5 + 1) + 2 * (9 + 6 + 1) + 6
    assert res.metadata["extra_parameters"] == 3 * per_task
    assert res.metadata["extra_storage_bytes"] == 3 * per_task * 8
    assert res.metadata["low_rank_factor_bytes"] == 3 * (per_task - 6) * 8


def test_tsv_compress_rank_fraction_and_mean_keys():
    base, fts = _pool({"w": (8, 6)}, 2)
    res = _run("tsv_compress", base, fts, rank_fraction=0.5)
    u, s, vh = np.linalg.svd((fts[1]["w"] - base["w"]).numpy(), full_matrices=False)
    _close(res.models["task1"].state_dict()["w"], base["w"].numpy() + u[:, :3] @ np.diag(s[:3]) @ vh[:3])
    res = _run("tsv_compress", base, fts, mean_keys=["w"])
    assert torch.equal(res.models["task0"].state_dict()["w"], fts[0]["w"])


# ----------------------------------------------------------------------------------------------
# Iso-C / Iso-CTS
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,n", [((6, 5), 3), ((8, 7), 4), ((5, 12), 2)])
def test_iso_c_matches_reference(shape, n):
    base, fts = _pool({"w": shape, "b": (shape[0],)}, n)
    sd = _run("iso_c", base, fts, scaling_factor=1.3).model.state_dict()
    _close(sd["w"], base["w"].numpy() + 1.3 * ref_iso_c(_deltas(base, fts, "w")))
    _close(sd["b"], base["b"].numpy() + 1.3 * np.mean(_deltas(base, fts, "b"), axis=0))


@pytest.mark.parametrize("shape,n,f", [((12, 10), 3, 0.8), ((6, 5), 3, 0.5), ((9, 16), 4, 0.5), ((6, 5), 3, 0.8),
                                       ((10, 10), 2, 0.0), ((7, 8), 3, 1.0)])
def test_iso_cts_matches_reference(shape, n, f):
    base, fts = _pool({"w": shape, "b": (shape[0],)}, n)
    sd = _run("iso_cts", base, fts, scaling_factor=0.9, common_space_fraction=f).model.state_dict()
    _close(sd["w"], base["w"].numpy() + 0.9 * ref_iso_cts(_deltas(base, fts, "w"), f))
    _close(sd["b"], base["b"].numpy() + 0.9 * np.mean(_deltas(base, fts, "b"), axis=0))


def test_iso_cts_split():
    assert ISO.iso_cts_split(768, 8, 0.8) == (768 - 19 * 8, 19)  # int(614.4) = 614, round(154 / 8) = 19
    assert ISO.iso_cts_split(5, 3, 0.8) == (5, 0)
    assert ISO.iso_cts_split(5, 2, 0.5) == (1, 2)  # round(1.5) = 2 (half to even)
    assert ISO.iso_cts_split(7, 2, 0.1) == (1, 3)  # round(3.5) * 2 = 8 > 7: p = 7 // 2


def test_iso_cts_full_common_space_is_iso_c():
    d = [_rand((7, 5), s) for s in range(3)]
    torch.testing.assert_close(ISO.iso_cts_delta(d, 1.0), ISO.iso_c_delta(d), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# tensors that are not 2-D, exclusions, options
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tsv_merging", "iso_c", "iso_cts"])
def test_non_2d_and_mean_keys_and_exclude(name):
    base, fts = _pool({"w": (6, 5), "v": (6, 5), "conv": (3, 2, 2, 2), "b": (6,)}, 3)
    sd = _run(name, base, fts, scaling_factor=0.5, mean_keys=["v"], exclude=["b"]).model.state_dict()
    for key in ("v", "conv"):  # averaged task vectors
        _close(sd[key], base[key].numpy() + 0.5 * np.mean(_deltas(base, fts, key), axis=0))
    assert torch.equal(sd["b"], base["b"])  # excluded: the base's
    mean_w = base["w"].numpy() + 0.5 * np.mean(_deltas(base, fts, "w"), axis=0)
    assert not np.allclose(sd["w"].numpy(), mean_w)  # the 2-D tensor went through the SVD


@pytest.mark.parametrize("name,key,value", [("tsv_merging", "scaling_factor", float("nan")),
                                            ("iso_cts", "common_space_fraction", 1.5),
                                            ("iso_cts", "common_space_fraction", -0.1),
                                            ("iso_c", "scaling_factor", 1e9),
                                            ("tsv_compress", "rank_fraction", 0.0),
                                            ("tsv_compress", "rank_fraction", 2.0)])
def test_bad_option_names_the_key(name, key, value):
    with pytest.raises(ConfigError, match=key):
        build_method({"name": name, key: value})


def test_typo_and_missing_base():
    with pytest.raises(ConfigError, match="common_space_fraction"):
        build_method({"name": "iso_cts", "common_space_fractio": 0.5})
    _, fts = _pool({"w": (6, 5)}, 2)
    for name in ("tsv_merging", "tsv_compress", "iso_c", "iso_cts"):
        with pytest.raises(FusionBenchError, match="_pretrained_"):
            build_method(name).run(ModelPool({f"t{j}": ft for j, ft in enumerate(fts)}))


# ----------------------------------------------------------------------------------------------
# end to end: a tiny llama causal-LM pool, in memory and through the streaming engine
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from tests.test_streaming_helpers import save_zoo

    return save_zoo(tmp_path_factory.mktemp("zoo"), "llama", n=3, dtype=torch.float32)


@pytest.mark.parametrize("name,opts", [("tsv_merging", {}), ("iso_c", {"scaling_factor": 0.5}),
                                       ("iso_cts", {"scaling_factor": 0.5})])
def test_end_to_end_streaming_equals_in_memory(zoo, tmp_path, name, opts):
    from fusion_bench.engine.streaming import merge_to_folder
    from fusion_bench.modelpool import build_modelpool
    from tests.test_streaming_helpers import load_sd

    pool = build_modelpool({"type": "causal_lm", "models": zoo})
    ref = build_method({"name": name, **opts}).run(pool).model.state_dict()
    out = tmp_path / "merged"
    merge_to_folder(build_method({"name": name, **opts}), build_modelpool({"type": "causal_lm", "models": zoo}), out,
                    block_elements=200, max_shard_size="20KB")
    got = load_sd(out)
    base = load_sd(zoo["_pretrained_"])
    assert set(got) <= set(ref)
    for k, v in got.items():
        assert torch.equal(v, ref[k]), f"{name}: tensor {k} differs"
        assert torch.isfinite(v).all()
    assert any(v.dim() == 2 and not torch.equal(v, base[k]) for k, v in got.items())


def test_end_to_end_tsv_compress_streams_per_task(zoo, tmp_path):
    from fusion_bench.engine.streaming import merge_to_folder
    from fusion_bench.modelpool import build_modelpool
    from tests.test_streaming_helpers import load_sd

    pool = build_modelpool({"type": "causal_lm", "models": zoo})
    method = build_method("tsv_compress")
    res = method.run(pool)
    assert res.kind == "per_task" and set(res.models) == set(pool.model_names)
    assert res.metadata["needs_task_id"] and res.metadata["extra_storage_bytes"] > 0
    base = load_sd(zoo["_pretrained_"])
    for task in pool.model_names:
        out = tmp_path / task
        pool2 = build_modelpool({"type": "causal_lm", "models": zoo})
        merge_to_folder(method.task_method(task, len(pool2.model_names)), method.task_pool(pool2, task), out,
                        block_elements=200, max_shard_size="20KB")
        got = load_sd(out)
        ref = res.models[task].state_dict()
        ft = load_sd(zoo[task])
        for k, v in got.items():
            assert torch.equal(v, ref[k]), f"task {task}: tensor {k} differs"
            if v.dim() == 1:
                assert torch.equal(v, ft[k])  # stored in full
        w = next(k for k, v in got.items() if v.dim() == 2)
        rank = torch.linalg.matrix_rank((got[w] - base[w]).double(), rtol=1e-4)
        assert 0 < rank <= min(got[w].shape) // 3
