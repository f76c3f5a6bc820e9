"""mergekit's tokenizer settings: the output vocabulary and each model's embedding rows aligned to it.

mergekit 0.1.5 semantics (``tokenizer_source: union|base|MODEL`` and the ``tokenizer:`` block):

- The output tokenizer is the base model's (``base``; its tokens with ids >= the config's ``vocab_size`` are
  stripped, BPE only), a model's own (``MODEL``), or the union (``union``): the base tokenizer with, appended by
  ``add_tokens`` in order, every token of the other models it lacks (models in order: base first, then the
  config's order, each model's tokens by id; ids >= its ``vocab_size`` skipped), then every model's added
  (special) tokens with their settings (first wins). mergekit 0.1.5 walks each vocabulary in the order of the
  Rust tokenizer's hash map, which changes from run to run, so its ids of the appended tokens are not
  reproducible; fusion_bench uses id order (the same tokens and rows, deterministic ids). Tokens named in ``tokenizer.tokens`` are added last if new.
- Each model's vocabulary-indexed tensors (embeddings, output head) are permuted by token string into the output
  ids. A model lacking a token gets a default row: from the single model that has it; else the base's row when
  the base has it; else the mean of the rows of the models that have it; zero when none has it. ``tokens``
  entries override the source (``zero``, a model's row of the same token, ``kind: model_token`` with ``token`` or
  ``token_id`` of that model's original vocabulary), and ``force: true`` uses that row for every model even where
  the model has the token. The merge method then runs unchanged on the aligned rows (no re-weighting).
- ``pad_to_multiple_of``: the vocabulary is padded up; each model's padding rows are the mean of its aligned rows.

The aligned models are written as temporary folders (removed at exit): the shards holding vocabulary tensors are
rewritten with the aligned tensors, the other shards are links to the originals, so the streaming engine merges
them like any model.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusion_bench.errors import CheckpointError, ConfigError

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "vocab.txt", "spiece.model"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class TokenSource:
    """One ``tokenizer.tokens`` entry: kind 'zero', 'model' (the model's row of the same token) or 'model_token'."""
    kind: str | None
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


def _config_vocab_size(path: str) -> int | None:
    f = Path(path) / "config.json"
    if not f.exists():
        return None
    c = json.loads(f.read_text())
    v = c.get("vocab_size")
    if v is None and isinstance(c.get("text_config"), Mapping):
        v = c["text_config"].get("vocab_size")
    return v if isinstance(v, int) else None


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, use_fast=True)


