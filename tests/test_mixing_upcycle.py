"""Mixtral upcycling and merging, depth up-scaling and model recombination on tiny Llama and Qwen2 pools.

References are written from the formulas (mergekit-moe 0.1.5's gate definitions, the sparse MoE layer,
SOLAR's layer copy, FusionBench's recombination) on tensors read back from the output folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusion_bench.errors import ConfigError, FusionBenchError
from fusion_bench.kernels.mixing.depth import parse_layer_indices, runs_of
from fusion_bench.kernels.mixing.mixtral import (
    cheap_embed_vector,
    expert_gate_vectors,
    hidden_prompt_vectors,
    moe_layer_reference,
)
from fusion_bench.kernels.mixing.recombination import unit_permutation

V, H, I, L = 48, 32, 40, 3  # noqa: E741


# ------------------------------------------------------------------------------------------------
# tiny models
# ------------------------------------------------------------------------------------------------
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, V)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _config(family: str):
    import transformers as T

    kw = dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)
    return {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[family](**kw)


def _dense(family: str, seed: int, base=None, scale: float = 0.02):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(_config(family)).eval()
    with torch.no_grad():
        if base is not None:
            g = torch.Generator().manual_seed(seed)
            bsd = base.state_dict()
            for k, p in m.state_dict().items():
                p.copy_(bsd[k] + torch.randn(p.shape, generator=g) * scale)
    return m


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Per family: a base and three fine-tunes saved as HF folders with a tokenizer."""
    root = tmp_path_factory.mktemp("mixzoo")
    tok = _tokenizer()
    out = {}
    for fam in ("llama", "qwen2", "mistral"):
        base = _dense(fam, 0)
        paths = {}
        fts = [(f"ft{j}", _dense(fam, 10 + j, base)) for j in range(3 if fam != "mistral" else 0)]
        for name, m in [("_pretrained_", base)] + fts:
            p = root / fam / name
            m.save_pretrained(p)
            tok.save_pretrained(p)
            paths[name] = str(p)
        out[fam] = paths
    return out


def _tensors(folder) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _run(method: dict, models: dict, out: Path | None = None, **kw):
    from fusion_bench.programs.fusion import run_program

    cfg = {"method": method, "modelpool": {"type": "causal_lm", "models": dict(models)}, "taskpool": {},
           "print_table": False, "evaluate": False, **kw}
    if out is not None:
        cfg["merged_model_path"] = str(out)
    return run_program(cfg, log=lambda *a: None)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 30], [1, 44, 3, 8, 8, 12, 40]])


