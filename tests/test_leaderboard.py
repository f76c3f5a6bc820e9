"""The leaderboard's hyperparameter selection on the tiny CLIP zoo: the clip_zoo task pool's validation
split, ``run_leaderboard(tune=True)`` choosing scaling_factor by validation accuracy, and the errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from fusion_bench.benchmark.zoo import Zoo
from fusion_bench.errors import ConfigError


@pytest.fixture(scope="module")
def tiny_zoo(tiny_clip_zoo) -> Zoo:
    """The session's tiny zoo (tests/conftest.py)."""
    return tiny_clip_zoo


def _taskpool(zoo: Zoo, **extra):
    from fusion_bench.taskpool.base import build_taskpool

    return build_taskpool({"type": "clip_zoo", "scale": "tiny", "root": str(zoo.root), "build": False, **extra})


def test_validation_split_taskpool_evaluates_the_validation_images(tiny_zoo):
    from datasets import load_from_disk

    from fusion_bench.data.loading import dataset_fingerprint

    zoo = tiny_zoo
    task = zoo.tasks[0]
    splits = load_from_disk(str(zoo.data_path(task)))
    val = _taskpool(zoo, split="validation", select=[task])
    test = _taskpool(zoo, select=[task])
    val_labels = val.images(task).labels
    test_labels = test.images(task).labels
    assert val_labels.numel() == len(splits["validation"])
    assert val_labels.tolist() == list(splits["validation"]["label"])
    assert test_labels.tolist() == list(splits["test"]["label"])
    assert val_labels.tolist() != test_labels.tolist()
    info = val.report_extras()["evaluation_splits"][task]
    assert info["split"] == "validation" and info["samples"] == len(splits["validation"])
    assert info["fingerprint"] == dataset_fingerprint(splits["validation"])
    assert info["fingerprint"] != test.report_extras()["evaluation_splits"][task]["fingerprint"]
    # max_samples applies to the validation split too
    few = _taskpool(zoo, split="validation", select=[task], max_samples=5)
    assert few.images(task).labels.numel() == 5


def test_validation_split_with_corruption_is_a_config_error(tiny_zoo):
    with pytest.raises(ConfigError, match=r"taskpool\.corruption.*taskpool\.split='validation'"):
        _taskpool(tiny_zoo, split="validation", corruption=tiny_zoo.corruptions()[0])
    with pytest.raises(ConfigError, match="taskpool.split"):
        _taskpool(tiny_zoo, split="train")


def test_tuned_leaderboard_selects_scaling_factor_on_validation(tiny_zoo, tmp_path):
    from fusion_bench.benchmark.leaderboard import TUNED_DATA, run_leaderboard
    from fusion_bench.methods.base import build_method
    from fusion_bench.modelpool.base import build_modelpool

    zoo = tiny_zoo
    grid = [1.0, 0.1]  # given unsorted: the row records it sorted
    doc = run_leaderboard("tiny", str(zoo.root), tmp_path / "lb", methods=["simple_average", "task_arithmetic"],
                          tune=True, tune_grid=grid, log=lambda s: None)
    rows = {r["method"]: r for r in doc["rows"]}
    ta = rows["task_arithmetic"]
    tuned = ta["tuned"]
    scores = tuned["validation_average"]
    assert tuned["grid"] == [0.1, 1.0] and set(scores) == {0.1, 1.0}
    top = max(scores.values())
    expected = min(v for v, a in scores.items() if a == top)  # argmax, ties to the smaller value
    assert tuned["scaling_factor"] == expected
    assert ta["hyperparameters"]["scaling_factor"] == expected
    assert ta["data"] == TUNED_DATA and "validation split" in ta["data"]
    assert ta["tuning_time_s"] > 0 and ta["merge_time_s"] is not None
    # simple_average has no scaling_factor: untouched
    sa = rows["simple_average"]
    assert "tuned" not in sa and "tuning_time_s" not in sa and sa["data"] == "none"

    # one validation average, recomputed independently: merge with that value, evaluate on validation
    pool = build_modelpool({"type": "clip_zoo", "scale": "tiny", "root": str(zoo.root), "build": False})
    val = _taskpool(zoo, split="validation")
    torch.manual_seed(0)
    model = build_method({"name": "task_arithmetic", "scaling_factor": 0.1}).run(pool).model
    accs = [m["accuracy"] for m in val.evaluate(model)["tasks"].values()]
    assert len(accs) == len(zoo.tasks)
    assert scores[0.1] == pytest.approx(sum(accs) / len(accs))

    out = tmp_path / "lb"
    md = (out / "leaderboard.md").read_text()
    assert f"| task_arithmetic (λ={expected:g}) |" in md and "| simple_average |" in md
    assert "scaling_factor was chosen on the validation split" in md
    saved = {r["method"]: r for r in json.loads((out / "leaderboard.json").read_text())["rows"]}
    assert saved["task_arithmetic"]["tuned"]["scaling_factor"] == expected
    with open(out / "leaderboard.csv") as f:
        table = {r["method"]: r for r in csv.DictReader(f)}
    assert float(table["task_arithmetic"]["tuned_scaling_factor"]) == expected
    assert table["simple_average"]["tuned_scaling_factor"] == ""


