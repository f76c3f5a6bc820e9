"""mergekit YAML front-end: parameter settings (gradients, filters), method mapping against naive
per-tensor formulas written from mergekit's documented semantics, the CLI and its errors."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from fusion_bench.compat.mergekit import depth_t, evaluate_setting, load_mergekit_config, main
from fusion_bench.errors import ConfigError
from tests.test_streaming_helpers import load_sd, save_zoo

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return save_zoo(tmp_path_factory.mktemp("mkzoo"), "llama", n=3, dtype=torch.float32)


def test_evaluate_setting():
    assert evaluate_setting("x", 0.3, 0.7) == 0.3
    assert evaluate_setting("x", [0.0, 1.0], 0.25) == pytest.approx(0.25)
    assert evaluate_setting("x", [0.0, 1.0, 0.0], 0.75) == pytest.approx(0.5)
    assert evaluate_setting("x", [0.2, 0.6], 1.0) == pytest.approx(0.6)
    f = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.9}]
    assert evaluate_setting("model.layers.3.self_attn.q_proj.weight", f, 0.5) == 0.1
    assert evaluate_setting("model.layers.3.mlp.up_proj.weight", f, 0.5) == pytest.approx(0.5)
    assert evaluate_setting("model.norm.weight", f, 1.0) == 0.9
    assert evaluate_setting("model.norm.weight", [{"filter": "mlp", "value": 1.0}], 0.0) is None
    with pytest.raises(ConfigError, match="value"):
        evaluate_setting("x", [{"filter": "mlp"}], 0.0)


def test_depth_t():
    assert depth_t("model.embed_tokens.weight", 4) == 0.0
    assert depth_t("model.layers.0.mlp.up_proj.weight", 4) == 0.0
    assert depth_t("model.layers.2.mlp.up_proj.weight", 4) == pytest.approx(2 / 3)
    assert depth_t("model.norm.weight", 4) == 0.0  # mergekit >= 0.1.2: t = 0 outside the layers
    assert depth_t("lm_head.weight", 4) == 0.0
    assert depth_t("model.layers.0.mlp.up_proj.weight", 1) == 1.0


def _write(tmp_path, doc) -> str:
    p = tmp_path / "merge.yml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(p)


def _t_of(key: str) -> float:  # two layers: layer 0 -> 0, layer 1 -> 1; outside the layers 0 (mergekit >= 0.1.2)
    return 1.0 if ".layers.1." in key else 0.0


def _mk_order(mags: list[float], descending: bool) -> list[int]:
    """Positions in the order of torch's default (unstable) sort of float32 magnitudes, as mergekit sorts; the
    order among tied magnitudes is whatever that sort gives, so take it from the same call."""
    return torch.argsort(torch.tensor(mags, dtype=torch.float32), descending=descending).tolist()


def _naive_ties(base, tensors, weights, densities, normalize, lam=1.0):
    """mergekit ties per element: keep exactly k = max(1, int(density n)) entries, the first k of mergekit's
    descending magnitude sort, weight, elect +1 where the weighted sum >= 0, keep agreeing entries, divide
    by their weights' sum, times lambda."""
    flat_b = base.reshape(-1).tolist()
    taus = []
    for t, d in zip(tensors, densities):
        tau = [a - b for a, b in zip(t.reshape(-1).tolist(), flat_b)]
        k = max(1, int(d * len(tau)))
        keep = set(_mk_order([abs(x) for x in tau], True)[:k])
        taus.append([x if j in keep else 0.0 for j, x in enumerate(tau)])
    out = []
    for j in range(len(flat_b)):
        wt = [w * tau[j] for w, tau in zip(weights, taus)]
        elected = 1 if sum(wt) >= 0 else -1
        mask = [1.0 if ((x > 0) - (x < 0)) == elected else 0.0 for x in wt]
        delta = sum(x * m for x, m in zip(wt, mask))
        if normalize:
            div = sum(w * m for w, m in zip(weights, mask)) or 1.0
            delta /= div
        out.append(flat_b[j] + lam * delta)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_yaml_with_gradients_and_filters(zoo, tmp_path, normalize):
    doc = {"merge_method": "ties", "base_model": zoo["_pretrained_"], "dtype": "float32",
           "parameters": {"normalize": normalize},
           "models": [{"model": zoo["ft0"], "parameters": {"weight": [0.2, 0.6], "density": 0.5}},
                      {"model": zoo["ft1"], "parameters": {"weight": [{"filter": "mlp", "value": 0.7},
                                                                      {"value": 0.3}], "density": 0.4}},
                      {"model": zoo["ft2"], "parameters": {"weight": 0.4, "density": [0.3, 0.9]}}]}
    cfg = _write(tmp_path, doc)
    out = tmp_path / "out"
    assert main([cfg, str(out), "--block-elements", "300", "--max-shard-size", "20KB"]) == 0
    got = load_sd(out)
    base, fts = load_sd(zoo["_pretrained_"]), [load_sd(zoo[f"ft{i}"]) for i in range(3)]
    for key in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
                "model.layers.1.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"):
        t = _t_of(key)
        w = [0.2 + 0.4 * t, 0.7 if "mlp" in key else 0.3, 0.4]
        d = [0.5, 0.4, 0.3 + 0.6 * t]
        expect = _naive_ties(base[key].double(), [f[key].double() for f in fts], w, d, normalize)
        torch.testing.assert_close(got[key].double(), expect, rtol=1e-5, atol=1e-6, msg=key)


def test_linear_and_task_arithmetic_yaml(zoo, tmp_path):
    base, fts = load_sd(zoo["_pretrained_"]), [load_sd(zoo[f"ft{i}"]) for i in range(3)]
    doc = {"merge_method": "linear", "models": [{"model": zoo["ft0"], "parameters": {"weight": 1.0}},
                                                {"model": zoo["ft1"], "parameters": {"weight": 3.0}}]}
    assert main([_write(tmp_path, doc), str(tmp_path / "lin")]) == 0
    got = load_sd(tmp_path / "lin")
    k = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(got[k], (fts[0][k] + 3 * fts[1][k]) / 4, rtol=1e-6, atol=1e-6)
    doc = {"merge_method": "task_arithmetic", "base_model": zoo["_pretrained_"],
           "parameters": {"weight": 0.5},
           "models": [{"model": zoo["ft0"]}, {"model": zoo["ft1"], "parameters": {"weight": -0.25}}]}
    assert main([_write(tmp_path, doc), str(tmp_path / "ta")]) == 0
    got = load_sd(tmp_path / "ta")
    expect = base[k] + 0.5 * (fts[0][k] - base[k]) - 0.25 * (fts[1][k] - base[k])
    torch.testing.assert_close(got[k], expect, rtol=1e-6, atol=1e-6)


