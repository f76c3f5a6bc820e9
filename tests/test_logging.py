"""Experiment logging (fusion_bench.tracking): what a run logs to CSV, TensorBoard and MLflow equals its report,
the options are validated like every config group, and the leaderboard table read back from the logs equals the
table the leaderboard's own row function builds from the reports.

Tiny in-memory models (fusion_bench.testing.tiny_pool_models) and a synthetic classification task pool keep it
fast; TensorBoard and MLflow parts skip when their package is absent (CI installs them).
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from fusion_bench.errors import ConfigError
from fusion_bench.methods import build_method
from fusion_bench.modelpool.base import ModelPool
from fusion_bench.taskpool.base import TaskPool, average_metrics
from fusion_bench.testing import tiny_pool_models
from tests.conftest import make_toy, run_cli

HAS_TB = importlib.util.find_spec("tensorboard") is not None
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
needs_tb = pytest.mark.skipif(not HAS_TB, reason="tensorboard is not installed (pip install tensorboard)")
needs_mlflow = pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed (pip install mlflow-skinny)")


class ToyTaskPool(TaskPool):
    """Accuracy and cross-entropy of a 8 -> 5 classifier on seeded random inputs; task i is labelled by what
    fine-tuning changed in ``model_i``'s logits, a quarter of the labels replaced at random (so methods differ)."""

    def __init__(self, tasks=("t0", "t1")):
        super().__init__({"name": "toy"})
        self._names = list(tasks)
        self.data = {}
        teachers = toy_models()
        for i, t in enumerate(self._names):
            g = torch.Generator().manual_seed(100 + i)
            x = torch.randn(40, 8, generator=g)
            with torch.no_grad():
                y = (teachers[f"model_{i}"](x) - teachers["_pretrained_"](x)).argmax(-1)  # what fine-tuning changed
            noise = torch.randint(0, 5, (40,), generator=g)
            y = torch.where(torch.arange(40) % 4 == 0, noise, y)
            self.data[t] = (x, y)

    @property
    def tasks(self):
        return list(self._names)

    def evaluate(self, model, tasks=None):
        out = {}
        with torch.no_grad():
            for t in tasks or self._names:
                x, y = self.data[t]
                z = model(x).float()
                out[t] = {"accuracy": float((z.argmax(-1) == y).float().mean()),
                          "loss": float(torch.nn.functional.cross_entropy(z, y))}
        return {"tasks": out, "average": average_metrics(out)}


def toy_models():
    """_pretrained_ and model_0..2: the tiny pool with larger, seeded 'fine-tuning' steps on the output layer."""
    models = tiny_pool_models(3, seed=7)
    for i in range(3):
        g = torch.Generator().manual_seed(50 + i)
        with torch.no_grad():
            fc2 = models[f"model_{i}"].fc2
            fc2.weight.add_(torch.randn(fc2.weight.shape, generator=g))
    return models


@pytest.fixture(scope="module")
def models():
    return toy_models()


def _run(models, method, logging, tmp_path, **opts):
    from fusion_bench.programs.fusion import run_program

    rep_path = tmp_path / f"report_{method}.json"
    return run_program({"print_table": False, "report_path": str(rep_path), "overwrite": True, "logging": logging},
                       modelpool=ModelPool(dict(models)), method=build_method(method, **opts),
                       taskpool=ToyTaskPool(), log=lambda s: None)


