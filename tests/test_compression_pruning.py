"""Pruning (magnitude, random, Wanda, SparseGPT; unstructured and N:M) against naive references written from the
papers' formulas, on small layers and a tiny Llama; the CLI run, the reload and the report."""

from __future__ import annotations

import json

import pytest
import torch

from fusion_bench.errors import ConfigError
from fusion_bench.kernels.compression.pruning import nm_mask, nm_ok, parse_nm, unstructured_mask, wanda_scores
from fusion_bench.kernels.compression.sparsegpt import HessianAccumulator, sparsegpt_prune
from fusion_bench.methods import build_method

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# naive references
# ----------------------------------------------------------------------------------------------
def naive_row_mask(scores, sparsity):
    rows, cols = scores.shape
    k = int(cols * sparsity)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        order = sorted(range(cols), key=lambda j: (float(scores[r, j]), j))
        for j in order[:k]:
            mask[r, j] = True
    return mask


def naive_layer_mask(scores, sparsity):
    rows, cols = scores.shape
    k = int(rows * cols * sparsity)
    flat = [(float(scores[r, c]), r * cols + c) for r in range(rows) for c in range(cols)]
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    for _, i in sorted(flat)[:k]:
        mask[i] = True
    return mask.reshape(rows, cols)


def naive_nm_mask(scores, n, m):
    rows, cols = scores.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        for g in range(0, cols, m):
            order = sorted(range(g, g + m), key=lambda j: (float(scores[r, j]), j))
            for j in order[:n]:
                mask[r, j] = True
    return mask


def naive_sparsegpt(W, X, sparsity, nm=None, blocksize=4, percdamp=0.01):
    """OBS pruning column by column with explicit inverses of the Hessian of the remaining columns (float64):
    after columns < c are fixed, the pruned error of column c is propagated as
    delta = -(w_c - q_c) / [H_F^-1]_cc * [H_F^-1]_{c,:}, F = {c, ..., n-1}; masks are chosen per block of
    columns (or per M columns with N:M) by the OBS error w^2 / [H_F^-1]_cc over the current weights."""
    W = W.double().clone()
    rows, cols = W.shape
    H = 2 * X.double().T @ X.double() / X.shape[0]
    H = H + percdamp * torch.diag(H).mean() * torch.eye(cols, dtype=torch.float64)
    inv_diag = lambda c: torch.linalg.inv(H[c:, c:])[0, 0]  # noqa: E731
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for j in range(0, cols, blocksize):
        if nm is None:
            d = torch.tensor([inv_diag(c) for c in range(j, j + blocksize)], dtype=torch.float64)
            # w^2 / U_cc^2 with U_cc^2 = [H_F^-1]_cc
            score = W[:, j:j + blocksize] ** 2 / d
            mask[:, j:j + blocksize] = naive_layer_mask(score, sparsity)
        for c in range(j, j + blocksize):
            if nm is not None and (c - j) % nm[1] == 0:
                d = torch.tensor([inv_diag(cc) for cc in range(c, c + nm[1])], dtype=torch.float64)
                mask[:, c:c + nm[1]] = naive_nm_mask(W[:, c:c + nm[1]] ** 2 / d, *nm)
            Hf_inv = torch.linalg.inv(H[c:, c:])
            q = W[:, c].clone()
            q[mask[:, c]] = 0
            delta = -((W[:, c] - q) / Hf_inv[0, 0]).unsqueeze(1) * Hf_inv[0, :].unsqueeze(0)
            W[:, c:] += delta
            W[:, c] = q
    return W, mask


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.75])
def test_unstructured_masks_match_naive(sparsity):
    s = torch.rand(7, 12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(unstructured_mask(s, sparsity, "row"), naive_row_mask(s, sparsity))
    assert torch.equal(unstructured_mask(s, sparsity, "layer"), naive_layer_mask(s, sparsity))
    assert int(unstructured_mask(s, sparsity, "row").sum()) == 7 * int(12 * sparsity)


def test_ties_are_broken_by_position_with_exact_count():
    s = torch.ones(3, 8)
    m = unstructured_mask(s, 0.5, "row")
    assert torch.equal(m, naive_row_mask(s, 0.5)) and int(m.sum()) == 12


@pytest.mark.parametrize("nm", ["2:4", "4:8", "1:4"])
def test_nm_mask_matches_naive(nm):
    n, m = parse_nm(nm)
    s = torch.rand(5, 16, generator=torch.Generator().manual_seed(2))
    mask = nm_mask(s, n, m)
    assert torch.equal(mask, naive_nm_mask(s, n, m))
    assert nm_ok(s.masked_fill(mask, 0), n, m)


def test_parse_nm_rejects_bad_patterns():
    for bad in ("2-4", "4:2", "0:4", "a:b"):
        with pytest.raises(ValueError):
            parse_nm(bad)
    assert parse_nm(None) is None and parse_nm("2:4") == (2, 4)


def test_wanda_scores_formula():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(4, 6, generator=g)
    X = torch.randn(50, 6, generator=g)
    S = wanda_scores(W, (X * X).sum(0))
    ref = torch.tensor([[abs(float(W[i, j])) * float(torch.sqrt(sum(X[t, j] ** 2 for t in range(50))))
                         for j in range(6)] for i in range(4)])
    torch.testing.assert_close(S, ref, rtol=1e-5, atol=1e-6)


def test_hessian_accumulator_is_two_over_n_xtx():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(3, 10, 5, generator=g, dtype=torch.float64)
    acc = HessianAccumulator(5, dtype=torch.float64)
    for b in X:
        acc.add(b)
    flat = X.reshape(-1, 5)
    torch.testing.assert_close(acc.H, 2 * flat.T @ flat / 30)


@pytest.mark.parametrize("nm,sparsity", [(None, 0.5), (None, 0.3), ((2, 4), 0.5), ((4, 8), 0.5)])
def test_sparsegpt_matches_naive_obs(nm, sparsity):
    g = torch.Generator().manual_seed(5)
    W = torch.randn(6, 16, generator=g, dtype=torch.float64)
    X = torch.randn(40, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    acc = HessianAccumulator(16, dtype=torch.float64)
    acc.add(X)
    blocksize = 8
    got, mask = sparsegpt_prune(W, acc.H, sparsity, nm, blocksize=blocksize)
    ref, ref_mask = naive_sparsegpt(W, X, sparsity, nm, blocksize=blocksize)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10)
    assert torch.equal(got == 0, mask)
    if nm is not None:
        assert nm_ok(got, *nm)
    else:
        assert int(mask.sum()) == 2 * int(6 * blocksize * sparsity)


def test_sparsegpt_beats_plain_masking_on_the_calibration_error():
    g = torch.Generator().manual_seed(6)
    W = torch.randn(8, 32, generator=g)
    X = torch.randn(200, 32, generator=g) @ torch.randn(32, 32, generator=g)
    acc = HessianAccumulator(32)
    acc.add(X)
    new, mask = sparsegpt_prune(W, acc.H, 0.5, blocksize=16)
    err_obs = ((X @ (W - new).T) ** 2).sum()
    err_zero = ((X @ (W * mask).T) ** 2).sum()  # the same mask without the OBS update
    assert err_obs < 0.8 * err_zero


# ----------------------------------------------------------------------------------------------
# methods on a tiny Llama
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory):
    from fusion_bench.testing.tiny_lm import save_tiny_llama_pool

    root = tmp_path_factory.mktemp("tiny_llama")
    return save_tiny_llama_pool(root, n=1)


