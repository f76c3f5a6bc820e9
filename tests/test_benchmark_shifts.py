"""Domain shifts of the CLIP benchmark's task images (fusion_bench.benchmark.shifts) and their use by the
task builders and the zoo: the grid formula, per-image seeding, errors, and that pretraining never sees a
shifted image while every split of a task is shifted."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from PIL import Image

from fusion_bench.benchmark import shifts as S
from fusion_bench.benchmark import tasks as T
from fusion_bench.errors import ConfigError


def _pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.int32)


def test_grid_is_a_half_opacity_line_grid_of_one_colour():
    """The grid formula written out: rows and columns offset + k * period mix half and half with one colour
    (crossings twice), every other pixel is unchanged; colour, period and offset come from the generator in
    that order."""
    rng_vals = np.random.default_rng(123)
    colour = rng_vals.random(3)
    period = int(rng_vals.integers(5, 8))
    offset = int(rng_vals.integers(0, period))
    src = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    out = _pixels(S.apply_shift("grid", Image.fromarray(src, "RGB"), np.random.default_rng(123)))
    a = src.astype(np.float64) / 255.0
    want = a.copy()
    lines = np.zeros(32, bool)
    lines[offset::period] = True
    for y in range(32):
        for x in range(32):
            for _ in range(int(lines[y]) + int(lines[x])):
                want[y, x] = 0.5 * want[y, x] + 0.5 * colour
    want = (np.clip(want, 0, 1) * 255 + 0.5).astype(np.uint8).astype(np.int32)
    assert np.abs(out - want).max() <= 1  # float32 in the kernel, float64 here
    untouched = ~(lines[:, None] | lines[None, :])
    assert (out[untouched] == src[untouched]).all() and (out[~untouched] != src[~untouched]).any()


def test_shift_images_seeds_each_image_from_seed_task_split_index():
    images = [Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8), "RGB") for i in range(4)]
    out = S.shift_images(images, "grid", "signs", "train", seed=5)
    key = zlib.crc32(b"signs/train")
    for i, im in enumerate(images):  # image i alone, from its own generator: independent of the others
        alone = S.apply_shift("grid", im, np.random.default_rng([5, key, i]))
        assert (_pixels(out[i]) == _pixels(alone)).all()
    assert (_pixels(S.shift_images(images[2:], "grid", "signs", "train", 5)[0]) != _pixels(out[2])).any()
    other = S.shift_images(images, "grid", "signs", "test", seed=5)  # another split draws other grids
    assert any((_pixels(a) != _pixels(b)).any() for a, b in zip(out, other))
    chained = S.shift_images(images, "grid+invert", "signs", "train", seed=5)
    assert (_pixels(chained[1]) == 255 - _pixels(out[1])).all()


def test_unknown_shift_is_one_clear_error():
    with pytest.raises(ConfigError, match="unknown shift 'gird'.*grid"):
        S.check_shift("gird")
    with pytest.raises(ConfigError, match="task 'signs': shift: unknown shift 'blurr'"):
        T.build_task_dataset("signs", "tiny", 0, shift="grid+blurr")
    with pytest.raises(ConfigError, match="a shift is a name"):
        S.check_shift("")


def test_shifted_task_is_the_generated_images_under_the_shift():
    plain = T.task_arrays("digits", "tiny", 0)
    dd = T.build_task_dataset("digits", "tiny", 0, shift="grid")
    for split, (images, labels) in plain.items():
        want = S.shift_images(images, "grid", "digits", split, 0)
        got = dd[split]["image"]
        assert [int(v) for v in dd[split]["label"]] == labels
        assert all((_pixels(a) == _pixels(b)).all() for a, b in zip(got, want))  # PNG is lossless
        assert any((_pixels(a) != _pixels(b)).any() for a, b in zip(got, images))
    again = T.build_task_dataset("digits", "tiny", 0, shift="grid")
    assert T.dataset_hash(again) == T.dataset_hash(dd) != T.dataset_hash(T.build_task_dataset("digits", "tiny", 0))


def test_save_task_records_the_shift_and_rebuilds_when_it_changes(tmp_path):
    import json

    path = T.save_task("digits", tmp_path, "tiny", 0, shift="grid")
    meta = json.loads((path / "task.json").read_text())
    assert meta["shift"] == "grid"
    assert meta["content_hash"] == T.dataset_hash(T.build_task_dataset("digits", "tiny", 0, shift="grid"))
    T.save_task("digits", tmp_path, "tiny", 0)  # no shift: another build, not the saved one
    assert json.loads((path / "task.json").read_text())["shift"] is None


def test_zoo_pretrains_on_unshifted_images_and_shifts_every_split(tmp_path, monkeypatch):
    """The zoo's data entries hold shifted splits (and corrupted tests of the shifted test split); the
    pretraining pairs are drawn from the unshifted train images, checked against the unshifted held-out ones."""
    from datasets import load_from_disk

    from fusion_bench.benchmark import zoo as Z

    zoo = Z.Zoo("tiny", tmp_path / "zoo")
    assert zoo.spec.domain_shift == "grid"
    task = "digits"
    with Z.atomic_dir(zoo.data_path(task)) as tmp:
        zoo._build_data(task, tmp)
    saved = load_from_disk(str(zoo.data_path(task)))
    plain = T.task_arrays(task, zoo.spec.data_scale, zoo.spec.seed)
    for split in ("train", "validation", "test"):
        want = S.shift_images(plain[split][0], "grid", task, split, zoo.spec.seed)
        assert all((_pixels(a) == _pixels(b)).all() for a, b in zip(saved[split]["image"], want))

    seen = {}

    class Stop(Exception):
        pass

    def fake_pairs(*args, train=None, held_out=None, **kw):
        seen["train"], seen["held_out"] = train, held_out
        raise Stop

    monkeypatch.setattr(T, "pretraining_pairs", fake_pairs)
    with pytest.raises(Stop), Z._Bars(False) as bars:
        zoo._build_pretrained(tmp_path / "out", bars)
    images, labels = seen["train"][task]
    assert labels == plain["train"][1]
    assert all((_pixels(a) == _pixels(b)).all() for a, b in zip(images, plain["train"][0]))
    held = seen["held_out"][task]
    assert len(held) == len(plain["validation"][0]) + len(plain["test"][0])
    assert all((_pixels(a) == _pixels(b)).all() for a, b in zip(held, [*plain["validation"][0], *plain["test"][0]]))
