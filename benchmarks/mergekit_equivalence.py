"""Equivalence of ``fusion_bench mergekit`` with mergekit itself, one line per config.

    python benchmarks/mergekit_equivalence.py --mergekit-bin PATH/TO/mergekit-yaml [--only NAME] [--keep DIR]

mergekit is not a dependency of fusion_bench: install it in its own virtual environment (torch first,
so that pip does not pull CUDA wheels) and pass its ``mergekit-yaml``:

    python -m venv mk-venv && mk-venv/bin/pip install torch==2.13.0 && mk-venv/bin/pip install mergekit==0.1.5

The script builds tiny Llama and Qwen2 zoos (a base and three fine-tunes; float32 and bfloat16; one
fine-tune with a larger vocabulary), writes one mergekit YAML per feature the way mergekit's examples
are written, runs ``mergekit-yaml`` and ``fusion_bench mergekit`` on each and compares every output
tensor. Deterministic methods must agree exactly up to float rounding (float32 outputs: 1e-5 relative;
bfloat16 outputs: one bfloat16 ulp). Random methods (DARE, DELLA) are compared by statistics that do
not depend on the random draw: the fraction of entries kept and the L1 norm of each sparsified task
vector (mergekit's ``rescale`` matches it exactly). Each line reads

    PASS     name  (max |diff|, in bf16 ulps where the output is bf16)
    FAIL     name  what differs
    REFUSED  name  fusion_bench's one-line reason (mergekit merges it)
    BOTH-REFUSE name  (mergekit and fusion_bench refuse it)

The ``lora-*`` lines compare ``fusion_bench extract-lora`` with ``mergekit-extract-lora`` (found beside
``--mergekit-bin``, or ``--extract-lora-bin``) module by module: the same modules as LoRA or saved whole,
equal singular values of B A and equal reconstruction errors ||W_ft - W_base - B A|| (relative 1e-5;
bfloat16: 2e-2), identical whole tensors, and fusion_bench's adapter loads in PEFT.

This is a benchmark, not a CI test (CI has no mergekit): tests/test_mergekit.py checks the same
behaviours against references written from mergekit's documented semantics.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_mergekit_tokenizer import build_token_zoo  # noqa: E402
from tests.test_streaming_helpers import load_sd, make_model, tiny_config, tiny_tokenizer  # noqa: E402

LAYERS = 4


def build_zoo(root: Path, family: str, dtype: torch.dtype, n: int = 3, big_vocab: bool = False) -> dict[str, str]:
    """base + n fine-tunes (base + seeded noise); with ``big_vocab`` the last one has 8 more vocabulary rows."""
    cfg = tiny_config(family, 96, layers=LAYERS)
    base = make_model(cfg, 0, dtype)
    paths = {"base": str(root / "base")}
    base.save_pretrained(paths["base"])
    tiny_tokenizer(96).save_pretrained(paths["base"])
    bsd = base.state_dict()
    for i in range(n):
        vocab = 104 if big_vocab and i == n - 1 else 96
        m = make_model(tiny_config(family, vocab, layers=LAYERS), 100 + i, dtype)
        g = torch.Generator().manual_seed(1000 + i)
        sd = {}
        for k, t in bsd.items():
            t2 = t.float() + 0.02 * torch.randn(t.shape, generator=g)
            rows = m.state_dict()[k].shape[0] if t.dim() else 0
            if t.dim() and rows > t.shape[0]:
                t2 = torch.cat([t2, 0.1 * torch.randn((rows - t.shape[0], *t.shape[1:]), generator=g)])
            sd[k] = t2.to(dtype)
        m.load_state_dict(sd)
        d = root / f"ft{i}"
        m.save_pretrained(d)
        tiny_tokenizer(vocab).save_pretrained(d)
        paths[f"ft{i}"] = str(d)
    return paths


def build_adapter(base: str, out: Path, seed: int, **lora_kw) -> str:
    """A PEFT LoRA adapter of ``base`` with seeded random A and B (PEFT initialises B to zero)."""
    import peft
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base)
    cfg = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **lora_kw})
    pm = peft.get_peft_model(m, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(str(out))
    return str(out)


def configs(z: dict[str, dict[str, str]]) -> list[tuple[str, dict, str]]:
    """(name, mergekit YAML as a mapping, comparison kind: exact | random)."""
    L, B, Q, V = z["llama"], z["llama_bf16"], z["qwen2"], z["vocab"]
    def three(zz: dict[str, str], **p) -> list[dict]:
        """models ft0..ft2; a parameter given as a 3-list is per model."""
        return [{"model": zz[f"ft{i}"], "parameters": {k: (v[i] if isinstance(v, list) and len(v) == 3 else v)
                                                       for k, v in p.items()}} for i in range(3)]

    out: list[tuple[str, dict, str]] = []

    def add(name: str, doc: dict, kind: str = "exact") -> None:
        out.append((name, doc, kind))

    # 0. baselines
    add("linear", {"merge_method": "linear", "dtype": "float32",
                   "models": three(L, weight=[0.5, 0.3, 0.2])})
    add("linear-gradient-weight", {"merge_method": "linear", "dtype": "float32",
                                   "models": [{"model": L["ft0"], "parameters": {"weight": [1.0, 0.0]}},
                                              {"model": L["ft1"], "parameters": {"weight": [0.0, 1.0]}}]})
    # 1. lambda
    for m in ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"):
        add(f"{m}-lambda", {"merge_method": m, "base_model": L["base"], "dtype": "float32",
                            "parameters": {"lambda": 0.7, **({"density": 0.5} if m != "task_arithmetic" else {})},
                            "models": three(L, weight=[0.5, 0.3, 0.2])})
    add("ties-qwen2", {"merge_method": "ties", "base_model": Q["base"], "dtype": "float32",
                       "parameters": {"density": 0.4, "normalize": True},
                       "models": three(Q, weight=[1.0, 0.6, 0.3])})
    # 2. passthrough scale (self-merge recipe)
    add("passthrough-scale", {"merge_method": "passthrough", "dtype": "float32",
                              "slices": [{"sources": [{"model": L["ft0"], "layer_range": [0, 3]}]},
                                         {"sources": [{"model": L["ft0"], "layer_range": [2, 4],
                                                       "parameters": {"scale": [{"filter": "o_proj", "value": 0.0},
                                                                                {"filter": "down_proj", "value": 0.0},
                                                                                {"value": 1.0}]}}]}]})
    # 3. slices from several models: final norm and lm_head from the last slice's model
    add("passthrough-multi-model", {"merge_method": "passthrough", "dtype": "float32",
                                    "slices": [{"sources": [{"model": L["ft0"], "layer_range": [0, 2]}]},
                                               {"sources": [{"model": L["ft1"], "layer_range": [2, 4]}]}]})
    # 4. gradient parameters after the layers (t = 0 for the final norm and lm_head)
    add("slerp-gradient-t", {"merge_method": "slerp", "base_model": L["ft0"], "dtype": "float32",
                             "models": [{"model": L["ft0"]}, {"model": L["ft1"]}],
                             "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                                  {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                                  {"value": 0.5}]}})
    add("ties-gradient-density", {"merge_method": "ties", "base_model": L["base"], "dtype": "float32",
                                  "models": three(L, weight=[[0.2, 1.0], 0.5, 0.4], density=[[0.3, 0.9], 0.5, 0.6])})
    # 5. bf16: exactly k entries kept
    for m in ("ties", "breadcrumbs_ties"):
        add(f"{m}-bf16", {"merge_method": m, "base_model": B["base"], "dtype": "bfloat16",
                          "parameters": {"density": 0.2},
                          "models": three(B, weight=[0.5, 0.3, 0.2])})
        add(f"{m}-bf16-f32compute", {"merge_method": m, "base_model": B["base"], "dtype": "float32",
                                     "out_dtype": "bfloat16", "parameters": {"density": 0.2},
                                     "models": three(B, weight=[0.5, 0.3, 0.2])})
    add("task_arithmetic-bf16-lambda", {"merge_method": "task_arithmetic", "base_model": B["base"],
                                        "dtype": "bfloat16", "parameters": {"lambda": 0.7, "normalize": True},
                                        "models": three(B, weight=[0.5, 0.3, 0.2])})
    add("ties-bf16-no-dtype", {"merge_method": "ties", "base_model": B["base"], "parameters": {"density": 0.3},
                               "models": three(B, weight=[1.0, 0.6, 0.3])})
    add("breadcrumbs-bf16-out-f32", {"merge_method": "breadcrumbs", "base_model": B["base"], "dtype": "bfloat16",
                                     "out_dtype": "float32", "parameters": {"density": 0.4, "gamma": 0.05},
                                     "models": three(B, weight=[0.5, 0.3, 0.2])})
    add("ties-bf16-rescale", {"merge_method": "ties", "base_model": B["base"], "dtype": "bfloat16",
                                       "parameters": {"density": 0.3, "rescale": True},
                                       "models": three(B, weight=[0.5, 0.3, 0.2])})
    # 6. random methods, by statistics (one model: the sparsified task vector itself)
    for m in ("dare_linear", "dare_ties", "della_linear", "della"):
        p = {"weight": 1.0, "density": 0.3}
        if m.startswith("della"):
            p["epsilon"] = 0.1
        add(f"{m}-rescale", {"merge_method": m, "base_model": L["base"], "dtype": "float32",
                             "models": [{"model": L["ft0"], "parameters": p}]}, "random")
    add("della-per-model-epsilon", {"merge_method": "della_linear", "base_model": L["base"], "dtype": "float32",
                                    "parameters": {"lambda": 1.0},
                                    "models": [{"model": L["ft0"], "parameters": {"weight": 1.0, "density": 0.3,
                                                                                  "epsilon": 0.05}}]}, "random")
    add("della-per-tensor-epsilon", {"merge_method": "della_linear", "base_model": L["base"], "dtype": "float32",
                                     "models": [{"model": L["ft0"], "parameters": {
                                         "weight": 1.0, "density": 0.4,
                                         "epsilon": [{"filter": "mlp", "value": 0.3}, {"value": 0.02}]}}]}, "random")
    add("breadcrumbs-per-model-gamma", {"merge_method": "breadcrumbs", "base_model": L["base"], "dtype": "float32",
                                        "models": three(L, weight=[0.5, 0.3, 0.2], density=0.5,
                                                        gamma=[0.01, 0.05, 0.1])})
    # 7. karcher
    add("karcher-no-base", {"merge_method": "karcher", "dtype": "float32", "models": three(L)})
    add("karcher-base-listed", {"merge_method": "karcher", "base_model": L["base"], "dtype": "float32",
                                "models": [{"model": L["base"]}, {"model": L["ft0"]}, {"model": L["ft1"]}]})
    # 8. refusals
    add("base-not-in-models-linear", {"merge_method": "linear", "base_model": L["base"], "dtype": "float32",
                                      "models": three(L, weight=1.0)})
    add("vocab-mismatch-no-tokenizer", {"merge_method": "ties", "base_model": V["base"], "dtype": "float32",
                                        "models": three(V, weight=0.5, density=0.5)})
    add("vocab-mismatch-tokenizer-base", {"merge_method": "linear", "base_model": V["base"], "dtype": "float32",
                                          "tokenizer_source": "base",
                                          "models": [{"model": V["base"], "parameters": {"weight": 1.0}},
                                                     {"model": V["ft2"], "parameters": {"weight": 1.0}}]})
    add("vocab-mismatch-tokenizer-block", {"merge_method": "linear", "base_model": V["base"], "dtype": "float32",
                                           "tokenizer": {"source": "base"},
                                           "models": [{"model": V["base"], "parameters": {"weight": 1.0}},
                                                      {"model": V["ft2"], "parameters": {"weight": 1.0}}]})
    # features
    add("model_stock", {"merge_method": "model_stock", "base_model": L["base"], "dtype": "float32",
                        "models": three(L)})
    add("slerp-multi-source-slices", {"merge_method": "slerp", "base_model": L["ft0"], "dtype": "float32",
                                      "slices": [{"sources": [{"model": L["ft0"], "layer_range": [0, 4]},
                                                              {"model": L["ft1"], "layer_range": [0, 4]}]}],
                                      "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                                           {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                                           {"value": 0.5}]}})
    add("slerp-two-slices", {"merge_method": "slerp", "base_model": L["ft0"], "dtype": "float32",
                             "slices": [{"sources": [{"model": L["ft0"], "layer_range": [0, 2]},
                                                     {"model": L["ft1"], "layer_range": [0, 2]}],
                                         "parameters": {"t": [{"filter": "mlp", "value": [0.2, 0.9]}]}},
                                        {"sources": [{"model": L["ft0"], "layer_range": [2, 4]},
                                                     {"model": L["ft1"], "layer_range": [2, 4]}]}],
                             "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.4}]}})
    add("linear-slices-per-source-weight", {
        "merge_method": "linear", "dtype": "float32",
        "slices": [{"sources": [{"model": L["ft0"], "layer_range": [0, 1], "parameters": {"weight": 1.0}},
                                {"model": L["ft1"], "layer_range": [0, 1], "parameters": {"weight": 3.0}}]},
                   {"sources": [{"model": L["ft0"], "layer_range": [1, 4], "parameters": {"weight": [2.0, 9.0]}},
                                {"model": L["ft1"], "layer_range": [1, 4]}],
                    "parameters": {"weight": 6.0}}]})
    add("slerp-slices-moved-layers", {"merge_method": "slerp", "base_model": L["ft0"], "dtype": "float32",
                                      "slices": [{"sources": [{"model": L["ft0"], "layer_range": [0, 2]},
                                                              {"model": L["ft1"], "layer_range": [2, 4]}]}],
                                      "parameters": {"t": 0.5}})
    add("nuslerp", {"merge_method": "nuslerp", "dtype": "float32",
                    "models": [{"model": L["ft0"], "parameters": {"weight": 0.6}},
                               {"model": L["ft1"], "parameters": {"weight": 0.4}}]})
    add("multislerp", {"merge_method": "multislerp", "dtype": "float32", "models": three(L, weight=[0.5, 0.3, 0.2])})
    add("sce", {"merge_method": "sce", "base_model": L["base"], "dtype": "float32",
                "parameters": {"select_topk": 0.5}, "models": three(L)})
    add("nuslerp-base-row-wise", {"merge_method": "nuslerp", "base_model": L["base"], "dtype": "float32",
                                  "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                                  "models": [{"model": L["ft0"], "parameters": {"weight": [0.2, 0.9]}},
                                             {"model": L["ft1"], "parameters": {"weight": 0.5}}]})
    add("nuslerp-per-vector", {"merge_method": "nuslerp", "dtype": "float32",
                               "parameters": {"nuslerp_flatten": False},
                               "models": [{"model": L["ft1"], "parameters": {"weight": 1.0}},
                                          {"model": L["ft2"], "parameters": {"weight": 3.0}}]})
    add("multislerp-base", {"merge_method": "multislerp", "base_model": L["base"], "dtype": "float32",
                            "parameters": {"normalize_weights": False, "eps": 1e-6},
                            "models": three(L, weight=[0.5, [0.1, 0.6], 0.2])})
    add("sce-topk-filters", {"merge_method": "sce", "base_model": L["base"], "dtype": "float32",
                             "parameters": {"select_topk": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.3}]},
                             "models": [{"model": L["base"]}, *three(L)]})
    add("sce-no-selection", {"merge_method": "sce", "base_model": Q["base"], "dtype": "float32", "models": three(Q)})
    # bfloat16 for the methods that are not task arithmetic (mergekit computes in bfloat16)
    add("linear-bf16", {"merge_method": "linear", "dtype": "bfloat16", "models": three(B, weight=[0.5, 0.3, 0.2])})
    add("slerp-bf16", {"merge_method": "slerp", "base_model": B["ft0"], "dtype": "bfloat16",
                       "parameters": {"t": [0.2, 0.7]}, "models": [{"model": B["ft0"]}, {"model": B["ft1"]}]})
    add("nuslerp-bf16", {"merge_method": "nuslerp", "dtype": "bfloat16",
                         "models": [{"model": B["ft0"], "parameters": {"weight": 0.6}},
                                    {"model": B["ft1"], "parameters": {"weight": 0.4}}]})
    add("multislerp-bf16", {"merge_method": "multislerp", "base_model": B["base"], "dtype": "bfloat16",
                            "models": three(B, weight=[0.5, 0.3, 0.2])})
    add("sce-bf16", {"merge_method": "sce", "base_model": B["base"], "dtype": "bfloat16",
                     "parameters": {"select_topk": 0.5}, "models": three(B)})
    add("karcher-bf16", {"merge_method": "karcher", "dtype": "bfloat16", "models": three(B)})
    add("model_stock-bf16", {"merge_method": "model_stock", "base_model": B["base"], "dtype": "bfloat16",
                             "models": three(B)})
    # arcee_fusion, nearswap, ram, ramplus_tl
    for tag, zz, dt in (("", L, "float32"), ("-bf16", B, "bfloat16")):
        add(f"arcee_fusion{tag}", {"merge_method": "arcee_fusion", "base_model": zz["base"], "dtype": dt,
                                   "models": [{"model": zz["base"]}, {"model": zz["ft0"]}]})
        add(f"nearswap{tag}", {"merge_method": "nearswap", "base_model": zz["base"], "dtype": dt,
                               "parameters": {"t": [{"filter": "mlp", "value": [0.001, 0.05]}, {"value": 0.01}]},
                               "models": [{"model": zz["ft1"]}]})
        add(f"ram{tag}", {"merge_method": "ram", "base_model": zz["base"], "dtype": dt,
                          "parameters": {"epsilon": 0.02}, "models": three(zz)})
        add(f"ramplus_tl{tag}", {"merge_method": "ramplus_tl", "base_model": zz["base"], "dtype": dt,
                                 "parameters": {"epsilon": 0.025, "r": 0.5, "alpha": [0.3, 0.8]},
                                 "models": three(zz)})
    add("nearswap-t-as-1e-2", {"merge_method": "nearswap", "base_model": L["base"], "dtype": "float32",
                               "parameters": {"t": "1e-2"}, "models": [{"model": L["ft1"]}]})
    add("ram-default-epsilon", {"merge_method": "ram", "base_model": Q["base"], "dtype": "float32",
                                "models": three(Q)})
    add("nearswap-no-t", {"merge_method": "nearswap", "base_model": L["base"], "dtype": "float32",
                          "models": [{"model": L["ft1"]}]})
    add("arcee_fusion-two-models", {"merge_method": "arcee_fusion", "base_model": L["base"], "dtype": "float32",
                                    "models": three(L)[:2]})
    # modules (mergekit's form of the one module, 'default', of a causal LM), chat_template, residual_weight
    add("modules-default-params", {"merge_method": "ties", "base_model": L["base"], "dtype": "float32",
                                   "parameters": {"density": 0.9, "lambda": 2.0},
                                   "modules": {"default": {"models": three(L, weight=[0.5, 0.3, 0.2]),
                                                           "parameters": {"density": [{"filter": "mlp",
                                                                                       "value": 0.4}]}}}})
    add("modules-default-slices", {"merge_method": "slerp", "base_model": L["ft0"], "dtype": "float32",
                                   "modules": {"default": {"slices": [{"sources": [
                                       {"model": L["ft0"], "layer_range": [0, 4]},
                                       {"model": L["ft1"], "layer_range": [0, 4]}]}],
                                       "parameters": {"t": [0.1, 0.9]}}}, "parameters": {"t": 0.5}})
    tpl = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    add("chat-template-text", {"merge_method": "linear", "dtype": "float32", "chat_template": tpl,
                               "models": three(L, weight=1.0)})
    add("passthrough-residual-weight", {"merge_method": "passthrough", "dtype": "float32",
                                        "slices": [{"sources": [{"model": L["ft0"], "layer_range": [0, 4]}],
                                                    "residual_weight": 0.3}]})
    add("tokenizer-union", {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
                            "models": three(L, weight=1.0)})
    # tokenizer settings: three models whose word-level tokenizers overlap in part (tests/test_mergekit_tokenizer.py)
    T = z["tok"]

    def lin(names: list[str], weights: list[float], **extra) -> dict:
        return {"merge_method": "linear", "base_model": T["base"], "dtype": "float32",
                "models": [{"model": T[n], "parameters": {"weight": w}} for n, w in zip(names, weights)], **extra}
    add("tok-union-linear", lin(["base", "ft0", "ft1"], [0.5, 0.3, 0.2], tokenizer_source="union"))
    add("tok-union-ties", {"merge_method": "ties", "base_model": T["base"], "dtype": "float32",
                           "tokenizer_source": "union", "parameters": {"density": 0.5},
                           "models": [{"model": T["ft0"], "parameters": {"weight": 0.6}},
                                      {"model": T["ft1"], "parameters": {"weight": 0.4}}]})
    add("tok-block-default-union", lin(["base", "ft0"], [1.0, 1.0], tokenizer={}))
    add("tok-source-base", lin(["base", "ft0", "ft1"], [0.2, 0.5, 0.3], tokenizer_source="base"))
    add("tok-source-model", lin(["base", "ft0", "ft1"], [0.2, 0.5, 0.3], tokenizer={"source": T["ft0"]}))
    add("tok-tokens-pad", lin(["base", "ft0", "ft1"], [0.4, 0.4, 0.2], tokenizer={
        "source": "union", "pad_to_multiple_of": 16,
        "tokens": {"<s>": {"source": {"kind": "zero"}, "force": True},
                   "x5": {"source": T["ft1"]},
                   "w20": {"source": {"kind": "model_token", "model": T["ft0"], "token_id": 7}, "force": True},
                   "brand_new": {"source": {"kind": "model_token", "model": T["base"], "token": "w5"}}}}))
    add("tok-passthrough-union", {"merge_method": "passthrough", "base_model": T["base"], "dtype": "float32",
                                  "tokenizer_source": "union",
                                  "slices": [{"sources": [{"model": T["ft0"], "layer_range": [0, 1]}]},
                                             {"sources": [{"model": T["ft1"], "layer_range": [1, 2]}]}]})
    add("tok-union-bf16", {"merge_method": "task_arithmetic", "base_model": T["base"], "dtype": "bfloat16",
                           "tokenizer_source": "union",
                           "models": [{"model": T["ft0"], "parameters": {"weight": 0.7}},
                                      {"model": T["ft1"], "parameters": {"weight": 0.4}}]})
    add("chat-template-named", {"merge_method": "linear", "dtype": "float32", "chat_template": "chatml",
                                "models": three(L, weight=1.0)})
    # LoRA references (mergekit applies the adapter with PEFT first)
    A = z["adapters"]
    add("lora-ref-models", {"merge_method": "task_arithmetic", "base_model": L["base"], "dtype": "float32",
                            "models": [{"model": f"{L['ft0']}+{A['llama_ft0']}", "parameters": {"weight": 0.6}},
                                       {"model": L["ft1"], "parameters": {"weight": 0.4}}]})
    add("lora-ref-base-rslora-patterns", {"merge_method": "ties", "base_model": f"{L['base']}+{A['llama_base']}",
                                          "dtype": "float32", "parameters": {"density": 0.5},
                                          "models": three(L, weight=[0.5, 0.3, 0.2])})
    add("lora-ref-slices-dict", {"merge_method": "passthrough", "dtype": "float32",
                                 "slices": [{"sources": [{"model": {"model": L["ft0"], "lora": A["llama_ft0"]},
                                                          "layer_range": [0, 2]}]},
                                            {"sources": [{"model": L["ft1"], "layer_range": [2, 4]}]}]})
    add("lora-ref-embed-modules-to-save", {"merge_method": "linear", "dtype": "float32",
                                           "models": [{"model": f"{L['ft1']}+{A['llama_embed']}",
                                                       "parameters": {"weight": 0.7}},
                                                      {"model": L["ft2"], "parameters": {"weight": 0.3}}]})
    add("lora-ref-bf16", {"merge_method": "task_arithmetic", "base_model": B["base"], "dtype": "bfloat16",
                          "models": [{"model": f"{B['ft0']}+{A['bf16_ft0']}", "parameters": {"weight": 0.5}},
                                     {"model": B["ft1"], "parameters": {"weight": 0.5}}]})
    add("lora-ref-qwen2-bias", {"merge_method": "linear", "dtype": "float32",
                                "models": [{"model": f"{Q['ft0']}+{A['qwen2_bias']}", "parameters": {"weight": 1.0}},
                                           {"model": Q["ft1"], "parameters": {"weight": 1.0}}]})
    return out


def run_mergekit(bin_: str, cfg: Path, out: Path, seed: int | None = None) -> tuple[bool, str]:
    cmd = [bin_, str(cfg), str(out), "--quiet", "--lora-merge-cache", str(out.parent / "mk_lora_cache")]
    if seed is not None:
        cmd += ["--random-seed", str(seed)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        lines = [ln for ln in (p.stderr or p.stdout).strip().splitlines() if ln.strip()]
        return False, lines[-1] if lines else f"exit {p.returncode}"
    return True, ""


def run_fusion_bench(cfg: Path, out: Path) -> tuple[bool, str]:
    from fusion_bench.compat.mergekit import main as fb_main
    from fusion_bench.errors import FusionBenchError

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            fb_main([str(cfg), str(out)])
        return True, ""
    except FusionBenchError as e:
        return False, str(e).splitlines()[0]


def bf16_ulps(diff: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None = None) -> float:
    """max |diff| in units of the bfloat16 spacing at the larger of |a|, |b| (and |base|: mergekit adds the merged
    delta to the base in bfloat16, so where they cancel the rounding is that of the base's magnitude)."""
    mag = torch.maximum(a.abs(), b.abs())
    if base is not None and base.shape == a.shape:
        mag = torch.maximum(mag, base.abs())
    mag = mag.clamp_min(2.0 ** -126)
    ulp = torch.pow(2.0, torch.floor(torch.log2(mag)) - 7)
    return float((diff / ulp).max()) if diff.numel() else 0.0


def compare_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                  base: dict[str, torch.Tensor] | None = None) -> tuple[bool, str]:
    if set(a) != set(b):
        return False, f"tensor names differ: only mergekit {sorted(set(a) - set(b))[:3]}, only fusion_bench {sorted(set(b) - set(a))[:3]}"
    worst, worst_key, worst_ulps, ok = 0.0, "", 0.0, True
    for k in sorted(a):
        x, y = a[k], b[k]
        if x.shape != y.shape:
            return False, f"{k}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if x.dtype != y.dtype:
            return False, f"{k}: dtype {x.dtype} vs {y.dtype}"
        xd, yd = x.double(), y.double()
        d = (xd - yd).abs()
        m = float(d.max()) if d.numel() else 0.0
        if x.dtype == torch.bfloat16:
            u = bf16_ulps(d, xd, yd, base[k].double() if base and k in base else None)
            worst_ulps = max(worst_ulps, u)
            bad = u > 1.0
        else:
            bad = bool((d > 1e-5 * (1 + xd.abs())).any())
        if m > worst:
            worst, worst_key = m, k
        ok &= not bad
    extra = f", {worst_ulps:.1f} bf16 ulp" if worst_ulps else ""
    return ok, f"max |diff| {worst:.3g} ({worst_key}{extra})"


