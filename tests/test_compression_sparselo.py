"""SparseLo (pruning + low-rank compensation of the pruned residual) against naive numpy references; the saved
sparse model + PEFT adapter reproduce the method's model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion_bench.kernels.compression.pruning import unstructured_mask
from fusion_bench.kernels.compression.sparselo import sparselo_iterative, sparselo_one_shot
from fusion_bench.methods import build_method

pytestmark = pytest.mark.usefixtures("one_thread")


def _wm(seed=0, shape=(12, 16)):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    return W, unstructured_mask(W.abs(), 0.5, "row")


def test_one_shot_is_the_best_rank_r_fit_of_the_pruned_residual():
    W, mask = _wm()
    S, B, A = sparselo_one_shot(W, mask, 3)
    assert torch.equal(S, W * (~mask))
    R = (W * mask).numpy()
    u, s, vt = np.linalg.svd(R, full_matrices=False)
    ref = (u[:, :3] * s[:3]) @ vt[:3]
    np.testing.assert_allclose((B @ A).numpy(), ref, rtol=1e-10, atol=1e-10)
    # Eckart-Young: the error is the tail of the spectrum
    assert float(torch.linalg.norm(W - S - B @ A)) == pytest.approx(float(np.sqrt((s[3:] ** 2).sum())), rel=1e-9)


def naive_iterative(W, keep, rank, T):
    W = W.numpy()
    keep = keep.numpy()
    S = W * keep
    for r in np.linspace(1, rank, T, dtype=np.int64):
        u, s, vt = np.linalg.svd(W - S, full_matrices=False)
        r = min(len(s) - 1, int(r))
        ratio = s[:r].sum() / s.sum()
        S = S + keep * ((u[:, r:] * s[r:]) @ vt[r:])
        if ratio > 0.99:
            break
    u, s, vt = np.linalg.svd(W - S, full_matrices=False)
    return S, (u[:, :rank] * s[:rank]) @ vt[:rank]


@pytest.mark.parametrize("rank,T", [(2, 3), (4, 10)])
def test_iterative_matches_naive(rank, T):
    W, mask = _wm(1)
    S, B, A, _ = sparselo_iterative(W, mask, rank, T)
    S_ref, L_ref = naive_iterative(W, ~mask, rank, T)
    np.testing.assert_allclose(S.numpy(), S_ref, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose((B @ A).numpy(), L_ref, rtol=1e-8, atol=1e-10)
    assert torch.equal(S[mask], torch.zeros(int(mask.sum()), dtype=S.dtype))  # the sparsity pattern is kept
    # the refined sparse part leaves a residual closer to rank r than one-shot pruning
    S1, B1, A1 = sparselo_one_shot(W, mask, rank)
    assert torch.linalg.norm(W - S - B @ A) <= torch.linalg.norm(W - S1 - B1 @ A1) + 1e-12


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory):
    from fusion_bench.testing.tiny_lm import save_tiny_llama_pool

    return save_tiny_llama_pool(tmp_path_factory.mktemp("tiny_llama_sparselo"), n=0)


def _pool(paths):
    from fusion_bench.modelpool.causal_lm import CausalLMPool

    return CausalLMPool({"_pretrained_": paths["base"]})


@pytest.mark.parametrize("cfg", [{"variant": "wanda", "n_samples": 4, "seq_len": 32},
                                 {"variant": "magnitude", "nm": "2:4", "algorithm": "iterative", "num_iterations": 3}])
def test_sparselo_adapter_output_reloads_exactly(tiny_pool, tmp_path, cfg):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pool = _pool(tiny_pool)
    res = build_method({"name": "sparselo", "rank": 4, **cfg}).run(pool)
    orig = AutoModelForCausalLM.from_pretrained(tiny_pool["base"]).eval()
    out = tmp_path / "sl"
    path = pool.save_model(res.model, out)
    sparse = AutoModelForCausalLM.from_pretrained(path).eval()
    k = "model.layers.0.mlp.down_proj.weight"
    assert res.metadata["sparsity_overall"] == pytest.approx(0.5, abs=1e-3)
    assert (sparse.state_dict()[k] == 0).float().mean() == pytest.approx(0.5, abs=0.01)
    w_sparse = sparse.state_dict()[k].clone()
    full = PeftModel.from_pretrained(sparse, str(path / "sparselo_adapter")).eval()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = res.model(ids).logits
        torch.testing.assert_close(full(ids).logits, want, rtol=1e-4, atol=1e-5)
        # S + B A of each layer is closer to W than S alone
        w = orig.state_dict()[k]
        merged = full.merge_and_unload().state_dict()[k]
        assert torch.linalg.norm(w - merged) < torch.linalg.norm(w - w_sparse)
    lin = [m for n, m in orig.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert res.metadata["lowrank_parameters"] == sum(4 * (m.in_features + m.out_features) for m in lin)


def test_sparselo_merged_format_is_a_stock_model(tiny_pool, tmp_path):
    from transformers import AutoModelForCausalLM

    pool = _pool(tiny_pool)
    res = build_method({"name": "sparselo", "rank": 4, "variant": "random", "save_format": "merged"}).run(pool)
    path = pool.save_model(res.model, tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, res.model(ids).logits)
    assert not (path / "sparselo_adapter").exists()