def _pool(paths, **kw):
    from fusion_bench.modelpool.causal_lm import CausalLMPool

    return CausalLMPool({"_pretrained_": paths["base"]}, **kw)


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("name,cfg", [("magnitude_pruning", {}), ("magnitude_pruning", {"nm": "2:4"}),
                                      ("random_pruning", {"group": "row"}), ("random_pruning", {"nm": "4:8"})])
def test_data_free_pruning_on_llama(tiny_pool, name, cfg):
    from transformers import AutoModelForCausalLM

    orig = AutoModelForCausalLM.from_pretrained(tiny_pool["base"])
    res = build_method({"name": name, **cfg}).run(_pool(tiny_pool))
    got = res.model.state_dict()
    for k, v in orig.state_dict().items():
        mod = k.rsplit(".", 1)[0]
        if ".layers." in k and k.endswith(".weight") and mod in _linear_names(orig):
            w = got[k]
            if "nm" in cfg:
                assert nm_ok(w, *parse_nm(cfg["nm"]))
            else:
                assert int((w == 0).sum()) == int(w.numel() * 0.5) or cfg.get("group") == "row"
            if name == "magnitude_pruning" and "nm" not in cfg:
                assert torch.equal(w == 0, naive_layer_mask(v.abs(), 0.5))
            assert torch.equal(w[w != 0], v[w != 0])
        else:  # embeddings, norms and lm_head stay dense
            assert torch.equal(got[k], v), k
    md = res.metadata
    assert md["sparsity_overall"] == pytest.approx(0.5, abs=1e-3)
    assert set(md["sparsity_per_layer"]) == {n for n in _linear_names(orig) if ".layers." in n}