def test_dare_and_della_yaml_map_to_gta(zoo):
    plan = load_mergekit_config({"merge_method": "dare_ties", "base_model": zoo["_pretrained_"],
                                 "models": [{"model": zoo["ft0"], "parameters": {"weight": 0.5, "density": 0.6}}]})
    c = plan.method.config
    assert (c.sparsification, c.consensus, c.normalize, c.rescale) == ("random", "sum", False, True)
    assert plan.method.params("model.norm.weight", ["ft0"]) == ([0.5], [0.6])
    # lambda is a global parameter in mergekit (a per-model lambda is refused: mergekit ignores it)
    plan = load_mergekit_config({"merge_method": "della_linear", "base_model": zoo["_pretrained_"],
                                 "parameters": {"lambda": 0.8},
                                 "models": [{"model": zoo["ft0"], "parameters": {"weight": 1, "density": 0.5,
                                                                                 "epsilon": 0.1}}]})
    c = plan.method.config
    assert (c.sparsification, c.consensus, c.rescale_norm) == ("della", "none", "l1")
    assert plan.method.extras("model.norm.weight", ["ft0"]) == ([0.01], [0.1], 0.8)


def test_passthrough_yaml(zoo, tmp_path):
    doc = {"merge_method": "passthrough", "dtype": "bfloat16",
           "slices": [{"sources": [{"model": zoo["ft0"], "layer_range": [0, 2]}]},
                      {"sources": [{"model": zoo["ft1"], "layer_range": [0, 1]}]}]}
    assert main([_write(tmp_path, doc), str(tmp_path / "p")]) == 0
    got = load_sd(tmp_path / "p")
    ft1 = load_sd(zoo["ft1"])
    k = "model.layers.2.self_attn.v_proj.weight"
    assert got[k].dtype == torch.bfloat16
    assert torch.equal(got[k], ft1["model.layers.0.self_attn.v_proj.weight"].to(torch.bfloat16))


def test_tokenizer_source_and_dtype(zoo):
    plan = load_mergekit_config({"merge_method": "ties", "base_model": zoo["_pretrained_"], "dtype": "bfloat16",
                                 "tokenizer_source": zoo["ft1"],
                                 "models": [{"model": zoo["ft1"], "parameters": {"weight": 1, "density": 0.5}}]})
    from transformers import AutoTokenizer

    # the output tokenizer is ft1's; the models' rows are aligned to it (tests/test_mergekit_tokenizer.py)
    assert plan.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(zoo["ft1"]).get_vocab()
    assert plan.pool.dtype == torch.bfloat16


def test_errors(zoo, tmp_path, capsys):
    base = {"merge_method": "ties", "base_model": zoo["_pretrained_"],
            "models": [{"model": zoo["ft0"], "parameters": {"weight": 1.0}}]}
    with pytest.raises(ConfigError, match="Did you mean 'merge_method'"):
        load_mergekit_config({**base, "merge_methd": "ties"})
    with pytest.raises(ConfigError, match="not supported"):
        load_mergekit_config({**base, "merge_method": "core_space"})
    with pytest.raises(ConfigError, match="union, base or a model"):
        load_mergekit_config({**base, "tokenizer_source": 3})
    with pytest.raises(ConfigError, match="'weight' is missing"):
        load_mergekit_config({**base, "models": [{"model": zoo["ft0"], "parameters": {"density": 0.5}}]})
    with pytest.raises(ConfigError, match="needs base_model"):
        load_mergekit_config({k: v for k, v in base.items() if k != "base_model"})
    # the CLI route: errors exit with status 2 and a message, dry run prints the plan
    from fusion_bench.cli import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["mergekit", _write(tmp_path, {**base, "merge_method": "ties_x"})])
    assert e.value.code == 2 and "not supported" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["mergekit", _write(tmp_path, base), "--dry-run"])
    assert e.value.code == 0 and "planned peak RSS" in capsys.readouterr().out


# ---- issue 18: mergekit parity, references from mergekit 0.1.5's documented semantics ----------------------------
K_NORM = "model.layers.1.mlp.down_proj.weight"


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_linear", "breadcrumbs", "della_linear"])
def test_lambda_scales_the_merged_delta(zoo, tmp_path, method):
    """lambda multiplies the merged task vector (density 1: no sparsification, so the result is exact)."""
    doc = {"merge_method": method, "base_model": zoo["_pretrained_"], "parameters": {"lambda": 0.4},
           "models": [{"model": zoo["ft0"], "parameters": {"weight": 0.7}},
                      {"model": zoo["ft1"], "parameters": {"weight": 0.5}}]}
    assert main([_write(tmp_path, doc), str(tmp_path / "o")]) == 0
    got, base = load_sd(tmp_path / "o"), load_sd(zoo["_pretrained_"])
    fts = [load_sd(zoo["ft0"]), load_sd(zoo["ft1"])]
    for k in (K_NORM, "lm_head.weight"):
        expect = base[k] + 0.4 * (0.7 * (fts[0][k] - base[k]) + 0.5 * (fts[1][k] - base[k]))
        torch.testing.assert_close(got[k], expect, rtol=1e-5, atol=1e-6)


