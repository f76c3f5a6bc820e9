"""Streaming merge engine: equals the in-memory engine for every tensor-wise method, reloads with
from_pretrained, is atomic, plans (dry run) and handles vocabulary-size differences."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fusion_bench.engine.streaming import merge_to_folder, plan_merge
from fusion_bench.errors import CheckpointError, ConfigError, ModelMismatchError
from fusion_bench.io.outputs import write_marker
from fusion_bench.io.stream import ShardedWriter, StreamReader
from fusion_bench.methods import build_method, get_method_class, list_methods
from fusion_bench.methods.base import TensorwiseMerge
from fusion_bench.modelpool import build_modelpool
from tests.test_streaming_helpers import load_sd, save_zoo

BLOCK = 200  # elements per row block: forces blocks on every matrix of the tiny models


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    return save_zoo(tmp_path_factory.mktemp("zoo"), "llama", n=3, dtype=torch.float32)


def _tensorwise_methods() -> list[str]:
    out = []
    for n in list_methods():
        cls = get_method_class(n)
        if issubclass(cls, TensorwiseMerge) and not cls.uses_data:
            out.append(n)
    return out


# options that make a method valid on a pool of three fine-tunes (plus variants worth covering)
CASES: dict[str, dict] = {
    "linear_interpolation": {"models": ["ft0", "ft2"], "t": 0.3},
    "slerp": {"models": ["ft0", "ft1"], "t": 0.4},
    "ties_merging": {"density": 0.3},
    "expo": {"model": "ft0"},                      # one aligned model beside _pretrained_
    "magnitude_diff_pruning": {"model": "ft0"},    # prunes one fine-tuned model
    "arcee_fusion": {"model": "ft0"},              # fuses one model into _pretrained_
    "nearswap": {"model": "ft0", "t": 0.01},       # swaps one model into _pretrained_
}
EXTRA_CASES = [
    ("ties_merging", {"density": 0.3, "trim_scope": "tensor"}),
    ("generalized_task_arithmetic", {"sparsification": "magnitude", "consensus": "sum", "density": 0.4,
                                     "normalize": True, "weights": [0.5, 1.0, 0.7]}),
    ("generalized_task_arithmetic", {"sparsification": "breadcrumbs", "density": 0.6, "gamma": 0.05}),
    ("generalized_task_arithmetic", {"sparsification": "random", "consensus": "count", "density": 0.5,
                                     "rescale": True, "seed": 3}),
    ("generalized_task_arithmetic", {"sparsification": "della", "consensus": "sum", "density": 0.5,
                                     "epsilon": 0.2, "rescale": True}),
    ("model_breadcrumbs", {"consensus": "sum"}),
    ("dare_ties", {"sparsity_ratio": 0.4}),
]


def _case_ids():
    cases = [(n, CASES.get(n, {})) for n in _tensorwise_methods()] + EXTRA_CASES
    return cases


@pytest.mark.parametrize("name,opts", _case_ids(), ids=lambda x: x if isinstance(x, str) else
                         "-".join(f"{k}={v}" for k, v in sorted(x.items()) if not isinstance(v, list)) or "default")
def test_streaming_equals_in_memory(zoo, tmp_path, name, opts):
    pool = build_modelpool({"type": "causal_lm", "models": zoo})
    method = build_method({"name": name, **opts})
    ref = method.run(pool).model.state_dict()
    method2 = build_method({"name": name, **opts})
    out = tmp_path / "merged"
    merge_to_folder(method2, build_modelpool({"type": "causal_lm", "models": zoo}), out, block_elements=BLOCK,
                    max_shard_size="20KB")
    got = load_sd(out)
    assert set(got) <= set(ref)
    for k, v in got.items():
        assert v.dtype == ref[k].dtype, k
        assert torch.equal(v, ref[k]), f"{name}: tensor {k} differs (max {(v - ref[k]).abs().max()})"
    base = load_sd(zoo["_pretrained_"])
    assert any(not torch.equal(got[k], base[k]) for k in got)  # something was merged


def test_every_tensorwise_method_is_covered():
    assert {"task_arithmetic", "ties_merging", "dare_ties", "model_breadcrumbs", "della", "karcher_mean"} <= set(
        _tensorwise_methods())


def test_block_protocol_really_used(zoo):
    """The plan merges large tensors in row blocks, and the magnitude methods run a stats pass."""
    pool = build_modelpool({"type": "causal_lm", "models": zoo})
    m = build_method({"name": "generalized_task_arithmetic", "sparsification": "magnitude", "density": 0.5})
    plan = plan_merge(m, pool, block_elements=BLOCK)
    emb = next(j for j in plan.jobs if j.key == "model.embed_tokens.weight")
    assert len(emb.blocks) > 1 and emb.stats and emb.protocol
    plan2 = plan_merge(build_method("task_arithmetic"), pool, block_elements=BLOCK)
    emb2 = next(j for j in plan2.jobs if j.key == "model.embed_tokens.weight")
    assert len(emb2.blocks) > 1 and not emb2.stats


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma"])
def test_reloads_with_from_pretrained(tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = save_zoo(tmp_path / "zoo", family, n=2, dtype=torch.bfloat16, tie=family == "gemma")
    pool = build_modelpool({"type": "causal_lm", "models": paths})
    method = build_method({"name": "task_arithmetic", "scaling_factor": 0.5})
    ref = method.run(pool).model
    out = tmp_path / "out"
    info = merge_to_folder(method, pool, out, block_elements=BLOCK, max_shard_size="20KB")
    assert len(info["shards"]) > 1 and (out / "model.safetensors.index.json").exists()
    assert (out / "generation_config.json").exists() and (out / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    sd = model.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(sd[k], v), k
    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(paths["_pretrained_"]))
    ids = torch.tensor([[5, 7, 11, 3]])
    assert torch.equal(model(ids).logits, ref(ids).logits)


def test_output_dtype_choice(zoo, tmp_path):
    pool = build_modelpool({"type": "causal_lm", "models": zoo, "dtype": "bf16"})
    method = build_method("simple_average")
    ref = method.run(pool).model.state_dict()
    merge_to_folder(method, pool, tmp_path / "o", block_elements=BLOCK)
    got = load_sd(tmp_path / "o")
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, ref[k]) for k, v in got.items())
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "bfloat16"


class _Boom(TensorwiseMerge):
    name = "boom_test_only"
    variant = "test"
    elementwise = True

    def __init__(self, fail_at: int):
        super().__init__()
        self.fail_at = fail_at
        self.calls = 0

    def merge_tensor(self, key, base, tensors, names):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("interrupted")
        return tensors[0]


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_merge_leaves_nothing(zoo, tmp_path, existing):
    pool = build_modelpool({"type": "causal_lm", "models": zoo})
    out = tmp_path / "dest"
    if existing:  # an earlier output of fusion_bench (marked), replaced only with overwrite=True
        out.mkdir()
        (out / "keep.txt").write_text("old")
        write_marker(out, "merged model folder")
    with pytest.raises(RuntimeError, match="interrupted"):
        merge_to_folder(_Boom(5), pool, out, block_elements=BLOCK, max_shard_size="20KB", overwrite=existing)
    if existing:
        assert sorted(os.listdir(out)) == [".fusion_bench_output", "keep.txt"]
    else:
        assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == (["dest"] if existing else [])


def test_dry_run_reports_mismatches(tmp_path):
    paths = save_zoo(tmp_path / "zoo", "llama", n=2, tokenizer=False)
    # a model with one renamed tensor and one reshaped tensor
    bad = tmp_path / "bad"
    sd = load_sd(paths["ft0"])
    sd["model.norm.weight_renamed"] = sd.pop("model.norm.weight")
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 32)
    bad.mkdir()
    from safetensors.torch import save_file

    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "config.json").write_text(Path(paths["ft0"], "config.json").read_text())
    pool = build_modelpool({"type": "causal_lm", "models": {**paths, "ft0": str(bad)}})
    plan = plan_merge(build_method("task_arithmetic"), pool)
    text = "\n".join(plan.mismatches)
    assert "lacks tensor 'model.norm.weight'" in text
    assert "model.norm.weight_renamed" in text
    assert "model.layers.0.mlp.up_proj.weight" in text and "[7, 32]" in text
    summary = plan.summary()
    assert "bytes to read" in summary and "planned peak RSS" in summary and "mismatch" in summary
    with pytest.raises(ModelMismatchError, match="dry run"):
        merge_to_folder(build_method("task_arithmetic"), pool, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_planned_memory_does_not_grow_with_depth(tmp_path):
    """Peak-memory estimate depends on the largest unit, not on the number of layers."""
    from tests.test_streaming_helpers import make_model, tiny_config

    figs = []
    for layers in (2, 6):
        d = tmp_path / f"l{layers}"
        cfg = tiny_config("llama", 96, layers=layers)
        paths = {}
        for i, n in enumerate(["_pretrained_", "a", "b"]):
            make_model(cfg, i).save_pretrained(d / n)
            paths[n] = str(d / n)
        plan = plan_merge(build_method("task_arithmetic"), build_modelpool({"models": paths}), block_elements=BLOCK)
        figs.append((plan.peak_unit_bytes, plan.bytes_read))
    assert figs[0][0] == figs[1][0]
    assert figs[1][1] > 2 * figs[0][1]


def test_vocab_policies(tmp_path):
    paths = save_zoo(tmp_path / "zoo", "llama", n=2, vocabs=[96, 100])
    method = build_method({"name": "task_arithmetic", "scaling_factor": 0.5})
    with pytest.raises(ModelMismatchError, match="vocab_policy"):
        merge_to_folder(method, build_modelpool({"type": "causal_lm", "models": paths}), tmp_path / "e")
    base, ft0, ft1 = (load_sd(paths[n]) for n in ("_pretrained_", "ft0", "ft1"))
    # shared rows merged, extra rows (96..99) from ft1, config and tokenizer from ft1
    pool = build_modelpool({"type": "causal_lm", "models": paths, "vocab_policy": "shared_rows", "vocab_source": "ft1"})
    merge_to_folder(method, pool, tmp_path / "s", block_elements=BLOCK)
    got = load_sd(tmp_path / "s")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        b = base[k]
        expect = b + 0.5 * ((ft0[k] - b) + (ft1[k][:96] - b))
        assert got[k].shape == (100, 32)
        torch.testing.assert_close(got[k][:96], expect, rtol=0, atol=1e-6)
        assert torch.equal(got[k][96:], ft1[k][96:])
    assert json.loads((tmp_path / "s" / "config.json").read_text())["vocab_size"] == 100
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "s").config.vocab_size == 100
    assert len(AutoTokenizer.from_pretrained(tmp_path / "s")) == 100
    # backbone only: embeddings copied from the base
    pool = build_modelpool({"type": "causal_lm", "models": paths, "vocab_policy": "backbone_only"})
    merge_to_folder(method, pool, tmp_path / "b", block_elements=BLOCK)
    got = load_sd(tmp_path / "b")
    assert torch.equal(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    k = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(got[k], base[k] + 0.5 * ((ft0[k] - base[k]) + (ft1[k] - base[k])), rtol=0, atol=1e-6)


def test_vocab_tokenizer_conflict(tmp_path):
    paths = save_zoo(tmp_path / "zoo", "llama", n=1, vocabs=[100])
    tj = Path(paths["ft0"]) / "tokenizer.json"
    tok = json.loads(tj.read_text())
    vocab = tok["model"]["vocab"]
    vocab["w5"], vocab["w6"] = vocab["w6"], vocab["w5"]
    tj.write_text(json.dumps(tok))
    pool = build_modelpool({"type": "causal_lm", "models": paths, "vocab_policy": "shared_rows"})
    plan = plan_merge(build_method("task_arithmetic"), pool)
    assert any("disagree on shared token id 5" in m for m in plan.mismatches)


def test_causal_lm_pool_config_errors(zoo):
    with pytest.raises(ConfigError, match="vocab_source"):
        build_modelpool({"type": "causal_lm", "models": zoo, "vocab_source": "ft9"})
    with pytest.raises(ConfigError, match="vocab_polic"):
        build_modelpool({"type": "causal_lm", "models": zoo, "vocab_polcy": "error"})
    pool = build_modelpool({"type": "causal_lm", "models": zoo})
    assert len(pool.load_tokenizer()) == 96


def test_reader_and_writer_roundtrip(tmp_path):
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(10, 7, generator=g), "b": torch.randn(3, generator=g).to(torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int64).reshape(2, 3), "s": torch.tensor(2.5), "e": torch.zeros(0, 4)}
    w = ShardedWriter(tmp_path, [(k, v.shape, v.dtype) for k, v in tensors.items()], max_shard_bytes=150)
    w.write("a", tensors["a"][:4])
    w.write("a", tensors["a"][4:], row_start=4)
    for k in ("b", "c", "s", "e"):
        w.write(k, tensors[k])
    wm = w.finish()
    assert len(set(wm.values())) > 1
    r = StreamReader(tmp_path)
    assert r.keys() == list(tensors)
    for k, v in tensors.items():
        assert torch.equal(r.read(k), v)
        with safe_open(str(tmp_path / wm[k]), framework="pt") as h:
            assert torch.equal(h.get_tensor(k), v)
    assert torch.equal(r.read("a", (3, 8)), tensors["a"][3:8])
    with pytest.raises(CheckpointError, match="out of range"):
        r.read("a", (5, 11))
    w2 = ShardedWriter(tmp_path / ".", [("x", (2,), torch.float32)])
    with pytest.raises(CheckpointError, match="not written"):
        w2.finish()


def test_program_engine_streaming(zoo, tmp_path):
    from fusion_bench.programs.fusion import run_program

    out = tmp_path / "merged"
    rep = run_program({"method": {"name": "task_arithmetic"}, "modelpool": {"type": "causal_lm", "models": zoo},
                       "taskpool": {}, "engine": "streaming", "merged_model_path": str(out), "evaluate": False,
                       "report_path": str(tmp_path / "r.json")}, log=lambda *a: None)
    assert rep["engine"] == "streaming" and (out / "config.json").exists()
    ref = build_method("task_arithmetic").run(build_modelpool({"type": "causal_lm", "models": zoo})).model.state_dict()
    got = load_sd(out)
    assert all(torch.equal(v, ref[k]) for k, v in got.items())
    dry = run_program({"method": {"name": "task_arithmetic"}, "modelpool": {"type": "causal_lm", "models": zoo},
                       "taskpool": {}, "engine": "streaming", "dry_run": True}, log=lambda *a: None)
    assert dry["plan"]["streaming"]["mismatches"] == []


def test_passthrough_stacks_layers(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    pool = build_modelpool({"type": "causal_lm", "models": zoo})
    method = build_method({"name": "passthrough", "slices": [{"model": "ft0", "layers": [0, 2]},
                                                             {"model": "ft1", "layers": [1, 2]}]})
    ref = method.run(pool).model
    merge_to_folder(method, pool, tmp_path / "p")
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert got.config.num_hidden_layers == 3
    ft0, ft1 = load_sd(zoo["ft0"]), load_sd(zoo["ft1"])
    sd = got.state_dict()
    assert torch.equal(sd["model.layers.2.mlp.up_proj.weight"], ft1["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(sd["model.layers.1.self_attn.q_proj.weight"], ft0["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(sd["model.embed_tokens.weight"], ft0["model.embed_tokens.weight"])
    for k, v in ref.state_dict().items():
        assert torch.equal(sd[k], v), k
    with pytest.raises(ModelMismatchError, match="has 2 layers"):
        build_method({"name": "passthrough", "slices": [{"model": "ft0", "layers": [0, 3]}]}).run(pool)
    with pytest.raises(ConfigError, match="Did you mean 'ft1'"):
        build_method({"name": "passthrough", "slices": [{"model": "ft_1", "layers": [0, 1]}]}).run(pool)
