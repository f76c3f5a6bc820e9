"""Experiment logging: a run's config, metrics and artifacts to TensorBoard, CSV and MLflow (all off by default).

    fusion_bench method=ties_merging logging.tensorboard=true logging.csv=true
    fusion_bench method=ties_merging logging=all logging.dir=runs        # one subfolder per run under runs/
    fusion_bench method=ties_merging logging.mlflow=true logging.tracking_uri=http://host:5000

What a run logs (:func:`run_metrics`, :func:`run_params`), the same for every backend:

- parameters: the method (name, family, variant, hyperparameters), the seed, the result kind, the program, the
  whole config flattened (``config.taskpool.max_samples``), and the leaderboard's per-run facts (data used,
  task id needed, the evaluated tasks in order);
- metrics: ``eval/<task>/<metric>`` and ``eval/average/<metric>`` (accuracy, loss, ...), ``cost/...`` (merge and
  evaluation wall time, peak memory, extra parameters), ``size/...`` (parameters, extra storage), and the
  method's own numbers from its metadata as ``method/<key>`` (a list such as a training-loss or entropy history
  becomes a curve over steps); continual runs log the accuracy-against-step curves (``continual/...``);
- artifacts: the report JSON and the plots the run wrote (continual accuracy plot, routing plots).

Layout on disk (``logging.tensorboard`` / ``logging.csv``): one folder per run, ``logging.dir/<run_name>/``, or
``<run folder>/logs`` when ``logging.dir`` is null (the CLI's Hydra folder), holding ``run.json`` (name, status,
backends), ``hparams.yaml`` (the parameters), ``metrics.csv`` (long format: metric, step, value),
``tensorboard/`` (event files: scalars, the config as text, hparams, the plots as images) and ``artifacts/``.
MLflow gets the same parameters, metrics and artifacts in a run of experiment ``logging.experiment``.
:mod:`fusion_bench.tracking.reader` reads any of them back into the leaderboard's table.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion_bench.config_schema import build_config, option, to_plain
from fusion_bench.errors import ConfigError

#: pip packages of each backend (the error names them); CSV needs nothing
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny")}
RUN_FILE = "run.json"
PARAMS_FILE = "hparams.yaml"
METRICS_FILE = "metrics.csv"
TB_DIR = "tensorboard"
ARTIFACTS_DIR = "artifacts"
_MAX_SERIES = 1000  # points kept of a method's list (evenly spaced)
_MAX_PARAM_CHARS = 500


@dataclass
class LoggingConfig:
    """Options of the ``logging`` group (``logging.<option>=value``); every backend is off by default."""

    tensorboard: bool = option(False, help="Log to TensorBoard event files (needs the tensorboard package).")
    csv: bool = option(False, help="Log to CSV: metrics.csv (metric, step, value) and hparams.yaml.")
    mlflow: bool = option(False, help="Log to MLflow (needs mlflow or mlflow-skinny); see tracking_uri.")
    dir: str | None = option(None, help="Folder holding one subfolder per run (TensorBoard, CSV, artifacts); "
                             "null: <run folder>/logs (the CLI's output folder).")
    run_name: str | None = option(None, help="The run's name (its subfolder, the MLflow run name); null: "
                                  "<method>-<UTC time>-<config hash>.")
    experiment: str = option("fusion_bench", help="MLflow experiment name (also recorded in run.json).")
    tracking_uri: str | None = option(None, help="MLflow tracking URI (http://host:5000, file:/path/mlruns, "
                                      "sqlite:///mlflow.db); null: $MLFLOW_TRACKING_URI, else <logging.dir>/mlruns, "
                                      "else ./mlruns.")
    artifacts: bool = option(True, help="Log the report JSON and the run's plots as artifacts.")


def logging_config(values: Mapping[str, Any] | LoggingConfig | None) -> LoggingConfig:
    """Validate the ``logging`` group (unknown keys and wrong types are one-line ConfigErrors)."""
    return build_config(LoggingConfig, values or {}, prefix="logging", ignore=("name",))


def enabled(cfg: LoggingConfig) -> list[str]:
    return [b for b in ("tensorboard", "csv", "mlflow") if getattr(cfg, b)]


def package_available(backend: str) -> bool:
    import importlib.util

    mod = PACKAGES[backend][0] if backend in PACKAGES else None
    return mod is None or importlib.util.find_spec(mod) is not None


def check_logging(values: Mapping[str, Any] | None, output_dir: str | None = None) -> LoggingConfig | None:
    """Before any work: the options, a place to write, and the backends' packages (one-line errors)."""
    if not values:
        return None
    cfg = logging_config(values)
    on = enabled(cfg)
    for b in on:
        if not package_available(b):
            mod, pip = PACKAGES[b]
            raise ConfigError(f"logging.{b}=true needs the {mod} package: pip install {pip} (or set "
                              f"logging.{b}=false).")
    files = [b for b in on if b != "mlflow"]
    if files and cfg.dir is None and not output_dir:
        raise ConfigError(f"logging.{files[0]}=true needs a folder: set logging.dir=<folder> (a run from Python has "
                          "no run folder).")
    if cfg.run_name is not None and (not cfg.run_name.strip() or re.search(r"[/\\\0]|^\.\.?$", cfg.run_name)):
        raise ConfigError(f"logging.run_name={cfg.run_name!r} must be a plain name (no '/', '\\', '.' or '..').")
    return cfg


