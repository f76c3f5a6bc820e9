"""Dataset references (fusion_bench.data.load_dataset_ref), fingerprints, column detection, image caches."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from fusion_bench.data import dataset_fingerprint, find_image_column, find_label_column, load_dataset_ref
from fusion_bench.errors import CheckpointError, ConfigError


def _dd() -> datasets.DatasetDict:
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    return datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(10)], "label": [i % 2 for i in range(10)]},
                                            features=feats),
        "test": datasets.Dataset.from_dict({"text": [f"s{i}" for i in range(6)], "label": [1, 0, 1, 1, 0, 0]},
                                           features=feats),
    })


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    _dd().save_to_disk(str(root / "dd"))
    _dd()["test"].save_to_disk(str(root / "single"))
    return root


def test_local_dataset_dict_and_splits(saved):
    dd = load_dataset_ref(str(saved / "dd"))
    assert isinstance(dd, datasets.DatasetDict) and set(dd) == {"train", "test"}
    test = load_dataset_ref(str(saved / "dd"), split="test")
    assert isinstance(test, datasets.Dataset) and test["text"] == [f"s{i}" for i in range(6)]
    assert load_dataset_ref(str(saved / "dd"), split="train[2:5]")["text"] == ["t2", "t3", "t4"]
    assert load_dataset_ref(str(saved / "dd"), split="train[:2]")["text"] == ["t0", "t1"]
    assert load_dataset_ref(str(saved / "dd"), split="train[-2:]")["text"] == ["t8", "t9"]
    # a mapping; its split wins over the argument
    m = load_dataset_ref({"path": str(saved / "dd"), "split": "test[:3]"}, split="train")
    assert m["text"] == ["s0", "s1", "s2"]
    # a single saved Dataset: returned whatever split is asked (a row slice still applies)
    assert len(load_dataset_ref(str(saved / "single"), split="test")) == 6
    assert len(load_dataset_ref(str(saved / "single"), split="test[:4]")) == 4
    # objects pass through
    obj = _dd()
    assert load_dataset_ref(obj, split="train") is obj["train"]


def test_data_files(tmp_path):
    ds = _dd()["train"]
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.to_csv(str(tmp_path / "a.csv"), index=False)
    ds.to_json(str(tmp_path / "a.jsonl"))
    for name in ("a.parquet", "a.csv", "a.jsonl"):
        got = load_dataset_ref(str(tmp_path / name), split="test[:3]")
        assert got["text"] == ["t0", "t1", "t2"], name


def test_errors_name_the_dataset_and_fix(saved, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"no split 'tset'.*Did you mean 'test'"):
        load_dataset_ref(str(saved / "dd"), split="tset")
    with pytest.raises(ConfigError, match=r"Unknown key 'splt'.*'split'"):
        load_dataset_ref({"path": str(saved / "dd"), "splt": "test"})
    with pytest.raises(ConfigError, match="has no 'path'"):
        load_dataset_ref({"split": "test"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataset_ref(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="unknown file type"):
        (tmp_path / "x.xyz").write_text("1")
        load_dataset_ref(str(tmp_path / "x.xyz"))
    with pytest.raises(ConfigError, match="must be a path"):
        load_dataset_ref(3)
    # a Hub id with the Hub unreachable (offline in the tests): CheckpointError naming the id and the fix
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"Dataset 'tanganke/sun397_missing'.*save_to_disk"):
        load_dataset_ref("tanganke/sun397_missing", split="test")


def test_fingerprint_follows_content(saved, tmp_path):
    a = load_dataset_ref(str(saved / "dd"), split="test")
    b = load_dataset_ref(str(saved / "dd"), split="test")
    assert dataset_fingerprint(a) == dataset_fingerprint(b)
    assert dataset_fingerprint(a) != dataset_fingerprint(load_dataset_ref(str(saved / "dd"), split="train"))
    assert dataset_fingerprint(a) != dataset_fingerprint(a.select(range(3)))
    # a saved copy is stable across loads; changed rows (on disk or in memory over the same files) differ
    a.save_to_disk(str(tmp_path / "copy"))
    copy_fp = dataset_fingerprint(load_dataset_ref(str(tmp_path / "copy")))
    assert copy_fp == dataset_fingerprint(load_dataset_ref(str(tmp_path / "copy")))
    changed = a.map(lambda r: {"text": r["text"] + "!"})
    changed.save_to_disk(str(tmp_path / "changed"))
    assert dataset_fingerprint(load_dataset_ref(str(tmp_path / "changed"))) not in (copy_fp, dataset_fingerprint(a))
    in_memory = a.map(lambda r: {"text": r["text"] + "!"}, keep_in_memory=True)
    assert dataset_fingerprint(in_memory) != dataset_fingerprint(a)


def test_column_detection():
    from PIL import Image

    feats = datasets.Features({"idx": datasets.Value("int64"), "picture": datasets.Image(),
                               "y": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"idx": [0], "picture": [Image.new("RGB", (2, 2))], "y": [1]}, features=feats)
    assert find_image_column(ds) == "picture" and find_label_column(ds) == "y"
    plain = datasets.Dataset.from_dict({"img": [[0]], "label": [0]})
    assert find_image_column(plain) == "img" and find_label_column(plain) == "label"
    with pytest.raises(ConfigError, match="no column 'image'.*picture"):
        find_image_column(ds, "image")
    with pytest.raises(ConfigError, match="cannot find the label column"):
        find_label_column(datasets.Dataset.from_dict({"a": [1]}))


def test_preprocessed_images_cache(tmp_path):
    from PIL import Image

    from fusion_bench.data import images as cache

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    ims = [Image.new("L", (4, 4), color=i * 20) for i in range(9)]  # grey images are converted to RGB
    ds = datasets.Dataset.from_dict({"image": ims, "label": [i % 3 for i in range(9)]}, features=feats)

    def to_tensor(im):
        return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 255

    cache.clear_memory_cache()
    s0 = dict(cache.STATS)
    data = cache.preprocessed_images(ds, to_tensor, image_column="image", label_column="label",
                                     cache_dir=tmp_path, batch_size=4)
    px, y = data.all(), data.labels
    assert data.scale is None and px.shape == (9, 3, 4, 4) and y.tolist() == [i % 3 for i in range(9)]
    for i in range(9):
        assert torch.allclose(px[i], torch.full((3, 4, 4), i * 20 / 255))
    assert cache.STATS["decoded"] == s0["decoded"] + 1
    cache.preprocessed_images(ds, to_tensor, image_column="image", label_column="label", cache_dir=tmp_path)
    assert cache.STATS["memory_hits"] == s0["memory_hits"] + 1
    cache.clear_memory_cache()
    px2 = cache.preprocessed_images(ds, to_tensor, image_column="image", label_column="label", cache_dir=tmp_path).all()
    assert cache.STATS["disk_hits"] == s0["disk_hits"] + 1 and torch.equal(px, px2)
    subset = cache.preprocessed_images(ds, to_tensor, image_column="image", label_column="label",
                                       cache_dir=tmp_path, max_samples=3)
    sub, ysub = subset.all(), subset.labels
    assert ysub.tolist() == [0, 0, 0] and torch.equal(sub, px[[0, 3, 6]])  # rows 0, 3, 6
    assert cache.STATS["decoded"] == s0["decoded"] + 2


def test_modelpool_dataset(saved):
    from fusion_bench.modelpool import ModelPool

    pool = ModelPool({"a": {"w": torch.zeros(1)}},
                     datasets={"sst": {"train": str(saved / "dd"), "test": {"path": str(saved / "dd"), "split": "test[:2]"}}})
    assert len(pool.dataset("sst", "train")) == 10
    assert pool.dataset("sst", "test")["text"] == ["s0", "s1"]
    with pytest.raises(ConfigError, match="no split 'val'"):
        pool.dataset("sst", "val")
    # a task given one reference: the split is chosen from it
    pool2 = ModelPool({"a": {"w": torch.zeros(1)}}, datasets={"sst": str(saved / "dd"), "p": {"path": str(saved / "dd")}})
    assert len(pool2.dataset("sst", "test")) == 6 and len(pool2.dataset("p", "train")) == 10
    with pytest.raises(ConfigError, match="no split 'val'"):
        pool2.dataset("p", "val")


def test_hf_processor_cached_as_uint8_equals_processor(tmp_path):
    """A resize/crop/rescale/normalise processor: uint8 cache, batches equal the processor's output."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    from fusion_bench.data import images as cache

    rng = np.random.default_rng(0)
    proc = CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 16, "width": 16})
    ims = [Image.fromarray(rng.integers(0, 255, (24 + i, 30, 3), dtype=np.uint8)) for i in range(7)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"image": ims, "label": [i % 2 for i in range(7)]}, features=feats)
    data = cache.preprocessed_images(ds, proc, image_column="image", label_column="label", cache_dir=tmp_path,
                                     batch_size=3)
    expected = proc(images=ims, return_tensors="pt")["pixel_values"]
    assert data.pixels.dtype == torch.uint8 and data.shape == (7, 3, 16, 16)
    torch.testing.assert_close(data.all(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(data.batch(2, 5), expected[2:5], atol=1e-5, rtol=0)
    px, y = data  # unpacks as (float32 inputs, labels)
    torch.testing.assert_close(px, expected, atol=1e-5, rtol=0)
    assert y.tolist() == [i % 2 for i in range(7)]
    cache.clear_memory_cache()
    again = cache.preprocessed_images(ds, proc, image_column="image", label_column="label", cache_dir=tmp_path)
    assert again.pixels.dtype == torch.uint8 and torch.equal(again.pixels, data.pixels)
    torch.testing.assert_close(again.all(), expected, atol=1e-5, rtol=0)