def test_tune_options_are_checked_before_any_work(tmp_path):
    from fusion_bench.benchmark.leaderboard import main, run_leaderboard, tunable
    from fusion_bench.methods import get_method_class

    assert tunable(get_method_class("task_arithmetic")) and tunable(get_method_class("ties_merging"))
    assert not tunable(get_method_class("simple_average"))
    root = str(tmp_path / "no_zoo")
    with pytest.raises(ConfigError, match="tune_grid"):
        run_leaderboard("tiny", root, tmp_path / "lb", tune_grid=[0.1])  # grid without tune
    with pytest.raises(ConfigError, match="tune_grid"):
        run_leaderboard("tiny", root, tmp_path / "lb", tune=True, tune_grid=[])
    with pytest.raises(ConfigError, match="--tune-grid"):
        main(["--scale", "tiny", "--root", root, "--out", str(tmp_path / "lb"), "--tune-grid", "0.1,big"])


def test_extra_storage_and_task_id_columns():
    """A per-task result needs the task id; the method's own storage count wins over 4 bytes per extra
    parameter; the markdown and CSV carry both columns."""
    from fusion_bench.benchmark.leaderboard import extra_storage_bytes, needs_task_id, to_csv, to_markdown

    per_task = {"result_kind": "per_task", "cost": {"extra_parameters": 1000},
                "metadata": {"extra_storage_bytes": 375}}
    merged = {"result_kind": "merged", "cost": {"extra_parameters": 0}, "metadata": {}}
    ens = {"result_kind": "ensemble", "cost": {"extra_parameters": 2_500_000}, "metadata": {}}
    assert needs_task_id(per_task) and not needs_task_id(merged) and not needs_task_id(ens)
    assert needs_task_id({"result_kind": "merged", "metadata": {"needs_task_id": True}})
    assert extra_storage_bytes(per_task) == 375
    assert extra_storage_bytes(merged) == 0 and extra_storage_bytes(ens) == 10_000_000
    assert extra_storage_bytes({"cost": {}, "metadata": {}}) is None
    row = {"method": "m", "kind": "merging", "accuracy": {"a": 0.5}, "average": 0.5, "normalized": 1.0,
           "extra_parameters": 1000, "extra_storage_bytes": 375, "needs_task_id": True, "data": "none"}
    doc = {"tasks": ["a"], "rows": [row], "zoo": {"scale": "tiny", "max_samples": None},
           "evaluation_time_one_model_s": 0.1, "skipped": {}}
    md = to_markdown(doc)
    assert "| extra storage | task id |" in md and "| 375 B | needed |" in md
    rec = next(csv.DictReader(to_csv(doc).splitlines()))
    assert rec["extra_storage_bytes"] == "375" and rec["needs_task_id"] == "True"


def test_order_beside_fusionbench():
    """Methods shared with FusionBench's ViT-B/32 table are ordered by gain kept here and there; Kendall's tau
    matches a pair count written from its definition (concordant minus discordant over all pairs)."""
    import itertools

    from fusion_bench.benchmark.leaderboard import (
        FUSIONBENCH_VITB32_R,
        kendall_tau,
        order_vs_fusionbench,
        to_markdown,
    )

    gains = {"simple_average": 0.30, "task_arithmetic": 0.50, "ties_merging": 0.45, "regmean": 0.70, "karcher_mean": 0.9}
    rows = [{"method": m, "kind": "merging", "accuracy": {"a": 0.5}, "average": 0.5, "normalized": 1.0,
             "gain_kept": g, "data": "none"} for m, g in gains.items()]
    doc = {"tasks": ["a"], "rows": rows, "zoo": {"scale": "tiny", "max_samples": None},
           "evaluation_time_one_model_s": 0.1, "skipped": {}}
    order = order_vs_fusionbench(doc)
    shared = ["regmean", "simple_average", "task_arithmetic", "ties_merging"]  # karcher_mean: not in FusionBench's
    assert sorted(order["here"]) == shared
    assert order["here"] == ["regmean", "task_arithmetic", "ties_merging", "simple_average"]
    assert order["fusionbench"] == ["regmean", "ties_merging", "task_arithmetic", "simple_average"]
    pairs = list(itertools.combinations(shared, 2))
    conc = sum(1 for x, y in pairs if (gains[x] - gains[y]) * (FUSIONBENCH_VITB32_R[x] - FUSIONBENCH_VITB32_R[y]) > 0)
    disc = sum(1 for x, y in pairs if (gains[x] - gains[y]) * (FUSIONBENCH_VITB32_R[x] - FUSIONBENCH_VITB32_R[y]) < 0)
    assert order["kendall_tau"] == pytest.approx((conc - disc) / len(pairs)) == pytest.approx(4 / 6)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1 and kendall_tau([1], [1]) is None
    doc["order_vs_fusionbench"] = order
    md = to_markdown(doc)
    assert "Kendall's tau +0.67" in md and "| 1 | regmean | 0.70 | regmean | 0.81 |" in md
    assert order_vs_fusionbench({**doc, "rows": rows[-1:]}) is None


