"""mergekit ``MODEL+LORA`` references: the adapter is applied as PEFT's ``merge_and_unload`` applies it (the
reference here is PEFT itself), then merged; every place a mergekit config names a model accepts them."""

from __future__ import annotations

import pytest
import torch
import yaml

from fusion_bench.compat.lora_apply import apply_lora, split_model_ref
from fusion_bench.compat.mergekit import load_mergekit_config, main
from fusion_bench.errors import ConfigError
from tests.test_streaming_helpers import load_sd, save_zoo

pytestmark = pytest.mark.usefixtures("one_thread")
peft = pytest.importorskip("peft")


def _make_adapter(base: str, out, seed: int, **lora_kw):
    """A PEFT LoRA adapter of ``base`` with random (non-zero) A and B; returns the PEFT-merged state dict."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base)
    cfg = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                             **lora_kw})
    pm = peft.get_peft_model(m, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(str(out))
    # the reference: load the adapter as mergekit does (transformers, PEFT) and merge
    m2 = AutoModelForCausalLM.from_pretrained(base)
    merged = peft.PeftModel.from_pretrained(m2, str(out)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return save_zoo(tmp_path_factory.mktemp("lorazoo"), "llama", n=2, dtype=torch.float32)


@pytest.fixture(scope="module")
def zoo_bf16(tmp_path_factory):
    return save_zoo(tmp_path_factory.mktemp("lorazoo16"), "llama", n=1, dtype=torch.bfloat16)


@pytest.mark.parametrize("kw", [
    {},
    {"use_rslora": True, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3}},
    {"target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
    {"target_modules": ["o_proj"], "lora_bias": True},
])
def test_apply_lora_equals_peft(zoo, tmp_path, kw):
    if kw.get("lora_bias"):  # Llama has no biases: give o_proj one by using a Qwen2 zoo instead
        z = save_zoo(tmp_path / "qz", "qwen2", n=0)
        base, kw = z["_pretrained_"], {"target_modules": ["q_proj"], "lora_bias": True}
    else:
        base = zoo["_pretrained_"]
    ref = _make_adapter(base, tmp_path / "ad", 3, **kw)
    apply_lora(base, str(tmp_path / "ad"), tmp_path / "out")
    got = load_sd(tmp_path / "out")
    assert set(got) >= {k for k in ref if k != "lm_head.weight" or k in got}
    changed = 0
    for k, v in got.items():
        torch.testing.assert_close(v, ref[k], rtol=1e-6, atol=1e-7)
        changed += not torch.equal(v, load_sd(base)[k])
    assert changed > 0


@pytest.mark.parametrize("merge_dtype", [None, "float32"])
def test_apply_lora_bf16(zoo_bf16, tmp_path, merge_dtype):
    """bfloat16 model: float32 adapter delta, added once and rounded (PEFT's in-place merge); with
    --lora-merge-dtype float32 the model is cast first and stays float32."""
    from transformers import AutoModelForCausalLM

    base = zoo_bf16["_pretrained_"]
    _make_adapter(base, tmp_path / "ad", 5)
    dt = torch.float32 if merge_dtype else torch.bfloat16
    m = AutoModelForCausalLM.from_pretrained(base, dtype=dt)
    ref = peft.PeftModel.from_pretrained(m, str(tmp_path / "ad")).merge_and_unload().state_dict()
    apply_lora(base, str(tmp_path / "ad"), tmp_path / "out", merge_dtype)
    got = load_sd(tmp_path / "out")
    for k, v in got.items():
        assert v.dtype == dt
        assert torch.equal(v, ref[k]), k


def test_split_model_ref(tmp_path):
    assert split_model_ref("a/b", "m") == ("a/b", None)
    assert split_model_ref("a/b+c/d", "m") == ("a/b", "c/d")
    assert split_model_ref({"model": "a", "lora": "c"}, "m") == ("a", "c")
    assert split_model_ref({"model": {"path": "a"}}, "m") == ("a", None)
    with pytest.raises(ConfigError, match="more than one"):
        split_model_ref("a+b+c", "m")
    with pytest.raises(ConfigError, match="revision"):
        split_model_ref("a@main+b", "m")
    with pytest.raises(ConfigError, match="override_architecture"):
        split_model_ref({"model": "a", "override_architecture": "X"}, "m")


def test_lora_references_in_configs(zoo, tmp_path):
    """base_model, models[].model, slices[].sources[].model and tokenizer_source take MODEL+LORA; the merge
    equals the merge of PEFT-merged folders."""
    base, ft0 = zoo["_pretrained_"], zoo["ft0"]
    ref_ft0 = _make_adapter(ft0, tmp_path / "ad0", 7)
    ref_base = _make_adapter(base, tmp_path / "adb", 8, target_modules=["k_proj"])
    base_sd = load_sd(base)
    ft1 = load_sd(zoo["ft1"])

    def run(doc, name):
        p = tmp_path / f"{name}.yml"
        p.write_text(yaml.safe_dump(doc))
        main([str(p), str(tmp_path / name), "--lora-merge-cache", str(tmp_path / "cache")])
        return load_sd(tmp_path / name)

    lo0 = f"{ft0}+{tmp_path / 'ad0'}"
    got = run({"merge_method": "task_arithmetic", "base_model": f"{base}+{tmp_path / 'adb'}", "dtype": "float32",
               "models": [{"model": lo0, "parameters": {"weight": 0.6}},
                          {"model": zoo["ft1"], "parameters": {"weight": 0.3}}]}, "ta")
    for k, v in got.items():
        want = ref_base[k] + 0.6 * (ref_ft0[k] - ref_base[k]) + 0.3 * (ft1[k] - ref_base[k])
        torch.testing.assert_close(v, want, rtol=1e-5, atol=1e-6)
    got = run({"merge_method": "linear", "dtype": "float32", "tokenizer_source": lo0,
               "models": [{"model": {"model": ft0, "lora": str(tmp_path / "ad0")}, "parameters": {"weight": 1.0}},
                          {"model": base, "parameters": {"weight": 1.0}}]}, "lin")
    for k, v in got.items():
        torch.testing.assert_close(v, (ref_ft0[k] + base_sd[k]) / 2, rtol=1e-5, atol=1e-6)
    got = run({"merge_method": "passthrough", "dtype": "float32",
               "slices": [{"sources": [{"model": lo0, "layer_range": [0, 1]}]},
                          {"sources": [{"model": base, "layer_range": [1, 2]}]}]}, "pt")
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], ref_ft0["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], ref_ft0["model.embed_tokens.weight"])
    assert torch.equal(got["model.layers.1.self_attn.q_proj.weight"], base_sd["model.layers.1.self_attn.q_proj.weight"])
    # the cache is reused (same folder, not rewritten) on a second run
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 2
    plan = load_mergekit_config({"merge_method": "linear", "models": [{"model": lo0, "parameters": {"weight": 1.0}}]},
                                lora_merge_cache=str(tmp_path / "cache"))
    assert not any("applied" in n for n in plan.notes)


def test_lora_reference_errors(zoo, tmp_path):
    base = zoo["_pretrained_"]
    with pytest.raises(ConfigError, match="not a local folder"):
        load_mergekit_config({"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path}/nope",
                                                                   "parameters": {"weight": 1.0}}]})
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text('{"peft_type": "LORA", "use_dora": true}')
    with pytest.raises(ConfigError, match="DoRA"):
        load_mergekit_config({"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path}/dora",
                                                                   "parameters": {"weight": 1.0}}]})
