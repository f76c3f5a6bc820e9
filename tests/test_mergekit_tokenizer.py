"""mergekit's tokenizer settings in ``fusion_bench mergekit``: union / base / model vocabularies, ``tokens``
overrides and ``pad_to_multiple_of``, checked against a naive per-token reference written from mergekit 0.1.5's
documented rules (the output vocabulary by token strings, each model's row of a token it lacks, the linear merge of
the aligned rows)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.test_streaming_helpers import load_sd, make_model, tiny_config

#: (name, regular tokens in id order, added special tokens, config vocab_size or None = all, seed)
TOKEN_ZOO = {
    "base": (["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 30)], [], None, 0),
    "ft0": (["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(29, 14, -1)] + [f"x{i}" for i in range(10)],
            ["<extra_0>"], None, 1),
    # x12 has id 27 >= vocab_size 27: an unused tokenizer entry, skipped by mergekit
    "ft1": (["<unk>", "<s>", "</s>"] + [f"w{i}" for i in (7, 3, 12, 20, 5, 18, 4, 9, 16, 11, 6, 14, 19, 8, 10, 13,
                                                           15, 17)] + [f"x{i}" for i in range(4, 10)] + ["x12"],
            [], 27, 2),
}


def build_token_zoo(root: Path) -> dict[str, str]:
    """Three tiny Llama models whose word-level tokenizers overlap in part (different ids, own tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out = {}
    for name, (words, added, vsize, seed) in TOKEN_ZOO.items():
        d = root / name
        out[name] = str(d)
        if (d / "config.json").exists():
            continue
        tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        if added:
            tok.add_special_tokens({"additional_special_tokens": added})
        n = vsize or len(words) + len(added)
        m = make_model(tiny_config("llama", n, layers=2), seed)
        m.save_pretrained(d)
        tok.save_pretrained(d)
    return out


def _vocab(name: str) -> dict[str, int]:
    words, added, vsize, _ = TOKEN_ZOO[name]
    v = {w: i for i, w in enumerate(words + added)}
    n = vsize or len(v)
    return {w: i for w, i in v.items() if i < n}


def _union(order: list[str]) -> list[str]:
    """mergekit's union ids: base's tokenizer, the others' regular tokens by id, then added tokens."""
    out = list(_full_vocab(order[0]))  # the base keeps its whole tokenizer
    added = []
    for n in order:
        words, add, _, _ = TOKEN_ZOO[n]
        for w, _i in sorted(_vocab(n).items(), key=lambda kv: kv[1]):
            if w in add:
                if w not in added:
                    added.append(w)
            elif w not in out:
                out.append(w)
    return out + [a for a in added if a not in out]


def _full_vocab(name: str) -> list[str]:
    words, added, _, _ = TOKEN_ZOO[name]
    return words + added


def _reference_rows(paths, order, out_tokens, key, base="base", tokens=None, pad=None):
    """Every model's aligned tensor, token by token, by mergekit's rules."""
    tokens = tokens or {}
    sds = {n: load_sd(paths[n])[key] for n in order}
    vocabs = {n: _vocab(n) for n in order}
    size = len(out_tokens)
    if pad and size % pad:
        size += pad - size % pad
    res = {n: torch.zeros(size, sds[n].shape[1]) for n in order}
    for i, t in enumerate(out_tokens):
        have = [n for n in order if t in vocabs[n]]
        spec = tokens.get(t)
        if spec is not None:
            kind, arg, force = spec
            if kind == "zero":
                default = torch.zeros(sds[order[0]].shape[1])
            elif kind == "model":
                default = sds[arg][vocabs[arg][t]]
            else:  # ("model_token", (model, token or id))
                m, ref = arg
                default = sds[m][ref if isinstance(ref, int) else vocabs[m][ref]]
        else:
            force = False
            if len(have) == 1:
                default = sds[have[0]][vocabs[have[0]][t]]
            elif not have:
                default = torch.zeros(sds[order[0]].shape[1])
            elif base in have:
                default = sds[base][vocabs[base][t]]
            else:
                default = sum(sds[n][vocabs[n][t]] for n in have) / len(have)
        for n in order:
            res[n][i] = sds[n][vocabs[n][t]] if (t in vocabs[n] and not force) else default
    if size > len(out_tokens):
        for n in order:
            res[n][len(out_tokens):] = res[n][:len(out_tokens)].mean(0)
    return res


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_token_zoo(tmp_path_factory.mktemp("tokzoo"))


def _run(tmp_path, doc, name="out"):
    from fusion_bench.compat.mergekit import main

    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / name
    assert main([str(cfg), str(out)]) == 0
    return out


def _linear_doc(zoo, names, weights, **extra):
    return {"merge_method": "linear", "base_model": zoo["base"], "dtype": "float32",
            "models": [{"model": zoo[n], "parameters": {"weight": w}} for n, w in zip(names, weights)], **extra}


def _check(out, zoo, names, weights, out_tokens, **kw):
    from transformers import AutoTokenizer

    got_tok = AutoTokenizer.from_pretrained(str(out))
    assert got_tok.get_vocab() == {t: i for i, t in enumerate(out_tokens)}
    sd = load_sd(out)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = _reference_rows(zoo, names, out_tokens, key, **kw)
        want = sum(w * rows[n] for n, w in zip(names, weights)) / sum(weights)
        torch.testing.assert_close(sd[key], want, rtol=1e-6, atol=1e-6)
    import json

    assert json.loads((out / "config.json").read_text())["vocab_size"] == sd["lm_head.weight"].shape[0]
    # the backbone is merged as usual
    other = {n: load_sd(zoo[n])["model.layers.0.mlp.up_proj.weight"] for n in names}
    want = sum(w * other[n] for n, w in zip(names, weights)) / sum(weights)
    torch.testing.assert_close(sd["model.layers.0.mlp.up_proj.weight"], want)


def test_union_three_models(zoo, tmp_path):
    names, weights = ["base", "ft0", "ft1"], [0.5, 0.3, 0.2]
    out = _run(tmp_path, _linear_doc(zoo, names, weights, tokenizer_source="union"))
    union = _union(names)
    assert "x12" not in union and union[-1] == "<extra_0>" and union[:30] == _full_vocab("base")
    _check(out, zoo, names, weights, union)


def test_tokenizer_block_default_is_union(zoo, tmp_path):
    names, weights = ["base", "ft0"], [1.0, 1.0]
    out = _run(tmp_path, _linear_doc(zoo, names, weights, tokenizer={}))
    _check(out, zoo, names, weights, _union(names))


def test_source_base_and_model(zoo, tmp_path):
    names, weights = ["base", "ft0", "ft1"], [0.2, 0.5, 0.3]
    out = _run(tmp_path, _linear_doc(zoo, names, weights, tokenizer_source="base"), "b")
    _check(out, zoo, names, weights, _full_vocab("base"))
    out = _run(tmp_path, _linear_doc(zoo, names, weights, tokenizer={"source": zoo["ft0"]}), "m")
    _check(out, zoo, names, weights, _full_vocab("ft0"))


def test_tokens_overrides_and_padding(zoo, tmp_path):
    names, weights = ["base", "ft0", "ft1"], [0.4, 0.4, 0.2]
    tokens = {"<s>": {"source": {"kind": "zero"}, "force": True},
              "x5": {"source": zoo["ft1"]},
              "w20": {"source": {"kind": "model_token", "model": zoo["ft0"], "token_id": 7}, "force": True},
              "brand_new": {"source": {"kind": "model_token", "model": zoo["base"], "token": "w5"}}}
    doc = _linear_doc(zoo, names, weights, tokenizer={"source": "union", "tokens": tokens, "pad_to_multiple_of": 16})
    out = _run(tmp_path, doc)
    union = _union(names) + ["brand_new"]
    ref_tokens = {"<s>": ("zero", None, True), "x5": ("model", "ft1", False),
                  "w20": ("model_token", ("ft0", 7), True), "brand_new": ("model_token", ("base", "w5"), False)}
    _check(out, zoo, names, weights, union, tokens=ref_tokens, pad=16)
    assert load_sd(out)["lm_head.weight"].shape[0] == 48


@pytest.mark.parametrize("tokens, msg", [
    ({"a": {"source": {"kind": "model_token", "model": "M", "token": "w3", "token_id": 3}}}, "exactly one"),
    ({"a": {"source": {"kind": "mean"}}}, "zero or model_token"),
    ({"a": {"force": "yes"}}, "force"),
    ({"a": {"source": "/nonexistent/model"}}, "not one of the merged models"),
])
def test_token_errors(zoo, tmp_path, tokens, msg):
    from fusion_bench.compat.mergekit import load_mergekit_config
    from fusion_bench.errors import ConfigError

    for v in tokens.values():
        src = v.get("source")
        if isinstance(src, dict) and src.get("model") == "M":
            src["model"] = zoo["base"]
    doc = _linear_doc(zoo, ["base", "ft0"], [1.0, 1.0], tokenizer={"tokens": tokens})
    with pytest.raises(ConfigError, match=msg):
        load_mergekit_config(doc)


def test_pad_must_be_positive(zoo):
    from fusion_bench.compat.mergekit import load_mergekit_config
    from fusion_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="pad_to_multiple_of"):
        load_mergekit_config(_linear_doc(zoo, ["base", "ft0"], [1.0, 1.0], tokenizer={"pad_to_multiple_of": 0}))


def test_passthrough_rows_from_the_slice_models_only(zoo, tmp_path):
    """mergekit fills a token's row from the models that feed that tensor: the embeddings from the first slice's
    model, the head from the last slice's; a token the feeding model lacks is zero there."""
    doc = {"merge_method": "passthrough", "base_model": zoo["base"], "dtype": "float32", "tokenizer_source": "union",
           "slices": [{"sources": [{"model": zoo["ft0"], "layer_range": [0, 1]}]},
                      {"sources": [{"model": zoo["ft1"], "layer_range": [1, 2]}]}]}
    out = _run(tmp_path, doc)
    union = _union(["base", "ft0", "ft1"])
    sd = load_sd(out)
    for key, src in (("model.embed_tokens.weight", "ft0"), ("lm_head.weight", "ft1")):
        want = _reference_rows(zoo, [src], union, key)[src]
        torch.testing.assert_close(sd[key], want, rtol=0, atol=0)
        assert (want.abs().sum(1) == 0).any()  # some tokens are missing from that model: zero rows
