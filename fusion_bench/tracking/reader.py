"""Read logged runs back (CSV, TensorBoard, MLflow) and build the leaderboard's table from them.

    fusion_bench leaderboard --from-logs runs/ [--references leaderboard/] --out leaderboard-from-logs
    fusion_bench leaderboard --from-mlflow file:/path/mlruns [--mlflow-experiment fusion_bench] --out ...

A run folder is any folder holding ``run.json`` (written by :func:`fusion_bench.tracking.log_run`); its
parameters come from ``hparams.yaml`` and its metrics from ``metrics.csv`` or, for a TensorBoard-only run,
from the event files under ``tensorboard/`` (TensorBoard stores float32: values match to about 1e-7). MLflow
runs come from a tracking URI and an experiment.

The table: one row per method (the latest run of a method wins, as ``leaderboard --combine`` does), with the
per-task accuracies, average, merge time, peak memory, extra parameters and storage, task id, data used,
evaluation time, parameter columns and hyperparameters, computed by the leaderboard's own row function.
A run of ``method=dummy`` (the pool's pretrained model) becomes the ``pretrained`` reference row; the
fine-tuned reference row (needed for the normalized accuracy and the gain kept) comes from a leaderboard
folder given as ``references`` (``leaderboard.json``) when the logs have none.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusion_bench.errors import ConfigError
from fusion_bench.tracking import METRICS_FILE, PARAMS_FILE, RUN_FILE, TB_DIR, mlflow_client


@dataclass
class LoggedRun:
    """One logged run: its name, parameters (flat), last value of each metric, metric curves and source."""

    name: str
    params: dict[str, Any]
    metrics: dict[str, float]
    source: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    finished: str = ""


def _parse_param(v: Any) -> Any:
    """A parameter as logged (MLflow keeps strings: 'True', '0.3', '["a", "b"]') back to its value."""
    if isinstance(v, str):
        if v in ("True", "False"):
            return v == "True"
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def _last(series: dict[str, list[tuple[int, float]]]) -> dict[str, float]:
    return {k: sorted(pts)[-1][1] for k, pts in series.items() if pts}


def _read_csv_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            series.setdefault(row["metric"], []).append((int(row["step"]), float(row["value"])))
    return series


def _read_tensorboard(path: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for events in sorted({p.parent for p in path.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.startswith("hparam/"):
                continue
            series.setdefault(tag, []).extend((int(e.step), float(e.value)) for e in acc.Scalars(tag))
    return series


def read_run_dir(run_dir: str | Path) -> LoggedRun:
    """One run folder (``run.json``, ``hparams.yaml``, ``metrics.csv`` or ``tensorboard/``)."""
    import yaml

    d = Path(run_dir)
    try:
        meta = json.loads((d / RUN_FILE).read_text())
        params = yaml.safe_load((d / PARAMS_FILE).read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{d}: not a readable fusion_bench run folder ({e}); give folders written with "
                          "logging.csv=true or logging.tensorboard=true.") from None
    if (d / METRICS_FILE).is_file():
        series, source = _read_csv_metrics(d / METRICS_FILE), "csv"
    elif (d / TB_DIR).is_dir():
        series, source = _read_tensorboard(d / TB_DIR), "tensorboard"
    else:
        raise ConfigError(f"{d}: the run has neither {METRICS_FILE} nor {TB_DIR}/ (was it logged with "
                          "logging.csv or logging.tensorboard?).")
    return LoggedRun(str(meta.get("run_name", d.name)), {k: _parse_param(v) for k, v in params.items()},
                     _last(series), source, series, str(meta.get("finished_utc", "")))


def read_run_dirs(root: str | Path) -> list[LoggedRun]:
    """Every run folder under ``root`` (searched recursively), oldest first."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--from-logs {root}: no such folder; give the folder of logged runs (logging.dir).")
    runs = [read_run_dir(p.parent) for p in sorted(root.rglob(RUN_FILE))]
    return sorted(runs, key=lambda r: r.finished)


def read_mlflow_runs(tracking_uri: str, experiment: str = "fusion_bench") -> list[LoggedRun]:
    """The finished runs of an MLflow experiment, oldest first."""
    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"MLflow at {tracking_uri} has no experiment '{experiment}'; set --mlflow-experiment (the "
                          "logging.experiment of the runs).")
    out = []
    for r in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                order_by=["attributes.start_time ASC"], max_results=50000):
        params = {k: _parse_param(v) for k, v in r.data.params.items()}
        out.append(LoggedRun(r.info.run_name or r.info.run_id, params, dict(r.data.metrics), "mlflow",
                             finished=str(r.info.end_time or 0)))
    return out


def _num(v: Any) -> float | int | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return int(v) if float(v).is_integer() and abs(v) < 2**53 else float(v)


