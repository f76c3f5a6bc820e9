"""SMILE (Tang et al. 2024, arXiv 2408.10174): the upscaled layer against a per-token loop written from the paper's
formula, its limit cases (one full-rank expert = the fine-tuned layer; equal routing over all experts = the average
of the fine-tuned layers), the generic method on a plain module pool, and the causal-LM path on tiny Llama, Mistral
and Qwen2 models: in memory vs streamed, reloaded through AutoModelForCausalLM, generate, the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench.errors import ConfigError, FusionBenchError, ModelMismatchError
from fusion_bench.kernels.mixing import smile as K
from fusion_bench.methods import build_method
from fusion_bench.modelpool.base import ModelPool
from fusion_bench.models.smile import SmileLinear, smile_parameter_counts, upscale_linears

pytestmark = pytest.mark.usefixtures("one_thread")


def _layers(n_models: int, m: int = 7, n: int = 5, seed: int = 0, bias: bool = True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(n, m, bias=bias).to(dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(m, n, generator=g, dtype=dtype))
        if bias:
            base.bias.copy_(torch.randn(m, generator=g, dtype=dtype))
    fts = []
    for _ in range(n_models):
        f = copy.deepcopy(base)
        with torch.no_grad():
            f.weight.add_(0.5 * torch.randn(m, n, generator=g, dtype=dtype))
            if bias:
                f.bias.add_(0.5 * torch.randn(m, generator=g, dtype=dtype))
        fts.append(f)
    return base, fts


@torch.no_grad()
def reference_forward(x, base, fts, gate_k, k, top_k, routing_use_diff=True):
    """The paper's formula, token by token, with its own SVDs (float64)."""
    w0 = base.weight.double()
    b0 = base.bias.double() if base.bias is not None else torch.zeros(w0.shape[0], dtype=torch.float64)
    svds, gates = [], []
    for f in fts:
        dw = f.weight.double() - w0
        u, s, vh = torch.linalg.svd(dw)
        kk = min(dw.shape) if k <= 0 else min(k, *dw.shape)
        db = (f.bias.double() if f.bias is not None else torch.zeros_like(b0)) - b0
        svds.append((u[:, :kk] @ torch.diag(s[:kk]) @ vh[:kk], db))
        src = vh if routing_use_diff else torch.linalg.svd(f.weight.double())[2]
        gates.append(src[:gate_k])
    out = []
    for xt in x.double():
        r = torch.stack([torch.linalg.vector_norm(g @ xt) for g in gates])
        p = torch.softmax(r, 0)
        chosen = sorted(range(len(fts)), key=lambda i: -float(p[i]))[:top_k]  # ties: none on random data
        z = sum(float(p[i]) for i in chosen)
        y = w0 @ xt + b0
        for i in chosen:
            y = y + float(p[i]) / z * (svds[i][0] @ xt + svds[i][1])
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("gate_k,k,top_k,routing_use_diff", [(2, 3, 2, True), (1, -1, 1, True), (5, 2, 3, True),
                                                              (3, 4, 2, False)])
def test_layer_equals_per_token_formula(gate_k, k, top_k, routing_use_diff):
    base, fts = _layers(3)
    layer = SmileLinear.from_linears(base, fts, gate_k, k, top_k, routing_use_diff)
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = layer(x)
    want = reference_forward(x.reshape(-1, 5), base, fts, gate_k, k, top_k, routing_use_diff).view(4, 3, 7)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert layer.gate_k == min(gate_k, 5)
    r = 0 if k <= 0 else min(k, 5)  # stored as factors only when they are smaller than the 7 x 5 matrix
    assert layer.rank == (r if 0 < r and r * (7 + 5) < 7 * 5 else 0)


def test_one_full_rank_expert_is_the_finetuned_layer():
    base, (ft,) = _layers(1, m=9, n=6)
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for k in (-1, 0, 6, 50):  # full delta, or a rank >= min(m, n)
        layer = SmileLinear.from_linears(base, [ft], gate_k=2, k=k, top_k=1)
        torch.testing.assert_close(layer(x), ft(x), rtol=1e-10, atol=1e-10)
    low = SmileLinear.from_linears(base, [ft], gate_k=2, k=2, top_k=1)
    assert not torch.allclose(low(x), ft(x))  # a real truncation changes the output