def stripped_tokenizer(path: str):
    """The base tokenizer without the tokens whose ids are >= the model's vocab_size (mergekit, BPE only)."""
    import tokenizers

    tok = _load_tokenizer(path)
    vs = _config_vocab_size(path) or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= vs}
    if not unused:
        return tok
    d = json.loads(tok._tokenizer.to_str())
    if d["model"]["type"] != "BPE":
        raise ConfigError(f"tokenizer of {path}: tokens beyond vocab_size {vs} can be stripped from BPE tokenizers "
                          f"only (this one is {d['model']['type']}), as mergekit; use tokenizer_source: MODEL.")
    d["added_tokens"] = [e for e in d["added_tokens"] if e["id"] < vs]
    for t in unused:
        d["model"]["vocab"].pop(t, None)

    def keep(m: Any) -> bool:
        parts = m.split(" ") if isinstance(m, str) else list(m)
        return not any(p in unused for p in parts)

    d["model"]["merges"] = [m for m in d["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(d))
    return tok


def union_tokenizer(base_tok, toks: list[tuple[str, Any]]):
    """mergekit's union: base tokenizer, then the other tokens (model order, id order), then added tokens."""
    from transformers import AutoTokenizer

    out_vocab: dict[str, int] = {}
    out_added: dict[str, Any] = {}
    for path, tok in toks:
        vs = _config_vocab_size(path) or tok.vocab_size
        added = tok.added_tokens_decoder
        added_contents = {a.content for a in added.values()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):  # by id (mergekit: hash-map order)
            if i >= vs or t in added_contents:
                continue
            out_vocab.setdefault(t, len(out_vocab))
        for i, info in added.items():
            if i < vs and info.content not in out_added:
                out_added[info.content] = info
    with tempfile.TemporaryDirectory() as d:  # a fresh copy: the base tokenizer itself is left as it is
        base_tok.save_pretrained(d, legacy_format=False, safe_serialization=True)
        res = AutoTokenizer.from_pretrained(d, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res


def build_output_tokenizer(source: str, base: str, referenced: list[str], add_tokens: list[str]):
    """(tokenizer, {path: model vocabulary}) as mergekit's BuildTokenizer. ``source``: 'union', 'base' or a path.
    ``referenced``: every model path, base first."""
    base_tok = stripped_tokenizer(base)
    toks: dict[str, Any] = {base: base_tok}
    for p in referenced:
        if p in toks:
            continue
        try:
            toks[p] = _load_tokenizer(p)
        except Exception:  # noqa: BLE001 - as mergekit: a model without a tokenizer is taken to share the base's
            print(f"note: no tokenizer loads from {p}; assuming it is the base's (as mergekit)")
    if source == "base":
        out = base_tok
    elif source == "union":
        out = union_tokenizer(base_tok, list(toks.items()))
    else:
        out = _load_tokenizer(source)
    have = set(out.get_vocab())
    for t in add_tokens:
        if t not in have:
            out.add_tokens(t)
            have.add(t)
    vocabs = {p: (toks[p] if p in toks else base_tok).get_vocab() for p in referenced}
    return out, vocabs


def permutation(vocab_out: dict[str, int], model_vocab: dict[str, int], vocab_size: int) -> dict[int, int]:
    """Output id -> the model's id (-1: the model lacks the token; ids >= its vocab_size count as absent)."""
    p = {}
    for t, i in vocab_out.items():
        j = model_vocab.get(t, -1)
        p[i] = j if j < vocab_size else -1
    return p


def align_rows(tensors: dict[str, torch.Tensor], vocab_out: dict[str, int], perms: dict[str, dict[int, int]],
               original_vocabs: dict[str, dict[str, int]], tokens: dict[str, TokenSource], base: str | None,
               pad_to_multiple_of: int | None) -> dict[str, torch.Tensor]:
    """Each model's vocabulary tensor (vocabulary first) with its rows in the output ids (mergekit's
    PermutedVocabulary); ``tensors`` in mergekit's model order."""
    models = list(tensors)
    n = len(vocab_out)
    size = n
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size = (size // pad_to_multiple_of + 1) * pad_to_multiple_of
    first = tensors[models[0]]
    shape = first.shape[1:]
    dtype = first.dtype
    for t in tensors.values():
        dtype = torch.promote_types(dtype, t.dtype)
    cfgs = dict(tokens)
    average: set[str] = set()
    for tok, i in vocab_out.items():
        if tok in cfgs:
            continue
        has = [perms[m][i] >= 0 for m in models]
        k = sum(has)
        if k == 1:
            cfgs[tok] = TokenSource("model", models[has.index(True)])
        elif k == 0:
            cfgs[tok] = TokenSource("zero")
        elif base in models and perms[base][i] >= 0:
            cfgs[tok] = TokenSource("model", base)
        else:
            average.add(tok)
    defaults: dict[str, torch.Tensor] = {}
    for tok, i in vocab_out.items():
        c = cfgs.get(tok)
        if not (c is not None and c.force) and all(perms[m][i] >= 0 for m in models):
            continue
        if tok in average:
            e = torch.zeros(shape, dtype=dtype)
            cnt = 0
            for m in models:
                if perms[m][i] >= 0:
                    e = e + tensors[m][perms[m][i]]
                    cnt += 1
            defaults[tok] = e / cnt
        elif c is not None:
            defaults[tok] = _default_row(tok, i, c, tensors, perms, original_vocabs, shape, dtype)
    out = {}
    for m in models:
        p, old = perms[m], tensors[m]
        new = torch.zeros((size, *shape), dtype=dtype)
        for tok, i in vocab_out.items():
            c = cfgs.get(tok)
            force = bool(tokens.get(tok).force) if tok in tokens else False
            if p[i] >= 0 and not force:
                new[i] = old[p[i]]
            elif tok in defaults:
                new[i] = defaults[tok]
            elif c is None or c.kind is None:
                raise ConfigError(f"tokenizer.tokens[{tok!r}] has no source but model {m} lacks that token; give "
                                  "source: {kind: zero} or a model.")
        if size > n:
            new[n:] = new[:n].mean(dim=0)
        out[m] = new
    return out


def _default_row(tok, i, c: TokenSource, tensors, perms, original_vocabs, shape, dtype) -> torch.Tensor:
    if c.kind == "zero":
        return torch.zeros(shape, dtype=next(iter(tensors.values())).dtype)
    if c.kind is None:
        raise ConfigError(f"tokenizer.tokens[{tok!r}] has no source; give source: {{kind: zero}} or a model.")
    m = c.model
    if m not in tensors:
        raise ConfigError(f"tokenizer.tokens[{tok!r}]: model {m} does not feed this tensor (not merged here, as mergekit).")
    if c.kind == "model_token":
        j = c.token_id
        if j is None:
            if c.token not in original_vocabs[m]:
                raise ConfigError(f"tokenizer.tokens[{tok!r}]: token {c.token!r} is not in the vocabulary of {m}.")
            j = original_vocabs[m][c.token]
        if not 0 <= j < tensors[m].shape[0]:
            raise ConfigError(f"tokenizer.tokens[{tok!r}]: token_id {j} is out of range for {m} "
                              f"(0..{tensors[m].shape[0] - 1}).")
        return tensors[m][j]
    if perms[m][i] < 0:
        raise ConfigError(f"tokenizer.tokens[{tok!r}]: model {m} does not have that token; use kind: model_token "
                          "with another token, or kind: zero.")
    return tensors[m][perms[m][i]]


def parse_tokens(value: Any, resolve_model) -> dict[str, TokenSource]:
    """``tokenizer.tokens`` (token -> {source, force}) with model references resolved to paths."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"mergekit tokenizer.tokens must map tokens to {{source, force}}, got {value!r}.")
    out = {}
    for tok, spec in value.items():
        where = f"tokenizer.tokens[{tok!r}]"
        spec = {} if spec is None else spec
        if not isinstance(spec, Mapping) or set(spec) - {"source", "force"}:
            raise ConfigError(f"{where} must be a mapping with 'source' and optional 'force', got {spec!r}.")
        force = spec.get("force", False)
        if not isinstance(force, bool):
            raise ConfigError(f"{where}.force must be true or false, got {force!r}.")
        src = spec.get("source")
        if src is None:
            out[str(tok)] = TokenSource(None, force=force)
        elif isinstance(src, Mapping) and "kind" in src:
            kind = src["kind"]
            if kind == "zero":
                if set(src) != {"kind"}:
                    raise ConfigError(f"{where}.source: kind zero takes no other keys, got {sorted(src)}.")
                out[str(tok)] = TokenSource("zero", force=force)
            elif kind == "model_token":
                extra = set(src) - {"kind", "model", "token", "token_id"}
                if extra or "model" not in src:
                    raise ConfigError(f"{where}.source: kind model_token takes model and token or token_id.")
                if (src.get("token") is None) == (src.get("token_id") is None):
                    raise ConfigError(f"{where}.source: give exactly one of token or token_id (as mergekit).")
                tid = src.get("token_id")
                if tid is not None and (not isinstance(tid, int) or isinstance(tid, bool)):
                    raise ConfigError(f"{where}.source.token_id must be an integer, got {tid!r}.")
                out[str(tok)] = TokenSource("model_token", resolve_model(src["model"], f"{where}.source.model"),
                                            token=src.get("token"), token_id=tid, force=force)
            else:
                raise ConfigError(f"{where}.source.kind must be zero or model_token, got {kind!r}.")
        else:
            out[str(tok)] = TokenSource("model", resolve_model(src, f"{where}.source"), force=force)
    return out


_TMP: list[Path] = []


def _tmp_root() -> Path:
    if not _TMP:
        root = Path(tempfile.mkdtemp(prefix="fb_mergekit_vocab_"))
        atexit.register(lambda r=root: shutil.rmtree(r, ignore_errors=True))
        _TMP.append(root)
    return _TMP[0]


def _weight_files(path: Path) -> dict[str, str]:
    """tensor name -> shard file name of a safetensors checkpoint folder."""
    from safetensors import safe_open

    idx = path / "model.safetensors.index.json"
    if idx.exists():
        return dict(json.loads(idx.read_text())["weight_map"])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no safetensors checkpoint; the tokenizer settings need safetensors models "
                              "(re-save the model with safe_serialization=True).")
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = f.name
    return out


def _read(path: Path, fname: str, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path / fname), "pt") as h:
        return h.get_tensor(key)


def align_models(models: dict[str, str], base_path: str | None, source: str, tokens: dict[str, TokenSource],
                 pad_to_multiple_of: int | None, dtype: str | None, embedding_patterns: list[str],
                 contributors: dict[str, list[str]] | None = None):
    """Write each model with its vocabulary tensors aligned to the output tokenizer; returns
    (name -> aligned folder, tokenizer, output vocab size). ``base_path``: mergekit's base_model (its rows fill
    the tokens other models lack; None: no base, the first model's tokenizer is the base tokenizer).
    ``contributors``: as mergekit, the default rows of a tensor come from the models that feed it: {'pre': the
    first slice's models (embeddings), 'post': the last slice's (output head)}; None: every model, in
    mergekit's order (the config's models, then the base when it is not listed)."""
    import fnmatch

    from safetensors.torch import save_file

    paths = list(dict.fromkeys(models.values()))
    base = base_path if base_path is not None else paths[0]
    order = [base] + [p for p in paths if p != base]
    tok, vocabs = build_output_tokenizer(source, base, order, list(tokens))
    vocab_out = tok.get_vocab()
    n = len(vocab_out)
    size = n if not pad_to_multiple_of or n % pad_to_multiple_of == 0 else n + pad_to_multiple_of - n % pad_to_multiple_of
    perms = {}
    for p in order:
        vs = _config_vocab_size(p) or len(vocabs[p])
        perms[p] = permutation(vocab_out, vocabs[p], vs)
    files = {p: _weight_files(Path(p)) for p in order}
    keys = [k for k in files[base] if any(fnmatch.fnmatchcase(k, pat) for pat in embedding_patterns)]
    cast = _DTYPES.get(str(dtype)) if dtype else None
    aligned: dict[str, dict[str, torch.Tensor]] = {p: {} for p in order}
    mk_order = [p for p in paths if p != base_path] + ([base_path] if base_path in paths else [])
    for k in keys:
        kind = "post" if k.startswith(("lm_head", "embed_out")) else "pre"
        feeds = contributors[kind] if contributors else mk_order
        groups = [[p for p in feeds if k in files.get(p, {})]]
        groups += [[p] for p in paths if p not in groups[0] and k in files[p]]  # unused by the merge; sized alike
        for have in groups:
            if not have:
                continue
            ts = {}
            for p in have:
                t = _read(Path(p), files[p][k], k)
                ts[p] = t.to(cast) if cast is not None else t
            res = align_rows(ts, vocab_out, {p: perms[p] for p in have}, vocabs, tokens,
                             base_path, pad_to_multiple_of)
            for p, t in res.items():
                aligned[p][k] = t.contiguous()
    root = _tmp_root()
    out: dict[str, str] = {}
    done: dict[str, str] = {}
    for name, p in models.items():
        if p in done:
            out[name] = done[p]
            continue
        d = Path(tempfile.mkdtemp(prefix="m_", dir=root))
        src = Path(p)
        for f in src.iterdir():
            if f.name in TOKENIZER_FILES or f.name in ("config.json", "model.safetensors.index.json") or f.is_dir():
                continue
            os.symlink(f.resolve(), d / f.name)
        by_file: dict[str, list[str]] = {}
        for k, fname in files[p].items():
            by_file.setdefault(fname, []).append(k)
        for fname, ks in by_file.items():
            if (d / fname).is_symlink():
                (d / fname).unlink()
            if any(k in aligned[p] for k in ks):  # that shard is rewritten with the aligned tensors in it
                from safetensors import safe_open

                with safe_open(str(src / fname), "pt") as h:
                    ts = {k: (aligned[p][k] if k in aligned[p] else h.get_tensor(k)) for k in ks}
                save_file(ts, str(d / fname), metadata={"format": "pt"})
            else:
                os.symlink((src / fname).resolve(), d / fname)
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": files[p]}))
        cfg = json.loads((src / "config.json").read_text()) if (src / "config.json").exists() else {}
        if isinstance(cfg.get("text_config"), Mapping) and "vocab_size" not in cfg:
            cfg["text_config"]["vocab_size"] = size
        else:
            cfg["vocab_size"] = size
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        out[name] = done[p] = str(d)
    return out, tok, size
