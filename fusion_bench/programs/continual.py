"""The continual program (``program=continual``): models arrive one at a time; evaluate after every step.

    fusion_bench method=opcm modelpool=clip_zoo taskpool=clip_zoo program=continual program.orders=3

For each of ``program.orders`` seeded task orders (order k shuffles the pool's models with seed
``program.order_seed + k``; ``program.order=[...]`` gives one order by hand), a continual method
(family ``continual``: OPCM, DOP, the sequential baselines) merges the models one by one; after step t
the merged model is evaluated on the tasks of the t models seen so far (a model's name is its task's
name in the task pool). Reported per order and averaged over orders (the protocol of OPCM, Tang et al.
2025, and DOP, Yang et al. 2025):

- ``final_avg_acc``: mean accuracy over all T tasks after the last step;
- ``avg_acc_curve``: after each step t, the mean accuracy over the t tasks seen; ``avg_acc_over_steps``
  is its mean over the T steps;
- ``bwt``: backward transfer, ``1/(T-1) sum_{i<T} (a_{T,i} - a_{i,i})`` with ``a_{t,i}`` the accuracy on
  the i-th task of the order after step t (Lopez-Paz & Ranzato 2017; negative: forgetting);
- memory after every step: the process RSS and the bytes of the tensors the method holds
  (``state_bytes``: pretrained copy, accumulators, merged model), which stays constant in the number of
  models; plus merge and evaluation wall times.

The report goes to ``report.json`` (``report_path``) and the accuracy-against-step plot beside it
(``<report stem>_accuracy.png``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusion_bench.config_schema import SEED_RANGE, build_config, option, to_plain
from fusion_bench.errors import ConfigError
from fusion_bench.io.outputs import check_output, output_file, output_lock
from fusion_bench.methods.base import build_method
from fusion_bench.methods.continual.base import ContinualMethod, seeded_order
from fusion_bench.modelpool.base import build_modelpool
from fusion_bench.taskpool.base import build_taskpool
from fusion_bench.utils import current_rss_bytes, measure


@dataclass
class ContinualProgramConfig:
    """Options of ``program=continual`` (``program.<option>=value``)."""

    name: str = option("continual", choices=("continual",), help="The program: continual merging, evaluated after "
                       "every step.")
    orders: int = option(10, ge=1, le=10**6, help="Number of seeded task orders (the OPCM paper averages 10).")
    order_seed: int = option(0, **SEED_RANGE, help="Order k is the pool's models shuffled with seed order_seed + k.")
    order: list[str] | None = option(None, help="One explicit order of the pool's models (overrides orders).")
    metric: str = option("accuracy", help="The task pool's per-task metric reported (a higher-is-better score).")
    plot: bool = option(True, help="Write the accuracy-against-step plot (PNG) beside the report.")


def plot_path_for(report_path: str | os.PathLike) -> Path:
    p = Path(os.path.expanduser(str(report_path)))
    return p.with_name(p.stem + "_accuracy.png")


def order_metrics(order: list[str], acc: list[dict[str, float]]) -> dict[str, Any]:
    """Final average, curve, its mean and BWT of one order; ``acc[t][task]`` after step t+1 (0-based)."""
    T = len(order)
    curve = [sum(acc[t][order[i]] for i in range(t + 1)) / (t + 1) for t in range(T)]
    bwt = (sum(acc[T - 1][order[i]] - acc[i][order[i]] for i in range(T - 1)) / (T - 1)) if T > 1 else 0.0
    return {"final_avg_acc": curve[-1], "avg_acc_curve": curve, "avg_acc_over_steps": sum(curve) / T, "bwt": bwt}


def _mean_std(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0}


def run_continual(config: Mapping[str, Any], program: Mapping[str, Any] | None = None, *, modelpool=None, method=None,
                  taskpool=None, log=print) -> dict[str, Any]:
    """Run the continual protocol and return its report (also written to ``report_path``).

    ``config`` holds the usual top-level keys (method, modelpool, taskpool, seed, device, report_path, ...);
    ``program`` the :class:`ContinualProgramConfig` options. Objects may be given directly (Python API).
    """
    from fusion_bench.programs.fusion import (
        OVERWRITE_HINT,
        ProgramConfig,
        _report_path,
        _seed_everything,
        _version,
    )

    cfg = build_config(ProgramConfig, config, ignore=("hydra", "program"))
    pcfg = build_config(ContinualProgramConfig, program or {}, prefix="program")
    from fusion_bench.engine.devices import run_device_options
    from fusion_bench.tracking import check_logging

    check_logging(cfg.logging, cfg.output_dir)  # before any work: options, folder and packages
    method_cfg, taskpool_cfg = run_device_options(cfg)
    method = method or build_method(method_cfg)
    if not isinstance(method, ContinualMethod):
        from fusion_bench.methods import list_methods

        raise ConfigError(f"program=continual needs a continual method (method={method.name} is of family "
                          f"'{method.family}'); choose one of: {', '.join(list_methods('continual'))}.")
    if cfg.merged_model_path:
        raise ConfigError("program=continual does not save merged models (one per step and order); drop "
                          "merged_model_path, or run program=fusion with the same method for the final model.")
    modelpool = modelpool or build_modelpool(cfg.modelpool)
    taskpool = taskpool or build_taskpool(taskpool_cfg, device=cfg.device)
    names = list(modelpool.model_names)
    if not names:
        raise ConfigError("program=continual: the model pool has no model besides '_pretrained_'.")
    tasks = list(getattr(taskpool, "tasks", []))
    missing = [n for n in names if n not in tasks]
    if missing:
        raise ConfigError(f"program=continual evaluates each model's own task, but model '{missing[0]}' names no task "
                          f"of the task pool (tasks: {tasks}); give the models their tasks' names.")
    if pcfg.order is not None:
        if sorted(pcfg.order) != sorted(names):
            raise ConfigError(f"program.order={pcfg.order} must list each of the pool's models once: {names}.")
        orders = [(None, list(pcfg.order))]
    else:
        orders = [(pcfg.order_seed + k, seeded_order(names, pcfg.order_seed + k)) for k in range(pcfg.orders)]
    rep_path = _report_path(cfg)
    targets = []
    if rep_path:
        targets.append((Path(os.path.expanduser(rep_path)), "report"))
        if pcfg.plot:
            targets.append((plot_path_for(rep_path), "plot"))
    if cfg.dry_run:
        plan = {"method": method.name, "hyperparameters": method.hyperparameters(), "models": names,
                "orders": [{"seed": s, "order": o} for s, o in orders], "outputs": [str(t[0]) for t in targets]}
        log("dry run (program=continual): configuration valid; nothing merged.")
        log(json.dumps(plan, indent=2))
        return {"dry_run": True, "plan": plan}
    for dest, what in targets:
        if what == "plot" and dest.exists() and cfg.overwrite:
            continue  # a PNG carries no marker; it is replaced together with the report it belongs to
        check_output(dest, overwrite=cfg.overwrite, what=what, kind="file", hint=OVERWRITE_HINT)
    with ExitStack() as stack:
        for dest, what in targets:
            stack.enter_context(output_lock(dest, what))
        return _run(cfg, pcfg, config, program, method, modelpool, taskpool, orders, rep_path, log,
                    version=_version(), seed_everything=_seed_everything, hint=OVERWRITE_HINT)


def _run(cfg, pcfg, config, program, method, modelpool, taskpool, orders, rep_path, log, *, version,
         seed_everything, hint) -> dict[str, Any]:
    seed_everything(cfg.seed)
    t_start = time.perf_counter()
    per_order: list[dict[str, Any]] = []
    with measure() as whole:
        for k, (seed, order) in enumerate(orders):
            log(f"[continual] {method.name}: order {k + 1}/{len(orders)} (seed {seed}): {' -> '.join(order)}")
            acc: list[dict[str, float]] = []
            steps: list[dict[str, Any]] = []
            it = method.steps(modelpool, order)
            merge_s_total = eval_s_total = 0.0
            while True:
                t0 = time.perf_counter()
                try:
                    t, name, model = next(it)
                except StopIteration:
                    break
                merge_s = time.perf_counter() - t0
                rss = current_rss_bytes()
                state = method.state_bytes()
                t1 = time.perf_counter()
                seen = order[:t]
                rep = taskpool.evaluate(model, tasks=seen)
                eval_s = time.perf_counter() - t1
                per_task = {task: _metric(rep, task, pcfg.metric) for task in seen}
                acc.append(per_task)
                avg = sum(per_task.values()) / len(per_task)
                merge_s_total += merge_s
                eval_s_total += eval_s
                steps.append({"step": t, "model": name, "accuracy": per_task, "avg_acc_seen": avg,
                              "merge_time_s": round(merge_s, 4), "eval_time_s": round(eval_s, 4),
                              "rss_mb": round(rss / 2**20, 1), "state_mb": round(state / 2**20, 3),
                              "state_bytes": state})
                log(f"[continual]   step {t}/{len(order)} +{name}: avg {pcfg.metric} on {t} seen "
                    f"{100 * avg:.2f}  (merge {merge_s:.2f}s, eval {eval_s:.2f}s, state {state / 2**20:.1f} MB, "
                    f"RSS {rss / 2**20:.0f} MB)")
            m = order_metrics(order, acc)
            extra = {k2: getattr(method, k2) for k2 in ("lambdas",) if hasattr(method, k2)}
            per_order.append({"seed": seed, "order": order, **m, "steps": steps,
                              "merge_time_s": round(merge_s_total, 3), "eval_time_s": round(eval_s_total, 3),
                              **({"method_trace": extra} if extra else {})})
    T = len(orders[0][1])
    curves = [o["avg_acc_curve"] for o in per_order]
    summary = {
        "orders": len(per_order), "steps": T, "metric": pcfg.metric,
        "final_avg_acc": _mean_std([o["final_avg_acc"] for o in per_order]),
        "avg_acc_over_steps": _mean_std([o["avg_acc_over_steps"] for o in per_order]),
        "bwt": _mean_std([o["bwt"] for o in per_order]),
        "avg_acc_curve": [statistics.fmean(c[t] for c in curves) for t in range(T)],
        "merge_time_s_per_order": _mean_std([o["merge_time_s"] for o in per_order]),
        "state_mb_per_step": [statistics.fmean(o["steps"][t]["state_mb"] for o in per_order) for t in range(T)],
        "rss_mb_per_step": [max(o["steps"][t]["rss_mb"] for o in per_order) for t in range(T)],
        "state_constant_after_step_2": all(len({s["state_bytes"] for s in o["steps"][1:]}) <= 1 for o in per_order),
    }
    report: dict[str, Any] = {
        "fusion_bench_version": version,
        "program": "continual",
        "config": {**to_plain({k: v for k, v in dict(config).items() if k not in ("hydra", "program")}),
                   "program": to_plain(pcfg)},
        "method": {"name": method.name, "variant": method.variant, "family": method.family,
                   "hyperparameters": method.hyperparameters(), "uses_data": method.uses_data},
        "seed": cfg.seed,
        "summary": summary,
        "per_order": per_order,
        "cost": {"total_wall_time_s": round(time.perf_counter() - t_start, 3),
                 "peak_rss_mb": whole.as_dict()["peak_rss_mb"]},
        "modelpool": modelpool.describe(),
        "checkpoint_hashes": modelpool.content_hashes(),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform(), "argv": sys.argv},
    }
    if cfg.print_table:
        log(format_table(report))
    if rep_path:
        if pcfg.plot:
            plot(report, plot_path_for(rep_path))
            report["plot_path"] = str(plot_path_for(rep_path))
        with output_file(os.path.expanduser(rep_path), "w", overwrite=cfg.overwrite, what="report", hint=hint) as f:
            json.dump(report, f, indent=2, default=str)
        report["report_path"] = rep_path
        log(f"report written to {rep_path}" + (f" (plot: {report['plot_path']})" if pcfg.plot else ""))
    if cfg.logging:
        from fusion_bench.tracking import log_run

        logged = log_run(cfg.logging, report, output_dir=cfg.output_dir, log=log)
        if logged:
            report["logged"] = logged
    return report


def _metric(rep: Mapping[str, Any], task: str, metric: str) -> float:
    m = rep.get("tasks", {}).get(task)
    if m is None or metric not in m:
        have = sorted(m) if m else []
        raise ConfigError(f"program.metric={metric!r}: the task pool reported no '{metric}' for task '{task}' "
                          f"(it reports {have}); set program.metric to one of them.")
    return float(m[metric])


def format_table(report: Mapping[str, Any]) -> str:
    """The per-step table (average over the seen tasks, mean over orders and per order) and the summary."""
    s = report["summary"]
    orders = report["per_order"]
    head = "| step | mean | " + " | ".join(f"order {i + 1}" for i in range(len(orders))) + " |"
    lines = [f"{report['method']['name']}: average {s['metric']} on the tasks seen so far", head,
             "|" + "---|" * (len(orders) + 2)]
    for t in range(s["steps"]):
        cells = " | ".join(f"{100 * o['avg_acc_curve'][t]:.2f}" for o in orders)
        lines.append(f"| {t + 1} | {100 * s['avg_acc_curve'][t]:.2f} | {cells} |")
    lines.append(f"final avg {100 * s['final_avg_acc']['mean']:.2f} ± {100 * s['final_avg_acc']['std']:.2f}, "
                 f"avg over steps {100 * s['avg_acc_over_steps']['mean']:.2f} ± "
                 f"{100 * s['avg_acc_over_steps']['std']:.2f}, BWT {100 * s['bwt']['mean']:.2f} ± "
                 f"{100 * s['bwt']['std']:.2f} ({s['orders']} orders); method state "
                 f"{s['state_mb_per_step'][-1]:.1f} MB after the last step, peak RSS {report['cost']['peak_rss_mb']} MB")
    return "\n".join(lines)


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Average accuracy on the seen tasks against the step: one thin line per order, the mean in bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fusion_bench.io.atomic import atomic_path

    s = report["summary"]
    steps = list(range(1, s["steps"] + 1))
    fig, ax = plt.subplots(figsize=(6, 4))
    for o in report["per_order"]:
        ax.plot(steps, [100 * v for v in o["avg_acc_curve"]], color="tab:blue", alpha=0.3, lw=1)
    ax.plot(steps, [100 * v for v in s["avg_acc_curve"]], color="tab:blue", lw=2.5, marker="o",
            label=f"mean of {s['orders']} orders")
    ax.set_xlabel("step (models merged)")
    ax.set_ylabel(f"average {s['metric']} on seen tasks (%)")
    ax.set_title(f"{report['method']['name']}: continual merging")
    ax.set_xticks(steps)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