def test_combine_leaderboards(tmp_path):
    """Runs of one zoo and test set combine into one table: rows united (a later run replaces the same method),
    the gain kept recomputed from the shared reference rows, the grids named; other zoos or test sets refused."""
    from fusion_bench.benchmark.leaderboard import FINETUNED_ROW, PRETRAINED_ROW, combine_leaderboards

    def row(method, kind, acc, **extra):
        return {"method": method, "kind": kind, "accuracy": {"a": acc, "b": acc}, "average": acc, "normalized": 1.0,
                "data": "none", **extra}

    refs = [row(PRETRAINED_ROW, "reference", 0.2), row(FINETUNED_ROW, "reference", 0.8)]
    zoo = {"track": "text", "scale": "tiny", "variant": "full", "max_samples": 10, "corruption": None}

    def write(name, rows, grid, **zoo_extra):
        d = tmp_path / name
        d.mkdir()
        doc = {"zoo": {**zoo, **zoo_extra}, "tasks": ["a", "b"], "rows": refs + rows, "skipped": {"x": "why"},
               "tune": {"option": "scaling_factor", "grid": grid, "split": "validation"},
               "evaluation_time_one_model_s": 0.1, "total_time_s": 5.0}
        (d / "leaderboard.json").write_text(json.dumps(doc))
        return d

    one = write("one", [row("task_arithmetic", "merging", 0.5), row("simple_average", "merging", 0.4)], [0.1, 1.0])
    two = write("two", [row("task_arithmetic", "merging", 0.6), row("iso_c", "merging", 0.7)], [0.1, 2.0])
    doc = combine_leaderboards([one, two], tmp_path / "out")
    by = {r["method"]: r for r in doc["rows"]}
    assert set(by) == {PRETRAINED_ROW, FINETUNED_ROW, "task_arithmetic", "simple_average", "iso_c"}
    assert by["task_arithmetic"]["average"] == 0.6  # the later run's row
    assert by["iso_c"]["gain_kept"] == pytest.approx((0.7 - 0.2) / (0.8 - 0.2))
    assert doc["tune"]["grids"] == [[0.1, 1.0], [0.1, 2.0]] and doc["total_time_s"] == 10.0
    assert (tmp_path / "out" / "leaderboard.md").exists() and doc["targets"]
    before = (one / "leaderboard.json").read_text()
    with pytest.raises(ConfigError, match="one of the runs being combined"):
        combine_leaderboards([one, two], one)
    assert (one / "leaderboard.json").read_text() == before  # the input is left as it was
    other = write("other", [], [0.1], max_samples=20)
    with pytest.raises(ConfigError, match="max_samples"):
        combine_leaderboards([one, other], tmp_path / "out2")


def test_spread_target_counts_one_model_merges_only():
    """A one-model-per-task result (the task id chooses the model) is not a merge for the spread target."""
    from fusion_bench.benchmark.leaderboard import (
        FINETUNED_ROW,
        PRETRAINED_ROW,
        add_gain_kept,
        quality_targets,
    )

    def row(method, kind, acc, **extra):
        return {"method": method, "kind": kind, "accuracy": {"a": acc}, "average": acc, "normalized": 1.0,
                "data": "none", **extra}

    doc = {"tasks": ["a"], "rows": [row(PRETRAINED_ROW, "reference", 0.2), row(FINETUNED_ROW, "reference", 0.9),
                                    row("task_arithmetic", "merging", 0.6, tuned={"scaling_factor": 0.3}),
                                    row("simple_average", "merging", 0.5),
                                    row("tall_mask_task_arithmetic", "merging", 0.9, needs_task_id=True)]}
    add_gain_kept(doc)
    spread = next(t for t in quality_targets(doc) if t["name"].startswith("spread"))
    assert spread["value"] == pytest.approx(0.1) and "tall_mask" not in spread["detail"]