# ------------------------------------------------------------------------------------------------
# kernels against the formulas
# ------------------------------------------------------------------------------------------------
def test_cheap_embed_is_normalised_masked_token_sum():
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(V, H, generator=g)
    ids = torch.tensor([[1, 4, 5], [0, 1, 7]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    # mergekit: one-hot(ids) @ embed, masked, summed over batch and positions, L2-normalised
    onehot = torch.nn.functional.one_hot(ids, V).float()
    s = ((onehot @ embed) * mask.unsqueeze(-1)).sum(dim=(0, 1))
    torch.testing.assert_close(cheap_embed_vector(embed, ids, mask), s / s.norm())


def test_hidden_prompt_vectors_last_and_average():
    hs = torch.randn(L, 2, 5, H, generator=torch.Generator().manual_seed(1))
    last = torch.stack([(hs[layer, 0, -1] + hs[layer, 1, -1]) / 2 for layer in range(L)])
    avg = torch.stack([(hs[layer, 0].mean(0) + hs[layer, 1].mean(0)) / 2 for layer in range(L)])
    torch.testing.assert_close(hidden_prompt_vectors(hs, average=False), last)
    torch.testing.assert_close(hidden_prompt_vectors(hs, average=True), avg)
    pos, neg = torch.randn(L, H), torch.randn(L, H)
    v = expert_gate_vectors(pos, neg)
    torch.testing.assert_close(v, (pos - neg) / (pos - neg).norm(dim=-1, keepdim=True))


def test_moe_reference_routes_top_k():
    g = torch.Generator().manual_seed(2)
    x, gate = torch.randn(4, H, generator=g), torch.randn(3, H, generator=g)
    mats = [torch.randn(H, H, generator=g) for _ in range(3)]
    experts = [lambda z, m=m: z @ m for m in mats]
    got = moe_layer_reference(x, gate, experts, top_k=2)
    for n in range(4):  # per token, from the definition
        p = torch.softmax(x[n] @ gate.t(), -1)
        top = torch.topk(p, 2).indices
        want = sum(p[e] / p[top].sum() * (x[n] @ mats[e]) for e in top.tolist())
        torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-5)


def test_layer_index_parsing_never_evaluates():
    assert parse_layer_indices([[0, 3], [1, 4]], 4) == [0, 1, 2, 1, 2, 3]
    assert parse_layer_indices([0, 2, "range(1, 3)", "3"], 4) == [0, 2, 1, 2, 3]
    assert runs_of([0, 1, 2, 1, 2, 3, 3]) == [(0, 3), (1, 4), (3, 4)]
    for bad in (["__import__('os')"], [[0, 9]], [5], [[2, 1]], "0,1", [True]):
        with pytest.raises(ConfigError):
            parse_layer_indices(bad, 4)


def test_recombination_draw_is_a_seeded_permutation():
    p = unit_permutation(3, "model.layers.0.mlp.up_proj.weight", 5)
    assert sorted(p) == list(range(5)) and p == unit_permutation(3, "model.layers.0.mlp.up_proj.weight", 5)
    draws = {tuple(unit_permutation(s, "u", 4)) for s in range(40)}
    assert len(draws) > 10  # seeds give different permutations


# ------------------------------------------------------------------------------------------------
# upcycling
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_upcycled_identical_experts_compute_the_dense_model(zoo, family, tmp_path):
    from transformers import AutoModelForCausalLM

    base = zoo[family]["_pretrained_"]
    rep = _run({"name": "mixtral_upscaling", "num_experts": 4, "experts_per_token": 2, "seed": 5},
               {"_pretrained_": base}, tmp_path / "moe", engine="streaming")
    assert rep["engine"] == "streaming"
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    want = "Qwen2MoeForCausalLM" if family == "qwen2" else "MixtralForCausalLM"
    assert type(moe).__name__ == want
    dense = AutoModelForCausalLM.from_pretrained(base).eval()
    torch.testing.assert_close(_logits(moe, IDS), _logits(dense, IDS), rtol=1e-4, atol=1e-5)
    assert moe.generate(IDS[:1], max_new_tokens=4, do_sample=False).shape == (1, IDS.shape[1] + 4)
    # the tensors: experts are the dense MLP, routers N(0, 1) from the seed, the rest copied
    out, src = _tensors(tmp_path / "moe"), _tensors(base)
    g = torch.Generator().manual_seed(5)
    gates = torch.randn((L, 4, H), generator=g)
    for layer in range(L):
        if family != "qwen2":
            pre = f"model.layers.{layer}.block_sparse_moe."
            names = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
        else:
            pre = f"model.layers.{layer}.mlp."
            names = {p: p for p in ("gate_proj", "up_proj", "down_proj")}
            assert out[pre + "shared_expert_gate.weight"].abs().sum() == 0
        torch.testing.assert_close(out[pre + "gate.weight"], gates[layer])
        for e in range(4):
            for o, s in names.items():
                assert torch.equal(out[f"{pre}experts.{e}.{o}.weight"], src[f"model.layers.{layer}.mlp.{s}.weight"])
    for k, v in src.items():
        if ".mlp." not in k:
            assert torch.equal(out[k], v), k
    # the report's parameter figures
    md = rep["metadata"]
    n_in = sum(v.numel() for v in src.values())
    mlp = sum(v.numel() for k, v in src.items() if ".mlp." in k)
    assert md["input_model_parameters"] == n_in
    assert md["total_parameters"] == sum(v.numel() for v in out.values())
    assert md["active_parameters_per_token"] == md["total_parameters"] - 2 * mlp
    assert md["extra_parameters"] == md["total_parameters"] - n_in == rep["cost"]["extra_parameters"]
    mm = md["mixed_model"]  # the mixing family's common block
    assert (mm["total_parameters"], mm["active_parameters_per_input"], mm["one_model_parameters"],
            mm["router_parameters"]) == (md["total_parameters"], md["active_parameters_per_token"], n_in,
                                    L * (5 if family == "qwen2" else 4) * H)  # + Qwen2-MoE's shared-expert gate


def test_upcycling_in_memory_equals_streamed(zoo, tmp_path):
    from fusion_bench.methods import build_method
    from fusion_bench.modelpool.base import build_modelpool

    base = zoo["llama"]["_pretrained_"]
    method = {"name": "mixtral_upscaling", "num_experts": 3, "experts_per_token": 1, "gate_mode": "uniform_random",
              "experts": [{}, {"noise_scale": 0.01}, {"residual_scale": 0.5}]}
    _run(method, {"_pretrained_": base}, tmp_path / "s", engine="streaming")
    res = build_method(dict(method)).run(build_modelpool({"type": "causal_lm", "models": {"_pretrained_": base}}))
    assert type(res.model).__name__ == "MixtralForCausalLM"
    moe = __import__("transformers").AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    torch.testing.assert_close(_logits(res.model, IDS), _logits(moe, IDS))
    out, src = _tensors(tmp_path / "s"), _tensors(base)
    w = src["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(out["model.layers.1.block_sparse_moe.experts.2.w2.weight"], w * 0.5)
    d = out["model.layers.1.block_sparse_moe.experts.1.w2.weight"] - w
    assert 0.005 < float(d.std()) < 0.02  # seeded noise of std 0.01
    bound = 1 / H ** 0.5
    gate = out["model.layers.0.block_sparse_moe.gate.weight"]
    assert gate.shape == (3, H) and float(gate.abs().max()) <= bound


# ------------------------------------------------------------------------------------------------
# merging
# ------------------------------------------------------------------------------------------------
def _moe_block(model, layer):
    return model.model.layers[layer].mlp


def _dense_mlp(folder, layer):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval().model.layers[layer].mlp


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_merged_layer_is_the_reference_moe_of_the_finetunes(zoo, family, tmp_path):
    from transformers import AutoModelForCausalLM

    paths = zoo[family]
    _run({"name": "mixtral_merging", "experts_per_token": 2, "seed": 1}, paths, tmp_path / "m")
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert moe.generate(IDS[:1], max_new_tokens=3, do_sample=False).shape[1] == IDS.shape[1] + 3
    out, base = _tensors(tmp_path / "m"), _tensors(paths["_pretrained_"])
    for k, v in base.items():  # shared tensors from the base
        if ".mlp." not in k:
            assert torch.equal(out[k], v), k
    x = torch.randn(1, 6, H, generator=torch.Generator().manual_seed(3))
    for layer in range(L):
        grp = "block_sparse_moe" if family == "llama" else "mlp"
        gate = out[f"model.layers.{layer}.{grp}.gate.weight"]
        experts = [_dense_mlp(paths[f"ft{e}"], layer) for e in range(3)]
        want = moe_layer_reference(x[0], gate, [lambda z, m=m: m(z) for m in experts], top_k=2)
        with torch.no_grad():
            got = _moe_block(moe, layer)(x)
            got = got[0] if isinstance(got, tuple) else got
        torch.testing.assert_close(got[0].float(), want, rtol=1e-4, atol=1e-5)


def test_merging_average_shared_tensors_and_expert_order(zoo, tmp_path):
    paths = zoo["llama"]
    _run({"name": "mixtral_merging", "experts": ["ft2", "ft0"], "shared_tensors": "average", "experts_per_token": 1},
         paths, tmp_path / "a")
    out = _tensors(tmp_path / "a")
    f0, f2 = _tensors(paths["ft0"]), _tensors(paths["ft2"])
    k = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(out[k], (f0[k] + f2[k]) / 2)
    assert torch.equal(out["model.layers.2.block_sparse_moe.experts.0.w3.weight"], f2["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.2.block_sparse_moe.experts.1.w1.weight"], f0["model.layers.2.mlp.gate_proj.weight"])
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["num_local_experts"] == 2 and cfg["num_experts_per_tok"] == 1 and cfg["model_type"] == "mixtral"
    assert (tmp_path / "a" / "tokenizer.json").exists()


PROMPTS = [{"positive_prompts": ["w3 w4 w5", "w6 w7"], "negative_prompts": ["w40 w41"]},
           {"positive_prompts": ["w20 w21 w22 w23"]},
           {"positive_prompts": ["w30", "w31 w32 w33"], "negative_prompts": ["w5"]}]


def _reference_prompt_rows(folder, mode):
    """mergekit-moe's gate rows written out: tokenized with BOS, left-padded with BOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side, tok.pad_token_id = "left", tok.bos_token_id
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    embed = model.model.embed_tokens.weight.detach()

    def vec(ps):
        t = tok([tok.bos_token + p for p in ps], return_tensors="pt", padding=True, add_special_tokens=False)
        if mode == "cheap_embed":
            h = (torch.nn.functional.one_hot(t["input_ids"], V).float() @ embed) * t["attention_mask"].unsqueeze(-1)
            s = h.sum(dim=(0, 1))
            return (s / s.norm()).expand(L, H)
        with torch.no_grad():
            hs = model(**t, output_hidden_states=True).hidden_states
        rows = []
        for layer in range(L):
            st = hs[layer]  # input of layer l
            per = st.mean(dim=1) if mode == "hidden_avg" else st[:, -1]
            rows.append(per.mean(dim=0))
        return torch.stack(rows)
    out = []
    for p in PROMPTS:
        v = vec(p["positive_prompts"])
        if p.get("negative_prompts"):
            v = v - vec(p["negative_prompts"])
        out.append(v / v.norm(dim=-1, keepdim=True))
    return torch.stack(out, dim=1)  # (L, E, H)


@pytest.mark.parametrize("mode", ["cheap_embed", "hidden", "hidden_avg"])
def test_prompt_gate_modes(zoo, mode, tmp_path):
    paths = zoo["llama"]
    experts = [{"model": f"ft{e}", **PROMPTS[e]} for e in range(3)]
    rep = _run({"name": "mixtral_merging", "experts": experts, "gate_mode": mode}, paths, tmp_path / "g")
    out = _tensors(tmp_path / "g")
    want = _reference_prompt_rows(paths["_pretrained_"], mode)
    for layer in range(L):
        torch.testing.assert_close(out[f"model.layers.{layer}.block_sparse_moe.gate.weight"], want[layer],
                                   rtol=1e-4, atol=1e-5)
    assert "prompts" in rep["metadata"]["gate_data"]


def test_qwen2_shared_expert_from_a_model(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    paths = zoo["qwen2"]
    _run({"name": "mixtral_merging", "experts": ["ft0", "ft1"], "shared_expert": "ft2", "seed": 4}, paths,
         tmp_path / "q")
    out, f2 = _tensors(tmp_path / "q"), _tensors(paths["ft2"])
    assert torch.equal(out["model.layers.0.mlp.shared_expert.up_proj.weight"], f2["model.layers.0.mlp.up_proj.weight"])
    # mergekit draws (L, E + 1, H) at once: the experts' rows, then the shared expert's
    rows = torch.randn((L, 3, H), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out["model.layers.1.mlp.gate.weight"], rows[1, :2])
    torch.testing.assert_close(out["model.layers.1.mlp.shared_expert_gate.weight"], rows[1, 2:])
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert m.config.shared_expert_intermediate_size == I


@pytest.mark.parametrize("method,match", [
    ({"name": "mixtral_merging", "experts_per_token": 4}, "experts_per_token=4 exceeds the 3 experts"),
    ({"name": "mixtral_merging", "gate_mode": "hidden"}, "needs prompts"),
    ({"name": "mixtral_merging", "experts": ["ft0", "nope"]}, "'nope' is not in the pool"),
    ({"name": "mixtral_merging", "gate_mode": "cheap_embed",
      "experts": [{"model": "ft0", "positive_prompts": ["w3"]}, {"model": "ft1", "positive_prompts": ["w3"]}]},
     "same positive and negative prompts"),
    ({"name": "mixtral_merging", "shared_expert": "ft1"}, "Qwen2-MoE outputs only"),
    ({"name": "mixtral_upscaling", "num_experts": 2, "experts": [{}]}, "one mapping per expert"),
])
def test_user_errors_are_one_line(zoo, method, match, tmp_path):
    with pytest.raises(FusionBenchError, match=match) as e:
        _run(method, zoo["llama"], tmp_path / "x")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------
# depth up-scaling
# ------------------------------------------------------------------------------------------------
def test_depth_upscaling_module_list_in_memory():
    from fusion_bench.methods import build_method
    from fusion_bench.modelpool.base import ModelPool

    layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(4)])
    before = {k: v.clone() for k, v in layers.state_dict().items()}
    res = build_method({"name": "depth_upscaling", "layer_indices": [[0, 3], [1, 4]]}).run(ModelPool({"m": layers}))
    new = res.model
    assert isinstance(new, torch.nn.ModuleList) and len(new) == 6
    for j, i in enumerate([0, 1, 2, 1, 2, 3]):
        assert torch.equal(new[j].weight, layers[i].weight) and new[j] is not layers[i]
    assert new[1] is not new[3]  # copies, not shared modules
    assert all(torch.equal(layers.state_dict()[k], v) for k, v in before.items())
    assert res.metadata["extra_parameters"] == 2 * (16 + 4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_depth_upscaling_causal_lm_streamed_and_in_memory(zoo, family, tmp_path):
    from transformers import AutoModelForCausalLM

    base = zoo[family]["_pretrained_"]
    spec = [[0, 2], [1, 3]]
    idx = [0, 1, 1, 2]
    rep = _run({"name": "depth_upscaling", "layer_indices": spec}, {"_pretrained_": base}, tmp_path / "d",
               engine="streaming")
    deep = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    assert deep.config.num_hidden_layers == 4 and rep["metadata"]["output_layers"] == 4
    out, src = _tensors(tmp_path / "d"), _tensors(base)
    for k, v in src.items():
        if ".layers." in k:
            i = int(k.split(".layers.")[1].split(".")[0])
            for j in [j for j, s in enumerate(idx) if s == i]:
                assert torch.equal(out[k.replace(f".layers.{i}.", f".layers.{j}.")], v)
        else:
            assert torch.equal(out[k], v)
    assert len(out) == len(src) + sum(1 for k in src if ".layers.1." in k)
    # in memory (FusionBench's DepthUpscalingForLlama path) gives the same model, and generation with a
    # KV cache works (each copy has its own cache slot)
    from fusion_bench.methods import build_method
    from fusion_bench.modelpool.base import build_modelpool

    res = build_method({"name": "depth_upscaling", "layer_indices": spec}).run(
        build_modelpool({"type": "causal_lm", "models": {"_pretrained_": base}}))
    torch.testing.assert_close(_logits(res.model, IDS), _logits(deep, IDS))
    assert [layer.self_attn.layer_idx for layer in res.model.model.layers] == [0, 1, 2, 3]
    a = res.model.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    b = deep.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# recombination
# ------------------------------------------------------------------------------------------------
def test_recombination_layers_come_whole_from_one_model(zoo, tmp_path):
    from fusion_bench.methods import build_method
    from fusion_bench.modelpool.base import build_modelpool

    paths = {k: v for k, v in zoo["llama"].items() if k != "_pretrained_"}
    srcs = {n: _tensors(p) for n, p in paths.items()}
    names = list(paths)
    pool = {"type": "causal_lm", "models": paths}
    per_model = []
    for i in range(3):  # the 3 recombined models use every model's unit exactly once per unit
        res = build_method({"name": "model_recombination", "granularity": "layer", "seed": 7, "model_index": i}).run(
            build_modelpool(pool))
        sd = res.model.state_dict()
        who = {}
        for k in srcs[names[0]]:
            hit = [n for n in names if torch.equal(sd[k], srcs[n][k])]
            assert len(hit) == 1, k
            unit = "layer" + k.split(".layers.")[1].split(".")[0] if ".layers." in k else k
            assert who.setdefault(unit, hit[0]) == hit[0], f"layer {unit} mixes models"
        per_model.append(who)
    for unit in per_model[0]:
        assert sorted(m[unit] for m in per_model) == sorted(names)
    assert len({m for m in per_model[0].values()}) > 1  # not all from one model
    # streamed from the CLI path equals in memory
    _run({"name": "model_recombination", "granularity": "layer", "seed": 7}, paths, tmp_path / "r")
    out = _tensors(tmp_path / "r")
    first = build_method({"name": "model_recombination", "granularity": "layer", "seed": 7}).run(build_modelpool(pool))
    for k, v in out.items():
        assert torch.equal(v, first.model.state_dict()[k])


# ------------------------------------------------------------------------------------------------
# the CLI on tiny Llama and Qwen2 pools
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("method", [
    ["method=mixtral_upscaling", "method.num_experts=4"],
    ["method=mixtral_merging", "method.gate_mode=cheap_embed",
     "method.experts=[{model: ft0, positive_prompts: [w3 w4]}, {model: ft1, positive_prompts: [w9]}]"],
    ["method=depth_upscaling", "method.layer_indices=[[0,2],[1,3]]"],
    ["method=model_recombination", "method.seed=3"],
])
def test_cli_output_reloads_and_generates(zoo, family, method, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tests.conftest import run_cli

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "cfg" / "modelpool"
    cfg.mkdir(parents=True)
    lines = ["# fusion_bench --config-dir cfg modelpool=tiny_lm '~taskpool' evaluate=false", "type: causal_lm",
             "models:"] + [f"  {n}: {p}" for n, p in zoo[family].items()]
    (cfg / "tiny_lm.yaml").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code, so, se = run_cli(["--config-dir", str(tmp_path / "cfg"), *method, "modelpool=tiny_lm", "~taskpool",
                            "evaluate=false", f"merged_model_path={out}", f"report_path={tmp_path / 'report.json'}"],
                           capsys)
    assert code == 0, se[-2000:]
    m = AutoModelForCausalLM.from_pretrained(out).eval()
    assert m.generate(IDS[:1], max_new_tokens=3, do_sample=False).shape[1] == IDS.shape[1] + 3
    rep = json.loads((tmp_path / "report.json").read_text())
    md = rep["metadata"]
    if "mixtral" in method[0] or "depth" in method[0]:
        assert md["total_parameters"] > md["input_model_parameters"] == sum(v.numel() for v in _tensors(
            zoo[family]["_pretrained_"]).values())
        assert md["active_parameters_per_token"] <= md["total_parameters"]
        assert rep["cost"]["extra_parameters"] == md["total_parameters"] - md["input_model_parameters"]
    else:
        assert rep["cost"]["extra_parameters"] == 0 and md["seed"] == 3
        assert md["total_parameters"] == md["active_parameters_per_token"] == md["input_model_parameters"]


def test_in_memory_engine_saves_a_loadable_model(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    base = zoo["qwen2"]["_pretrained_"]
    method = {"name": "mixtral_upscaling", "num_experts": 2, "experts_per_token": 1, "seed": 2}
    rep = _run(method, {"_pretrained_": base}, tmp_path / "mem", engine="memory")
    _run(method, {"_pretrained_": base}, tmp_path / "str", engine="streaming")
    assert rep["engine"] == "memory" and rep["metadata"]["total_parameters"] > rep["metadata"]["input_model_parameters"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "mem").eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "str").eval()
    assert type(a).__name__ == "Qwen2MoeForCausalLM"
    torch.testing.assert_close(_logits(a, IDS), _logits(b, IDS))
    assert (tmp_path / "mem" / "tokenizer.json").exists()