def test_random_pruning_is_seeded(tiny_pool):
    a = build_method({"name": "random_pruning", "seed": 1}).run(_pool(tiny_pool)).model.state_dict()
    b = build_method({"name": "random_pruning", "seed": 1}).run(_pool(tiny_pool)).model.state_dict()
    c = build_method({"name": "random_pruning", "seed": 2}).run(_pool(tiny_pool)).model.state_dict()
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[k], b[k]) and not torch.equal(a[k] == 0, c[k] == 0)


def _naive_layerwise(model, ids, prune_fn):
    """Reference of the sequential procedure of both papers through the full model: for each decoder layer in
    order, run the whole (partly pruned) model on the calibration ids with hooks recording the inputs of that
    layer's linear layers, then prune them with ``prune_fn(weight, X)``."""
    for layer in model.model.layers:
        lins = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        seen = {n: [] for n in lins}
        hs = [m.register_forward_hook(lambda mod, a, o, n=n, s=seen: s[n].append(a[0].reshape(-1, a[0].shape[-1])))
              for n, m in lins.items()]
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        for h in hs:
            h.remove()
        with torch.no_grad():
            for n, m in lins.items():
                m.weight.copy_(prune_fn(m.weight.detach(), torch.cat(seen[n]).double()))
    return model


def _calib_ids(tiny_pool, n, seq):
    from fusion_bench.data.lm_text import calibration_batches, load_texts
    from fusion_bench.testing.tiny_lm import byte_tokenizer

    return calibration_batches(byte_tokenizer(), load_texts("builtin", split="train"), n_samples=n, seq_len=seq, seed=0)


@pytest.mark.parametrize("nm", [None, "2:4"])
def test_wanda_method_equals_sequential_reference(tiny_pool, nm):
    from transformers import AutoModelForCausalLM

    cfg = {"name": "wanda_pruning", "n_samples": 4, "seq_len": 48, "batch_size": 4, "nm": nm}
    res = build_method(cfg).run(_pool(tiny_pool))
    ids = _calib_ids(tiny_pool, 4, 48)

    def prune(w, X):
        s = w.abs().double() * torch.sqrt((X * X).sum(0)).unsqueeze(0)
        mask = naive_nm_mask(s, 2, 4) if nm else naive_row_mask(s, 0.5)
        return w.masked_fill(mask, 0)

    ref = _naive_layerwise(AutoModelForCausalLM.from_pretrained(tiny_pool["base"]).eval(), ids, prune)
    for k, v in ref.state_dict().items():
        assert torch.equal(res.model.state_dict()[k] == 0, v == 0), k
        torch.testing.assert_close(res.model.state_dict()[k], v)
    assert res.metadata["calibration"]["tokens"] == 4 * 48


def test_sparsegpt_method_equals_sequential_reference(tiny_pool):
    from transformers import AutoModelForCausalLM

    cfg = {"name": "sparsegpt_pruning", "n_samples": 4, "seq_len": 48, "batch_size": 4, "blocksize": 16,
           "sparsity": 0.5}
    res = build_method(cfg).run(_pool(tiny_pool))
    ids = _calib_ids(tiny_pool, 4, 48)

    def prune(w, X):
        return naive_sparsegpt(w, X, 0.5, None, blocksize=16)[0].to(w.dtype)

    ref = _naive_layerwise(AutoModelForCausalLM.from_pretrained(tiny_pool["base"]).eval(), ids, prune)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(res.model.state_dict()[k], v, rtol=1e-3, atol=1e-4)
    assert res.metadata["sparsity_overall"] == pytest.approx(0.5, abs=1e-3)
    mem = res.metadata["memory"]
    assert mem["decoder_layers"] == 2 and mem["layer_input_bytes"] == 4 * 48 * 32 * 4


def test_bad_config_is_one_line_config_error():
    with pytest.raises(ConfigError, match="method.nm"):
        build_method({"name": "wanda_pruning", "nm": "3:2"})
    with pytest.raises(ConfigError, match="blocksize"):
        build_method({"name": "sparsegpt_pruning", "nm": "4:8", "blocksize": 12})
    with pytest.raises(ConfigError, match="sparsity"):
        build_method({"name": "magnitude_pruning", "sparsity": 1.0})


