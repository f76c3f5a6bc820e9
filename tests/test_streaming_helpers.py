"""Tiny causal-LM zoos for the streaming, causal-LM pool and mergekit tests (no tests here).

Models are random (seeded) Llama / Mistral / Qwen2 / Gemma configs with hidden size 32 and two
layers, saved with ``save_pretrained`` and a tiny shard size so that every checkpoint is sharded.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "gemma")


def tiny_config(family: str = "llama", vocab: int = 96, layers: int = 2, tie: bool = False):
    import transformers as T

    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=tie)
    if family == "llama":
        return T.LlamaConfig(**common)
    if family == "mistral":
        return T.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return T.Qwen2Config(**common)
    if family == "gemma":
        return T.GemmaConfig(**common, head_dim=8)
    raise ValueError(family)


def tiny_tokenizer(vocab: int = 96):
    """A word-level tokenizer with ``vocab`` entries (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_model(config, seed: int, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.to(dtype)


def save_zoo(root: Path, family: str = "llama", n: int = 3, dtype: torch.dtype = torch.float32,
             shard: str = "20KB", vocab: int = 96, vocabs: list[int] | None = None, tie: bool = False,
             tokenizer: bool = True) -> dict[str, str]:
    """A base and ``n`` fine-tunes (base + seeded noise) saved as sharded HF folders; returns name -> path."""
    from transformers import GenerationConfig

    cfg = tiny_config(family, vocab, tie=tie)
    base = make_model(cfg, 0, dtype)
    paths = {}
    base_dir = root / "base"
    base.save_pretrained(base_dir, max_shard_size=shard)
    GenerationConfig(max_new_tokens=7, bos_token_id=1, eos_token_id=2).save_pretrained(base_dir)
    if tokenizer:
        tiny_tokenizer(vocab).save_pretrained(base_dir)
    paths["_pretrained_"] = str(base_dir)
    base_sd = base.state_dict()
    for i in range(n):
        v = vocabs[i] if vocabs else vocab
        c = tiny_config(family, v, tie=tie)
        m = make_model(c, 100 + i, dtype)
        g = torch.Generator().manual_seed(1000 + i)
        sd = {}
        for k, t in base_sd.items():
            t2 = t.float() + 0.02 * torch.randn(t.shape, generator=g)
            if t.dim() and t.shape[0] != m.state_dict()[k].shape[0]:  # vocabulary rows differ
                extra = m.state_dict()[k].shape[0] - t.shape[0]
                if extra > 0:
                    t2 = torch.cat([t2, 0.1 * torch.randn((extra, *t.shape[1:]), generator=g)])
                else:
                    t2 = t2[: m.state_dict()[k].shape[0]]
            sd[k] = t2.to(dtype)
        m.load_state_dict(sd)
        d = root / f"ft{i}"
        m.save_pretrained(d, max_shard_size=shard)
        if tokenizer:
            tiny_tokenizer(v).save_pretrained(d)
        paths[f"ft{i}"] = str(d)
    return paths


def load_sd(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors folder (via safetensors itself, not our reader)."""
    import json

    from safetensors import safe_open

    path = Path(path)
    idx = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(str(path / f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out