def test_ties_lambda_and_exact_k(zoo, tmp_path):
    doc = {"merge_method": "ties", "base_model": zoo["_pretrained_"], "parameters": {"lambda": 0.6, "density": 0.3},
           "models": [{"model": zoo["ft0"], "parameters": {"weight": 0.5}},
                      {"model": zoo["ft1"], "parameters": {"weight": 0.8}}]}
    assert main([_write(tmp_path, doc), str(tmp_path / "o")]) == 0
    got, base = load_sd(tmp_path / "o"), load_sd(zoo["_pretrained_"])
    fts = [load_sd(zoo["ft0"]), load_sd(zoo["ft1"])]
    for k in (K_NORM, "model.norm.weight"):
        expect = _naive_ties(base[k].double(), [f[k].double() for f in fts], [0.5, 0.8], [0.3, 0.3], True, lam=0.6)
        torch.testing.assert_close(got[k].double(), expect, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_bf16_keeps_exactly_k(tmp_path_factory, tmp_path, method):
    """bf16 task vectors have many tied magnitudes; mergekit still keeps exactly k entries per tensor."""
    z = save_zoo(tmp_path_factory.mktemp("bf"), "llama", n=1, dtype=torch.bfloat16)
    doc = {"merge_method": method, "base_model": z["_pretrained_"], "dtype": "float32",
           "parameters": {"density": 0.2, **({"gamma": 0.01} if method == "breadcrumbs" else {})},
           "models": [{"model": z["ft0"], "parameters": {"weight": 1.0}}]}
    assert main([_write(tmp_path, doc), str(tmp_path / "o")]) == 0
    got, base, ft = load_sd(tmp_path / "o"), load_sd(z["_pretrained_"]), load_sd(z["ft0"])
    for k in (K_NORM, "model.embed_tokens.weight"):
        tau = ft[k].float() - base[k].float()
        assert tau.abs().unique().numel() < 0.5 * tau.numel()  # ties are common
        n = tau.numel()
        if method == "ties":
            keep = _mk_order(tau.abs().reshape(-1).tolist(), True)[:max(1, int(0.2 * n))]
        else:  # breadcrumbs: ascending sort, drop the n_bot smallest and the int(gamma n) largest
            target, n_top = int(0.2 * n), int(0.01 * n)
            n_bot = max(0, n - target - n_top)
            keep = _mk_order(tau.abs().reshape(-1).tolist(), False)[n_bot:n_bot + target]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[keep] = True
        expect = (base[k].float().reshape(-1) + tau.reshape(-1) * mask).reshape(tau.shape)
        torch.testing.assert_close(got[k], expect, rtol=0, atol=1e-7, msg=k)
        assert int(((got[k] - base[k].float()) != 0).sum()) == len(keep)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_rescale_matches_the_l1_norm(zoo, tmp_path, method):
    """mergekit 0.1.5 rescale: each sparsified task vector is scaled back to its L1 norm (not by 1/p)."""
    p = {"weight": 1.0, "density": 0.3, **({"epsilon": [{"filter": "mlp", "value": 0.25}, {"value": 0.05}]}
                                           if method == "della_linear" else {})}
    doc = {"merge_method": method, "base_model": zoo["_pretrained_"], "models": [{"model": zoo["ft0"], "parameters": p}]}
    assert main([_write(tmp_path, doc), str(tmp_path / "o")]) == 0
    got, base, ft = load_sd(tmp_path / "o"), load_sd(zoo["_pretrained_"]), load_sd(zoo["ft0"])
    kept = total = 0
    for k in (K_NORM, "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        d, tau = got[k].double() - base[k].double(), ft[k].double() - base[k].double()
        assert float(d.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-5)
        kept, total = kept + int((d != 0).sum()), total + d.numel()
    assert abs(kept / total - 0.3) < 0.05


def test_della_and_breadcrumbs_parameters_per_model(zoo):
    plan = load_mergekit_config({"merge_method": "della", "base_model": zoo["_pretrained_"],
                                 "models": [{"model": zoo["ft0"], "parameters": {"weight": 1, "density": 0.5,
                                                                                 "epsilon": 0.1}},
                                            {"model": zoo["ft1"], "parameters": {"weight": 1, "density": 0.5,
                                                                                 "epsilon": [0.0, 0.4]}}]})
    assert plan.method.extras("model.layers.1.mlp.up_proj.weight", ["ft0", "ft1"])[1] == [0.1, pytest.approx(0.4)]
    with pytest.raises(ConfigError, match="model 'ft1'"):  # density + epsilon >= 1 for ft1 only
        load_mergekit_config({"merge_method": "della", "base_model": zoo["_pretrained_"],
                              "models": [{"model": zoo["ft0"], "parameters": {"weight": 1, "density": 0.5}},
                                         {"model": zoo["ft1"], "parameters": {"weight": 1, "density": 0.7,
                                                                              "epsilon": 0.3}}]})
    plan = load_mergekit_config({"merge_method": "breadcrumbs", "base_model": zoo["_pretrained_"],
                                 "models": [{"model": zoo["ft0"], "parameters": {"weight": 1, "gamma": 0.05}},
                                            {"model": zoo["ft1"], "parameters": {"weight": 1}}]})
    assert plan.method.extras("lm_head.weight", ["ft0", "ft1"])[0] == [0.05, 0.01]


def test_passthrough_scale_and_last_slice_head(zoo, tmp_path):
    """scale multiplies a slice's tensors (t per slice); the final norm and lm_head come from the last slice's model."""
    doc = {"merge_method": "passthrough",
           "slices": [{"sources": [{"model": zoo["ft0"], "layer_range": [0, 2]}]},
                      {"sources": [{"model": zoo["ft1"], "layer_range": [0, 2],
                                    "parameters": {"scale": [{"filter": "o_proj", "value": 0.0},
                                                             {"filter": "mlp", "value": [0.5, 1.5]},
                                                             {"value": 1.0}]}}]}]}
    assert main([_write(tmp_path, doc), str(tmp_path / "p")]) == 0
    got, f0, f1 = load_sd(tmp_path / "p"), load_sd(zoo["ft0"]), load_sd(zoo["ft1"])
    assert torch.equal(got["model.layers.1.self_attn.o_proj.weight"], f0["model.layers.1.self_attn.o_proj.weight"])
    assert not got["model.layers.2.self_attn.o_proj.weight"].any()
    torch.testing.assert_close(got["model.layers.2.mlp.up_proj.weight"], 0.5 * f1["model.layers.0.mlp.up_proj.weight"])
    torch.testing.assert_close(got["model.layers.3.mlp.up_proj.weight"], 1.5 * f1["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], f0["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], f1["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], f1["lm_head.weight"])


def test_karcher_without_base_and_with_base_listed(zoo, tmp_path):
    from fusion_bench.kernels.merging.karcher import karcher_mean

    sds = {n: load_sd(zoo[n]) for n in ("_pretrained_", "ft0", "ft1")}
    for i, (doc_base, names) in enumerate([(None, ["ft0", "ft1"]), (zoo["_pretrained_"], ["_pretrained_", "ft0", "ft1"])]):
        doc = {"merge_method": "karcher", "models": [{"model": zoo[n]} for n in names]}
        if doc_base:
            doc["base_model"] = doc_base
        assert main([_write(tmp_path, doc), str(tmp_path / f"k{i}")]) == 0
        got = load_sd(tmp_path / f"k{i}")
        torch.testing.assert_close(got[K_NORM], karcher_mean([sds[n][K_NORM] for n in names]), rtol=1e-5, atol=1e-6)


def test_model_stock_mergekit_formula(zoo, tmp_path):
    doc = {"merge_method": "model_stock", "base_model": zoo["_pretrained_"],
           "models": [{"model": zoo[f"ft{i}"]} for i in range(3)]}
    assert main([_write(tmp_path, doc), str(tmp_path / "ms")]) == 0
    got, b = load_sd(tmp_path / "ms"), load_sd(zoo["_pretrained_"])[K_NORM].double().reshape(-1)
    ws = [load_sd(zoo[f"ft{i}"])[K_NORM].double().reshape(-1) for i in range(3)]
    taus = [w - b for w in ws]
    cos = sum(float(taus[i] @ taus[j] / (taus[i].norm() * taus[j].norm())) for i, j in [(0, 1), (0, 2), (1, 2)]) / 3
    t = 3 * cos / (1 + 2 * cos)
    expect = t * sum(ws) / 3 + (1 - t) * b
    torch.testing.assert_close(got[K_NORM].double().reshape(-1), expect, rtol=1e-5, atol=1e-6)


def test_refusals_like_mergekit(zoo, tmp_path_factory):
    with pytest.raises(ConfigError, match="not in 'models'.*weight"):
        load_mergekit_config({"merge_method": "linear", "base_model": zoo["_pretrained_"],
                              "models": [{"model": zoo["ft0"], "parameters": {"weight": 1.0}}]})
    # with a global weight mergekit averages the base too
    plan = load_mergekit_config({"merge_method": "linear", "base_model": zoo["_pretrained_"],
                                 "parameters": {"weight": 1.0}, "models": [{"model": zoo["ft0"]}]})
    assert len(plan.pool.names) == 2
    z = save_zoo(tmp_path_factory.mktemp("voc"), "llama", n=2, vocabs=[96, 104])
    doc = {"merge_method": "ties", "base_model": z["_pretrained_"],
           "models": [{"model": z[f"ft{i}"], "parameters": {"weight": 1.0, "density": 0.5}} for i in range(2)]}
    with pytest.raises(ConfigError, match="vocabularies differ.*tokenizer_source"):
        load_mergekit_config(doc)
    load_mergekit_config({**doc, "tokenizer_source": "base"})
    with pytest.raises(ConfigError, match="nearswap"):
        load_mergekit_config({**doc, "merge_method": "nearswap"})


def _ref_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP of the flattened tensors (mergekit: linear interpolation when |cos| > 0.9995)."""
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    cos = float(a64 @ b64 / (a64.norm() * b64.norm()))
    if abs(cos) > 0.9995:
        out = (1 - t) * a64 + t * b64
    else:
        om = math.acos(cos)
        out = math.sin((1 - t) * om) / math.sin(om) * a64 + math.sin(t * om) / math.sin(om) * b64
    return out.reshape(a.shape)


def test_slerp_slices_with_several_sources(zoo, tmp_path):
    """mergekit's gradient-SLERP recipe written with slices: in each slice t runs over the slice's own layers
    (one-layer slice: t = 1), a slice's parameters win over the global ones, the embeddings use the first
    slice's parameters and the final norm / lm_head the last slice's, at t = 0."""
    a, b = zoo["ft0"], zoo["ft1"]
    doc = {"merge_method": "slerp", "base_model": a, "dtype": "float32",
           "slices": [{"sources": [{"model": a, "layer_range": [0, 1]}, {"model": b, "layer_range": [0, 1]}],
                       "parameters": {"t": [{"filter": "mlp", "value": 0.3}]}},
                      {"sources": [{"model": a, "layer_range": [1, 2]}, {"model": b, "layer_range": [1, 2]}]}],
           "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.8]}, {"value": 0.6}]}}
    assert main([_write(tmp_path, doc), str(tmp_path / "s")]) == 0
    got, sa, sb = load_sd(tmp_path / "s"), load_sd(a), load_sd(b)

    def t_of(key: str) -> float:
        if ".layers.0." in key:  # slice 0 (one layer: t = 1); its own filter first, then the global ones
            return 0.3 if "mlp" in key else (0.8 if "self_attn" in key else 0.6)
        if ".layers.1." in key:  # slice 1 (one layer: t = 1): the global setting
            return 0.8 if "self_attn" in key else 0.6
        return 0.6  # embeddings (slice 0's filter does not match), final norm, lm_head (last slice): global, t = 0

    for k in sa:
        torch.testing.assert_close(got[k].double(), _ref_slerp(sa[k], sb[k], t_of(k)), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_linear_slices_per_slice_source_parameters(zoo, tmp_path):
    """A source's parameters apply within its slice: weights differ by slice; embeddings from the first slice's
    weights, final norm / lm_head from the last slice's."""
    a, b = zoo["ft0"], zoo["ft1"]
    doc = {"merge_method": "linear", "dtype": "float32",
           "slices": [{"sources": [{"model": a, "layer_range": [0, 1], "parameters": {"weight": 1.0}},
                                   {"model": b, "layer_range": [0, 1], "parameters": {"weight": 3.0}}]},
                      {"sources": [{"model": a, "layer_range": [1, 2], "parameters": {"weight": [2.0, 9.0]}},
                                   {"model": b, "layer_range": [1, 2]}],
                       "parameters": {"weight": 6.0}}]}
    assert main([_write(tmp_path, doc), str(tmp_path / "l")]) == 0
    got, sa, sb = load_sd(tmp_path / "l"), load_sd(a), load_sd(b)
    for k in sa:
        # slice 1 has one layer: t = 1, weight of a = 9; outside the layers t = 0, weight of a = 2
        wa, wb = (1.0, 3.0) if (".layers.0." in k or "embed_tokens" in k) else \
            ((9.0, 6.0) if ".layers.1." in k else (2.0, 6.0))
        torch.testing.assert_close(got[k], (wa * sa[k] + wb * sb[k]) / (wa + wb), rtol=1e-6, atol=1e-6)


def test_slices_refusals(zoo):
    a, b = zoo["ft0"], zoo["ft1"]

    def doc(slices, **kw):
        return {"merge_method": "slerp", "base_model": a, "parameters": {"t": 0.5}, "slices": slices, **kw}

    def two(r0, r1):
        return {"sources": [{"model": a, "layer_range": r0}, {"model": b, "layer_range": r1}]}

    with pytest.raises(ConfigError, match=r"slices\[0\]: the sources' layer ranges differ"):
        load_mergekit_config(doc([two([0, 2], [0, 1])]))
    with pytest.raises(ConfigError, match=r"slices\[1\] has layer_range \[0, 2\].*passthrough"):
        load_mergekit_config(doc([two([0, 2], [0, 2]), two([0, 2], [0, 2])]))
    with pytest.raises(ConfigError, match=r"cover layers \[0, 1\) but the models have 2"):
        load_mergekit_config(doc([two([0, 1], [0, 1])]))
    with pytest.raises(ConfigError, match=r"slices\[0\] does not list base_model"):
        load_mergekit_config(doc([{"sources": [{"model": b, "layer_range": [0, 2]},
                                               {"model": zoo["ft2"], "layer_range": [0, 2]}]}]))
    with pytest.raises(ConfigError, match="either 'models' or 'slices'"):
        load_mergekit_config(doc([two([0, 2], [0, 2])], models=[{"model": a}]))
    with pytest.raises(ConfigError, match=r"slices\[0\]\.parameters\.normalize"):
        load_mergekit_config({"merge_method": "linear", "parameters": {"weight": 1.0},
                              "slices": [{**two([0, 2], [0, 2]), "parameters": {"normalize": False}}]})


# --- nuslerp, multislerp, sce (mergekit 0.1.5 semantics, references in float64 from the formulas) ---------
K_EMB = "model.embed_tokens.weight"
F64 = torch.float64


def _ref_nuslerp_vec(a: list[float], b: list[float], t: float) -> list[float]:
    """SLERP of two vectors: angle between the unit directions (norms clamped at 1e-7), lerp when colinear."""
    na = max(math.sqrt(sum(x * x for x in a)), 1e-7)
    nb = max(math.sqrt(sum(x * x for x in b)), 1e-7)
    cos = max(-1.0, min(1.0, sum(x / na * y / nb for x, y in zip(a, b))))
    if 1 - cos * cos <= 1e-16:
        return [(1 - t) * x + t * y for x, y in zip(a, b)]
    th = math.acos(cos)
    return [(math.sin((1 - t) * th) * x + math.sin(t * th) * y) / math.sin(th) for x, y in zip(a, b)]


def _ref_nuslerp(v0: torch.Tensor, v1: torch.Tensor, t: float, flatten: bool, row_wise: bool) -> torch.Tensor:
    a, b = v0.double(), v1.double()
    if flatten or a.dim() == 1:  # a 1-D tensor is one vector either way
        return torch.tensor(_ref_nuslerp_vec(a.reshape(-1).tolist(), b.reshape(-1).tolist(), t), dtype=F64).reshape(a.shape)
    if row_wise and a.dim() == 2:  # vectors along dim 0: the columns
        cols = [_ref_nuslerp_vec(a[:, j].tolist(), b[:, j].tolist(), t) for j in range(a.shape[1])]
        return torch.tensor(cols, dtype=F64).T
    rows = [_ref_nuslerp_vec(a[i].tolist(), b[i].tolist(), t) for i in range(a.shape[0])]
    return torch.tensor(rows, dtype=F64)


@pytest.mark.parametrize("opts", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp(zoo, tmp_path, opts, with_base):
    doc = {"merge_method": "nuslerp", "parameters": dict(opts),
           "models": [{"model": zoo["ft0"], "parameters": {"weight": [0.2, 0.8]}},
                      {"model": zoo["ft1"], "parameters": {"weight": 0.6}}]}
    if with_base:
        doc["base_model"] = zoo["_pretrained_"]
        doc["models"].insert(0, {"model": zoo["_pretrained_"]})  # listed base: not one of the two models
    assert main([_write(tmp_path, doc), str(tmp_path / "o")]) == 0
    got = load_sd(tmp_path / "o")
    sds = {n: load_sd(zoo[n]) for n in ("_pretrained_", "ft0", "ft1")}
    for key in (K_NORM, K_EMB, "model.norm.weight"):
        w0 = 0.2 + 0.6 * _t_of(key)
        t = 0.6 / (w0 + 0.6)
        b = sds["_pretrained_"][key].double() if with_base else 0
        expect = b + _ref_nuslerp(sds["ft0"][key] - b, sds["ft1"][key] - b, t,
                                  opts.get("nuslerp_flatten", True), opts.get("nuslerp_row_wise", False))
        torch.testing.assert_close(got[key].double(), expect, rtol=1e-5, atol=1e-6)


def test_nuslerp_kernel_colinear_and_zero_weights():
    from fusion_bench.kernels.merging.nuslerp import nuslerp

    a = torch.randn(4, 5)
    torch.testing.assert_close(nuslerp(a, 2 * a, 0.25), 1.25 * a)  # colinear: linear interpolation
    with pytest.raises(ConfigError, match="exactly two"):
        load_mergekit_config({"merge_method": "nuslerp", "models": [{"model": "a", "parameters": {"weight": 1}}]})


def _ref_multislerp(xs: list[list[float]], w: list[float], normalize: bool, eps: float) -> list[float]:
    if len(xs) == 1:
        return xs[0]
    if normalize:
        w = [x / sum(w) for x in w]
    norms = [math.sqrt(sum(v * v for v in x)) for x in xs]
    units = [[v / (nm + eps) for v in x] for x, nm in zip(xs, norms)]
    mean = [sum(wi * u[j] for wi, u in zip(w, units)) for j in range(len(xs[0]))]
    mn = math.sqrt(sum(v * v for v in mean))
    mean = [v / mn for v in mean]
    tang = [0.0] * len(mean)
    for wi, u in zip(w, units):
        d = sum(a * b for a, b in zip(u, mean))
        for j in range(len(mean)):
            tang[j] += wi * (u[j] - d * mean[j])
    tn = math.sqrt(sum(v * v for v in tang)) + eps
    avg = sum(nm * wi for nm, wi in zip(norms, w))
    return [avg * (m * math.cos(tn) + v * math.sin(tn) / tn) for m, v in zip(mean, tang)]


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp(zoo, tmp_path, with_base):
    params = {"normalize_weights": False, "eps": 1e-6} if with_base else {}
    doc = {"merge_method": "multislerp", "parameters": params,
           "models": [{"model": zoo[f"ft{i}"], "parameters": {"weight": w}}
                      for i, w in enumerate([0.5, [0.1, 0.7], 0.2])]}
    if with_base:
        doc["base_model"] = zoo["_pretrained_"]
    assert main([_write(tmp_path, doc), str(tmp_path / "o")]) == 0
    got = load_sd(tmp_path / "o")
    sds = {n: load_sd(zoo[n]) for n in ("_pretrained_", "ft0", "ft1", "ft2")}
    for key in (K_NORM, K_EMB):
        w = [0.5, 0.1 + 0.6 * _t_of(key), 0.2]
        b = sds["_pretrained_"][key].double().reshape(-1) if with_base else torch.zeros(sds["ft0"][key].numel(),
                                                                                          dtype=torch.float64)
        xs = [(sds[f"ft{i}"][key].double().reshape(-1) - b).tolist() for i in range(3)]
        expect = torch.tensor(_ref_multislerp(xs, w, not with_base, 1e-6 if with_base else 1e-8), dtype=F64) + b
        torch.testing.assert_close(got[key].double().reshape(-1), expect, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="sum to"):
        load_mergekit_config({**doc, "parameters": {}, "models": [
            {"model": zoo["ft0"], "parameters": {"weight": 1.0}}, {"model": zoo["ft1"], "parameters": {"weight": -1.0}}]})


def _ref_sce(base: torch.Tensor, tensors: list[torch.Tensor], topk: float) -> torch.Tensor:
    b = base.double().reshape(-1).tolist()
    taus = [[x - y for x, y in zip(t.double().reshape(-1).tolist(), b)] for t in tensors]
    n, m = len(taus), len(b)
    if topk < 1:
        var = []
        for j in range(m):
            mu = sum(tau[j] for tau in taus) / n
            var.append(sum((tau[j] - mu) ** 2 for tau in taus) / n)
        k = int(sum(v != 0 for v in var) * topk)
        keep = set(sorted(range(m), key=lambda j: -var[j])[:k])
        taus = [[x if j in keep else 0.0 for j, x in enumerate(tau)] for tau in taus]
    ms = [sum(x * x for x in tau) / m for tau in taus]
    w = [x / sum(ms) for x in ms] if abs(sum(ms)) >= 1e-6 else [1 / n] * n
    out = []
    for j in range(m):
        elected = 1 if sum(tau[j] for tau in taus) >= 0 else -1
        agree = [wi if ((tau[j] > 0) - (tau[j] < 0)) == elected else 0.0 for wi, tau in zip(w, taus)]
        out.append(b[j] + sum(a * tau[j] for a, tau in zip(agree, taus)) / max(sum(agree), 1e-6))
    return torch.tensor(out, dtype=F64).reshape(base.shape)


@pytest.mark.parametrize("topk", [None, 0.3, [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.5}]])
def test_sce(zoo, tmp_path, topk):
    doc = {"merge_method": "sce", "base_model": zoo["_pretrained_"],
           "models": [{"model": zoo[f"ft{i}"]} for i in range(3)]}
    if topk is not None:
        doc["parameters"] = {"select_topk": topk}
    assert main([_write(tmp_path, doc), str(tmp_path / "o")]) == 0
    got = load_sd(tmp_path / "o")
    sds = {n: load_sd(zoo[n]) for n in ("_pretrained_", "ft0", "ft1", "ft2")}
    for key in (K_NORM, "model.norm.weight"):
        k = 1.0 if topk is None else (0.3 if isinstance(topk, float) else (0.1 + 0.8 * _t_of(key) if "mlp" in key
                                                                             else 0.5))
        expect = _ref_sce(sds["_pretrained_"][key], [sds[f"ft{i}"][key] for i in range(3)], k)
        torch.testing.assert_close(got[key].double(), expect, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="select_topk"):
        load_mergekit_config({**doc, "parameters": {"select_topk": 1.5}})
    with pytest.raises(ConfigError, match="needs base_model"):
        load_mergekit_config({k: v for k, v in doc.items() if k != "base_model"})


def _bf(x: float) -> float:
    """Round to bfloat16 the way a bfloat16 op does (the float32 result, rounded to nearest even)."""
    return float(torch.tensor(x, dtype=torch.float32).to(torch.bfloat16))


def _naive_ties_bf16(base, tensors, weights, density, lam):
    """mergekit 0.1.5 ties with dtype bfloat16, per element, rounding after every step as mergekit computes:
    delta_i = t_i - b; exactly-k trim; w_i rounded; w_i delta_i; vote = sum_i w_i delta_i; sum of agreeing
    products / sum of agreeing w_i; times lambda; + b."""
    b = base.float().reshape(-1).tolist()
    ws = [_bf(w) for w in weights]
    taus = []
    for t in tensors:
        tau = [_bf(x - y) for x, y in zip(t.float().reshape(-1).tolist(), b)]
        k = max(1, int(density * len(tau)))
        keep = set(_mk_order([abs(x) for x in tau], True)[:k])
        taus.append([x if j in keep else 0.0 for j, x in enumerate(tau)])
    out = []
    for j in range(len(b)):
        wd = [_bf(w * tau[j]) for w, tau in zip(ws, taus)]
        elected = 1 if _bf(sum(wd)) >= 0 else -1
        agree = [((x > 0) - (x < 0)) == elected for x in wd]
        mixed = _bf(sum(x for x, a in zip(wd, agree) if a))
        div = _bf(sum(w for w, a in zip(ws, agree) if a)) or 1.0
        mixed = _bf(_bf(mixed / div) * lam)
        out.append(_bf(b[j] + mixed))
    return torch.tensor(out, dtype=torch.float32).reshape(base.shape)


@pytest.mark.parametrize("dtype_key", [{"dtype": "bfloat16"}, {}, {"dtype": "bfloat16", "out_dtype": "float32"}])
def test_gta_bf16_in_mergekit_order(tmp_path_factory, tmp_path, dtype_key):
    z = save_zoo(tmp_path_factory.mktemp("bf"), "llama", n=3, dtype=torch.bfloat16)
    w = [0.5, 0.3, 0.2]
    doc = {"merge_method": "ties", "base_model": z["_pretrained_"], **dtype_key,
           "parameters": {"density": 0.3, "lambda": 0.7},
           "models": [{"model": z[f"ft{i}"], "parameters": {"weight": w[i]}} for i in range(3)]}
    assert main([_write(tmp_path, doc), str(tmp_path / "o")]) == 0
    got = load_sd(tmp_path / "o")
    sds = {n: load_sd(z[n]) for n in ("_pretrained_", "ft0", "ft1", "ft2")}
    for key in (K_NORM, "model.norm.weight"):
        expect = _naive_ties_bf16(sds["_pretrained_"][key], [sds[f"ft{i}"][key] for i in range(3)], w, 0.3, 0.7)
        assert got[key].dtype == (torch.float32 if "out_dtype" in dtype_key else torch.bfloat16)
        assert torch.equal(got[key].float(), expect), key


def test_own_gta_keeps_float32_compute():
    from fusion_bench.methods import build_method

    m = build_method({"name": "generalized_task_arithmetic", "sparsification": "magnitude", "density": 0.5})
    assert m.compute_dtype(torch.bfloat16) == torch.float32


# --- mergekit-yaml command-line options ---------------------------------------------------------------------
def _ta_doc(zoo, method="dare_linear"):
    return {"merge_method": method, "base_model": zoo["_pretrained_"],
            "models": [{"model": zoo[f"ft{i}"], "parameters": {"weight": 0.5, "density": 0.5}} for i in range(2)]}


def test_cli_random_seed(zoo, tmp_path):
    cfg = _write(tmp_path, _ta_doc(zoo))
    outs = {}
    for name, extra in [("d", []), ("s0", ["--random-seed", "0"]), ("s1", ["--random-seed", "1"]),
                        ("s1b", ["--random-seed", "1"])]:
        assert main([cfg, str(tmp_path / name), *extra]) == 0
        outs[name] = load_sd(tmp_path / name)[K_NORM]
    assert torch.equal(outs["s1"], outs["s1b"]) and torch.equal(outs["d"], outs["s0"])
    assert not torch.equal(outs["s0"], outs["s1"])
    with pytest.raises(ConfigError, match="random-seed"):
        main([cfg, str(tmp_path / "neg"), "--random-seed", "-1"])


def test_cli_allow_crimes(zoo, tmp_path):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(zoo["ft1"], other)
    c = json.loads((other / "config.json").read_text())
    c["architectures"] = ["MyLlamaForCausalLM"]
    (other / "config.json").write_text(json.dumps(c))
    doc = {"merge_method": "linear", "models": [{"model": zoo["ft0"], "parameters": {"weight": 1.0}},
                                                 {"model": str(other), "parameters": {"weight": 1.0}}]}
    cfg = _write(tmp_path, doc)
    with pytest.raises(ConfigError, match="architectures differ.*--allow-crimes"):
        main([cfg, str(tmp_path / "a")])
    assert main([cfg, str(tmp_path / "a"), "--allow-crimes"]) == 0
    got, f0, f1 = load_sd(tmp_path / "a"), load_sd(zoo["ft0"]), load_sd(zoo["ft1"])
    torch.testing.assert_close(got[K_NORM], (f0[K_NORM] + f1[K_NORM]) / 2)
    c["model_type"] = "mistral"
    (other / "config.json").write_text(json.dumps(c))
    with pytest.raises(ConfigError, match="model_type"):
        main([cfg, str(tmp_path / "b"), "--allow-crimes"])


def test_cli_out_shard_size_and_tokenizer(zoo, tmp_path):
    from fusion_bench.compat.mergekit import parse_mergekit_size

    assert parse_mergekit_size("5B") == 5 * 10**9 and parse_mergekit_size("20K") == 20000
    assert parse_mergekit_size("123") == 123
    with pytest.raises(ConfigError, match="out-shard-size"):
        parse_mergekit_size("5GiB")
    cfg = _write(tmp_path, _ta_doc(zoo, "task_arithmetic"))
    assert main([cfg, str(tmp_path / "one")]) == 0
    assert main([cfg, str(tmp_path / "many"), "--out-shard-size", "20K", "--no-copy-tokenizer"]) == 0
    one = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    many = sorted((tmp_path / "many").glob("*.safetensors"))
    assert len(one) == 1 and len(many) > 1
    a, b = load_sd(tmp_path / "one"), load_sd(tmp_path / "many")
    assert all(torch.equal(a[k], b[k]) for k in a) and set(a) == set(b)
    assert any(p.name.startswith("tokenizer") for p in (tmp_path / "one").iterdir())
    assert not any(p.name.startswith(("tokenizer", "special_tokens")) for p in (tmp_path / "many").iterdir())
    assert (tmp_path / "many" / "config.json").exists()


def test_cli_execution_options_are_no_ops_and_refusals(zoo, tmp_path):
    cfg = _write(tmp_path, _ta_doc(zoo, "ties"))
    assert main([cfg, str(tmp_path / "plain")]) == 0
    assert main([cfg, str(tmp_path / "opts"), "--lazy-unpickle", "--low-cpu-memory", "--cuda", "--no-read-to-gpu",
                 "--quiet", "-v", "-v", "-j", "2", "--write-model-card", "--clone-tensors", "--safe-serialization",
                 "--no-trust-remote-code", "--device", "cpu", "--async-write", "--write-threads", "2"]) == 0
    a, b = load_sd(tmp_path / "plain"), load_sd(tmp_path / "opts")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for flag in ("--trust-remote-code", "--unsafe-truncate-embeddings", "--no-safe-serialization"):
        with pytest.raises(ConfigError, match=flag):
            main([cfg, str(tmp_path / "r"), flag])


# ---- modules, chat_template, tokenizer blocks, slice keys ---------------------------------------------------------
def test_modules_default_equals_top_level(zoo, tmp_path):
    """modules: {default: ...} is mergekit's form of the one module of a causal LM; its parameters come after a
    model's and before the global ones (a filter that does not match falls through)."""
    models = [{"model": zoo["ft0"], "parameters": {"weight": 0.7}}, {"model": zoo["ft1"]}]
    mod = {"merge_method": "task_arithmetic", "base_model": zoo["_pretrained_"], "parameters": {"weight": 0.1, "lambda": 2.0},
           "modules": {"default": {"models": models,
                                   "parameters": {"weight": [{"filter": "mlp", "value": 0.4}], "lambda": 0.5}}}}
    main([_write(tmp_path, mod), str(tmp_path / "mod")])
    got, base = load_sd(tmp_path / "mod"), load_sd(zoo["_pretrained_"])
    f0, f1 = load_sd(zoo["ft0"]), load_sd(zoo["ft1"])
    for k in (K_NORM, "model.layers.0.self_attn.q_proj.weight"):
        w1 = 0.4 if "mlp" in k else 0.1
        want = base[k] + 0.5 * (0.7 * (f0[k] - base[k]) + w1 * (f1[k] - base[k]))
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="single-module"):
        load_mergekit_config({**mod, "modules": {"vision_tower": {"models": models}}})
    with pytest.raises(ConfigError, match="exactly one of 'models', 'slices' or 'modules'"):
        load_mergekit_config({**mod, "models": models})
    with pytest.raises(ConfigError, match="modules.default.modles"):
        load_mergekit_config({**mod, "modules": {"default": {"modles": models}}})


def test_chat_template(zoo, tmp_path):
    from transformers import AutoTokenizer

    tpl = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    doc = {"merge_method": "linear", "chat_template": tpl,
           "models": [{"model": zoo["ft0"], "parameters": {"weight": 1.0}}]}
    main([_write(tmp_path, doc), str(tmp_path / "ct")])
    assert AutoTokenizer.from_pretrained(str(tmp_path / "ct")).chat_template == tpl
    # auto: the most common template of the referenced models; here none has one, so none is set (as mergekit)
    main([_write(tmp_path, {**doc, "chat_template": "auto"}), str(tmp_path / "ct2")])
    assert not AutoTokenizer.from_pretrained(str(tmp_path / "ct2")).chat_template
    main([_write(tmp_path, {**doc, "models": [{"model": str(tmp_path / "ct"), "parameters": {"weight": 1.0}}],
                            "chat_template": "auto"}), str(tmp_path / "ct3")])
    assert AutoTokenizer.from_pretrained(str(tmp_path / "ct3")).chat_template == tpl
    for bad, msg in (("chatml", "bundled with mergekit"), ("hello", "not a Jinja template"), (3, "must be a string")):
        with pytest.raises(ConfigError, match=msg):
            load_mergekit_config({**doc, "chat_template": bad})


def test_tokenizer_blocks_and_slice_keys(zoo):
    base = {"merge_method": "linear", "models": [{"model": zoo["ft0"], "parameters": {"weight": 1.0}}]}
    plan = load_mergekit_config({**base, "tokenizer": {"source": "base"}})
    assert plan.pool.config.vocab_policy == "shared_rows"
    # mergekit's default source of a tokenizer block is the union (tests/test_mergekit_tokenizer.py)
    assert load_mergekit_config({**base, "tokenizer": {"pad_to_multiple_of": None}}).tokenizer is not None
    with pytest.raises(ConfigError, match="zero or model_token"):
        load_mergekit_config({**base, "tokenizer": {"source": "base", "tokens": {"<x>": {"source": {"kind": "x"}}}}})
    with pytest.raises(ConfigError, match="pad_to_multiple_of must be a positive integer"):
        load_mergekit_config({**base, "tokenizer": {"source": "base", "pad_to_multiple_of": -64}})
    with pytest.raises(ConfigError, match="tokenizer.sorce"):
        load_mergekit_config({**base, "tokenizer": {"sorce": "base"}})
    with pytest.raises(ConfigError, match="not both"):
        load_mergekit_config({**base, "tokenizer": {"source": "base"}, "tokenizer_source": "base"})
    sl = {"merge_method": "passthrough",
          "slices": [{"sources": [{"model": zoo["ft0"], "layer_range": [0, 2]}], "residual_weight": 0.5}]}
    plan = load_mergekit_config(sl)
    assert any("residual_weight" in n for n in plan.notes)  # mergekit 0.1.5 never reads it
    with pytest.raises(ConfigError, match="per-slice base model"):
        load_mergekit_config({**sl, "slices": [{**sl["slices"][0], "base_model": zoo["ft0"]}]})


def test_mergekit_karcher_equals_karcher_mean():
    """The front end's karcher (mergekit's arithmetic and order) is the same mean as fusion_bench's karcher_mean,
    which is written independently (float64 inputs: equal to rounding)."""
    from fusion_bench.compat.mergekit import MergekitKarcher
    from fusion_bench.kernels.merging.karcher import karcher_mean

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 5, generator=g, dtype=torch.float64) + 0.5 for _ in range(3)]
    got = MergekitKarcher(max_iter=50, tol=1e-12).merge_tensor("k", None, xs, ["a", "b", "c"])
    torch.testing.assert_close(got, karcher_mean(xs, max_iter=50, tol=1e-12), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["model_stock", "sce", "karcher", "nuslerp", "multislerp"])
def test_half_precision_methods_compute_in_mergekit_dtype(zoo, method):
    """dtype: bfloat16 -> these methods compute in bfloat16, as mergekit (float32 for float32 checkpoints)."""
    doc = {"merge_method": method, "dtype": "bfloat16", "models": [{"model": zoo["ft0"]}, {"model": zoo["ft1"]}]}
    if method in ("model_stock", "sce"):
        doc["base_model"] = zoo["_pretrained_"]
    if method in ("nuslerp", "multislerp"):
        doc["models"] = [{"model": zoo["ft0"], "parameters": {"weight": 0.6}},
                         {"model": zoo["ft1"], "parameters": {"weight": 0.4}}]
    plan = load_mergekit_config(doc)
    assert plan.method.compute_dtype(torch.float32) == torch.bfloat16
    plan = load_mergekit_config({k: v for k, v in doc.items() if k != "dtype"})
    assert plan.method.compute_dtype(torch.float32) == torch.float32  # the checkpoint's dtype


def test_numbers_written_without_a_dot(zoo, tmp_path):
    """YAML 1.1 reads 1e-2 as a string; mergekit's validation turns it into a number, and so does fusion_bench."""
    text = (f"merge_method: nearswap\nbase_model: {zoo['_pretrained_']}\nparameters:\n  t: 1e-2\n"
            f"models:\n  - model: {zoo['ft0']}\n")
    (tmp_path / "ns.yml").write_text(text)
    plan = load_mergekit_config(str(tmp_path / "ns.yml"))
    assert plan.method.resolver.value("t", "model.norm.weight", None) == 0.01
    with pytest.raises(ConfigError, match="not a number"):
        load_mergekit_config({"merge_method": "nearswap", "base_model": zoo["_pretrained_"],
                              "parameters": {"t": "abc"}, "models": [{"model": zoo["ft0"]}]})


# --- --tie-break index: the lower index first among tied magnitudes (fast; not mergekit's tie order) ----------
def test_cli_tie_break_index(tmp_path_factory, tmp_path):
    z = save_zoo(tmp_path_factory.mktemp("tb"), "llama", n=3, dtype=torch.bfloat16)
    w = [0.5, 0.3, 0.2]
    doc = {"merge_method": "ties", "base_model": z["_pretrained_"], "dtype": "float32",
           "parameters": {"density": 0.2, "lambda": 0.7, "normalize": False},
           "models": [{"model": z[f"ft{i}"], "parameters": {"weight": w[i]}} for i in range(3)]}
    cfg = _write(tmp_path, doc)
    assert main([cfg, str(tmp_path / "mk")]) == 0
    assert main([cfg, str(tmp_path / "ix"), "--tie-break", "index"]) == 0
    mk, ix = load_sd(tmp_path / "mk"), load_sd(tmp_path / "ix")
    sds = {n: load_sd(z[n]) for n in ("_pretrained_", "ft0", "ft1", "ft2")}
    differ = 0
    for key in ("model.embed_tokens.weight", K_NORM):
        b = sds["_pretrained_"][key].float().reshape(-1)
        taus = []
        for i in range(3):
            tau = sds[f"ft{i}"][key].float().reshape(-1) - b
            n = tau.numel()
            k = max(1, int(0.2 * n))
            # the lower index first: a stable descending sort of the magnitudes (written out: sort by (-|x|, j))
            order = sorted(range(n), key=lambda j: (-abs(float(tau[j])), j))[:k]
            m = torch.zeros(n)
            m[order] = 1.0
            taus.append(tau * m)
        wt = [wi * t for wi, t in zip(w, taus)]
        s = sum(wt)
        elected = torch.where(s >= 0, 1.0, -1.0)
        delta = sum(x * (torch.sign(x) == elected) for x in wt)
        expect = (b + 0.7 * delta).reshape(ix[key].shape)
        torch.testing.assert_close(ix[key], expect, rtol=1e-6, atol=1e-7, msg=key)
        differ += int((mk[key] != ix[key]).sum())
    assert differ > 0  # bf16 ties at the cut: the two orders keep different tied entries
    with pytest.raises(SystemExit):
        main([cfg, str(tmp_path / "bad"), "--tie-break", "random"])


def test_stats_on_several_workers_equal_one(tmp_path_factory, tmp_path):
    """The per-model stats of one tensor run on several workers; the merge waits for all of them."""
    from fusion_bench.engine.streaming import merge_to_folder

    z = save_zoo(tmp_path_factory.mktemp("tw"), "llama", n=3, dtype=torch.bfloat16)
    doc = {"merge_method": "ties", "base_model": z["_pretrained_"], "dtype": "bfloat16",
           "parameters": {"density": 0.3, "lambda": 0.9},
           "models": [{"model": z[f"ft{i}"], "parameters": {"weight": 0.4}} for i in range(3)]}
    outs = []
    for workers in (1, 3):
        plan = load_mergekit_config(doc)
        out = tmp_path / f"w{workers}"
        merge_to_folder(plan.method, plan.pool, out, workers=workers, block_elements=64, progress=False)
        outs.append(load_sd(out))
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k


def test_tie_break_index_stats_from_row_blocks(tmp_path_factory, tmp_path):
    """With --tie-break index on a bf16 merge the engine builds the trim from row-block histograms (no whole
    tensor held): the same merge as the whole-tensor path, bit for bit."""
    from fusion_bench.engine.streaming import merge_to_folder, plan_merge

    z = save_zoo(tmp_path_factory.mktemp("tbb"), "llama", n=3, dtype=torch.bfloat16)
    for method in ("ties", "breadcrumbs_ties"):
        doc = {"merge_method": method, "base_model": z["_pretrained_"], "dtype": "bfloat16",
               "parameters": {"density": 0.3, "lambda": 0.9, **({"gamma": 0.05} if "bread" in method else {})},
               "models": [{"model": z[f"ft{i}"], "parameters": {"weight": 0.4}} for i in range(3)]}
        outs = []
        for be in (64, 1 << 30):
            plan = load_mergekit_config(doc, tie_break="index")
            p = plan_merge(plan.method, plan.pool, block_elements=be)
            assert any(j.stats_blocks for j in p.jobs) == (be == 64)
            out = tmp_path / f"{method}_{be}"
            merge_to_folder(plan.method, plan.pool, out, block_elements=be, progress=False)
            outs.append(load_sd(out))
        for k in outs[0]:
            assert torch.equal(outs[0][k], outs[1][k]), (method, k)


def test_stats_error_reaches_the_user_with_several_workers(tmp_path_factory, tmp_path):
    """A non-finite tensor found by a statistics unit on one worker is the error raised, not the 'merge stopped'
    of a merge block waiting for that statistic on another worker; nothing is written."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from fusion_bench.engine.streaming import merge_to_folder
    from fusion_bench.errors import ModelMismatchError

    z = save_zoo(tmp_path_factory.mktemp("nan"), "llama", n=3, dtype=torch.bfloat16)
    for f in Path(z["ft1"]).glob("*.safetensors"):
        sd = load_file(f)
        if "model.embed_tokens.weight" in sd:
            sd["model.embed_tokens.weight"][-1, -1] = float("nan")
            save_file(sd, f, metadata={"format": "pt"})
    doc = {"merge_method": "ties", "base_model": z["_pretrained_"], "dtype": "bfloat16",
           "parameters": {"density": 0.3},
           "models": [{"model": z[f"ft{i}"], "parameters": {"weight": 0.4}} for i in range(3)]}
    for tie_break in ("mergekit", "index"):
        plan = load_mergekit_config(doc, tie_break=tie_break)
        out = tmp_path / tie_break
        with pytest.raises(ModelMismatchError, match="non-finite.*embed_tokens"):
            merge_to_folder(plan.method, plan.pool, out, workers=3, block_elements=64, progress=False)
        assert not out.exists()
