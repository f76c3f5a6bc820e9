"""Checkpoint sources and atomic outputs."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fusion_bench.errors import CheckpointError
from fusion_bench.io import (
    SafetensorsSource,
    StateDictSource,
    TorchFileSource,
    atomic_dir,
    atomic_file,
    atomic_path,
    open_checkpoint,
)


def _sd():
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(3, 2, generator=g), "a.bias": torch.randn(2, generator=g).to(torch.bfloat16),
            "ids": torch.arange(4)}


def test_safetensors_single_and_sharded(tmp_path):
    sd = _sd()
    save_file(sd, tmp_path / "m.safetensors")
    src = open_checkpoint(tmp_path / "m.safetensors", "m")
    assert isinstance(src, SafetensorsSource)
    assert set(src.keys()) == set(sd)
    for k, v in sd.items():
        assert src.meta(k).shape == tuple(v.shape) and src.meta(k).dtype == v.dtype
        assert torch.equal(src.get(k), v)
    # sharded folder with index
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({"b.weight": sd["b.weight"]}, d / "model-00001-of-00002.safetensors")
    save_file({"a.bias": sd["a.bias"], "ids": sd["ids"]}, d / "model-00002-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "b.weight": "model-00001-of-00002.safetensors", "a.bias": "model-00002-of-00002.safetensors",
        "ids": "model-00002-of-00002.safetensors"}}))
    s2 = open_checkpoint(d, "sh")
    assert set(s2.keys()) == set(sd) and torch.equal(s2.get("a.bias"), sd["a.bias"])
    assert s2.content_hash() != src.content_hash()
    with pytest.raises(CheckpointError, match="Model 'sh' has no tensor 'a.bais'.*Did you mean 'a.bias'"):
        s2.get("a.bais")


def test_torch_file_source(tmp_path):
    sd = _sd()
    torch.save(sd, tmp_path / "m.bin")
    src = open_checkpoint(tmp_path / "m.bin", "m")
    assert isinstance(src, TorchFileSource)
    assert all(torch.equal(src.get(k), v) for k, v in sd.items())
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pt")
    assert set(open_checkpoint(tmp_path / "ckpt.pt").keys()) == set(sd)
    torch.save([1, 2], tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="does not hold a mapping"):
        open_checkpoint(tmp_path / "bad.pt", "bad")


def test_missing_and_unknown_format(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope.safetensors", "x")
    (tmp_path / "w.xyz").write_text("")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        open_checkpoint(tmp_path / "w.xyz", "x")


def test_state_dict_hash_depends_on_content():
    a, b = _sd(), _sd()
    assert StateDictSource(a).content_hash() == StateDictSource(b).content_hash()
    b["b.weight"][0, 0] += 1
    assert StateDictSource(a).content_hash() != StateDictSource(b).content_hash()


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "f.txt").write_text("partial")
            raise RuntimeError("crash")
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(dest) as tmp:
        (tmp / "f.txt").write_text("ok")
    assert (dest / "f.txt").read_text() == "ok"
    # replacing an existing folder
    with atomic_dir(dest) as tmp:
        (tmp / "g.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["g.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_file_and_path(tmp_path):
    with pytest.raises(ValueError):
        with atomic_file(tmp_path / "r.json", "w") as f:
            f.write("{")
            raise ValueError
    assert list(tmp_path.iterdir()) == []
    with atomic_path(tmp_path / "m.safetensors") as p:
        save_file({"x": torch.ones(2)}, str(p))
    assert [x.name for x in tmp_path.iterdir()] == ["m.safetensors"]
