"""fusion_bench.data.lm_text: text sources and calibration windows; the byte tokenizer of testing.tiny_lm."""

from __future__ import annotations

import json

import pytest
import torch

from fusion_bench.data.lm_text import (
    builtin_paragraphs,
    calibration_batches,
    load_texts,
    texts_sha256,
    tokenize_joined,
)
from fusion_bench.errors import CheckpointError, ConfigError
from fusion_bench.testing.tiny_lm import byte_tokenizer


def test_builtin_is_sizeable_and_split_disjoint():
    allp = load_texts("builtin")
    assert sum(len(p) for p in allp) > 20_000
    assert len(set(allp)) == len(allp) >= 50
    train, test = load_texts("builtin", split="train"), load_texts("builtin", split="test")
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(allp)
    assert test == [p for i, p in enumerate(allp) if i % 5 == 4]
    assert load_texts("builtin", max_texts=3) == allp[:3]
    with pytest.raises(ConfigError, match="no split 'valid'"):
        builtin_paragraphs("valid")


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nline two\n\n\n  \nsecond para\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["first para\nline two", "second para"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x y"}) + "\n\n" + json.dumps({"text": " "}) + "\n"
                                      + json.dumps({"text": "z"}) + "\n")
    assert load_texts(str(tmp_path / "b.jsonl")) == ["x y", "z"]
    (tmp_path / "c.json").write_text(json.dumps([{"body": "one"}, {"body": "two"}]))
    assert load_texts(str(tmp_path / "c.json"), field="body") == ["one", "two"]
    with pytest.raises(ConfigError, match="no field 'text'"):
        load_texts(str(tmp_path / "c.json"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_texts("./missing.txt")
    with pytest.raises(ConfigError, match="has no split"):
        load_texts(str(tmp_path / "a.txt"), split="test")


def test_saved_dataset_folder(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b", "", "c"]}),
                               "test": datasets.Dataset.from_dict({"text": ["t1", "t2"]})})
    dd.save_to_disk(str(tmp_path / "ds"))
    assert load_texts(str(tmp_path / "ds"), split="train") == ["a b", "c"]
    assert load_texts(str(tmp_path / "ds"), split="test[:1]") == ["t1"]
    with pytest.raises(ConfigError, match="choose one with split"):
        load_texts(str(tmp_path / "ds"))


def test_hub_id_offline_is_one_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    with pytest.raises(CheckpointError, match="wikitext") as e:
        load_texts("wikitext:wikitext-2-raw-v1", split="test")
    assert "\n" not in str(e.value).split(" Check the id")[0]


def test_byte_tokenizer_round_trip():
    tok = byte_tokenizer()
    text = "Héllo, wörld\n\ttabs"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == 256
    assert ids[1:] == list(text.encode("utf-8"))
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_calibration_windows_match_reference():
    tok = byte_tokenizer()
    texts = load_texts("builtin", split="train")
    out = calibration_batches(tok, texts, n_samples=5, seq_len=32, seed=3)
    assert out.shape == (5, 32) and out.dtype == torch.long
    # reference: the joined text's bytes, windows at torch.randint offsets from the seed
    data = list("\n\n".join(texts).encode("utf-8"))
    g = torch.Generator().manual_seed(3)
    starts = torch.randint(0, len(data) - 32 + 1, (5,), generator=g).tolist()
    assert out.tolist() == [data[s:s + 32] for s in starts]
    assert torch.equal(out, calibration_batches(tok, texts, n_samples=5, seq_len=32, seed=3))
    assert not torch.equal(out, calibration_batches(tok, texts, n_samples=5, seq_len=32, seed=4))
    assert tokenize_joined(tok, ["ab", "c"]).tolist() == [97, 98, 10, 10, 99]
    with pytest.raises(ConfigError, match="fewer than seq_len"):
        calibration_batches(tok, ["short"], n_samples=1, seq_len=64, seed=0)


def test_texts_sha256_distinguishes_boundaries():
    assert texts_sha256(["ab", "c"]) != texts_sha256(["a", "bc"])
    assert texts_sha256(["ab"]) == texts_sha256(["ab"])
