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
    assert depth_t("model.norm.weight", 4) == 1.0
    assert depth_t("lm_head.weight", 4) == 1.0
    assert depth_t("model.layers.0.mlp.up_proj.weight", 1) == 1.0


def _write(tmp_path, doc) -> str:
    p = tmp_path / "merge.yml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(p)


def _t_of(key: str) -> float:  # two layers: layer 0 -> 0, layer 1 -> 1; embeddings 0; the rest 1
    if ".layers.0." in key or "embed" in key:
        return 0.0
    return 1.0


def _naive_ties(base, tensors, weights, densities, normalize):
    """mergekit ties per element: trim to the floor(density n) largest |tau| (ties kept), weight,
    elect +1 where the weighted sum >= 0, keep agreeing entries, divide by their weights' sum."""
    flat_b = base.reshape(-1).tolist()
    taus = []
    for t, d in zip(tensors, densities):
        tau = [a - b for a, b in zip(t.reshape(-1).tolist(), flat_b)]
        k = int(d * len(tau))
        thr = sorted((abs(x) for x in tau), reverse=True)[k - 1] if k > 0 else math.inf
        taus.append([x if abs(x) >= thr else 0.0 for x in tau])
    out = []
    for j in range(len(flat_b)):
        wt = [w * tau[j] for w, tau in zip(weights, taus)]
        elected = 1 if sum(wt) >= 0 else -1
        mask = [1.0 if ((x > 0) - (x < 0)) == elected else 0.0 for x in wt]
        delta = sum(x * m for x, m in zip(wt, mask))
        if normalize:
            div = sum(w * m for w, m in zip(weights, mask)) or 1.0
            delta /= div
        out.append(flat_b[j] + delta)
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
    assert (c.sparsification, c.consensus, c.epsilon, c.scaling_factor) == ("della", "none", 0.1, 0.8)


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
    assert plan.pool.config.vocab_source == "ft1" and plan.pool.dtype == torch.bfloat16


def test_errors(zoo, tmp_path, capsys):
    base = {"merge_method": "ties", "base_model": zoo["_pretrained_"],
            "models": [{"model": zoo["ft0"], "parameters": {"weight": 1.0}}]}
    with pytest.raises(ConfigError, match="Did you mean 'merge_method'"):
        load_mergekit_config({**base, "merge_methd": "ties"})
    with pytest.raises(ConfigError, match="not supported"):
        load_mergekit_config({**base, "merge_method": "nuslerp"})
    with pytest.raises(ConfigError, match="union"):
        load_mergekit_config({**base, "tokenizer_source": "union"})
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