# -- what a run logs -------------------------------------------------------------------------------------------

def _flatten(obj: Any, prefix: str, out: dict[str, Any], depth: int = 6) -> None:
    if isinstance(obj, Mapping) and depth > 0:
        if not obj and prefix:
            out[prefix] = "{}"
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, depth - 1)
    else:
        out[prefix] = obj


def _param_value(v: Any) -> str | int | float | bool:
    if isinstance(v, bool) or v is None:
        return "null" if v is None else v
    if isinstance(v, (int, float)):
        return v
    s = v if isinstance(v, str) else json.dumps(to_plain(v), default=str)
    return s if len(s) <= _MAX_PARAM_CHARS else s[:_MAX_PARAM_CHARS - 3] + "..."


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def one_model_parameters(report: Mapping[str, Any]) -> int | None:
    """Weights of one model of the pool, from a fusion report (merged: result minus extra; ensemble: a member)."""
    params = report.get("parameters") or {}
    extra = (report.get("cost") or {}).get("extra_parameters")
    if params.get("weights") is not None and extra is not None:
        return int(params["weights"]) - int(extra)
    member = ((report.get("metadata") or {}).get("parameters") or {}).get("per_member")
    return int(member) if member is not None else None


def run_params(report: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of a run (flat ``key -> scalar``) from its report."""
    from fusion_bench.benchmark.leaderboard import _data_used, needs_task_id

    method = report.get("method") or {}
    p: dict[str, Any] = {
        "program": report.get("program", "fusion"),
        "method.name": method.get("name"), "method.family": method.get("family"),
        "method.variant": method.get("variant"), "method.uses_data": method.get("uses_data"),
        "seed": report.get("seed"), "fusion_bench_version": report.get("fusion_bench_version"),
    }
    _flatten(method.get("hyperparameters") or {}, "method.hyperparameters", p)
    if p.get("program") == "fusion":
        p["result_kind"] = report.get("result_kind")
        p["engine"] = report.get("engine")
        p["leaderboard.data_used"] = _data_used(dict(report), bool(method.get("uses_data")))
        p["leaderboard.needs_task_id"] = needs_task_id(dict(report))
        p["leaderboard.tasks"] = list((report.get("evaluation") or {}).get("tasks") or {})
    _flatten({k: v for k, v in (report.get("config") or {}).items() if k not in ("fusionbench",)}, "config", p)
    return {k: _param_value(v) for k, v in p.items()}


def _series(values: list[Any]) -> list[tuple[int, float]]:
    nums = [(i, float(v)) for i, v in enumerate(values) if _is_number(v)]
    if len(nums) > _MAX_SERIES:
        stride = math.ceil(len(nums) / _MAX_SERIES)
        nums = nums[::stride] + ([nums[-1]] if (len(nums) - 1) % stride else [])
    return nums


def _method_metrics(meta: Mapping[str, Any], prefix: str, out: list[tuple[str, float, int]], depth: int = 3) -> None:
    for k, v in meta.items():
        key = f"{prefix}/{k}"
        if _is_number(v):
            out.append((key, float(v), 0))
        elif isinstance(v, (list, tuple)) and v and all(_is_number(x) for x in v):
            out.extend((key, val, step) for step, val in _series(list(v)))
        elif isinstance(v, Mapping) and depth > 1:
            _method_metrics(v, key, out, depth - 1)


def run_metrics(report: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """The metrics of a run as ``(name, value, step)`` from its report (fusion or continual)."""
    from fusion_bench.benchmark.leaderboard import extra_storage_bytes, needs_task_id, size_columns

    out: list[tuple[str, float, int]] = []
    if report.get("program") == "continual":
        s = report.get("summary") or {}
        for k in ("final_avg_acc", "avg_acc_over_steps", "bwt", "merge_time_s_per_order"):
            if isinstance(s.get(k), Mapping):
                out += [(f"continual/{k}/{stat}", float(v), 0) for stat, v in s[k].items() if _is_number(v)]
        for k in ("avg_acc_curve", "state_mb_per_step", "rss_mb_per_step"):
            out += [(f"continual/{k}", v, t + 1) for t, v in _series(list(s.get(k) or []))]
        for i, o in enumerate(report.get("per_order") or []):
            out += [(f"continual/order_{i}/avg_acc_seen", float(st["avg_acc_seen"]), int(st["step"]))
                    for st in o.get("steps", []) if _is_number(st.get("avg_acc_seen"))]
            for k in ("final_avg_acc", "bwt", "merge_time_s", "eval_time_s"):
                if _is_number(o.get(k)):
                    out.append((f"continual/order_{i}/{k}", float(o[k]), 0))
    ev = report.get("evaluation") or {}
    for task, m in (ev.get("tasks") or {}).items():
        out += [(f"eval/{task}/{k}", float(v), 0) for k, v in m.items() if _is_number(v)]
    out += [(f"eval/average/{k}", float(v), 0) for k, v in (ev.get("average") or {}).items() if _is_number(v)]
    out += [(f"cost/{k}", float(v), 0) for k, v in (report.get("cost") or {}).items() if _is_number(v)]
    if _is_number(report.get("total_wall_time_s")):
        out.append(("cost/total_wall_time_s", float(report["total_wall_time_s"]), 0))
    out += [(f"size/parameters_{k}", float(v), 0) for k, v in (report.get("parameters") or {}).items() if _is_number(v)]
    if report.get("program", "fusion") == "fusion":
        extra = (report.get("cost") or {}).get("extra_parameters")
        storage = extra_storage_bytes(dict(report))
        if storage is not None:
            out.append(("size/extra_storage_bytes", float(storage), 0))
        one = one_model_parameters(report)
        if one is not None:
            out.append(("size/one_model_parameters", float(one), 0))
            single = report.get("result_kind") == "merged" and not needs_task_id(dict(report))
            for k, v in size_columns(dict(report), one, extra, single).items():
                if _is_number(v):
                    out.append((f"size/{k}", float(v), 0))
    _method_metrics(report.get("metadata") or {}, "method", out)
    seen: set[tuple[str, int]] = set()
    unique = []
    for name, v, step in out:  # a key logged twice at one step keeps its first value
        name = sanitize_key(name)
        if (name, step) not in seen:
            seen.add((name, step))
            unique.append((name, v, step))
    return unique


def sanitize_key(key: str) -> str:
    """A metric/parameter name every backend accepts (MLflow: letters, digits, _ - . space /)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)


