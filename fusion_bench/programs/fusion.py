"""The fusion program: build modelpool, method and taskpool from config, run, evaluate, report."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusion_bench.checks import check_result
from fusion_bench.config_schema import SEED_RANGE, build_config, option, to_plain
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.io.outputs import check_output, output_file, output_lock
from fusion_bench.methods.base import FusionResult, TensorwiseMerge, build_method
from fusion_bench.modelpool.base import build_modelpool, save_path_for
from fusion_bench.taskpool.base import average_metrics, build_taskpool
from fusion_bench.utils import count_parameters, float_numel, measure

#: how a run's user replaces an existing output (named in the error message)
OVERWRITE_HINT = "overwrite=true"


@dataclass
class ProgramConfig:
    """Top-level keys of a run (besides the method, modelpool and taskpool groups)."""

    method: dict[str, Any] = option({}, help="The method group: method=<name> plus method.<option>=value.")
    modelpool: dict[str, Any] = option({}, help="The model pool group.")
    taskpool: dict[str, Any] = option({}, help="The task pool group.")
    seed: int = option(0, **SEED_RANGE, help="Global seed (torch, numpy, random) set before the method runs; written to the report.")
    device: str = option("auto", help="Device for evaluation: auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...; a "
                         "missing GPU falls back to the CPU (docs/logging_devices.md).")
    devices: list[str] | str | None = option(
        None, help="Several devices (docs/logging_devices.md): a list ([cuda:0,cuda:1]), auto (every visible GPU) or "
        "a number of GPUs. The task pool evaluates across them (ensemble members round-robin, one model's batches "
        "split) and ensemble methods place their members round-robin; pools and methods with their own "
        "devices option keep it. null: the one device.")
    precision: str = option("32", choices=("32", "32-true", "bf16-mixed", "16-mixed"),
                            help="Evaluation arithmetic of task pools that have the option: 32 (exact float32), "
                            "bf16-mixed (bfloat16 autocast, works on CPU) or 16-mixed (float16 autocast, for GPUs).")
    logging: dict[str, Any] = option(
        {}, help="Experiment logging (docs/logging_devices.md): logging.tensorboard / logging.csv / logging.mlflow = "
        "true, logging.dir, logging.run_name, logging.experiment, logging.tracking_uri, logging.artifacts.")
    dry_run: bool = option(False, help="Validate config and models, print the plan, and stop before merging.")
    merged_model_path: str | None = option(None, help="Save the merged model here (HF folder or .safetensors), atomically.")
    overwrite: bool = option(False, help="Replace an existing merged_model_path / report_path. Only outputs that "
                             "fusion_bench wrote (marked) are ever replaced, never an input or a folder holding one; "
                             "without it an existing destination is refused before any merging.")
    report_path: str | None = option(None, help="Write the JSON report here (default: <output_dir>/report.json).")
    evaluate: bool = option(True, help="Evaluate the result with the task pool.")
    print_table: bool = option(True, help="Print the per-task table after evaluation.")
    output_dir: str | None = option(None, help="Run folder (set by the CLI to Hydra's output folder).")
    fusionbench: dict[str, Any] | None = option(
        None, help="Set by the CLI when the command line used FusionBench's names (docs/fusionbench.md): the original "
        "arguments, the translated ones and those without effect here; kept in the report.")
    engine: str = option("auto", choices=("auto", "memory", "streaming"),
                         help="How tensor-wise merges run: 'streaming' reads and writes tensor by tensor "
                         "(out-of-core, needs merged_model_path); 'memory' holds the merged model; 'auto' streams "
                         "when the result is only written (merged_model_path set, evaluate=false).")


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _extra_parameters(result: FusionResult, base_params: int) -> int:
    """Weights held by the result beyond one model of the pool (per-task results hold one per task)."""
    if result.kind == "per_task":
        return sum(float_numel(m) for m in result.models.values()) - base_params
    return float_numel(result.model) - base_params


def evaluate_result(result: FusionResult, taskpool) -> dict[str, Any]:
    """Evaluate a result: one model on all tasks, or each per-task model on its own task."""
    if result.kind != "per_task":
        return taskpool.evaluate(result.model)
    per_task: dict[str, Any] = {}
    for task, model in result.models.items():
        rep = taskpool.evaluate(model, tasks=[task]) if task in taskpool.tasks else None
        if rep is not None:
            per_task.update(rep.get("tasks", {}))
    return {"tasks": per_task, "average": average_metrics(per_task)}


def format_table(report: Mapping[str, Any]) -> str:
    tasks = report.get("evaluation", {}).get("tasks", {})
    if not tasks:
        return ""
    metrics = sorted({k for m in tasks.values() for k in m})
    head = "| task | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 1)]

    for t, m in tasks.items():
        cells = []
        for k in metrics:
            v = m.get(k, "")
            cells.append(f"{100 * v:.2f}" if "acc" in k and isinstance(v, float) else (f"{v:.4f}" if isinstance(v, float) else str(v)))
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    avg = report["evaluation"].get("average", {})
    cells = [f"{100 * avg[k]:.2f}" if "acc" in k and k in avg else (f"{avg[k]:.4f}" if k in avg else "") for k in metrics]
    lines.append("| **average** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_program(config: Mapping[str, Any] | ProgramConfig, *, modelpool=None, method=None, taskpool=None,
                log=print) -> dict[str, Any]:
    """Run one fusion experiment and return its report (also written to ``report_path``).

    ``modelpool``, ``method`` and ``taskpool`` objects may be given directly (Python API); otherwise
    they are built from the config groups.
    """
    cfg = build_config(ProgramConfig, config, ignore=("hydra",))
    from fusion_bench.engine.devices import run_device_options
    from fusion_bench.tracking import check_logging

    check_logging(cfg.logging, cfg.output_dir)  # before any work: options, folder and packages
    method_cfg, taskpool_cfg = run_device_options(cfg)
    method = method or build_method(method_cfg)
    modelpool = modelpool or build_modelpool(cfg.modelpool)
    taskpool = taskpool or build_taskpool(taskpool_cfg, device=cfg.device)

    # validation before any work
    if isinstance(method, TensorwiseMerge):
        method.check_pool(modelpool.model_names, modelpool.has_pretrained)
    from fusion_bench.engine.streaming import streaming_applicable

    can_stream = streaming_applicable(method, modelpool)
    streaming = cfg.engine == "streaming" or (cfg.engine == "auto" and can_stream and bool(cfg.merged_model_path)
                                              and not cfg.evaluate)
    if streaming and not can_stream:
        raise ConfigError(f"engine=streaming: method '{method.name}' does not merge tensor by tensor or a model is "
                          "not on disk; use engine=memory.")
    if streaming and not cfg.merged_model_path and not cfg.dry_run:
        raise ConfigError("engine=streaming writes the merged model to disk: set merged_model_path=<folder>.")
    if cfg.dry_run:
        plan = {"method": method.name, "hyperparameters": method.hyperparameters(),
                "models": modelpool.describe(), "taskpool": getattr(taskpool, "tasks", [])}
        if streaming:
            from fusion_bench.engine.streaming import plan_merge

            splan = plan_merge(method, modelpool)
            log(splan.summary())
            plan["streaming"] = splan.as_dict()
            plan["tensors"] = len(splan.jobs)
            if splan.mismatches:
                raise ModelMismatchError(f"dry run: {len(splan.mismatches)} mismatch(es), first: "
                                         f"{splan.mismatches[0]}.")
        from fusion_bench.programs.dry_run import check_run

        merges = isinstance(method, TensorwiseMerge) or (method.uses_data and method.family == "merging")
        found = check_run(cfg, method, modelpool, taskpool, merges=merges, log=log)
        plan.update({k: v for k, v in found.items() if k not in plan})
        targets = output_targets(cfg, modelpool, streaming, per_task=_declares_per_task(method))
        check_outputs(targets, cfg, modelpool)  # the outputs: may be written (not created, not locked)
        if targets:
            plan["checked"].append("output(s) may be written: " + ", ".join(str(t[0]) for t in targets))
        log("dry run: configuration, models" + (", data" if method.uses_data else "")
            + " and outputs are valid; nothing merged.")
        for note in plan["not_checked"]:
            log(f"dry run: not checked: {note}")
        log(json.dumps(plan, indent=2, default=str))
        return {"dry_run": True, "plan": plan}

    targets = output_targets(cfg, modelpool, streaming, per_task=_declares_per_task(method))
    check_outputs(targets, cfg, modelpool)  # before any work: no hour of merging lost to this error
    with ExitStack() as stack:  # one run at a time per destination, for the whole run
        for dest, what, _kind in targets:
            stack.enter_context(output_lock(dest, what))
        return _run_checked(cfg, config, method, modelpool, taskpool, streaming, log)


def _declares_per_task(method) -> bool:
    return getattr(method, "result_kind", None) == "per_task"


def output_targets(cfg: ProgramConfig, modelpool, streaming: bool, per_task: bool = False) -> list[tuple[Path, str, str]]:
    """The run's outputs ``(path, what, 'dir' | 'file')``: the merged model (where
    :meth:`ModelPool.save_model` will put it; a folder of per-task models for one-model-per-task methods,
    see :meth:`ModelPool.save_models`) and the report."""
    out: list[tuple[Path, str, str]] = []
    if cfg.merged_model_path:
        p = Path(os.path.expanduser(str(cfg.merged_model_path)))
        if streaming:
            out.append((p, "merged model folder", "dir"))
        elif per_task:
            out.append((p, "per-task models", "dir"))
        else:
            base = modelpool.base_name()
            kind = modelpool.kind(base)
            hf = kind == "hf" or (kind == "module" and hasattr(modelpool.entry(base), "save_pretrained"))
            out.append((p, "merged model", "dir") if hf else (save_path_for(None, p), "merged model", "file"))
    rep = _report_path(cfg)
    if rep:
        out.append((Path(os.path.expanduser(rep)), "report", "file"))
    return out


def check_outputs(targets: list[tuple[Path, str, str]], cfg: ProgramConfig, modelpool) -> None:
    """Raise OutputExistsError for an output that may not be written (see :mod:`fusion_bench.io.outputs`)."""
    from fusion_bench.engine.streaming import pool_input_paths

    inputs = pool_input_paths(modelpool)
    for dest, what, kind in targets:
        check_output(dest, overwrite=cfg.overwrite, inputs=inputs, what=what, kind=kind, hint=OVERWRITE_HINT)


def _report_path(cfg: ProgramConfig) -> str | None:
    return cfg.report_path or (str(Path(cfg.output_dir) / "report.json") if cfg.output_dir else None)


def _run_checked(cfg: ProgramConfig, config, method, modelpool, taskpool, streaming: bool, log) -> dict[str, Any]:
    """The run once its outputs are checked and locked: fuse, save, evaluate, report."""
    _seed_everything(cfg.seed)
    t_start = time.perf_counter()
    with measure() as m:
        if streaming:
            from fusion_bench.engine.streaming import run_streaming

            result = run_streaming(method, modelpool, cfg.merged_model_path, load=cfg.evaluate,
                                   overwrite=cfg.overwrite, overwrite_hint=OVERWRITE_HINT)
        else:
            result = method.run(modelpool)
    if not isinstance(result, FusionResult):
        raise TypeError(f"Method '{method.name}'.run returned {type(result).__name__}, expected FusionResult.")
    check_result(result, method)  # a non-finite merged tensor stops the run before anything is saved
    extra_params = result.metadata.get("extra_parameters")
    if extra_params is None:
        extra_params = _extra_parameters(result, float_numel(modelpool.load_model(modelpool.base_name())))

    report: dict[str, Any] = {
        "fusion_bench_version": _version(),
        "config": to_plain(config) if not isinstance(config, ProgramConfig) else to_plain(cfg),
        "method": {"name": method.name, "variant": method.variant, "family": method.family,
                   "hyperparameters": method.hyperparameters(), "uses_data": method.uses_data},
        "seed": cfg.seed,
        "result_kind": result.kind,
        "cost": {"merge_wall_time_s": round(m.wall_time_s, 4), "peak_rss_mb": m.as_dict()["peak_rss_mb"],
                 "peak_rss_delta_mb": m.as_dict()["peak_rss_delta_mb"],
                 "extra_parameters": extra_params,
                 **({"peak_cuda_mb": m.as_dict()["peak_cuda_mb"]} if m.peak_cuda_bytes is not None else {})},
        "metadata": to_plain({k: v for k, v in result.metadata.items() if _jsonable(v)}),
        "modelpool": modelpool.describe(),
        "checkpoint_hashes": modelpool.content_hashes(),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform(), "argv": sys.argv},
    }
    if result.kind != "per_task":
        report["parameters"] = count_parameters(result.model)
    report["engine"] = "streaming" if streaming else "memory"
    if streaming:
        report["merged_model_path"] = str(cfg.merged_model_path)
    elif cfg.merged_model_path and result.kind == "merged":
        path = modelpool.save_model(result.model, cfg.merged_model_path, overwrite=cfg.overwrite,
                                    overwrite_hint=OVERWRITE_HINT)
        report["merged_model_path"] = str(path)
        log(f"merged model saved to {path}")
    elif cfg.merged_model_path and result.kind == "per_task":
        paths = modelpool.save_models(result.models, cfg.merged_model_path, overwrite=cfg.overwrite,
                                      overwrite_hint=OVERWRITE_HINT)
        report["merged_model_path"] = str(Path(os.path.expanduser(str(cfg.merged_model_path))))
        report["per_task_model_paths"] = {t: str(p) for t, p in paths.items()}
        log(f"{len(paths)} per-task models saved under {report['merged_model_path']} (one per task: the task id "
            "chooses the model)")
    elif cfg.merged_model_path and result.kind == "ensemble":
        report["merged_model_path"] = None
        report["merged_model_path_note"] = ("an output ensemble has no merged weights: its members are the pool's "
                                            "models, nothing was saved")
        log(f"merged_model_path={cfg.merged_model_path}: {report['merged_model_path_note']}")
    if cfg.evaluate:
        with measure() as em:
            report["evaluation"] = evaluate_result(result, taskpool)
        report["cost"]["evaluation_wall_time_s"] = round(em.wall_time_s, 4)
        extra = getattr(taskpool, "report_extras", None)
        if callable(extra):
            report.update(extra())
    report["total_wall_time_s"] = round(time.perf_counter() - t_start, 4)

    out = _report_path(cfg)
    artifacts = getattr(method, "write_artifacts", None)  # e.g. a mixing method's routing plot beside the report
    if out and callable(artifacts):
        report["artifacts"] = artifacts(report, Path(os.path.expanduser(out)), cfg.overwrite)
    if out:
        from fusion_bench.engine.streaming import pool_input_paths

        with output_file(os.path.expanduser(out), "w", overwrite=cfg.overwrite, inputs=pool_input_paths(modelpool),
                         what="report", hint=OVERWRITE_HINT) as f:
            json.dump(report, f, indent=2, default=str)
        report["report_path"] = out
        log(f"report written to {out}")
    if cfg.print_table and cfg.evaluate:
        table = format_table(report)
        if table:
            log(table)
    if cfg.logging:
        from fusion_bench.tracking import log_run

        logged = log_run(cfg.logging, report, output_dir=cfg.output_dir, log=log)
        if logged:
            report["logged"] = logged
    return report


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(to_plain(v), default=None)
        return True
    except (TypeError, ValueError):
        return False


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fusion_bench")
    except Exception:
        return "unknown"
