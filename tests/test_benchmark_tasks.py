"""Tests of the offline benchmark tasks (fusion_bench.benchmark.tasks / corruptions / sources)."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re

import datasets
import numpy as np
import pytest
from PIL import Image

from fusion_bench.benchmark import sources
from fusion_bench.benchmark.corruptions import (
    CORRUPTIONS,
    SEVERITY_PARAMS,
    build_corrupted_test,
    convolve,
    corrupt_image,
    disk_kernel,
    motion_kernel,
)
from fusion_bench.benchmark.tasks import (
    IMAGE_SIZE,
    TASK_NAMES,
    TaskSpec,
    build_task_dataset,
    dataset_hash,
    get_task_spec,
    list_tasks,
    load_task,
    load_task_meta,
    pretraining_pairs,
    save_task,
    split_sizes,
    web_images,
)
from fusion_bench.errors import ConfigError


def _digest(img: Image.Image) -> str:
    return hashlib.sha1(img.convert("RGB").tobytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny() -> dict[str, datasets.DatasetDict]:
    return {name: build_task_dataset(name, "tiny", seed=0) for name in TASK_NAMES}


# ---- specs ----------------------------------------------------------------------------------------


def test_task_names_and_specs():
    assert len(TASK_NAMES) == 8 and len(set(TASK_NAMES)) == 8
    assert list_tasks()[:8] == list(TASK_NAMES)
    counts = set()
    for name in list_tasks():
        spec = get_task_spec(name)
        assert isinstance(spec, TaskSpec) and spec.name == name
        assert len(set(spec.classnames)) == len(spec.classnames) >= 10
        assert all(c.strip() == c and c for c in spec.classnames)
        assert len(spec.templates) >= 4 and all(t.count("{}") == 1 for t in spec.templates)
        assert spec.description and spec.source
        counts.add(len(spec.classnames))
    assert len(counts) >= 4, "tasks should differ in their number of classes"


def test_unknown_task_and_scale_errors():
    with pytest.raises(ConfigError, match="Did you mean 'letters'"):
        get_task_spec("leters")
    with pytest.raises(ConfigError, match="scale"):
        build_task_dataset("shapes", scale="huge")
    with pytest.raises(ConfigError, match="seed"):
        build_task_dataset("shapes", scale="tiny", seed=-1)


def test_split_sizes():
    assert split_sizes("textures", "full") == {"train": 3000, "validation": 500, "test": 1000}
    tiny = split_sizes("signs", "tiny")
    n = get_task_spec("signs").num_classes
    assert tiny["train"] >= 2 * n and tiny["test"] >= n


# ---- builds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASK_NAMES)
def test_tiny_build_structure(tiny, name):
    dd = tiny[name]
    spec = get_task_spec(name)
    assert list(dd) == ["train", "validation", "test"]
    assert {s: len(dd[s]) for s in dd} == split_sizes(name, "tiny")
    for split in dd:
        ds = dd[split]
        assert isinstance(ds.features["image"], datasets.Image)
        label = ds.features["label"]
        assert isinstance(label, datasets.ClassLabel)
        assert label.names == list(spec.classnames) and label.num_classes == len(spec.classnames)
        assert set(ds["label"]) == set(range(len(spec.classnames))), f"{name}/{split} misses a class"
        for im in ds["image"][:8]:
            assert im.mode == "RGB" and im.size == (IMAGE_SIZE, IMAGE_SIZE)
    digests = {s: {_digest(im) for im in dd[s]["image"]} for s in dd}
    assert not digests["train"] & digests["test"], f"{name}: an image is in train and test"
    assert not digests["train"] & digests["validation"]
    assert not digests["validation"] & digests["test"]
    # not a constant image generator: most images in a split are distinct
    assert len(digests["train"]) >= 0.9 * len(dd["train"])


@pytest.mark.parametrize("name", ["letters", "fashion", "digits", "textures"])
def test_build_is_deterministic(tiny, name):
    again = build_task_dataset(name, "tiny", seed=0)
    assert dataset_hash(again) == dataset_hash(tiny[name])
    other = build_task_dataset(name, "tiny", seed=1)
    assert dataset_hash(other) != dataset_hash(tiny[name])


def test_all_images_have_size_and_mode_after_decode(tiny):
    for name, dd in tiny.items():
        for im in dd["test"]["image"]:
            arr = np.asarray(im)
            assert arr.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and arr.dtype == np.uint8, name
            assert arr.std() > 0, f"{name}: a blank image"


# ---- storage -----------------------------------------------------------------------------------


def test_save_and_load_roundtrip(tmp_path):
    path = save_task("shapes", tmp_path, "tiny", seed=3)
    assert path == tmp_path / "shapes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"], "a temporary folder was left behind"
    meta = load_task_meta("shapes", tmp_path)
    assert meta["scale"] == "tiny" and meta["seed"] == 3 and meta["spec"]["classnames"] == list(get_task_spec("shapes").classnames)
    dd = load_task("shapes", tmp_path, verify=True)
    assert dataset_hash(dd) == meta["content_hash"] == dataset_hash(build_task_dataset("shapes", "tiny", 3))
    # a matching build is kept, not rebuilt
    mtime = os.stat(path / "task.json").st_mtime_ns
    save_task("shapes", tmp_path, "tiny", seed=3)
    assert os.stat(path / "task.json").st_mtime_ns == mtime
    # a different seed replaces it
    save_task("shapes", tmp_path, "tiny", seed=4)
    assert load_task_meta("shapes", tmp_path)["seed"] == 4
    # tampering is detected
    meta = load_task_meta("shapes", tmp_path)
    meta["content_hash"] = "0" * 64
    (path / "task.json").write_text(json.dumps(meta))
    with pytest.raises(sources.DataSourceError, match="content hash"):
        load_task("shapes", tmp_path, verify=True)
    with pytest.raises(sources.DataSourceError, match="save_task"):
        load_task("textures", tmp_path)


# ---- Fashion-MNIST source ------------------------------------------------------------------------


def _write_idx(path, arr: np.ndarray, code: int, dtype: str, compress: bool) -> None:
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.astype(dtype).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def test_read_idx(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 4, 3)).astype(np.uint8)
    _write_idx(tmp_path / "a-idx3-ubyte.gz", imgs, 0x08, "u1", True)
    np.testing.assert_array_equal(sources.read_idx(tmp_path / "a-idx3-ubyte.gz"), imgs)
    ints = np.array([-3, 7, 100000, 0], dtype=np.int64)
    _write_idx(tmp_path / "b-idx1", ints, 0x0C, ">i4", False)
    got = sources.read_idx(tmp_path / "b-idx1")
    np.testing.assert_array_equal(got, ints)
    floats = np.array([[1.5, -2.25]])
    _write_idx(tmp_path / "c-idx2", floats, 0x0D, ">f4", False)
    np.testing.assert_array_equal(sources.read_idx(tmp_path / "c-idx2"), floats)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(sources.DataSourceError, match="magic"):
        sources.read_idx(tmp_path / "bad")
    raw = (tmp_path / "b-idx1").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-2])
    with pytest.raises(sources.DataSourceError, match="truncated"):
        sources.read_idx(tmp_path / "short")


@pytest.fixture
def fresh_fashion(monkeypatch):
    """Isolate the cached Fashion-MNIST loader (and the task pools built from it)."""
    from fusion_bench.benchmark import tasks

    monkeypatch.delenv("FUSION_BENCH_FASHION_MNIST_DIR", raising=False)
    sources.load_fashion_mnist.cache_clear()
    tasks._fashion_pools.cache_clear()
    yield
    sources.load_fashion_mnist.cache_clear()
    tasks._fashion_pools.cache_clear()


def test_fashion_idx_from_env_folder(tmp_path, monkeypatch, fresh_fashion):
    rng = np.random.default_rng(1)
    arrays = {}
    for split, (img_name, lab_name), n in (("train", sources._FASHION_FILES["train"], 12),
                                           ("test", sources._FASHION_FILES["test"], 6)):
        x = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(tmp_path / (img_name + ".gz"), x, 0x08, "u1", True)
        _write_idx(tmp_path / (lab_name + ".gz"), y, 0x08, "u1", True)
        arrays[split] = (x, y)
    monkeypatch.setattr(sources, "FASHION_MNIST_DIRS", ())
    monkeypatch.setenv("FUSION_BENCH_FASHION_MNIST_DIR", str(tmp_path))
    got = sources.load_fashion_mnist()
    for split in ("train", "test"):
        np.testing.assert_array_equal(got[split][0], arrays[split][0])
        np.testing.assert_array_equal(got[split][1], arrays[split][1])


def test_fashion_hub_fallback_and_error(tmp_path, monkeypatch, fresh_fashion):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIRS", (str(tmp_path / "absent"),))
    calls = []

    def offline(repo, *a, **k):
        calls.append(repo)
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(sources.DataSourceError) as err:
        sources.load_fashion_mnist()
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "hub" in msg and "absent" in msg
    assert calls == [sources.FASHION_MNIST_HUB_ID]
    with pytest.raises(sources.DataSourceError):
        build_task_dataset("fashion", "tiny")

    # the hub path, when it works, is used and converted to arrays
    sources.load_fashion_mnist.cache_clear()
    fake = datasets.DatasetDict({
        s: datasets.Dataset.from_dict(
            {"image": [Image.fromarray(np.full((28, 28), 10 * i, np.uint8)) for i in range(n)], "label": list(range(n))},
            features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}),
        )
        for s, n in (("train", 4), ("test", 3))
    })
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, *a, **k: fake)
    got = sources.load_fashion_mnist()
    assert got["train"][0].shape == (4, 28, 28) and got["test"][1].tolist() == [0, 1, 2]
    assert int(got["train"][0][3, 0, 0]) == 30


# ---- corruptions ---------------------------------------------------------------------------------


def _test_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    arr = np.stack([x * 8, y * 8, ((x // 4 + y // 4) % 2) * 200 + 20], -1) + rng.integers(0, 20, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def test_corruption_list():
    assert len(CORRUPTIONS) >= 5
    assert {"gaussian_noise", "impulse_noise", "motion_blur", "pixelate", "contrast", "jpeg_compression"} <= set(CORRUPTIONS)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_change_image_keep_size(name):
    img = _test_image()
    for sev in (1, 5):
        out = corrupt_image(img, name, sev, np.random.default_rng(0))
        assert out.size == img.size and out.mode == "RGB"
        assert np.abs(np.asarray(out, float) - np.asarray(img, float)).mean() > 0.5, (name, sev)
    a = corrupt_image(img, name, 3, 7)
    b = corrupt_image(img, name, 3, np.random.default_rng(7))
    assert a.tobytes() == b.tobytes(), "same seed must give the same corruption"
    # stronger severity moves the image further (on average over a few seeds)
    d1 = np.mean([np.abs(np.asarray(corrupt_image(img, name, 1, s), float) - np.asarray(img, float)).mean() for s in range(3)])
    d5 = np.mean([np.abs(np.asarray(corrupt_image(img, name, 5, s), float) - np.asarray(img, float)).mean() for s in range(3)])
    assert d5 > d1, name


def test_corruption_errors():
    with pytest.raises(ConfigError, match="Did you mean 'gaussian_noise'"):
        corrupt_image(_test_image(), "gausian_noise", 3, 0)
    with pytest.raises(ConfigError, match="1 to 5"):
        corrupt_image(_test_image(), "contrast", 6, 0)


def _naive_correlate(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    r = k.shape[0] // 2
    h, w, c = x.shape
    out = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            for a in range(k.shape[0]):
                for b in range(k.shape[1]):
                    ii = min(max(i + a - r, 0), h - 1)
                    jj = min(max(j + b - r, 0), w - 1)
                    out[i, j] += k[a, b] * x[ii, jj]
    return out


def test_blur_kernels_against_naive_reference():
    rng = np.random.default_rng(0)
    x = rng.random((6, 7, 2))
    for k in (motion_kernel(5, 0.7), disk_kernel(1.5)):
        assert math.isclose(k.sum(), 1.0) and (k >= 0).all()
        np.testing.assert_allclose(convolve(x, k), _naive_correlate(x, k), atol=1e-12)
    # a horizontal motion kernel is a centred horizontal line of the given length
    k = motion_kernel(5, 0.0)
    assert np.count_nonzero(k.sum(axis=1)) == 1 and np.count_nonzero(k[k.shape[0] // 2]) == 5
    # a disk kernel is symmetric under flips and transposition
    d = disk_kernel(2.0)
    np.testing.assert_allclose(d, d[::-1]) and np.testing.assert_allclose(d, d.T)


def test_contrast_and_noise_follow_their_formulas():
    img = _test_image()
    x = np.asarray(img, float) / 255
    c = SEVERITY_PARAMS["contrast"][2]
    expect = np.clip((x - x.mean()) * c + x.mean(), 0, 1)
    got = np.asarray(corrupt_image(img, "contrast", 3, 0), float) / 255
    assert np.abs(got - expect).max() <= 1 / 255 + 1e-9
    grey = Image.fromarray(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 128, np.uint8))
    noisy = np.asarray(corrupt_image(grey, "gaussian_noise", 3, 0), float) / 255 - 128 / 255
    assert abs(noisy.std() - SEVERITY_PARAMS["gaussian_noise"][2]) < 0.01 and abs(noisy.mean()) < 0.01
    imp = np.asarray(corrupt_image(grey, "impulse_noise", 5, 0))
    changed = imp != 128
    assert set(np.unique(imp[changed])) <= {0, 255}
    assert abs(changed.mean() - SEVERITY_PARAMS["impulse_noise"][4]) < 0.02


def test_build_corrupted_test(tiny):
    test = tiny["shapes"]["test"]
    bad = build_corrupted_test(test, "motion_blur", severity=4, seed=0)
    assert len(bad) == len(test) and bad["label"] == test["label"] and bad.features == test.features
    diffs = [np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() for a, b in zip(bad["image"], test["image"])]
    assert min(diffs) > 0
    again = build_corrupted_test(test, "motion_blur", severity=4, seed=0)
    assert [_digest(i) for i in again["image"]] == [_digest(i) for i in bad["image"]]
    with pytest.raises(ConfigError, match="image"):
        build_corrupted_test(test.rename_column("image", "img"), "contrast")


# ---- pre-training pairs --------------------------------------------------------------------------


def test_pretraining_pairs_use_train_only(tiny):
    tasks = ("shapes", "textures")
    pairs = pretraining_pairs("tiny", seed=0, tasks=tasks)
    assert len(pairs) == sum(split_sizes(t, "tiny")["train"] for t in tasks)
    held_out = {_digest(im) for t in tasks for s in ("validation", "test") for im in tiny[t][s]["image"]}
    train = {_digest(im) for t in tasks for im in tiny[t]["train"]["image"]}
    for img, cap in pairs:
        assert isinstance(img, Image.Image) and isinstance(cap, str) and cap
        d = _digest(img)
        assert d in train and d not in held_out
    # captions are deterministic and mention class names most of the time
    again = pretraining_pairs("tiny", seed=0, tasks=tasks)
    assert [c for _, c in again] == [c for _, c in pairs]
    names = [n for t in tasks for n in get_task_spec(t).classnames]
    named = np.mean([any(n in c for n in names) for _, c in pairs])
    assert 0.4 < named < 0.95
    only_generic = pretraining_pairs("tiny", seed=0, tasks=("shapes",), generic_prob=1.0)
    assert not any(any(n in c for n in get_task_spec("shapes").classnames) for _, c in only_generic)
    clean = pretraining_pairs("tiny", seed=0, tasks=("shapes",), generic_prob=0.0, synonym_prob=0.0, label_noise=0.0)
    assert all(any(n in c for n in get_task_spec("shapes").classnames) for _, c in clean)
    assert len(pretraining_pairs("tiny", seed=0, tasks=("shapes",), n=40)) == 40
    with pytest.raises(ConfigError, match="generic_prob"):
        pretraining_pairs("tiny", tasks=("shapes",), generic_prob=1.5)
    # pairs from already built train splits (the zoo's saved data) equal the pairs built here
    saved = {t: ([im.convert("RGB") for im in tiny[t]["train"]["image"]], list(tiny[t]["train"]["label"]))
             for t in tasks}
    from_saved = pretraining_pairs("tiny", seed=0, tasks=tasks, train=saved)
    assert [c for _, c in from_saved] == [c for _, c in pairs]
    assert [_digest(i) for i, _ in from_saved] == [_digest(i) for i, _ in pairs]
    with pytest.raises(ConfigError, match="shapes"):
        pretraining_pairs("tiny", seed=0, tasks=("shapes",), train={"shapes": (saved["shapes"][0], [0])})
    # a per-task generic_prob: textures captions never name a class, shapes captions keep the global rate
    mixed = pretraining_pairs("tiny", seed=0, tasks=tasks, generic_prob=0.0, synonym_prob=0.0,
                              task_generic_prob={"textures": 1.0})
    tex_names, shape_names = get_task_spec("textures").classnames, get_task_spec("shapes").classnames
    tex_caps = [c for (img, c) in mixed if _digest(img) in {_digest(i) for i in tiny["textures"]["train"]["image"]}]
    assert tex_caps and not any(any(n in c for n in tex_names) for c in tex_caps)
    assert sum(any(n in c for n in shape_names) for _, c in mixed) == len(mixed) - len(tex_caps)
    with pytest.raises(ConfigError, match="task_generic_prob.*textres"):
        pretraining_pairs("tiny", seed=0, tasks=tasks, task_generic_prob={"textres": 0.5})
    # hidden classes: their names never appear, their aliases do, the other classes keep their names
    from fusion_bench.benchmark.tasks import class_alias, hidden_classes

    hid = hidden_classes("shapes", 0.5, seed=0)
    assert len(hid) == round(0.5 * get_task_spec("shapes").num_classes) and hid == hidden_classes("shapes", 0.5, 0)
    assert hidden_classes("shapes", 0.0) == []
    names = get_task_spec("shapes").classnames
    alias = {c: class_alias("shapes", c, 0) for c in hid}
    assert len(set(alias.values())) == len(alias) and not set(alias.values()) & set(names)
    hp = pretraining_pairs("tiny", seed=0, tasks=("shapes",), generic_prob=0.0, synonym_prob=0.0, label_noise=0.0,
                           hidden_class_fraction=0.5)
    labels = {_digest(im): int(y) for im, y in zip(tiny["shapes"]["train"]["image"], tiny["shapes"]["train"]["label"])}
    for img, cap in hp:
        y = labels[_digest(img)]
        if y in alias:
            assert alias[y] in cap and not any(re.search(rf"\b{re.escape(names[c])}\b", cap) for c in hid), cap
        else:
            assert names[y] in cap and not any(a in cap for a in alias.values()), cap
    with pytest.raises(ConfigError, match="hidden_class_fraction"):
        pretraining_pairs("tiny", tasks=("shapes",), hidden_class_fraction=2.0)
    # hidden_name_prob: a hidden class is sometimes captioned with its real name (0: never, the default)
    opts = dict(seed=0, tasks=("shapes",), generic_prob=0.0, synonym_prob=0.0, label_noise=0.0,
                hidden_class_fraction=0.5, n=600)
    never = pretraining_pairs("tiny", hidden_name_prob=0.0, **opts)
    assert [c for _, c in never] == [c for _, c in pretraining_pairs("tiny", **opts)]
    for prob in (0.3, 1.0):
        some = pretraining_pairs("tiny", hidden_name_prob=prob, **opts)
        hidden_caps = [c for img, c in some if labels[_digest(img)] in alias]
        real = np.mean([not any(a in c for a in alias.values()) for c in hidden_caps])
        assert abs(real - prob) < 0.1, (prob, real)
        for img, c in some:
            y = labels[_digest(img)]
            if y in alias and alias[y] not in c:
                assert re.search(rf"\b{re.escape(names[y])}\b", c), c
    with pytest.raises(ConfigError, match="hidden_name_prob"):
        pretraining_pairs("tiny", tasks=("shapes",), hidden_name_prob=-0.1)


def test_web_images_are_in_no_split_and_join_pretraining(tiny):
    for name in TASK_NAMES:
        c = get_task_spec(name).num_classes
        images, labels = web_images(name, 2 * c, seed=0, scale="tiny")
        assert len(images) == 2 * c and sorted(labels.tolist()) == sorted(list(range(c)) * 2)
        assert all(im.size == (IMAGE_SIZE, IMAGE_SIZE) and im.mode == "RGB" for im in images)
        split_digests = {s: {_digest(im) for im in tiny[name][s]["image"]} for s in ("train", "validation", "test")}
        web = [_digest(im) for im in images]
        assert not set(web) & (split_digests["validation"] | split_digests["test"]), name
        if name == "fashion":  # other official train rows than the train split's
            assert not set(web) & split_digests["train"]
        again, _ = web_images(name, 2 * c, seed=0, scale="tiny")
        assert [_digest(im) for im in again] == web
    # an image equal to a held-out one is redrawn (procedural), or refused where nothing can be redrawn
    first, _ = web_images("shapes", 3, seed=0, scale="tiny")
    redrawn, _ = web_images("shapes", 3, seed=0, held_out=[first[0]])
    assert _digest(redrawn[0]) != _digest(first[0]) and [_digest(i) for i in redrawn[1:]] == [_digest(i) for i in first[1:]]
    fashion, _ = web_images("fashion", 2, seed=0, scale="tiny")
    with pytest.raises(ConfigError, match="fashion.*web image #0 distinct"):
        web_images("fashion", 2, seed=0, held_out=[fashion[0]])
    with pytest.raises(ConfigError, match="non-negative"):
        web_images("shapes", -1)
    assert web_images("shapes", 0)[0] == []
    # pre-training pairs: the train images plus k web images per task; held-out images passed in or built
    tasks = ("shapes", "digits")
    plain = pretraining_pairs("tiny", seed=0, tasks=tasks)
    pairs = pretraining_pairs("tiny", seed=0, tasks=tasks, web_images_per_task=5)
    assert len(pairs) == len(plain) + 10
    train = {_digest(im) for t in tasks for im in tiny[t]["train"]["image"]}
    held = {_digest(im) for t in tasks for s in ("validation", "test") for im in tiny[t][s]["image"]}
    digests = [_digest(im) for im, _ in pairs]
    assert train <= set(digests) and not held & set(digests)
    assert sum(d not in train for d in digests) == 10
    given = {t: [im.convert("RGB") for s in ("validation", "test") for im in tiny[t][s]["image"]] for t in tasks}
    same = pretraining_pairs("tiny", seed=0, tasks=tasks, web_images_per_task=5, held_out=given)
    assert [_digest(im) for im, _ in same] == digests and [c for _, c in same] == [c for _, c in pairs]
    with pytest.raises(ConfigError, match="web_images_per_task"):
        pretraining_pairs("tiny", tasks=tasks, web_images_per_task=-2)
    # drawn by two processes: the same pairs, and the progress callback still sees every task in order
    seen = []
    parallel = pretraining_pairs("tiny", seed=0, tasks=tasks, web_images_per_task=5, workers=2, progress=seen.append)
    assert [_digest(im) for im, _ in parallel] == digests and [c for _, c in parallel] == [c for _, c in pairs]
    assert seen == list(tasks)
    with pytest.raises(ConfigError, match="workers"):
        pretraining_pairs("tiny", tasks=tasks, workers=0)


def test_command_line_builds_and_reports(tmp_path, capsys):
    from fusion_bench.benchmark.tasks import main

    assert main(["--root", str(tmp_path), "--scale", "tiny", "--tasks", "aerial"]) == 0
    out = capsys.readouterr().out
    assert "aerial" in out and "classes= 12" in out
    assert load_task_meta("aerial", tmp_path)["content_hash"][:12] in out