def default_run_name(report: Mapping[str, Any]) -> str:
    method = (report.get("method") or {}).get("name", "run")
    h = hashlib.sha256(json.dumps(to_plain(report.get("config") or {}), sort_keys=True, default=str).encode())
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{method}-{stamp}-{h.hexdigest()[:8]}"


def _artifact_paths(report: Mapping[str, Any]) -> list[Path]:
    paths = []
    for p in [report.get("report_path"), report.get("plot_path"),
              *((report.get("artifacts") or {}).values() if isinstance(report.get("artifacts"), Mapping) else [])]:
        if isinstance(p, str) and p and Path(os.path.expanduser(p)).is_file():
            paths.append(Path(os.path.expanduser(p)))
    return paths


# -- the writers -------------------------------------------------------------------------------------------------

def _run_dir(cfg: LoggingConfig, output_dir: str | None, name: str) -> Path:
    if cfg.dir is None:
        return Path(os.path.expanduser(str(output_dir))) / "logs"
    root = Path(os.path.expanduser(cfg.dir))
    d, k = root / name, 1
    while d.exists():  # never write into another run's folder
        k += 1
        d = root / f"{name}-{k}"
    return d


def _write_csv(run_dir: Path, metrics: list[tuple[str, float, int]]) -> Path:
    from fusion_bench.io.atomic import atomic_file

    path = run_dir / METRICS_FILE
    with atomic_file(path, "w") as f:
        w = csv.writer(f)
        w.writerow(["metric", "step", "value"])
        for name, v, step in metrics:
            w.writerow([name, step, repr(float(v))])
    return path