def test_equal_routing_over_all_experts_is_the_average_model():
    base, fts = _layers(4)
    layer = SmileLinear.from_linears(base, fts, gate_k=2, k=-1, top_k=4)
    with torch.no_grad():  # every router the same: equal logits, weights 1/T
        g = layer.gate.weight.view(4, 2, 5)
        layer.gate.weight.copy_(g[:1].expand(4, 2, 5).reshape(8, 5))
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w_avg = torch.stack([f.weight for f in fts]).mean(0)
    b_avg = torch.stack([f.bias for f in fts]).mean(0)
    torch.testing.assert_close(layer(x), F.linear(x, w_avg, b_avg), rtol=1e-10, atol=1e-10)


def test_routing_kernel_softmax_over_all_then_renormalised_top_k():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, 0.1, 0.2, 2.0]])
    w, idx = K.routing_weights(logits, 2)
    p = torch.softmax(logits, -1)
    assert idx.tolist() == [[1, 2], [3, 0]]
    torch.testing.assert_close(w[0], torch.stack([p[0, 1], p[0, 2]]) / (p[0, 1] + p[0, 2]))
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    gate = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(4))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(5))
    r = K.routing_logits(x, gate)
    torch.testing.assert_close(r[2, 1], torch.linalg.vector_norm(gate[1] @ x[2]))


def test_expert_factors_reconstruct_the_truncated_delta_and_router_is_orthonormal():
    base, (ft,) = _layers(1, m=8, n=6, dtype=torch.float32)
    f = K.smile_factors(base.weight, ft.weight, gate_k=4, k=3, b0=base.bias, b=ft.bias)
    dw = (ft.weight - base.weight).double()
    u, s, vh = torch.linalg.svd(dw)
    torch.testing.assert_close((f.u @ f.svh).double(), u[:, :3] @ torch.diag(s[:3]) @ vh[:3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f.gate @ f.gate.T, torch.eye(4), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.bias, ft.bias - base.bias)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.norm = nn.LayerNorm(10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def _pool(n=3, frozen_fc2=False, seed=0):
    torch.manual_seed(seed)
    base = Net().eval()
    models = {"_pretrained_": base}
    for i in range(n):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if not (frozen_fc2 and name.startswith("fc2")):
                    p.add_(0.3 * torch.randn_like(p))
        models[f"t{i}"] = m
    return models


def test_method_on_module_pool_equals_layerwise_reference_and_counts():
    models = _pool(3)
    res = build_method({"name": "smile_upscaling", "gate_k": 2, "k": 3, "top_k": 2}).run(ModelPool(dict(models)))
    model = res.model
    base, fts = models["_pretrained_"], [models[f"t{i}"] for i in range(3)]
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(6))
    h = reference_forward(x, base.fc1, [f.fc1 for f in fts], 2, 3, 2).float()
    h = torch.relu(base.norm(h))  # norms stay pretrained (average_experts=false)
    want = reference_forward(h, base.fc2, [f.fc2 for f in fts], 2, 3, 2).float()
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)
    # parameters: each upscaled layer adds T routers of gate_k rows and T experts (u, svh, bias)
    one = sum(p.numel() for p in base.parameters())
    # fc1 (10 x 6): factors 3 * (10 + 6) < 60 entries; fc2 (4 x 10): 3 * 14 >= 40, the rank-3 product stored densely
    per_expert = {"fc1": 10 * 3 + 3 * 6 + 10, "fc2": 4 * 10 + 4}
    assert model.fc1.rank == 3 and model.fc2.rank == 0
    routers = 3 * 2 * 6 + 3 * 2 * 10
    total = one + routers + 3 * sum(per_expert.values())
    md = res.metadata
    assert md["total_parameters"] == total and md["extra_parameters"] == total - one
    assert md["active_parameters_per_token"] == total - (3 - 2) * sum(per_expert.values())
    assert md["mixed_model"]["total_parameters"] == total and md["mixed_model"]["router_parameters"] == routers
    # the pool's live modules are untouched
    assert isinstance(models["_pretrained_"].fc1, nn.Linear)


def test_outputs_do_not_depend_on_model_order_and_unchanged_layers_are_kept():
    models = _pool(3, frozen_fc2=True)
    order = {"_pretrained_": models["_pretrained_"], "t2": models["t2"], "t0": models["t0"], "t1": models["t1"]}
    cfg = {"name": "smile_upscaling", "gate_k": 3, "k": 4, "top_k": 2, "linear_patterns": ["fc*"]}
    a = build_method(cfg).run(ModelPool(dict(models))).model
    b = build_method(cfg).run(ModelPool(order)).model
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)
    assert isinstance(a.fc1, SmileLinear) and isinstance(a.fc2, nn.Linear)  # no model changed fc2