def _hyperparameters(params: Mapping[str, Any]) -> dict[str, Any]:
    pre = "method.hyperparameters."
    out: dict[str, Any] = {}
    for k, v in params.items():
        if k.startswith(pre):
            node = out
            parts = k[len(pre):].split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = None if v == "null" else v
    return out


def row_from_run(run: LoggedRun, tasks: Sequence[str], finetuned: Mapping[str, float] | None) -> dict[str, Any]:
    """A leaderboard row from a logged fusion run (the same fields as ``run_leaderboard``'s rows)."""
    from fusion_bench.benchmark.leaderboard import PRETRAINED_ROW, _row

    p, m = run.params, run.metrics
    name = str(p.get("method.name"))
    kind = str(p.get("method.family"))
    if name == "dummy":
        name, kind = PRETRAINED_ROW, "reference"
    accs = {t: m[f"eval/{t}/accuracy"] for t in tasks if f"eval/{t}/accuracy" in m}
    extra: dict[str, Any] = dict(
        merge_time_s=0.0 if kind == "reference" else m.get("cost/merge_wall_time_s"),
        peak_rss_mb=None if kind == "reference" else m.get("cost/peak_rss_mb"),
        extra_parameters=_num(m.get("cost/extra_parameters")),
        extra_storage_bytes=_num(m.get("size/extra_storage_bytes")),
        data=p.get("leaderboard.data_used"),
        evaluation_time_s=m.get("cost/evaluation_wall_time_s"),
    )
    if kind != "reference":
        extra["needs_task_id"] = bool(p.get("leaderboard.needs_task_id"))
        extra["hyperparameters"] = _hyperparameters(p)
    else:
        extra["evaluation_time_s"] = round(extra["evaluation_time_s"], 2) if extra["evaluation_time_s"] else None
    for k in ("total_parameters", "active_parameters", "inference_cost_ratio"):
        extra[k] = _num(m.get(f"size/{k}")) if k != "inference_cost_ratio" else m.get(f"size/{k}")
    row = _row(name, kind, accs, list(tasks), finetuned, **extra)
    row["run"] = run.name
    row["source"] = run.source
    return row


def leaderboard_from_runs(runs: Iterable[LoggedRun], out: str | Path | None = None,
                          references: str | Path | None = None, source: str = "") -> dict[str, Any]:
    """The leaderboard document (``leaderboard.json``'s format) from logged fusion runs; written to ``out``
    (``leaderboard.md``/``.csv``/``.json``/``.png``) when given.

    Args:
        runs: logged runs (:func:`read_run_dirs`, :func:`read_mlflow_runs`); continual runs are left out.
        out: output folder, or None to only return the document.
        references: a leaderboard folder whose reference rows (pretrained, fine-tuned) are used where the logs
            have none (same zoo and test set).
        source: where the runs came from (recorded in the document).
    """
    from fusion_bench.benchmark.leaderboard import (
        FINETUNED_ROW,
        PRETRAINED_ROW,
        add_gain_kept,
        order_vs_fusionbench,
        write_outputs,
    )

    fusion = [r for r in runs if r.params.get("program", "fusion") == "fusion" and r.params.get("method.name")]
    if not fusion:
        raise ConfigError(f"no logged fusion runs in {source or 'the given runs'}; log runs with logging.csv, "
                          "logging.tensorboard or logging.mlflow first.")
    tasks: list[str] = []
    for r in fusion:
        for t in r.params.get("leaderboard.tasks") or []:
            if t not in tasks:
                tasks.append(t)
    fusion = [r for r in fusion if r.params.get("leaderboard.tasks")]
    if not tasks:
        raise ConfigError(f"the logged runs in {source or 'the given runs'} evaluated no tasks (a parameter-count task "
                          "pool, or evaluate=false); the leaderboard needs runs evaluated on a task pool with tasks.")
    ref_doc = None
    if references is not None:
        path = Path(references).expanduser() / "leaderboard.json"
        try:
            ref_doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--references: cannot read {path} ({e}); give a `fusion_bench leaderboard --out` "
                              "folder.") from None
        if list(ref_doc.get("tasks", [])) != tasks:
            raise ConfigError(f"--references {references} evaluated tasks {ref_doc.get('tasks')}, the logged runs "
                              f"{tasks}; give references of the same zoo and test set.")
    ref_rows = {r["method"]: r for r in (ref_doc or {}).get("rows", []) if r.get("kind") == "reference"}
    ft = ref_rows.get(FINETUNED_ROW)
    finetuned = {t: v for t, v in ft["accuracy"].items() if v is not None} if ft else None
    rows: dict[str, dict[str, Any]] = {}
    for r in fusion:  # oldest first: a later run of the same method replaces the earlier row
        row = row_from_run(r, tasks, finetuned)
        rows[row["method"]] = row
    for name in (FINETUNED_ROW, PRETRAINED_ROW):
        if name not in rows and name in ref_rows:
            rows = {name: ref_rows[name], **rows}
    refs = [rows[n] for n in (PRETRAINED_ROW, FINETUNED_ROW) if n in rows]
    ordered = refs + [r for n, r in rows.items() if n not in (PRETRAINED_ROW, FINETUNED_ROW)]
    first = fusion[0].params
    pre = rows.get(PRETRAINED_ROW)
    eval_one = (pre or {}).get("evaluation_time_s")
    if eval_one is None:
        singles = [r.get("evaluation_time_s") for r in ordered if r.get("evaluation_time_s") is not None]
        eval_one = min(singles) if singles else 0.0
    doc = {"zoo": {"track": "logged runs", "scale": first.get("config.taskpool.scale", first.get("config.taskpool.type",
                                                                                                  "-")),
                   "corruption": first.get("config.taskpool.corruption") if first.get("config.taskpool.corruption")
                   not in ("null", None) else None,
                   "max_samples": first.get("config.taskpool.max_samples")
                   if first.get("config.taskpool.max_samples") not in ("null", None) else None,
                   "source": source},
           "tasks": tasks, "rows": ordered, "skipped": {}, "tune": None,
           "evaluation_time_one_model_s": round(float(eval_one), 2),
           "total_time_s": round(sum(r.metrics.get("cost/total_wall_time_s", 0.0) for r in fusion), 2),
           "from_logs": {"source": source, "runs": [r.name for r in fusion],
                         "references": str(references) if references is not None else None}}
    add_gain_kept(doc)
    doc["order_vs_fusionbench"] = order_vs_fusionbench(doc)
    if out is not None:
        write_outputs(doc, Path(out))
    return doc


