"""Tiny causal language models and a byte-level tokenizer, built offline, for tests and examples.

:func:`byte_tokenizer` reads any text (every UTF-8 byte is a token, ids 0-255, plus ``<s>`` = 256 and
``</s>`` = 257), so perplexity and calibration code paths run on real prose without a download.
:func:`tiny_llama` builds a seeded random Llama of a few thousand parameters; :func:`save_tiny_llama_pool`
writes a base and fine-tunes (base + seeded noise) with the tokenizer, as Hugging Face folders.
"""

from __future__ import annotations

from pathlib import Path

import torch

BYTE_VOCAB = 258


def byte_tokenizer():
    """A byte-level tokenizer (vocabulary 258: the 256 bytes, ``<s>``, ``</s>``); ``<s>`` is added in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    vocab["<s>"] = 256
    vocab["</s>"] = 257
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 256)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   model_max_length=1 << 20)


def _byte_of(ch: str) -> int:
    """The byte a GPT-2 byte-level character stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip([chr(c) for c in cs], bs))[ch]


def tiny_llama_config(vocab: int = BYTE_VOCAB, hidden: int = 32, layers: int = 2, intermediate: int = 64,
                      heads: int = 4, kv_heads: int = 2, max_positions: int = 256):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                       bos_token_id=256, eos_token_id=257, pad_token_id=257, tie_word_embeddings=False)


def tiny_llama(seed: int = 0, config=None, dtype: torch.dtype = torch.float32):
    """A seeded random ``LlamaForCausalLM`` (default config :func:`tiny_llama_config`), in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config or tiny_llama_config())
    return model.to(dtype).eval()


def perturbed(model, seed: int, scale: float = 0.02):
    """A copy of ``model`` with seeded Gaussian noise (std ``scale``) added to every parameter (a 'fine-tune')."""
    import copy

    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
    return out


def save_tiny_llama_pool(root: str | Path, n: int = 2, seed: int = 0, scale: float = 0.02, config=None,
                         dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Save a tiny Llama base (``base``) and ``n`` fine-tunes (``ft1``..) with the byte tokenizer; name -> folder."""
    root = Path(root)
    tok = byte_tokenizer()
    base = tiny_llama(seed, config, dtype)
    out = {}
    for i in range(n + 1):
        name = "base" if i == 0 else f"ft{i}"
        m = base if i == 0 else perturbed(base, seed + 1000 * i, scale)
        folder = root / name
        m.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[name] = str(folder)
    return out


__all__ = ["BYTE_VOCAB", "byte_tokenizer", "perturbed", "save_tiny_llama_pool", "tiny_llama", "tiny_llama_config"]