def test_average_experts_and_patterns():
    models = _pool(2)
    base = copy.deepcopy(models["_pretrained_"])
    done = upscale_linears(base, [models["t0"], models["t1"]], gate_k=1, k=2, top_k=1, patterns=["fc1"],
                           average_experts=True)
    assert done["upscaled"] == ["fc1"] and isinstance(base.fc2, nn.Linear)
    torch.testing.assert_close(base.norm.weight, (models["t0"].norm.weight + models["t1"].norm.weight) / 2)
    torch.testing.assert_close(base.fc2.weight, (models["t0"].fc2.weight + models["t1"].fc2.weight) / 2)
    counts = smile_parameter_counts(base, sum(p.numel() for p in models["_pretrained_"].parameters()))
    assert counts["upscaled_layers"] == 1


def test_config_errors():
    with pytest.raises(ConfigError, match="top_k"):
        build_method({"name": "smile_upscaling", "top_k": 4}).run(ModelPool(_pool(3)))
    with pytest.raises(ConfigError, match="gate_k"):
        build_method({"name": "smile_upscaling", "gate_kk": 4})
    with pytest.raises(FusionBenchError, match="_pretrained_"):
        build_method({"name": "smile_upscaling"}).run(ModelPool({k: v for k, v in _pool(2).items()
                                                                 if k != "_pretrained_"}))


# ----------------------------------------------------------------------------------------------
# causal LMs
# ----------------------------------------------------------------------------------------------
def _lm_config(family: str):
    import transformers

    kw = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
    return {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
            "mistral": transformers.MistralConfig}[family](**kw)


def _lm_pool(tmp_path, family: str, n: int = 3, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_lm_config(family)).to(dtype).eval()
    paths = {"_pretrained_": tmp_path / "base"}
    base.save_pretrained(paths["_pretrained_"])
    models = [base]
    for i in range(n):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_((0.05 * torch.randn(p.shape)).to(dtype))
        paths[f"ft{i}"] = tmp_path / f"ft{i}"
        m.save_pretrained(paths[f"ft{i}"])
        models.append(m)
    pool = ModelPool({k: str(v) for k, v in paths.items()}, config={"model_class": "causal_lm"})
    return pool, models


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_causal_lm_streamed_equals_in_memory_and_reloads(tmp_path, family):
    from transformers import AutoModelForCausalLM

    import fusion_bench.models  # noqa: F401  (registers the smile_* classes)

    pool, models = _lm_pool(tmp_path, family)
    opts = {"name": "smile_causal_lm_upscaling", "gate_k": 4, "k": 6, "top_k": 2}
    mem = build_method(opts).run(pool)
    out = tmp_path / "smile"
    streamed = build_method({**opts, "output_path": str(out)}).run(pool)
    assert type(mem.model).__name__ == f"Smile{type(models[0]).__name__}"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == f"smile_{family}" and cfg["num_local_experts"] == 3 and "auto_map" not in cfg
    assert not list(out.glob("*.py"))  # no code in the folder: nothing for trust_remote_code to run
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is type(mem.model)
    x = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = mem.model(x).logits, streamed.model(x).logits, reloaded(x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    for key in ("total_parameters", "active_parameters_per_token", "extra_parameters"):
        assert mem.metadata[key] == streamed.metadata[key]
    assert mem.metadata["total_parameters"] == sum(p.numel() for p in reloaded.parameters())
    gen = reloaded.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False)
    assert gen.shape == (2, 13)
    if family == "qwen2":  # q/k/v biases: the expert holds the bias delta
        sd = reloaded.state_dict()
        want = (models[2].state_dict()["model.layers.0.self_attn.q_proj.bias"]
                - models[0].state_dict()["model.layers.0.self_attn.q_proj.bias"])
        torch.testing.assert_close(sd["model.layers.0.self_attn.q_proj.experts.1.bias"], want)