def _write_tensorboard(run_dir: Path, params: dict[str, Any], metrics: list[tuple[str, float, int]],
                       report: Mapping[str, Any], artifacts: list[Path]) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    tb = run_dir / TB_DIR
    with SummaryWriter(log_dir=str(tb)) as w:
        for name, v, step in metrics:
            w.add_scalar(name, v, global_step=step)
        import yaml

        w.add_text("config", "```\n" + yaml.safe_dump(to_plain(report.get("config") or {}), sort_keys=False) + "```")
        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()
              if not k.startswith("config.")}
        summary = {f"hparam/{n}": v for n, v, s in metrics if s == 0 and (n.startswith("eval/average/")
                                                                          or n.startswith("cost/merge"))}
        if summary:
            w.add_hparams(hp, summary, run_name=".")
        for p in artifacts:
            if p.suffix.lower() == ".png":
                import numpy as np
                from PIL import Image

                with Image.open(p) as im:
                    w.add_image(f"artifacts/{p.stem}", np.asarray(im.convert("RGB")), dataformats="HWC")
    return tb


def mlflow_uri(cfg: LoggingConfig) -> str:
    """The tracking URI a run logs to (option, then $MLFLOW_TRACKING_URI, then a local file store)."""
    if cfg.tracking_uri:
        uri = cfg.tracking_uri
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
    else:
        root = Path(os.path.expanduser(cfg.dir)) if cfg.dir else Path.cwd()
        uri = (root / "mlruns").resolve().as_uri()
    return uri