def align_by_token(mk: Path, fb: Path, b: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Compare the saved vocabularies; return fusion_bench's vocabulary tensors with their rows in mergekit's ids.
    mergekit 0.1.5 appends a union's new tokens in the Rust tokenizer's hash-map order (it changes from run to
    run); fusion_bench appends them by id, so rows are matched by token string."""
    from transformers import AutoTokenizer

    va, vb = (AutoTokenizer.from_pretrained(str(x)).get_vocab() for x in (mk, fb))
    if set(va) != set(vb):
        return b, f"FAIL saved vocabularies differ: only mergekit {sorted(set(va) - set(vb))[:5]}, only fusion_bench {sorted(set(vb) - set(va))[:5]}"
    aa, ab = ({t["content"]: {k: v for k, v in t.items() if k != "id"}
               for t in json.loads((x / "tokenizer.json").read_text())["added_tokens"]} for x in (mk, fb))
    if aa != ab:
        return b, f"FAIL added tokens differ: {sorted(c for c in set(aa) | set(ab) if aa.get(c) != ab.get(c))[:3]}"
    ca, cb = (json.loads((x / "config.json").read_text())["vocab_size"] for x in (mk, fb))
    if ca != cb:
        return b, f"FAIL config vocab_size {ca} vs {cb}"
    moved = sum(va[t] != vb[t] for t in va)
    n = len(va)
    idx = torch.arange(ca)
    for t, i in va.items():
        idx[i] = vb[t]
    out = {k: (t[idx] if k.endswith(("embed_tokens.weight", "lm_head.weight")) else t) for k, t in b.items()}
    return out, (f"same {n}-token vocabulary and added tokens, vocab_size {ca}, {moved} ids differ (rows matched "
                 "by token)")


def compare_random(base: dict[str, torch.Tensor], a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[bool, str]:
    """Draw-independent statistics of one sparsified task vector: L1 norm (exact under L1 rescale) and the
    fraction kept (binomial: within 5 standard deviations over the whole model)."""
    l1a = l1b = 0.0
    ka = kb = n = 0
    worst_l1 = 0.0
    for k in sorted(a):
        if k not in b or k not in base:
            return False, f"tensor {k} missing"
        da, db = a[k].double() - base[k].double(), b[k].double() - base[k].double()
        la, lb = float(da.abs().sum()), float(db.abs().sum())
        worst_l1 = max(worst_l1, abs(la - lb) / max(la, 1e-12))
        l1a, l1b = l1a + la, l1b + lb
        ka, kb, n = ka + int((da != 0).sum()), kb + int((db != 0).sum()), n + da.numel()
    p = ka / n
    sd = (2 * p * (1 - p) / n) ** 0.5
    ok = worst_l1 < 1e-4 and abs(ka - kb) / n < 5 * sd + 1e-9
    return ok, f"per-tensor L1 rel diff {worst_l1:.2g}, kept {ka / n:.4f} vs {kb / n:.4f}"


# ------------------------------------------------------------------------------------------------
# fusion_bench extract-lora vs mergekit-extract-lora
# ------------------------------------------------------------------------------------------------
def lora_configs(z: dict[str, dict[str, str]]) -> list[tuple[str, str, str, list[str]]]:
    """(name, fine-tuned model, base model, options shared by both tools)."""
    L, B, Q, V = z["llama"], z["llama_bf16"], z["qwen2"], z["vocab"]
    return [
        ("lora-r4", L["ft0"], L["base"], ["--max-rank", "4"]),
        ("lora-full-rank", L["ft0"], L["base"], ["--max-rank", "64"]),
        ("lora-no-distribute-scale", L["ft1"], L["base"], ["--max-rank", "8", "--no-distribute-scale"]),
        ("lora-sv-epsilon", L["ft0"], L["base"], ["--max-rank", "64", "--sv-epsilon", "0.2"]),
        ("lora-embed-lora", L["ft0"], L["base"], ["--max-rank", "4", "--embed-lora"]),
        ("lora-regex-skip", L["ft0"], L["base"], ["--max-rank", "4", "-i", "self_attn", "-e", r"layers\.1\.",
                                                 "--skip-undecomposable"]),
        # mergekit 0.1.5 crashes on --save-module when it adds a module itself (a tuple is appended to):
        # --embed-lora and --skip-undecomposable leave nothing for it to add
        ("lora-save-module", L["ft0"], L["base"], ["--max-rank", "4", "--save-module", "down_proj", "--embed-lora",
                                                  "--skip-undecomposable"]),
        ("lora-bf16", B["ft0"], B["base"], ["--max-rank", "4"]),
        ("lora-vocab-embed-lora", V["ft2"], V["base"], ["--max-rank", "4", "--embed-lora"]),
        ("lora-qwen2-qkv-bias", Q["ft0"], Q["base"], ["--max-rank", "4", "-i", "(q|k|v)_proj"]),
        ("lora-qwen2", Q["ft0"], Q["base"], ["--max-rank", "4"]),
    ]


def _adapter(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """module -> {'delta': B A (as the weight's shape), 'bias': lora_B.bias} or {'weight', 'bias'} (saved whole)."""
    from safetensors.torch import load_file

    t = load_file(str(folder / "adapter_model.safetensors"))
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for k in t:
        name = k.removeprefix("base_model.model.")
        for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_embedding_A", ".lora_embedding_B"):
            if name.endswith(suffix):
                mod = name.removesuffix(suffix)
                m = mods.setdefault(mod, {"lora": True})
                if suffix == ".lora_B.bias":
                    m["bias"] = t[k].float()
                elif "delta" not in m:
                    if suffix.startswith(".lora_embedding"):
                        m["delta"] = (t[f"{k[: -len(suffix)]}.lora_embedding_B"].float()
                                      @ t[f"{k[: -len(suffix)]}.lora_embedding_A"].float()).T
                    else:
                        m["delta"] = (t[f"{k[: -len(suffix)]}.lora_B.weight"].float()
                                      @ t[f"{k[: -len(suffix)]}.lora_A.weight"].float())
                break
        else:
            mod, _, leaf = name.rpartition(".")
            mods.setdefault(mod, {"lora": False})[leaf] = t[k].float()
    return mods


def compare_lora(mk: Path, fb: Path, ft: str, base: str) -> tuple[bool, str]:
    """Per module: the same kind (LoRA or whole), equal singular values of B A, equal reconstruction error
    ||W_ft - W_base - B A||_F, equal whole tensors; and fusion_bench's adapter loads in PEFT."""
    a, b = _adapter(mk), _adapter(fb)
    ft_sd, base_sd = load_sd(ft), load_sd(base)
    bad, sv_diff, err_diff, whole_here, rank0 = [], 0.0, 0.0, [], []
    for mod in sorted(set(a) | set(b)):
        x, y = a.get(mod), b.get(mod)
        if y is None and x is not None and x["lora"] and not x["delta"].any():
            rank0.append(mod)  # mergekit writes a rank-0 LoRA (PEFT refuses r = 0); fusion_bench leaves it out
            continue
        if x is None or y is None:
            bad.append(f"{mod} only in {'mergekit' if y is None else 'fusion_bench'}")
            continue
        if x["lora"] and not y["lora"] and "bias" in y and torch.equal(y["weight"], ft_sd[f"{mod}.weight"].float()):
            whole_here.append(mod)  # a changed bias among unbiased targets (docs/mergekit.md)
            continue
        if x["lora"] != y["lora"]:
            bad.append(f"{mod}: LoRA in one, whole in the other")
            continue
        if not x["lora"]:
            for leaf in set(x) | set(y):
                if leaf != "lora" and not (leaf in x and leaf in y and torch.equal(x[leaf], y[leaf])):
                    bad.append(f"{mod}.{leaf} differs")
            continue
        w = (ft_sd[f"{mod}.weight"].float() - base_sd[f"{mod}.weight"].float())
        sx, sy = torch.linalg.svdvals(x["delta"]), torch.linalg.svdvals(y["delta"])
        scale = float(sx.max()) or 1.0
        sv_diff = max(sv_diff, float((sx - sy).abs().max()) / scale)
        ex, ey = float((w - x["delta"]).norm()), float((w - y["delta"]).norm())
        err_diff = max(err_diff, abs(ex - ey) / max(float(w.norm()), 1e-12))
        if ("bias" in x) != ("bias" in y) or ("bias" in x and not torch.allclose(x["bias"], y["bias"])):
            bad.append(f"{mod}.bias differs")
    tol = 2e-2 if any(v.dtype == torch.bfloat16 for v in ft_sd.values()) else 1e-5
    if sv_diff > tol or err_diff > tol:
        bad.append(f"singular values differ by {sv_diff:.2e}, reconstruction error by {err_diff:.2e} (relative)")
    try:
        import peft
        from transformers import AutoModelForCausalLM

        with contextlib.redirect_stderr(io.StringIO()):
            m = AutoModelForCausalLM.from_pretrained(base)
            vocab = ft_sd["model.embed_tokens.weight"].shape[0]
            if m.get_input_embeddings().weight.shape[0] != vocab:  # a larger vocabulary: resize the base first
                m.resize_token_embeddings(vocab)
            peft.PeftModel.from_pretrained(m, str(fb)).merge_and_unload()
    except Exception as e:  # noqa: BLE001 - reported as a FAIL line
        bad.append(f"PEFT cannot load fusion_bench's adapter: {str(e).splitlines()[0][:120]}")
    if bad:
        return False, "; ".join(bad[:4]) + (f" (+{len(bad) - 4})" if len(bad) > 4 else "")
    msg = f"{len(a)} modules, max rel diff: singular values {sv_diff:.1e}, reconstruction error {err_diff:.1e}"
    if rank0:
        msg += f"; {len(rank0)} module(s) with no singular value above sv_epsilon: mergekit writes rank 0, left out here"
    if whole_here:
        msg += f"; {len(whole_here)} biased module(s) saved whole here (mergekit: lora_B.bias, which PEFT ignores)"
    return True, msg


def run_lora_equivalence(bin_: str, z: dict[str, dict[str, str]], work: Path, only: list[str] | None) -> list[str]:
    from fusion_bench.compat.lora_extract import main as fb_extract
    from fusion_bench.errors import FusionBenchError

    lines = []
    for name, ft, base, opts in lora_configs(z):
        if only and not any(o in name for o in only):
            continue
        d = work / "runs" / name
        for sub in ("mk", "fb"):
            if (d / sub).exists():
                shutil.rmtree(d / sub)
        d.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        p = subprocess.run([bin_, "--model", ft, "--base-model", base, "--out-path", str(d / "mk"), *opts],
                           capture_output=True, text=True, env=env)
        mk_msg = "" if p.returncode == 0 else ([ln for ln in (p.stderr or p.stdout).splitlines() if ln.strip()]
                                               or [f"exit {p.returncode}"])[-1]
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                fb_extract(["--model", ft, "--base-model", base, "--out-path", str(d / "fb"), *opts])
            fb_msg = ""
        except FusionBenchError as e:
            fb_msg = str(e).splitlines()[0]
        if mk_msg and fb_msg:
            line = f"BOTH-REFUSE {name}  fusion_bench: {fb_msg} | mergekit: {mk_msg[:160]}"
        elif mk_msg:
            line = f"FAIL     {name}  mergekit refuses ({mk_msg[:160]}) but fusion_bench extracts"
        elif fb_msg:
            line = f"REFUSED  {name}  {fb_msg}"
        else:
            ok, msg = compare_lora(d / "mk", d / "fb", ft, base)
            line = f"{'PASS' if ok else 'FAIL':8} {name}  {msg}"
        print(line, flush=True)
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-bin", required=True, help="mergekit-yaml of a separate mergekit install")
    ap.add_argument("--only", action="append", help="run only configs whose name contains this (repeatable)")
    ap.add_argument("--keep", help="keep the zoos, configs and outputs in this folder")
    ap.add_argument("--extract-lora-bin", help="mergekit-extract-lora (default: beside --mergekit-bin)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mk_equiv_"))
    work.mkdir(parents=True, exist_ok=True)
    zoos = {"llama": ("llama", torch.float32, False), "llama_bf16": ("llama", torch.bfloat16, False),
            "qwen2": ("qwen2", torch.float32, False), "vocab": ("llama", torch.float32, True)}
    z = {}
    for name, (fam, dt, big) in zoos.items():
        root = work / "zoo" / name
        if not (root / "ft2").exists():
            build_zoo(root, fam, dt, big_vocab=big)
        z[name] = {k: str(root / k) for k in ("base", "ft0", "ft1", "ft2")}
    z["tok"] = build_token_zoo(work / "zoo" / "tok")
    ad = work / "zoo" / "adapters"
    specs = {"llama_ft0": (z["llama"]["ft0"], 11, {}),
             "llama_base": (z["llama"]["base"], 12, {"use_rslora": True, "rank_pattern": {"down_proj": 2},
                                                     "alpha_pattern": {"v_proj": 3}}),
             "llama_embed": (z["llama"]["ft1"], 13, {"target_modules": ["q_proj", "embed_tokens"],
                                                     "modules_to_save": ["lm_head"]}),
             "bf16_ft0": (z["llama_bf16"]["ft0"], 14, {}),
             "qwen2_bias": (z["qwen2"]["ft0"], 15, {"target_modules": ["q_proj", "k_proj"], "lora_bias": True})}
    z["adapters"] = {}
    for name, (base, seed, kw) in specs.items():
        if not (ad / name / "adapter_config.json").exists():
            with contextlib.redirect_stderr(io.StringIO()):
                build_adapter(base, ad / name, seed, **kw)
        z["adapters"][name] = str(ad / name)
    results = []
    for name, doc, kind in configs(z):
        if args.only and not any(o in name for o in args.only):
            continue
        d = work / "runs" / name
        d.mkdir(parents=True, exist_ok=True)
        cfg = d / "merge.yml"
        text = yaml.safe_dump(doc, sort_keys=False)
        same = cfg.exists() and cfg.read_text() == text and (d / "mk.json").exists()
        cfg.write_text(text)
        for sub in ("fb",) if same else ("mk", "fb"):
            if (d / sub).exists():
                shutil.rmtree(d / sub)
        if same:  # --keep: mergekit's result of this very config is already there
            mk_ok, mk_msg = json.loads((d / "mk.json").read_text())
        else:
            mk_ok, mk_msg = run_mergekit(args.mergekit_bin, cfg, d / "mk", seed=1 if kind == "random" else None)
            (d / "mk.json").write_text(json.dumps([mk_ok, mk_msg]))
        fb_ok, fb_msg = run_fusion_bench(cfg, d / "fb")
        if not mk_ok and not fb_ok:
            line = f"BOTH-REFUSE {name}  fusion_bench: {fb_msg} | mergekit: {mk_msg[:160]}"
        elif not mk_ok:
            line = f"FAIL     {name}  mergekit refuses ({mk_msg[:160]}) but fusion_bench merges"
        elif not fb_ok:
            line = f"REFUSED  {name}  {fb_msg}"
        else:
            a, b = load_sd(d / "mk"), load_sd(d / "fb")
            if kind == "random":
                base_path = doc.get("base_model")
                ok, msg = compare_random(load_sd(base_path), a, b)
            else:
                bp = doc.get("base_model")
                tok_msg = ""
                if doc.get("tokenizer_source") is not None or doc.get("tokenizer") is not None:
                    b, tok_msg = align_by_token(d / "mk", d / "fb", b)
                ok, msg = compare_exact(a, b, load_sd(bp) if bp and doc.get("dtype") == "bfloat16" else None)
                if tok_msg.startswith("FAIL"):
                    ok, msg = False, tok_msg[5:]
                elif tok_msg:
                    msg += ", " + tok_msg
            if ok and doc.get("chat_template"):
                from transformers import AutoTokenizer

                ta, tb = (AutoTokenizer.from_pretrained(str(d / x)).chat_template for x in ("mk", "fb"))
                ok, msg = ta == tb, msg + (", same chat template" if ta == tb else f", chat templates differ: {ta!r} vs {tb!r}")
            line = f"{'PASS' if ok else 'FAIL':8} {name}  {msg}"
        print(line, flush=True)
        results.append(line)
    lora_bin = args.extract_lora_bin or str(Path(args.mergekit_bin).with_name("mergekit-extract-lora"))
    if Path(lora_bin).exists():
        results += run_lora_equivalence(lora_bin, z, work, args.only)
    else:
        print("SKIPPED  lora-*  no mergekit-extract-lora beside --mergekit-bin (give --extract-lora-bin)")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