def _csv_metrics(run_dir: Path) -> dict[tuple[str, int], float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {(r["metric"], int(r["step"])): float(r["value"]) for r in csv.DictReader(f)}


def test_csv_run_logs_config_metrics_and_report(models, tmp_path):
    rep = _run(models, "task_arithmetic", {"csv": True, "dir": str(tmp_path / "logs"), "run_name": "ta"}, tmp_path,
               scaling_factor=0.4)
    run_dir = tmp_path / "logs" / "ta"
    assert rep["logged"]["dir"] == str(run_dir)
    m = _csv_metrics(run_dir)
    for task, vals in rep["evaluation"]["tasks"].items():
        assert m[(f"eval/{task}/accuracy", 0)] == vals["accuracy"]  # repr() round-trips floats exactly
        assert m[(f"eval/{task}/loss", 0)] == vals["loss"]
    assert m[("eval/average/accuracy", 0)] == rep["evaluation"]["average"]["accuracy"]
    assert m[("cost/merge_wall_time_s", 0)] == rep["cost"]["merge_wall_time_s"]
    assert m[("cost/peak_rss_mb", 0)] == rep["cost"]["peak_rss_mb"]
    assert m[("cost/extra_parameters", 0)] == 0
    params = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert params["method.name"] == "task_arithmetic" and params["method.hyperparameters.scaling_factor"] == 0.4
    assert params["seed"] == 0 and params["program"] == "fusion" and params["result_kind"] == "merged"
    assert params["config.report_path"] == str(tmp_path / "report_task_arithmetic.json")
    logged = json.loads((run_dir / "artifacts" / "report_task_arithmetic.json").read_text())
    assert logged == json.loads(Path(rep["report_path"]).read_text())
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "finished" and meta["backends"] == ["csv"] and meta["method"] == "task_arithmetic"
    assert not (run_dir / "tensorboard").exists()
    # the same run name again: a new folder, the first run's files untouched
    before = (run_dir / "metrics.csv").read_bytes()
    rep2 = _run(models, "task_arithmetic", {"csv": True, "dir": str(tmp_path / "logs"), "run_name": "ta"}, tmp_path)
    assert rep2["logged"]["dir"] == str(tmp_path / "logs" / "ta-2")
    assert (run_dir / "metrics.csv").read_bytes() == before


def test_method_metrics_and_continual_curves():
    """Numbers a method reports become metrics; lists (training-loss histories) become curves over steps."""
    from fusion_bench.tracking import run_metrics

    report = {"program": "fusion", "evaluation": {"tasks": {"a": {"accuracy": 0.5}}, "average": {"accuracy": 0.5}},
              "cost": {"merge_wall_time_s": 1.25, "extra_parameters": 0},
              "metadata": {"loss": [3.0, 2.0, 1.5], "entropy_last": 0.25, "note": "text", "flag": True,
                           "inner": {"lambda": 0.3, "deeper": {"x": 2}}, "mixed": [1, "a"]}}
    got = {(n, s): v for n, v, s in run_metrics(report)}
    assert got[("method/loss", 0)] == 3.0 and got[("method/loss", 1)] == 2.0 and got[("method/loss", 2)] == 1.5
    assert got[("method/entropy_last", 0)] == 0.25 and got[("method/inner/lambda", 0)] == 0.3
    assert got[("method/inner/deeper/x", 0)] == 2.0
    assert not any(n.startswith(("method/note", "method/flag", "method/mixed")) for n, _ in got)
    assert got[("eval/a/accuracy", 0)] == 0.5 and got[("cost/merge_wall_time_s", 0)] == 1.25
    long = run_metrics({"metadata": {"h": list(range(5000))}})
    steps = [s for n, _, s in long if n == "method/h"]
    assert len(steps) <= 1001 and steps[0] == 0 and steps[-1] == 4999  # thinned evenly, the last point kept


@needs_tb
def test_tensorboard_scalars_hparams_and_plot_images(models, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rep = _run(models, "simple_average", {"tensorboard": True, "dir": str(tmp_path / "tb"), "run_name": "sa"},
               tmp_path)
    tb = tmp_path / "tb" / "sa" / "tensorboard"
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for task, vals in rep["evaluation"]["tasks"].items():
        (ev,) = acc.Scalars(f"eval/{task}/accuracy")
        assert ev.value == pytest.approx(vals["accuracy"], rel=1e-6)  # TensorBoard stores float32
    assert "config/text_summary" in tags["tensors"]  # the config as text
    assert "hparam/eval/average/accuracy" in tags["scalars"]  # the hparams view's summary metric
    assert (tmp_path / "tb" / "sa" / "hparams.yaml").is_file() and not (tmp_path / "tb" / "sa" / "metrics.csv").exists()
    from fusion_bench.tracking.reader import read_run_dir

    run = read_run_dir(tmp_path / "tb" / "sa")
    assert run.source == "tensorboard"
    assert run.metrics["eval/average/accuracy"] == pytest.approx(rep["evaluation"]["average"]["accuracy"], rel=1e-6)


@needs_mlflow
def test_mlflow_run_params_metrics_artifacts(models, tmp_path):
    from fusion_bench.tracking import mlflow_client

    uri = (tmp_path / "mlruns").as_uri()
    rep = _run(models, "task_arithmetic", {"mlflow": True, "tracking_uri": uri, "experiment": "exp1",
                                           "run_name": "ta"}, tmp_path, scaling_factor=0.3)
    info = rep["logged"]["mlflow"]
    assert info["tracking_uri"] == uri and "dir" not in rep["logged"]  # MLflow alone writes no run folder
    client = mlflow_client(uri)
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "ta"
    assert run.data.params["method.name"] == "task_arithmetic"
    assert float(run.data.params["method.hyperparameters.scaling_factor"]) == 0.3
    for task, vals in rep["evaluation"]["tasks"].items():
        assert run.data.metrics[f"eval/{task}/accuracy"] == vals["accuracy"]
    assert run.data.metrics["cost/merge_wall_time_s"] == rep["cost"]["merge_wall_time_s"]
    names = [a.path for a in client.list_artifacts(info["run_id"])]
    assert "report_task_arithmetic.json" in names
    local = client.download_artifacts(info["run_id"], "report_task_arithmetic.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text())["evaluation"] == rep["evaluation"]


def _expected_rows(reports: dict[str, dict], tasks: list[str], one_model: int) -> list[dict]:
    """What run_leaderboard puts in its rows, built from the reports with the leaderboard's own functions."""
    from fusion_bench.benchmark.leaderboard import (
        PRETRAINED_ROW,
        _data_used,
        _per_task_acc,
        _row,
        extra_storage_bytes,
        needs_task_id,
        size_columns,
    )

    rows = []
    for name, rep in reports.items():
        cost = rep["cost"]
        if name == "dummy":
            rows.append(_row(PRETRAINED_ROW, "reference", _per_task_acc(rep["evaluation"]), tasks, None,
                             merge_time_s=0.0, peak_rss_mb=None, extra_parameters=0, extra_storage_bytes=0,
                             data="none", evaluation_time_s=round(cost["evaluation_wall_time_s"], 2),
                             **size_columns(None, one_model, 0, True)))
            continue
        rows.append(_row(name, rep["method"]["family"], _per_task_acc(rep["evaluation"]), tasks, None,
                         merge_time_s=cost["merge_wall_time_s"], peak_rss_mb=cost["peak_rss_mb"],
                         extra_parameters=cost["extra_parameters"], extra_storage_bytes=extra_storage_bytes(rep),
                         needs_task_id=needs_task_id(rep), data=_data_used(rep, rep["method"]["uses_data"]),
                         evaluation_time_s=cost["evaluation_wall_time_s"],
                         hyperparameters=rep["method"]["hyperparameters"],
                         **size_columns(rep, one_model, cost["extra_parameters"],
                                        rep["result_kind"] == "merged" and not needs_task_id(rep))))
    return rows


def _table(doc) -> list[str]:
    from fusion_bench.benchmark.leaderboard import to_markdown

    md = to_markdown(doc)
    return md[:md.index("\n\n")].splitlines()


def test_leaderboard_read_back_from_csv_tensorboard_and_mlflow(models, tmp_path):
    import shutil

    from fusion_bench.benchmark.leaderboard import add_gain_kept
    from fusion_bench.tracking.reader import leaderboard_from_logs
    from fusion_bench.utils import float_numel

    uri = (tmp_path / "mlruns").as_uri()
    backends = {"csv": True, "tensorboard": HAS_TB, "mlflow": HAS_MLFLOW, "dir": str(tmp_path / "logs"),
                "tracking_uri": uri}
    reports = {}
    for method, opts in (("dummy", {}), ("simple_average", {}), ("task_arithmetic", {"scaling_factor": 0.5}),
                         ("simple_ensemble", {})):
        reports[method] = _run(models, method, {**backends, "run_name": method}, tmp_path, **opts)
    if HAS_TB:  # the same runs without their CSV files: read from the TensorBoard event files
        shutil.copytree(tmp_path / "logs", tmp_path / "tblogs", ignore=shutil.ignore_patterns("mlruns"))
        for p in (tmp_path / "tblogs").rglob("metrics.csv"):
            p.unlink()
    tasks = ["t0", "t1"]
    expected = {r["method"]: r for r in _expected_rows(reports, tasks, float_numel(models["model_0"]))}
    exp_doc = {"zoo": {"scale": "-"}, "tasks": tasks, "rows": list(expected.values()), "skipped": {}, "tune": None,
               "evaluation_time_one_model_s": 0.0}
    add_gain_kept(exp_doc)

    doc = leaderboard_from_logs(tmp_path / "logs", tmp_path / "lb")
    got = {r["method"]: r for r in doc["rows"]}
    assert set(got) == set(expected) == {"pretrained", "simple_average", "task_arithmetic", "simple_ensemble"}
    for name, want in expected.items():
        for k, v in want.items():
            assert got[name][k] == v, (name, k)
    assert _table(doc) == _table(exp_doc)  # the same Markdown table, cell by cell
    assert (tmp_path / "lb" / "leaderboard.md").is_file() and (tmp_path / "lb" / "leaderboard.csv").is_file()
    assert got["simple_ensemble"]["extra_parameters"] == 2 * float_numel(models["model_0"])

    assert {r["source"] for r in doc["rows"]} == {"csv"}
    others = []
    if HAS_TB:
        others.append(("tensorboard", leaderboard_from_logs(tmp_path / "tblogs")))
    if HAS_MLFLOW:
        others.append(("mlflow", leaderboard_from_logs(mlflow_uri=uri)))
    for source, other in others:  # TensorBoard keeps float32: the same table to its printed precision
        assert {r["source"] for r in other["rows"]} == {source}
        assert _table(other) == _table(exp_doc)
        o = {r["method"]: r for r in other["rows"]}
        for name, want in expected.items():
            for t in tasks:
                assert o[name]["accuracy"][t] == pytest.approx(want["accuracy"][t], rel=1e-6)


def test_leaderboard_references_and_errors(models, tmp_path):
    from fusion_bench.benchmark.leaderboard import FINETUNED_ROW, write_outputs
    from fusion_bench.tracking.reader import leaderboard_from_logs

    rep = _run(models, "simple_average", {"csv": True, "dir": str(tmp_path / "logs")}, tmp_path)
    ft = {"t0": 0.5, "t1": 0.25}
    ref = {"zoo": {"scale": "-"}, "tasks": ["t0", "t1"], "skipped": {}, "tune": None,
           "evaluation_time_one_model_s": 0.0,
           "rows": [{"method": FINETUNED_ROW, "kind": "reference", "accuracy": ft, "average": 0.375, "normalized": 1.0}]}
    write_outputs(ref, tmp_path / "refs")
    doc = leaderboard_from_logs(tmp_path / "logs", references=tmp_path / "refs")
    row = {r["method"]: r for r in doc["rows"]}["simple_average"]
    acc = rep["evaluation"]["tasks"]
    assert row["normalized"] == pytest.approx((acc["t0"]["accuracy"] / 0.5 + acc["t1"]["accuracy"] / 0.25) / 2)
    from fusion_bench.tracking.reader import main

    assert main(["--from-logs", str(tmp_path / "logs"), "--references", str(tmp_path / "refs"), "--out",
                 str(tmp_path / "lb_cli")]) == 0
    saved = json.loads((tmp_path / "lb_cli" / "leaderboard.json").read_text())
    assert {r["method"]: r for r in saved["rows"]}["simple_average"]["normalized"] == row["normalized"]
    with pytest.raises(ConfigError, match="no such folder"):
        leaderboard_from_logs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no logged fusion runs"):
        leaderboard_from_logs(tmp_path / "empty")


def test_continual_run_logs_its_curves(models, tmp_path):
    from fusion_bench.programs.continual import run_continual

    pool = {"_pretrained_": models["_pretrained_"], "t0": models["model_0"], "t1": models["model_1"]}
    rep = run_continual({"report_path": str(tmp_path / "c.json"), "print_table": False,
                         "logging": {"csv": True, "dir": str(tmp_path / "logs"), "run_name": "c"}},
                        {"orders": 2}, modelpool=ModelPool(pool), method=build_method("continual_task_arithmetic"),
                        taskpool=ToyTaskPool(), log=lambda s: None)
    m = _csv_metrics(tmp_path / "logs" / "c")
    curve = rep["summary"]["avg_acc_curve"]
    assert [m[("continual/avg_acc_curve", t + 1)] for t in range(len(curve))] == curve
    assert m[("continual/final_avg_acc/mean", 0)] == rep["summary"]["final_avg_acc"]["mean"]
    assert m[("continual/bwt/mean", 0)] == rep["summary"]["bwt"]["mean"]
    for i, o in enumerate(rep["per_order"]):
        for st in o["steps"]:
            assert m[(f"continual/order_{i}/avg_acc_seen", st["step"])] == st["avg_acc_seen"]
    arts = sorted(p.name for p in (tmp_path / "logs" / "c" / "artifacts").iterdir())
    assert arts == ["c.json", "c_accuracy.png"]
    params = yaml.safe_load((tmp_path / "logs" / "c" / "hparams.yaml").read_text())
    assert params["program"] == "continual" and params["method.name"] == "continual_task_arithmetic"


def test_logging_options_are_validated(models, tmp_path, monkeypatch):
    from fusion_bench import tracking

    with pytest.raises(ConfigError, match=r"Unknown config key 'logging\.tensorbord'.*Did you mean 'tensorboard'"):
        _run(models, "simple_average", {"tensorbord": True, "dir": str(tmp_path)}, tmp_path)
    with pytest.raises(ConfigError, match=r"logging\.csv='maybe' has the wrong type"):
        _run(models, "simple_average", {"csv": "maybe", "dir": str(tmp_path)}, tmp_path)
    with pytest.raises(ConfigError, match=r"logging\.csv=true needs a folder: set logging\.dir"):
        _run(models, "simple_average", {"csv": True}, tmp_path)
    with pytest.raises(ConfigError, match="logging.run_name"):
        _run(models, "simple_average", {"csv": True, "dir": str(tmp_path), "run_name": "../x"}, tmp_path)
    monkeypatch.setattr(tracking, "package_available", lambda b: b not in ("tensorboard", "mlflow"))
    with pytest.raises(ConfigError, match=r"logging\.tensorboard=true needs the tensorboard package: pip install "
                       "tensorboard"):
        _run(models, "simple_average", {"tensorboard": True, "dir": str(tmp_path)}, tmp_path)
    with pytest.raises(ConfigError, match="pip install mlflow-skinny"):
        _run(models, "simple_average", {"mlflow": True}, tmp_path)
    assert not list(tmp_path.glob("report_*.json"))  # refused before any work
    # all backends off (the default group): nothing logged, no 'logged' key
    rep = _run(models, "simple_average", {"csv": False, "tensorboard": False}, tmp_path)
    assert "logged" not in rep


def test_cli_logging_group(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    toy = make_toy(tmp_path, "ab")
    code, out, err = run_cli(["--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count", "method=simple_average",
                              "logging.tensorbord=true"], capsys)
    assert code == 2 and err.strip().splitlines() == [
        "error: Unknown config key 'logging.tensorbord'. Did you mean 'tensorboard'?"]
    code, out, err = run_cli(["--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count", "method=simple_average",
                              "logging=csvv"], capsys)
    assert code == 2 and "Unknown logging 'csvv'" in err
    code, out, err = run_cli(["--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count", "method=simple_average",
                              "logging.csv=true", "hydra.run.dir=run1"], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "run1" / "logs" / "run.json").read_text())  # default: <run folder>/logs
    assert meta["method"] == "simple_average" and meta["backends"] == ["csv"]
    params = yaml.safe_load((tmp_path / "run1" / "logs" / "hparams.yaml").read_text())
    assert params["config.logging.csv"] is True and params["config.modelpool.models._pretrained_"].endswith(
        "base.safetensors")
    assert (tmp_path / "run1" / "logs" / "artifacts" / "report.json").is_file()
    from fusion_bench.tracking.reader import leaderboard_from_logs

    with pytest.raises(ConfigError, match="evaluated no tasks"):  # a parameter-count pool has no accuracies
        leaderboard_from_logs(tmp_path / "run1")