def _file_store(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file:")


def mlflow_client(uri: str):
    """An ``MlflowClient`` for ``uri``. MLflow 3 refuses its local file store unless MLFLOW_ALLOW_FILE_STORE is
    set; mlflow-skinny has no database store, so for a file URI this process sets it (documented)."""
    if _file_store(uri):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _write_mlflow(cfg: LoggingConfig, name: str, params: dict[str, Any], metrics: list[tuple[str, float, int]],
                  artifacts: list[Path], report: Mapping[str, Any]) -> dict[str, str]:
    import time

    from mlflow.entities import Metric, Param, RunTag

    uri = mlflow_uri(cfg)
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(cfg.experiment)
    run = client.create_run(exp_id, run_name=name, tags={"fusion_bench.program": str(params.get("program"))})
    rid = run.info.run_id
    try:
        now = int(time.time() * 1000)
        ps = [Param(sanitize_key(k), str(v)) for k, v in params.items()]
        ms = [Metric(n, v, now, s) for n, v, s in metrics]
        for i in range(0, len(ps), 100):
            client.log_batch(rid, params=ps[i:i + 100])
        for i in range(0, len(ms), 1000):
            client.log_batch(rid, metrics=ms[i:i + 1000])
        client.log_batch(rid, tags=[RunTag("fusion_bench.run_name", name)])
        if cfg.artifacts:
            for p in artifacts:
                client.log_artifact(rid, str(p))
            if not any(p.suffix == ".json" for p in artifacts):
                client.log_dict(rid, json.loads(json.dumps(to_plain(dict(report)), default=str)), "report.json")
        client.set_terminated(rid, "FINISHED")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    return {"tracking_uri": uri, "experiment_id": str(exp_id), "run_id": rid}


def log_run(values: Mapping[str, Any] | LoggingConfig, report: Mapping[str, Any], output_dir: str | None = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Log a finished run's config, metrics and artifacts to the enabled backends; return where they went.

    Args:
        values: the ``logging`` options.
        report: the run's report (:func:`fusion_bench.programs.run_program` or ``run_continual``).
        output_dir: the run folder (where ``logs/`` goes when ``logging.dir`` is null).
        log: where the one summary line goes.
    """
    cfg = check_logging(to_plain(values) if not isinstance(values, LoggingConfig) else to_plain(values), output_dir)
    if cfg is None or not enabled(cfg):
        return {}
    name = cfg.run_name or default_run_name(report)
    params = run_params(report)
    metrics = run_metrics(report)
    artifacts = _artifact_paths(report) if cfg.artifacts else []
    out: dict[str, Any] = {"run_name": name, "backends": enabled(cfg)}
    if cfg.tensorboard or cfg.csv:
        import yaml

        from fusion_bench.io.atomic import atomic_file

        run_dir = _run_dir(cfg, output_dir, name)
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(run_dir / PARAMS_FILE, "w") as f:
            yaml.safe_dump(params, f, sort_keys=False, allow_unicode=True)
        copied = []
        if artifacts:
            (run_dir / ARTIFACTS_DIR).mkdir(exist_ok=True)
            for p in artifacts:
                shutil.copy2(p, run_dir / ARTIFACTS_DIR / p.name)
                copied.append(f"{ARTIFACTS_DIR}/{p.name}")
        elif cfg.artifacts:  # no report file was written (report_path unset): the report itself
            (run_dir / ARTIFACTS_DIR).mkdir(exist_ok=True)
            with atomic_file(run_dir / ARTIFACTS_DIR / "report.json", "w") as f:
                json.dump(to_plain(dict(report)), f, indent=2, default=str)
            copied.append(f"{ARTIFACTS_DIR}/report.json")
        if cfg.csv:
            _write_csv(run_dir, metrics)
        if cfg.tensorboard:
            _write_tensorboard(run_dir, params, metrics, report, artifacts)
        meta = {"run_name": name, "status": "finished", "program": params.get("program"),
                "method": params.get("method.name"), "experiment": cfg.experiment,
                "backends": [b for b in enabled(cfg) if b != "mlflow"], "artifacts": copied,
                "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        with atomic_file(run_dir / RUN_FILE, "w") as f:
            json.dump(meta, f, indent=2)
        out["dir"] = str(run_dir)
    if cfg.mlflow:
        out["mlflow"] = _write_mlflow(cfg, name, params, metrics, artifacts, report)
    log(f"logged run '{name}' ({', '.join(enabled(cfg))}): {len(metrics)} metric points, {len(params)} parameters"
        + (f" -> {out['dir']}" if "dir" in out else "") + (f"; MLflow {out['mlflow']['tracking_uri']}"
                                                            if "mlflow" in out else ""))
    return out