# ----------------------------------------------------------------------------------------------
# CLI, reload, perplexity before/after
# ----------------------------------------------------------------------------------------------
def test_cli_prunes_saves_and_reloads(tiny_pool, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from tests.conftest import run_cli

    cfg = tmp_path / "cfg"
    (cfg / "modelpool").mkdir(parents=True)
    (cfg / "modelpool" / "tiny_lm.yaml").write_text(
        "# fusion_bench --config-dir cfg method=wanda_pruning modelpool=tiny_lm\n"
        f"type: causal_lm\nmodels:\n  _pretrained_: {tiny_pool['base']}\n")
    (cfg / "taskpool").mkdir()
    (cfg / "taskpool" / "tiny_ppl.yaml").write_text("# fusion_bench --config-dir cfg taskpool=tiny_ppl\n"
                                                    "type: causal_lm_perplexity\nmax_length: 128\n"
                                                    "stride: 128\nmax_tokens: 600\n")
    out = tmp_path / "pruned"
    report = tmp_path / "report.json"
    code, stdout, err = run_cli(
        ["--config-dir", str(cfg), "method=wanda_pruning", "modelpool=tiny_lm", "taskpool=tiny_ppl",
         "method.nm=2:4", "method.n_samples=4", "method.seq_len=32", "method.perplexity_data=builtin",
         "method.perplexity_max_length=128", "method.perplexity_max_tokens=600", f"merged_model_path={out}", f"report_path={report}"],
        capsys)
    assert code == 0, err
    rep = json.loads(report.read_text())
    md = rep["metadata"]
    assert md["sparsity_overall"] == 0.5
    after = rep["evaluation"]["tasks"]
    ppl_task = next(iter(after.values()))["perplexity"]
    assert ppl_task == pytest.approx(md["perplexity_after"]["perplexity"], rel=1e-4)
    assert md["perplexity_before"]["perplexity"] != md["perplexity_after"]["perplexity"]
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert 0 <= on_disk - md["bytes_dense"] < 64 * 1024  # safetensors stores the zeros: dense bytes + a header
    assert md["bytes_nm_compressed_estimate"] <= md["bytes_sparse_bitmask_estimate"] < md["bytes_dense"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    w = reloaded.state_dict()["model.layers.1.self_attn.o_proj.weight"]
    assert nm_ok(w, 2, 4) and not torch.equal(w, torch.zeros_like(w))


def test_readme_merge_then_prune_example(tmp_path, monkeypatch, capsys):
    """The README's offline example with the shipped configs: merge two tiny LMs, prune the merge 2:4, perplexity."""
    from transformers import AutoModelForCausalLM

    from fusion_bench.testing.tiny_lm import save_tiny_llama_pool
    from tests.conftest import run_cli

    monkeypatch.chdir(tmp_path)
    save_tiny_llama_pool("tiny_lms", n=2)
    code, _, err = run_cli(["method=task_arithmetic", "modelpool=tiny_lm_merge", "~taskpool", "evaluate=false",
                            "merged_model_path=outputs/tiny_lm_merged", "report_path=merge.json"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["method=sparsegpt_pruning", "method.nm=2:4", "method.n_samples=16", "method.seq_len=128",
                              "method.perplexity_data=builtin", "modelpool=tiny_lm_merged",
                              "taskpool=causal_lm_perplexity", "merged_model_path=outputs/tiny_lm_merged_2of4",
                              "report_path=prune.json"], capsys)
    assert code == 0, err
    assert "before" in out and "| builtin |" in out
    rep = json.loads((tmp_path / "prune.json").read_text())
    assert rep["metadata"]["sparsity_overall"] == 0.5
    assert rep["evaluation"]["tasks"]["builtin"]["perplexity"] > 1
    w = AutoModelForCausalLM.from_pretrained("outputs/tiny_lm_merged_2of4").state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert nm_ok(w, 2, 4)


@pytest.mark.parametrize("cfg", [{"name": "sparsegpt_pruning", "nm": "2:4", "n_samples": 4, "seq_len": 32,
                                  "blocksize": 16},
                                 {"name": "wanda_pruning", "n_samples": 4, "seq_len": 32},
                                 {"name": "random_pruning", "seed": 3}])
def test_out_of_core_equals_in_memory(tiny_pool, tmp_path, cfg):
    from transformers import AutoModelForCausalLM

    from fusion_bench.methods.compression.out_of_core import prune_to_folder

    pool = _pool(tiny_pool)
    mem = build_method(cfg).run(pool)
    rep = prune_to_folder(build_method(cfg), pool, tmp_path / "ooc")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ooc").eval()
    want = mem.model.state_dict()
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)
    assert rep["sparsity_per_layer"] == mem.metadata["sparsity_per_layer"]
    assert (tmp_path / "ooc" / "tokenizer.json").exists()