def leaderboard_from_logs(logs: str | Path | None = None, out: str | Path | None = None, *,
                          mlflow_uri: str | None = None, experiment: str = "fusion_bench",
                          references: str | Path | None = None) -> dict[str, Any]:
    """The leaderboard from a folder of logged runs (``logs``) and/or an MLflow experiment (``mlflow_uri``)."""
    runs: list[LoggedRun] = []
    src = []
    if logs is not None:
        runs += read_run_dirs(logs)
        src.append(str(logs))
    if mlflow_uri is not None:
        runs += read_mlflow_runs(mlflow_uri, experiment)
        src.append(f"{mlflow_uri} ({experiment})")
    if not src:
        raise ConfigError("give a folder of logged runs (--from-logs DIR) or an MLflow URI (--from-mlflow URI).")
    return leaderboard_from_runs(runs, out, references=references, source=", ".join(src))


def add_arguments(ap) -> None:
    """The leaderboard CLI's read-back options (``--from-logs``, ``--from-mlflow``, ``--experiment``,
    ``--mlflow-experiment``, ``--references``)."""
    ap.add_argument("--from-logs", default=None, metavar="DIR",
                    help="build the table from runs logged with logging.csv/logging.tensorboard under DIR; runs nothing")
    ap.add_argument("--from-mlflow", default=None, metavar="URI",
                    help="build the table from the MLflow runs at this tracking URI; runs nothing")
    ap.add_argument("--mlflow-experiment", default="fusion_bench", help="MLflow experiment for --from-mlflow")
    ap.add_argument("--references", default=None, metavar="DIR",
                    help="a leaderboard folder whose pretrained/fine-tuned rows complete a table read from logs")


def main_from_args(args) -> int | None:
    """Run the read-back when ``--from-logs``/``--from-mlflow`` were given (returns 0), else None."""
    if not (getattr(args, "from_logs", None) or getattr(args, "from_mlflow", None)):
        return None
    from fusion_bench.benchmark.leaderboard import to_markdown

    doc = leaderboard_from_logs(args.from_logs, args.out, mlflow_uri=args.from_mlflow,
                                experiment=args.mlflow_experiment,
                                references=args.references)
    print(to_markdown(doc))
    print(f"written to {Path(args.out) / 'leaderboard.md'} (.csv, .json, .png) from {len(doc['from_logs']['runs'])} "
          "logged runs")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fusion_bench.tracking.reader --from-logs DIR | --from-mlflow URI [--out DIR]`` (the same options
    as ``fusion_bench leaderboard --from-logs``)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fusion_bench.tracking.reader",
                                 description="Build the leaderboard table from logged runs.")
    ap.add_argument("--out", default="leaderboard", help="output folder (default ./leaderboard)")
    add_arguments(ap)
    args = ap.parse_args(argv)
    if not (args.from_logs or args.from_mlflow):
        ap.error("give --from-logs DIR or --from-mlflow URI")
    return main_from_args(args) or 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    from fusion_bench.cli import fail

    try:
        sys.exit(main())
    except Exception as e:  # one-line errors, like the fusion_bench command
        fail(e)