def test_causal_lm_one_full_rank_expert_is_the_finetuned_model(tmp_path):
    pool, models = _lm_pool(tmp_path, "qwen2", n=1)
    res = build_method({"name": "smile_causal_lm_upscaling", "gate_k": 2, "k": -1, "top_k": 1,
                        "output_path": str(tmp_path / "one")}).run(pool)
    # embeddings, norms and head stay pretrained: the fine-tuned model's projections in the pretrained model
    from fusion_bench.models.smile_hf import TARGET_WEIGHT

    want = copy.deepcopy(models[0])
    ft_sd = models[1].state_dict()
    with torch.no_grad():
        for k, v in want.state_dict().items():
            m = TARGET_WEIGHT.match(k) or TARGET_WEIGHT.match(k.removesuffix(".bias") + ".weight")
            if m:
                v.copy_(ft_sd[k])
    x = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(res.model(x).logits, want(x).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(res.model(x).logits, models[0](x).logits, atol=1e-3)


def test_causal_lm_bf16_streams_in_bf16(tmp_path):
    pool, _ = _lm_pool(tmp_path, "llama", n=2, dtype=torch.bfloat16)
    res = build_method({"name": "smile_causal_lm_upscaling", "gate_k": 2, "k": 4, "top_k": 1,
                        "output_path": str(tmp_path / "bf"), "load_output": False}).run(pool)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert all(p.device.type == "meta" for p in res.model.parameters())  # shapes only, counted in the report
    assert sum(p.numel() for p in res.model.parameters()) == res.metadata["total_parameters"]


def test_causal_lm_refusals(tmp_path):
    pool, _ = _lm_pool(tmp_path, "llama", n=2)
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FusionBenchError, match="already exists"):
        build_method({"name": "smile_causal_lm_upscaling", "output_path": str(out)}).run(pool)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(FusionBenchError, match="already exists"):  # the dry run says so before any work
        build_method({"name": "smile_causal_lm_upscaling", "output_path": str(out)}).check_ready(pool)
    assert build_method({"name": "smile_causal_lm_upscaling", "output_path": str(tmp_path / "new")}).check_ready(
        pool) == []
    with pytest.raises(ConfigError, match="top_k"):
        build_method({"name": "smile_causal_lm_upscaling", "top_k": 3}).run(pool)
    with pytest.raises(ModelMismatchError, match="method=smile_upscaling"):
        build_method({"name": "smile_causal_lm_upscaling"}).run(ModelPool(_pool(2)))


