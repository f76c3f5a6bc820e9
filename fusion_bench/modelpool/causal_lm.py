"""Causal language-model pool (Llama, Mistral, Qwen2, Gemma style): dtype, tokenizer, vocabularies.

``modelpool.type=causal_lm``. Models are Hugging Face folders (or hub ids) loaded with
``AutoModelForCausalLM``. The pool decides, before any tensor is merged, what happens when the
base and the fine-tunes have different vocabulary sizes (a fine-tune that added tokens):

- ``vocab_policy=error`` (default): stop with a message naming the models and their sizes.
- ``vocab_policy=shared_rows``: the embedding rows shared by every model (ids ``0 .. V_min - 1``)
  are merged; the remaining rows of the output come from ``vocab_source`` (default: the base),
  whose vocabulary size, config and tokenizer the merged model takes. The tokenizers' ``tokenizer.json``
  files are compared on the shared ids when present: models that map a shared id to different
  tokens are rejected (merging their rows would mix unrelated tokens).
- ``vocab_policy=backbone_only``: only the backbone is merged; the embedding tensors (input
  embeddings and output head) are copied from ``vocab_source``.

Embedding tensors are found by the glob patterns ``embedding_patterns`` (default: the names used
by Llama, Mistral, Qwen2, Gemma, GPT-2/NeoX and BLOOM). The policy applies to the streaming engine
(``engine=streaming`` or ``fusion_bench.engine.streaming.merge_to_folder``); the in-memory engine
requires equal shapes.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion_bench.config_schema import option
from fusion_bench.errors import CheckpointError, ConfigError, did_you_mean
from fusion_bench.io.checkpoint import read_json_object
from fusion_bench.modelpool.base import PRETRAINED, ModelPool, ModelPoolConfig
from fusion_bench.modelpool.registry import register_modelpool

DEFAULT_EMBEDDING_PATTERNS = ["*embed_tokens.weight", "lm_head.weight", "*.wte.weight", "*embed_in.weight",
                              "embed_out.weight", "*word_embeddings.weight"]


@dataclass
class CausalLMPoolConfig(ModelPoolConfig):
    """Config of a causal LM pool (``modelpool.type=causal_lm``)."""

    model_class: str = option("causal_lm", help="Class that loads the models (default AutoModelForCausalLM).")
    vocab_policy: str = option(
        "error", choices=("error", "shared_rows", "backbone_only"),
        help="What to do when models have different vocabulary sizes: 'error'; 'shared_rows' (merge the "
        "rows every model has, take the rest from vocab_source); 'backbone_only' (copy the embeddings and "
        "output head from vocab_source, merge the rest).")
    vocab_source: str | None = option(
        None, help="Model (name in modelpool.models) whose extra embedding rows, vocabulary size, config and "
        "tokenizer the merged model keeps; default: the base ('_pretrained_', else the first model).")
    embedding_patterns: list[str] = option(
        list(DEFAULT_EMBEDDING_PATTERNS), help="Glob patterns of the tensors indexed by token id (first dimension "
        "= vocabulary): input embeddings and output head.")
    check_tokenizers: bool = option(
        True, help="With vocab_policy=shared_rows, compare the models' tokenizer.json vocabularies on the shared "
        "ids and refuse to merge rows of ids that map to different tokens.")


@dataclass(frozen=True)
class VocabRule:
    """How the streaming engine builds one embedding tensor: ``shared_rows`` (merge rows [0, rows),
    copy the rest from ``source``) or ``copy`` (the whole tensor from ``source``)."""

    mode: str
    rows: int
    source: str


@register_modelpool("causal_lm")
class CausalLMPool(ModelPool):
    """A pool of causal language models with dtype, tokenizer and vocabulary-size handling.

    Args:
        models: name -> Hugging Face folder or hub id (``_pretrained_`` is the base).
        config: :class:`CausalLMPoolConfig` or a mapping (keywords win).
    """

    config_class = CausalLMPoolConfig

    def __init__(self, models=None, config=None, **kwargs: Any):
        super().__init__(models, config, **kwargs)
        src = self.config.vocab_source
        if src is not None and src not in self.names:
            raise ConfigError(f"modelpool.vocab_source='{src}' is not a model of the pool.{did_you_mean(src, self.names)}")
        self._vocab_target: int | None = None

    # -- vocabulary --------------------------------------------------------------------------------
    def vocab_source_name(self) -> str:
        return self.config.vocab_source or self.base_name()

    def config_source(self) -> str:
        """The model whose config.json (and tokenizer) the merged model takes."""
        return self.vocab_source_name()

    def embedding_keys(self, keys: list[str]) -> list[str]:
        return [k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in self.config.embedding_patterns)]

    def vocab_sizes(self, readers: dict[str, Any]) -> dict[str, int]:
        """Rows of the first embedding tensor of each model (its vocabulary size as stored)."""
        out = {}
        for n, r in readers.items():
            keys = self.embedding_keys(r.keys())
            if keys:
                shape = r.meta(keys[0]).shape
                if shape:
                    out[n] = int(shape[0])
        return out

    def vocab_rules(self, readers: dict[str, Any]) -> tuple[dict[str, VocabRule], list[str], list[str]]:
        """Decide the embedding tensors' treatment before merging: (rules, notes, problems)."""
        sizes = self.vocab_sizes(readers)
        notes: list[str] = []
        problems: list[str] = []
        if len(set(sizes.values())) <= 1:
            self._vocab_target = None
            return {}, notes, problems
        policy = self.config.vocab_policy
        src = self.vocab_source_name()
        if policy == "error":
            problems.append(
                f"vocabulary sizes differ: {sizes}; set modelpool.vocab_policy=shared_rows (merge the shared "
                "rows, keep the rest from modelpool.vocab_source) or backbone_only (copy embeddings from "
                "modelpool.vocab_source)")
            return {}, notes, problems
        emb = self.embedding_keys(readers[self.base_name()].keys())
        shared = min(sizes.values())
        self._vocab_target = sizes[src]
        rules: dict[str, VocabRule] = {}
        for k in emb:
            if policy == "shared_rows":
                rules[k] = VocabRule("shared_rows", shared, src)
            else:
                rules[k] = VocabRule("copy", sizes[src], src)
        if policy == "shared_rows":
            notes.append(f"vocabulary sizes {sizes}: rows 0..{shared - 1} of {emb} are merged, rows "
                         f"{shared}..{sizes[src] - 1} come from '{src}'")
            if self.config.check_tokenizers:
                problems += self._tokenizer_conflicts(list(readers), shared)
        else:
            notes.append(f"vocabulary sizes {sizes}: {emb} are copied from '{src}', the backbone is merged")
        return rules, notes, problems

    def vocab_config_updates(self) -> dict[str, Any]:
        return {"vocab_size": self._vocab_target} if self._vocab_target is not None else {}

    def _tokenizer_vocab(self, name: str) -> dict[str, int] | None:
        folder = self.hf_folder(name)
        f = folder / "tokenizer.json" if folder is not None else None
        if f is None or not f.exists():
            return None
        tok = read_json_object(f, name, "tokenizer file")
        try:
            vocab = dict((tok.get("model") or {}).get("vocab") or {})
            for a in tok.get("added_tokens") or []:
                vocab[a["content"]] = a["id"]
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"Model '{name}': tokenizer file {f} has no valid vocabulary ({type(e).__name__}: "
                                  f"{e}). Re-download or re-save that file.") from e
        return vocab if vocab else None

    def _tokenizer_conflicts(self, names: list[str], shared: int) -> list[str]:
        ref_name = self.vocab_source_name()
        ref = self._tokenizer_vocab(ref_name)
        if ref is None:
            return []
        ref_by_id = {i: t for t, i in ref.items() if isinstance(i, int) and i < shared}
        out = []
        for n in names:
            if n == ref_name:
                continue
            v = self._tokenizer_vocab(n)
            if v is None:
                continue
            by_id = {i: t for t, i in v.items() if isinstance(i, int) and i < shared}
            diff = [i for i in sorted(ref_by_id) if by_id.get(i, ref_by_id[i]) != ref_by_id[i]]
            if diff:
                i = diff[0]
                out.append(f"tokenizers of '{n}' and '{ref_name}' disagree on shared token id {i} "
                           f"({by_id.get(i)!r} vs {ref_by_id[i]!r}, {len(diff)} ids in all): their embedding rows "
                           "cannot be merged; use vocab_policy=backbone_only")
        return out

    # -- tokenizer -----------------------------------------------------------------------------------
    def tokenizer_path(self) -> Path | None:
        """The tokenizer folder: ``modelpool.tokenizer`` if set, else the vocabulary source's folder."""
        from fusion_bench.modelpool.base import resolve_hf_path

        if self.config.tokenizer:
            return resolve_hf_path(self.config.tokenizer, "tokenizer")
        return self.hf_folder(self.vocab_source_name())

    def load_tokenizer(self):
        """The tokenizer (AutoTokenizer) of the merged model."""
        from transformers import AutoTokenizer

        path = self.tokenizer_path()
        if path is None:
            raise ConfigError("No tokenizer: set modelpool.tokenizer to a tokenizer folder or hub id.")
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise CheckpointError(f"Cannot load the tokenizer from {path}: {e}") from e

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"type": "causal_lm", "vocab_policy": self.config.vocab_policy,
                  "vocab_source": self.vocab_source_name(), "dtype": self.config.dtype})
        return d


__all__ = ["CausalLMPool", "CausalLMPoolConfig", "VocabRule", "PRETRAINED"]