def test_cli_causal_lm_streamed_and_in_memory_saved(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    from fusion_bench.testing.tiny_lm import save_tiny_llama_pool
    from tests.conftest import run_cli

    monkeypatch.chdir(tmp_path)
    paths = save_tiny_llama_pool(tmp_path / "zoo", n=2, seed=3, scale=0.05)  # with a (byte) tokenizer
    common = ["modelpool=causal_lm_merge", f"modelpool.models={{_pretrained_: {paths['base']}, math: {paths['ft1']}, "
              f"code: {paths['ft2']}}}", "modelpool.dtype=float32", "taskpool=causal_lm_perplexity",
              "taskpool.max_length=32", "taskpool.stride=16", "taskpool.max_tokens=200", "device=cpu"]
    # streamed by the method to its output_path, evaluated from the reloaded folder
    code, out, err = run_cli(["method=smile_causal_lm_upscaling", "method.gate_k=2", "method.k=4",
                              f"method.output_path={tmp_path / 'streamed'}", f"report_path={tmp_path / 'r1.json'}",
                              *common], capsys)
    assert code == 0, err
    r1 = json.loads((tmp_path / "r1.json").read_text())
    # built in memory, saved by the program (save_pretrained), evaluated in memory
    code, out, err = run_cli(["method=smile_causal_lm_upscaling", "method.gate_k=2", "method.k=4",
                              f"merged_model_path={tmp_path / 'saved'}", f"report_path={tmp_path / 'r2.json'}",
                              *common], capsys)
    assert code == 0, err
    r2 = json.loads((tmp_path / "r2.json").read_text())
    e1, e2 = r1["evaluation"]["tasks"]["builtin"], r2["evaluation"]["tasks"]["builtin"]
    assert (e1["perplexity"], e1["nll"], e1["tokens"]) == (e2["perplexity"], e2["nll"], e2["tokens"])
    md = r1["metadata"]
    assert md["total_parameters"] > md["active_parameters_per_token"] > md["extra_parameters"] > 0
    assert r1["cost"]["extra_parameters"] == md["extra_parameters"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    for (k1, v1), (k2, v2) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert k1 == k2 and torch.equal(v1, v2)


def test_smile_upscaling_on_a_causal_lm_pool_gives_the_registered_class(tmp_path):
    pool, models = _lm_pool(tmp_path, "llama", n=2)
    a = build_method({"name": "smile_upscaling", "gate_k": 2, "k": 4, "top_k": 1}).run(pool)
    b = build_method({"name": "smile_causal_lm_upscaling", "gate_k": 2, "k": 4, "top_k": 1}).run(pool)
    assert type(a.model).__name__ == "SmileLlamaForCausalLM"
    for (k1, v1), (k2, v2) in zip(sorted(a.model.state_dict().items()), sorted(b.model.state_dict().items())):
        assert k1 == k2 and torch.equal(v1, v2)


# ----------------------------------------------------------------------------------------------
# the tiny CLIP zoo from the CLI: report, routing plot
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    from fusion_bench.benchmark.zoo import Zoo

    # one tiny zoo per test session (a zoo build resumes: a complete one is only verified), so that test modules
    # using this location build it once
    base = tmp_path_factory.getbasetemp() / "shared_tiny_clip_zoo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSION_BENCH_CACHE", str(base / "cache"))
        zoo = Zoo("tiny", base / "tiny")
        zoo.build(progress=False, log=lambda s: None)
    return zoo


def test_cli_on_tiny_clip_zoo(tiny_zoo, tmp_path, capsys):
    from tests.conftest import run_cli

    rep = tmp_path / "report.json"
    code, out, err = run_cli(["method=smile_upscaling", "method.gate_k=4", "method.k=16", "method.top_k=2",
                              "modelpool=clip_zoo_tiny", "taskpool=clip_zoo_tiny", f"modelpool.root={tiny_zoo.root}",
                              f"taskpool.root={tiny_zoo.root}", "modelpool.build=false", "taskpool.build=false",
                              "method.report_samples=8", "method.cost_repeats=1", "taskpool.max_samples=16",
                              f"report_path={rep}"], capsys)
    assert code == 0, err
    r = json.loads(rep.read_text())
    md, mm = r["metadata"], r["metadata"]["mixed_model"]
    assert mm["total_parameters"] == md["total_parameters"] == r["parameters"]["total"]
    assert mm["one_model_parameters"] < mm["active_parameters_per_input"] < mm["total_parameters"]
    assert r["cost"]["extra_parameters"] == mm["extra_parameters"] and mm["inference_cost_ratio"] > 0
    routing = md["routing"]
    assert set(routing["per_task"]) == set(tiny_zoo.tasks) == set(routing["experts"])
    for t in tiny_zoo.tasks:  # applied weights over the experts sum to 1 per token
        assert abs(sum(routing["per_task"][t]["mean"]) - 1) < 1e-4
    assert r["artifacts"]["routing_plot"] == str(tmp_path / "report_routing.png")
    assert 0 <= r["evaluation"]["average"]["accuracy"] <= 1
    # an upscaled CLIP encoder has no Hugging Face class to save as: refused in one line, nothing written
    code, out, err = run_cli(["method=smile_upscaling", "modelpool=clip_zoo_tiny", "taskpool=clip_zoo_tiny",
                              f"modelpool.root={tiny_zoo.root}", f"taskpool.root={tiny_zoo.root}",
                              "modelpool.build=false", "taskpool.build=false", "method.report_samples=0",
                              "method.cost_repeats=0", "evaluate=false", f"merged_model_path={tmp_path / 'm'}"], capsys)
    assert code != 0 and "no Hugging Face class to save as" in err and not (tmp_path / "m").exists()


def test_fresh_process_reloads_after_import_fusion_bench_models(tmp_path):
    import subprocess
    import sys

    pool, _ = _lm_pool(tmp_path, "mistral", n=2)
    out = tmp_path / "smile"
    build_method({"name": "smile_causal_lm_upscaling", "gate_k": 2, "k": 4, "output_path": str(out),
                  "load_output": False}).run(pool)
    code = ("import sys; import fusion_bench.models; "
            "lazy = 'transformers.models.mistral.modeling_mistral' not in sys.modules; "
            "from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); print(type(m).__name__, lazy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == ["SmileMistralForCausalLM", "True"]
    # without fusion_bench's registration transformers refuses the folder (there is no code in it to run)
    r = subprocess.run([sys.executable, "-c", "from transformers import AutoModelForCausalLM; "
                        f"AutoModelForCausalLM.from_pretrained({str(out)!r})"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode != 0 and "smile_mistral" in r.stderr


def test_cli_qwen2_streamed(tmp_path, capsys, monkeypatch):
    from tests.conftest import run_cli

    monkeypatch.chdir(tmp_path)
    _lm_pool(tmp_path, "qwen2", n=2)
    out = tmp_path / "smile_qwen2"
    code, _, err = run_cli(["method=smile_causal_lm_upscaling", "method.gate_k=2", "method.k=4",
                            f"method.output_path={out}", "method.load_output=false", "modelpool=causal_lm_merge",
                            f"modelpool.models={{_pretrained_: {tmp_path / 'base'}, math: {tmp_path / 'ft0'}, "
                            f"code: {tmp_path / 'ft1'}}}", "modelpool.dtype=float32", "~taskpool", "evaluate=false",
                            f"report_path={tmp_path / 'r.json'}"], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["parameters"]["total"] == rep["metadata"]["total_parameters"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "smile_qwen2"
    from transformers import AutoModelForCausalLM

    import fusion_bench.models  # noqa: F401

    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "SmileQwen2ForCausalLM"
