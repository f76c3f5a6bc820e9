"""The leaderboard: every registered method that applies, run on an offline zoo on equal terms.

    fusion_bench leaderboard [--scale full|tiny] [--root DIR] [--out DIR] [--methods a,b,...]
                             [--max-samples N] [--corruption NAME] [--tune [--tune-grid 0.05,0.1,...]]
    fusion_bench leaderboard --track text [--variant full|lora] [--scale ...] [--tune] ...
    fusion_bench leaderboard ... [--executor sequential|process|ray] [--jobs N] [--ray-address ADDR] [--no-resume]

``--track clip`` (default): the offline CLIP zoo, zero-shot evaluation. ``--track text``: the MiniLM text
zoo (:mod:`fusion_bench.benchmark.text_zoo`), full or LoRA fine-tuned encoders (``--variant``), each task
evaluated with its own fine-tuned head; the data methods run with the cheaper options of
:data:`TEXT_METHOD_OPTIONS` (recorded in each row's hyperparameters), and the document gets the text
benchmark's quality targets (:func:`quality_targets`).

For every method of :func:`fusion_bench.methods.list_methods` (so new methods appear without
edits) the zoo's model pool is fused with the method's documented defaults and the result is
evaluated zero-shot on the eight tasks by :func:`fusion_bench.programs.run_program`. Methods that
do not apply are listed with the reason (training methods, methods for a fixed number of models
other than eight, methods whose run fails on the zoo). Reference rows: the pretrained CLIP and the
individual fine-tuned models (each on its own task).

Outputs (written atomically into ``--out``, default ``./leaderboard``): ``leaderboard.md``,
``leaderboard.csv``, ``leaderboard.json`` (per-task accuracy, average, normalized accuracy = mean
over tasks of accuracy / fine-tuned accuracy (tasks where that is 0 left out), merge wall time, peak memory, extra parameters,
extra storage in bytes (the method's own count when it reports one, e.g. masks as bits; else 4 bytes per extra
parameter), whether the deployed result needs the task id (one model per task), data used) and ``leaderboard.png`` (average accuracy against merge time and against peak memory).

``--tune`` chooses the scaling coefficient lambda on held-out data, as task arithmetic's paper
(Ilharco et al. 2023) and FusionBench do: every method whose config has a ``scaling_factor`` field
is run once per value of a grid (default :data:`DEFAULT_TUNE_GRID`, or ``--tune-grid``, which
implies ``--tune``), each result evaluated on the zoo's labelled VALIDATION split (``max_samples``
applies); the value with the best average validation accuracy wins (ties: the smaller value) and
the method is run once more with it and evaluated on the test split as usual. Such a row records
``tuned`` = {scaling_factor, grid, validation_average} and ``tuning_time_s`` (the whole sweep; the
merge time stays that of the final run), its ``data`` column names the validation split, and the
tables show it as ``name (λ=value)``. Without ``--tune`` every method keeps its defaults.

Execution (docs/scale_out.md): the work is cut into independent jobs, the reference rows, one per method and,
when tuning, one per (method, grid value) followed by the method's final run; ``--executor`` runs them here one
after another (the default), in ``--jobs`` local processes, or on Ray (:mod:`fusion_bench.benchmark.executors`).
The table is the same whichever runs them. Each job's result is kept in ``OUT/jobs/<hash of its configuration>.json``
(written atomically); a re-run into the same ``--out`` reuses the complete ones (``--no-resume``: run all again).
A failed job is reported: its method has a FAILED row and its error under the table, in the CSV's ``error``
column and in the JSON's ``failed`` list.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fusion_bench.errors import ConfigError, FusionBenchError, did_you_mean
from fusion_bench.io.atomic import atomic_file, atomic_path

PRETRAINED_ROW = "pretrained"
FINETUNED_ROW = "fine-tuned (individual)"
#: the hyperparameter ``--tune`` selects, and the default grid of values tried on the validation split
TUNED_OPTION = "scaling_factor"
DEFAULT_TUNE_GRID: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
TUNED_DATA = f"validation split (labelled, selects {TUNED_OPTION})"
TRACKS = ("clip", "text")
#: the text track's options for the data methods, whose defaults (sized for the small CLIP zoo) would take
#: most of an hour each on a 22 M-parameter encoder on two CPU cores; every row records its hyperparameters
TEXT_METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "fisher_merging": {"num_fisher_examples": 64},
    "regmean": {"num_regmean_examples": 256},
    "adamerging": {"steps": 40, "batch_size": 8, "max_test_samples": 128},
}
#: the text benchmark's quality targets (docs/text_benchmark.md)
TARGET_FINETUNE_GAIN = 0.15   # each fine-tuned model >= 15 points above the pretrained encoder with its head
TARGET_TA_RECOVERY = 0.40     # (tuned) task arithmetic keeps >= 40 % of the pretrained -> fine-tuned gap
TARGET_SPREAD = 0.05          # best minus worst merging method >= 5 points


def tunable(method_cls: type) -> bool:
    """True when the method's config dataclass has the ``scaling_factor`` field that ``--tune`` selects."""
    cfg = getattr(method_cls, "config_class", None)
    return dataclasses.is_dataclass(cfg) and any(f.name == TUNED_OPTION for f in dataclasses.fields(cfg))


def _check_grid(grid: Sequence[float]) -> list[float]:
    """The grid as sorted distinct floats; a ConfigError naming ``tune_grid`` when it is empty or not numeric."""
    try:
        values = sorted({float(v) for v in grid})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"leaderboard tune_grid (--tune-grid) must be numbers, got {list(grid)!r}: {e}") from None
    if not values:
        raise ConfigError("leaderboard tune_grid (--tune-grid) is empty; give at least one scaling_factor value.")
    return values


def select_scaling_factor(method_cls: type, pool, val_taskpool, grid: Sequence[float],
                          options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``method_cls`` with every ``scaling_factor`` of ``grid``, evaluate on ``val_taskpool``.

    Returns ``{"scaling_factor": best, "grid": [...], "validation_average": {value: accuracy},
    "tuning_time_s": seconds}``; best = highest average validation accuracy over the task pool's tasks,
    ties broken toward the smaller value. Each run is seeded like the final run (seed 0). ``options``: the
    method's other options (kept fixed).
    """
    from fusion_bench.programs.fusion import run_program

    values = _check_grid(grid)
    t0 = time.perf_counter()
    scores: dict[float, float] = {}
    for v in values:
        rep = run_program({"print_table": False, "seed": 0}, modelpool=pool, method=method_cls({**(options or {}), TUNED_OPTION: v}),
                          taskpool=val_taskpool, log=lambda s: None)
        scores[v] = _validation_average(rep, val_taskpool.tasks, method_cls.name)
    return {TUNED_OPTION: _best_value(scores), "grid": values, "validation_average": scores,
            "tuning_time_s": round(time.perf_counter() - t0, 2)}


def _validation_average(report: dict[str, Any], tasks: Sequence[str], method: str) -> float:
    """The average validation accuracy of one tuning run over ``tasks`` (an error names a missing task)."""
    accs = _per_task_acc(report.get("evaluation", {}))
    missing = [t for t in tasks if t not in accs]
    if missing:
        raise FusionBenchError(f"tuning {method}: no validation accuracy for task '{missing[0]}'.")
    return sum(accs[t] for t in tasks) / len(tasks)


def _best_value(scores: dict[float, float]) -> float:
    """The grid value with the best validation average, ties broken toward the smaller value."""
    return max(scores, key=lambda v: (scores[v], -v))


def applicability(method_cls: type, names: list[str], has_pretrained: bool) -> str | None:
    """None when the method can run on the zoo's pool; else the reason it is skipped."""
    from fusion_bench.methods.base import TensorwiseMerge

    if method_cls.family == "training":
        return "trains models (it built the zoo's fine-tuned models: see the 'fine-tuned (individual)' row)"
    if method_cls.requires_pretrained and not has_pretrained:
        return "needs the pretrained model"
    if issubclass(method_cls, TensorwiseMerge):
        try:
            method_cls().check_pool(names, has_pretrained)
        except FusionBenchError as e:
            return f"does not apply to {len(names)} models with default options: {e}"
    return None


def _data_used(report: dict[str, Any], uses_data: bool) -> str:
    """The data a method used, from its metadata's ``data_used`` (split, count, labels) when it gives one."""
    du = report.get("metadata", {}).get("data_used")
    if isinstance(du, dict) and "split" in du:
        n = du.get("unlabeled_inputs", du.get("examples"))
        labels = "labelled" if du.get("labels_read") else "unlabeled"
        return f"{du['split']} split ({n} {labels} inputs)" if n is not None else f"{du['split']} split"
    return "train split" if uses_data else "none"


def needs_task_id(report: dict[str, Any]) -> bool:
    """True when the result is one model per task (the deployed model must be told the task)."""
    return report.get("result_kind") == "per_task" or bool(report.get("metadata", {}).get("needs_task_id"))


def extra_storage_bytes(report: dict[str, Any]) -> int | None:
    """Bytes stored beyond one model of the pool: the method's own count (``extra_storage_bytes`` in its
    metadata: masks as bits, low-rank factors, ...) when it gives one, else its extra parameters at the
    pool's float32 (4 bytes each; the zoos are float32)."""
    own = report.get("metadata", {}).get("extra_storage_bytes")
    if own is not None:
        return int(own)
    extra = report.get("cost", {}).get("extra_parameters")
    return None if extra is None else int(extra) * 4


def size_columns(report: dict[str, Any] | None, one_model: int, extra_parameters: int | None,
                 single_model: bool) -> dict[str, Any]:
    """The parameter and inference-cost columns of a row: ``total_parameters`` (weights the result stores),
    ``active_parameters`` (of those, the ones one input's forward uses) and ``inference_cost_ratio`` (forward
    time per batch relative to one model of the pool, measured on the same batch).

    Mixing methods report all three (``metadata.mixed_model``, see :mod:`fusion_bench.methods.mixing._moe_report`).
    Otherwise the total is one model plus the extra parameters, and a result that is one model of the pool's
    architecture (``single_model``) has active = total and a ratio of 1 by construction; the rest stay unknown.
    """
    mm = (report or {}).get("metadata", {}).get("mixed_model")
    if isinstance(mm, dict) and mm.get("total_parameters") is not None:
        return {"total_parameters": mm["total_parameters"], "active_parameters": mm.get("active_parameters_per_input"),
                "inference_cost_ratio": mm.get("inference_cost_ratio")}
    total = None if extra_parameters is None else one_model + int(extra_parameters)
    same = single_model and extra_parameters == 0
    return {"total_parameters": total, "active_parameters": total if same else None,
            "inference_cost_ratio": 1.0 if same else None}


def parse_method_options(items: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """``--set METHOD.KEY=VALUE`` items as {method: {key: value}}; values are YAML scalars (data, never code)."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        head, sep, raw = item.partition("=")
        method, dot, key = head.strip().partition(".")
        if not sep or not dot or not method or not key:
            raise ConfigError(f"leaderboard --set {item!r}: write METHOD.KEY=VALUE, e.g. --set we_moe.steps=200.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"leaderboard --set {item!r}: the value is not a YAML scalar ({e}).") from None
        out.setdefault(method, {})[key] = value
    return out


def _fmt_bytes(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    if v == 0:
        return "0"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= size:
            return f"{v / size:.1f} {unit}"
    return f"{int(v)} B"


def _per_task_acc(report: dict[str, Any]) -> dict[str, float]:
    return {t: float(m["accuracy"]) for t, m in report.get("tasks", {}).items() if "accuracy" in m}


def _row(name: str, kind: str, accs: dict[str, float], tasks: list[str], finetuned: dict[str, float] | None,
         **extra: Any) -> dict[str, Any]:
    avg = sum(accs[t] for t in tasks) / len(tasks) if all(t in accs for t in tasks) else None
    norm = None
    ref = [t for t in tasks if finetuned and finetuned.get(t)]  # tasks with a non-zero fine-tuned accuracy
    if avg is not None and ref:
        norm = sum(accs[t] / finetuned[t] for t in ref) / len(ref)
    return {"method": name, "kind": kind, "accuracy": {t: accs.get(t) for t in tasks}, "average": avg,
            "normalized": norm, **extra}


REFERENCE_JOB = "_references_"


def evaluate_references(pool, taskpool) -> dict[str, Any]:
    """The reference rows' evaluations: the pretrained model on every task, each fine-tuned model on its own
    task (one job; ``evaluation_time_one_model_s``: the pretrained model's evaluation wall time)."""
    from fusion_bench.methods.base import FusionResult
    from fusion_bench.programs.fusion import evaluate_result
    from fusion_bench.utils import measure

    with measure() as em:
        pre_rep = taskpool.evaluate(pool.load_pretrained_model())
    ft_models = {t: pool.load_model(t) for t in pool.model_names}
    ft_rep = evaluate_result(FusionResult("per_task", models=ft_models), taskpool)
    return {"pretrained": pre_rep, "finetuned": ft_rep, "evaluation_time_one_model_s": em.wall_time_s}


class _JobPlan:
    """The leaderboard's jobs. Per method: one run on the test split with its options; or, when tuned, one run
    on the validation split per grid value, then (once all of them are done) the run on the test split with the
    value selected. Jobs are plain data (:func:`fusion_bench.benchmark.executors.make_job`), seeded 0."""

    def __init__(self, track: str, zoo_opts: dict[str, Any], root: str, test_opts: dict[str, Any],
                 max_samples: int | None, val_max_samples: int | None, grid: list[float] | None,
                 method_options: dict[str, dict[str, Any]], reports_dir: Path, fingerprint: str, tasks: list[str],
                 log: Callable[[str], None]):
        self.track = track
        self.pool_cfg = {**zoo_opts, "root": root}
        self.test_cfg = {**self.pool_cfg, "max_samples": max_samples, **test_opts}
        self.val_cfg = {**self.pool_cfg, "split": "validation", "max_samples": val_max_samples or max_samples}
        self.grid, self.options, self.reports_dir = grid, method_options, reports_dir
        self.fingerprint, self.tasks, self.log = fingerprint, tasks, log
        self.jobs: dict[str, dict[str, Any]] = {}
        self.tune_jobs: dict[str, dict[float, dict[str, Any]]] = {}
        self.final: dict[str, dict[str, Any]] = {}
        self.tuned: dict[str, dict[str, Any]] = {}
        self.tune_errors: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}

    def _job(self, purpose: str, name: str, options: dict[str, Any], label: str) -> dict[str, Any]:
        from fusion_bench.benchmark.executors import make_job

        final = purpose == "final"
        job = make_job(purpose, name, options, self.track, self.pool_cfg, self.test_cfg if final else self.val_cfg,
                       seed=0, report_path=str(self.reports_dir / f"{name}.json") if final else None, label=label,
                       zoo_fingerprint=self.fingerprint)
        self.jobs[job["key"]] = job
        if final:
            self.final[name] = job
        return job

    def reference_job(self) -> dict[str, Any]:
        """The job that evaluates the pretrained model and each fine-tuned model on its own task."""
        from fusion_bench.benchmark.executors import make_job

        self.reference = make_job("reference", REFERENCE_JOB, {}, self.track, self.pool_cfg, self.test_cfg,
                                  label="references (pretrained, fine-tuned)", zoo_fingerprint=self.fingerprint)
        self.jobs[self.reference["key"]] = self.reference
        return self.reference

    def first_jobs(self, names: list[str]) -> list[dict[str, Any]]:
        from fusion_bench.methods import get_method_class

        out = []
        for name in names:
            opts = dict(self.options.get(name, {}))
            if self.grid is not None and tunable(get_method_class(name)):
                self.tune_jobs[name] = {v: self._job("tune", name, {**opts, TUNED_OPTION: v},
                                                     f"{name} {TUNED_OPTION}={v:g} (validation)") for v in self.grid}
                out += self.tune_jobs[name].values()
            else:
                out.append(self._job("final", name, opts, name))
        return out

    def then(self, job: dict[str, Any], result: dict[str, Any], results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Follow-up jobs once ``job`` is done: the final run of a method whose tuning runs are all done."""
        name = job["method"]
        if job["purpose"] != "tune" or name in self.final or name in self.tune_errors:
            return []
        sweep = self.tune_jobs[name]
        if any(j["key"] not in results for j in sweep.values()):
            return []
        scores: dict[float, float] = {}
        for v, j in sweep.items():
            res = results[j["key"]]
            if res["status"] != "ok":
                self.tune_errors[name] = (j, res)
                return []
            try:
                scores[v] = _validation_average(res["report"], self.tasks, name)
            except FusionBenchError as e:
                self.tune_errors[name] = (j, {"status": "error", "error": str(e), "user_error": True,
                                              "error_type": type(e).__name__})
                return []
        best = _best_value(scores)
        self.tuned[name] = {TUNED_OPTION: best, "grid": list(sweep), "validation_average": scores,
                            "tuning_time_s": round(sum(results[j["key"]].get("wall_time_s") or 0
                                                       for j in sweep.values()), 2)}
        self.log(f"leaderboard: {name} {TUNED_OPTION} on validation: " + ", ".join(
            f"{v:g}: {_pct(a).strip()}" for v, a in scores.items())
            + f" -> {best:g} ({self.tuned[name]['tuning_time_s']:.1f}s)")
        return [self._job("final", name, {**self.options.get(name, {}), TUNED_OPTION: best}, f"{name} (λ={best:g})")]

    def errors(self, name: str, results: dict[str, dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """[(job, error result)] of the method's failed jobs (its tuning runs, or its final run); [] when none."""
        sweep = list(self.tune_jobs.get(name, {}).values())
        out = [(j, results[j["key"]]) for j in sweep if results[j["key"]]["status"] != "ok"]
        if name in self.tune_errors and not out:  # every run worked but a validation accuracy is missing
            out.append(self.tune_errors[name])
        if name in self.final and results[self.final[name]["key"]]["status"] != "ok":
            out.append((self.final[name], results[self.final[name]["key"]]))
        return out

    def ensure_report(self, name: str, result: dict[str, Any]) -> None:
        """A final run's report under ``reports/``: a result taken from the job cache writes its own report there
        (the file may be missing, or hold the report of another run of the method since)."""
        path = Path(self.final[name]["report_path"])
        if result.get("cached") or not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path, "w") as f:
                json.dump(result["report"], f, indent=2, default=str)


def run_leaderboard(scale: str = "full", root: str | None = None, out: str | Path = "leaderboard",
                    methods: list[str] | None = None, max_samples: int | None = None,
                    corruption: str | None = None, log: Callable[[str], None] | None = None,
                    tune: bool = False, tune_grid: Sequence[float] | None = None, track: str = "clip",
                    variant: str = "full", val_max_samples: int | None = None,
                    method_options: dict[str, dict[str, Any]] | None = None, executor: str | Any = "sequential",
                    jobs: int | None = None, ray_address: str | None = None, threads: int | None = None,
                    resume: bool = True) -> dict[str, Any]:
    """Run the leaderboard and write its tables and plot; return the JSON document.

    Args:
        scale: the zoo's scale (``full`` or ``tiny``).
        root: the zoo folder (default: the scale's default cache folder).
        out: output folder.
        methods: only these registered methods (default: all).
        max_samples: evaluate at most this many test images per task.
        corruption: evaluate on this corrupted test split (robustness) instead of the clean one.
        log: where progress lines go (default: stderr).
        tune: choose ``scaling_factor`` on the validation split for every method that has one (see the
            module docstring); otherwise every method runs with its defaults.
        tune_grid: the values tried when ``tune`` (default :data:`DEFAULT_TUNE_GRID`).
        track: ``clip`` (the CLIP zoo) or ``text`` (the MiniLM text zoo).
        variant: the text zoo's fine-tuned encoders, ``full`` or ``lora`` (text track only).
        val_max_samples: validation examples per task when tuning (default: ``max_samples``).
        method_options: {method: {option: value}} given to those methods on top of the track's own options
            (CLI ``--set METHOD.KEY=VALUE``); recorded in each row's hyperparameters.
        executor: where the jobs (one per method, and per grid value when tuning) run: ``sequential`` (here,
            one after another), ``process`` (local worker processes) or ``ray`` (a local Ray instance, or the
            cluster at ``ray_address``); or an executor object of :mod:`fusion_bench.benchmark.executors`
            (left open). The table is the same whichever runs it.
        jobs: jobs run at once (parallel executors; default: one per core).
        ray_address: the Ray cluster to use (``ray`` only; default: a local instance).
        threads: torch threads of each job (default: cores / jobs for a parallel executor, unchanged otherwise).
        resume: use the results of jobs finished by an earlier run into the same ``out`` (``out/jobs``, keyed by
            a hash of each job's configuration); False runs every job again.
    """
    from fusion_bench.methods import get_method_class, list_methods

    if track not in TRACKS:
        raise ConfigError(f"leaderboard --track {track!r} is unknown; choose clip or text.{did_you_mean(track, TRACKS)}")
    if track == "text":
        from fusion_bench.modelpool.text_zoo import TextZooModelPool as PoolClass
        from fusion_bench.taskpool.text_zoo import TextZooTaskPool as TaskPoolClass

        if corruption is not None:
            raise ConfigError("leaderboard --corruption applies to the CLIP track only (the text zoo has no "
                              "corrupted splits).")
        if variant not in ("full", "lora"):
            raise ConfigError(f"leaderboard --variant {variant!r} is unknown; choose full or lora.")
        zoo_opts: dict[str, Any] = {"scale": scale, "root": root, "variant": variant}
        test_opts: dict[str, Any] = {}
        track_options = TEXT_METHOD_OPTIONS
    else:
        from fusion_bench.modelpool.clip_zoo import CLIPZooModelPool as PoolClass
        from fusion_bench.taskpool.clip_zoo import CLIPZooTaskPool as TaskPoolClass

        if variant != "full":
            raise ConfigError("leaderboard --variant applies to the text track only (--track text).")
        zoo_opts = {"scale": scale, "root": root}
        test_opts = {"corruption": corruption}
        track_options = {}
    method_options = {m: {**track_options.get(m, {}), **(method_options or {}).get(m, {})}
                      for m in {*track_options, *(method_options or {})}}

    log = log or (lambda s: print(s, file=sys.stderr))
    out = Path(out)
    registered = list_methods()
    chosen = registered if not methods else list(methods)
    for m in chosen:
        if m not in registered:
            raise ConfigError(f"leaderboard --methods names unknown method '{m}'.{did_you_mean(m, registered)}")
    for m in method_options:
        if m not in registered:
            raise ConfigError(f"leaderboard --set names unknown method '{m}'.{did_you_mean(m, registered)}")
    if tune_grid is not None and not tune:
        raise ConfigError("leaderboard tune_grid is given but tune is off; pass tune=True (--tune).")
    grid = _check_grid(DEFAULT_TUNE_GRID if tune_grid is None else tune_grid) if tune else None
    if isinstance(executor, str):
        from fusion_bench.benchmark.executors import check_executor_options

        check_executor_options(executor, jobs, ray_address, threads)
    t_start = time.perf_counter()
    pool = PoolClass(dict(zoo_opts))
    taskpool = TaskPoolClass({**zoo_opts, "max_samples": max_samples, **test_opts})
    tasks = taskpool.tasks
    names = pool.model_names

    # jobs: the reference rows, then one per (method, grid value) ------------------------------
    from fusion_bench.benchmark import executors as ex

    skipped: dict[str, str] = {}
    runnable: list[str] = []
    for name in chosen:
        why = applicability(get_method_class(name), names, pool.has_pretrained)
        if why is not None:
            skipped[name] = why
            log(f"leaderboard: skip {name}: {why}")
        else:
            runnable.append(name)
    plan = _JobPlan(track, zoo_opts, str(pool.zoo.root), test_opts, max_samples, val_max_samples, grid,
                    method_options, out / "reports", ex.zoo_fingerprint(pool.zoo), tasks, log)
    # the sequential executor runs on the objects built above (their caches of heads and images shared)
    ex.register_context(track, plan.pool_cfg, pool, plan.test_cfg, taskpool)
    runner = ex.make_executor(executor, jobs, ray_address, threads) if isinstance(executor, str) else executor
    stats: dict[str, int] = {}
    try:
        results = ex.run_jobs([plan.reference_job(), *plan.first_jobs(runnable)], runner, out / ex.JOBS_DIR, log,
                              stats, then=plan.then, reuse=resume)
    finally:
        if isinstance(executor, str):
            runner.close()
        ex.clear_context()

    # references: the pretrained model, and each fine-tuned model on its own task
    ref = results[plan.reference["key"]]
    if ref["status"] != "ok":
        raise FusionBenchError(f"leaderboard: evaluating the zoo's pretrained and fine-tuned models failed: {ref['error']}")
    pre_acc, ft_acc = _per_task_acc(ref["report"]["pretrained"]), _per_task_acc(ref["report"]["finetuned"])
    eval_time_one_model = ref["report"]["evaluation_time_one_model_s"]
    one_model = _params(pool)
    rows = [_row(PRETRAINED_ROW, "reference", pre_acc, tasks, ft_acc, merge_time_s=0.0, peak_rss_mb=None,
                 extra_parameters=0, extra_storage_bytes=0, data="none",
                 evaluation_time_s=round(eval_time_one_model, 2), **size_columns(None, one_model, 0, True)),
            _row(FINETUNED_ROW, "reference", ft_acc, tasks, ft_acc, merge_time_s=None, peak_rss_mb=None,
                 extra_parameters=(len(names) - 1) * one_model,
                 extra_storage_bytes=(len(names) - 1) * one_model * 4, needs_task_id=True,
                 data="train split (fine-tuning)", total_parameters=len(names) * one_model,
                 active_parameters=one_model, inference_cost_ratio=1.0)]
    log(f"leaderboard: pretrained {100 * rows[0]['average']:.2f}, fine-tuned {100 * rows[1]['average']:.2f} "
        f"(one model on {len(tasks)} tasks evaluated in {eval_time_one_model:.1f}s)")

    failed: list[dict[str, Any]] = []
    for name in runnable:
        cls = get_method_class(name)
        errors = plan.errors(name, results)
        if errors:
            job, res = errors[0]
            what = f"{job['label']}: " if job["purpose"] == "tune" else ""
            skipped[name] = (f"failed on the zoo: {what}{res['error']}" if res.get("user_error")
                             else f"error: {what}{res['error']}")
            failed += [{"method": name, "kind": cls.family, "job": job["key"], "label": job["label"],
                        "split": job["taskpool"].get("split", "test"), "options": job["options"],
                        "error": res["error"], "error_type": res.get("error_type"),
                        **({} if res.get("user_error") else {"traceback": res.get("traceback")})}
                       for job, res in errors]
            log(f"leaderboard: {name} failed: {skipped[name]}")
            continue
        tuned = plan.tuned.get(name)
        rep = results[plan.final[name]["key"]]["report"]
        plan.ensure_report(name, results[plan.final[name]["key"]])
        cost = rep.get("cost", {})
        data = _data_used(rep, cls.uses_data)
        extra: dict[str, Any] = {}
        if tuned:
            data = TUNED_DATA if data == "none" else f"{data}; {TUNED_DATA}"
            extra = {"tuned": {k: tuned[k] for k in (TUNED_OPTION, "grid", "validation_average")},
                     "tuning_time_s": tuned["tuning_time_s"]}
        rows.append(_row(name, cls.family, _per_task_acc(rep.get("evaluation", {})), tasks, ft_acc,
                         merge_time_s=cost.get("merge_wall_time_s"), peak_rss_mb=cost.get("peak_rss_mb"),
                         extra_parameters=cost.get("extra_parameters"),
                         extra_storage_bytes=extra_storage_bytes(rep),
                         needs_task_id=needs_task_id(rep),
                         data=data,
                         evaluation_time_s=cost.get("evaluation_wall_time_s"),
                         hyperparameters=rep.get("method", {}).get("hyperparameters"),
                         **size_columns(rep, one_model, cost.get("extra_parameters"),
                                        rep.get("result_kind") == "merged" and not needs_task_id(rep)), **extra))
        r = rows[-1]
        log(f"leaderboard: {_label(r):28s} avg {_pct(r['average'])}  normalized {_pct(r['normalized'])}  "
            f"merge {r['merge_time_s']:.2f}s")

    doc = {"zoo": {"track": track, "scale": scale, "root": str(pool.zoo.root), "corruption": corruption,
                   "max_samples": max_samples, **({"variant": variant, "val_max_samples": val_max_samples or max_samples}
                                                  if track == "text" else {})},
           "tasks": tasks, "rows": rows, "skipped": skipped, "failed": failed,
           "tune": {"option": TUNED_OPTION, "grid": grid, "split": "validation"} if grid is not None else None,
           "evaluation_time_one_model_s": round(eval_time_one_model, 2),
           "total_time_s": round(time.perf_counter() - t_start, 2),
           "execution": {"executor": runner.name, "parallel_jobs": runner.jobs, "threads_per_job": runner.threads,
                         "jobs": stats, "jobs_folder": str(out / ex.JOBS_DIR)}}
    add_gain_kept(doc)
    doc["order_vs_fusionbench"] = order_vs_fusionbench(doc)
    if track == "text":
        doc["targets"] = quality_targets(doc)
    write_outputs(doc, out)
    return doc


def combine_leaderboards(dirs: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """One table from leaderboard runs of the same zoo and test set (e.g. methods run in parallel, or re-run
    with another grid): rows are united, a later run's row replaces an earlier one of the same method, the
    reference rows must agree, and the derived columns (gain kept, order, targets) are recomputed."""
    out_dir = Path(out).expanduser().resolve()
    clash = [str(d) for d in dirs if Path(d).expanduser().resolve() == out_dir]
    if clash:
        raise ConfigError(f"leaderboard --combine: --out {out} is one of the runs being combined ({clash[0]}); its "
                          "tables would be replaced. Give a new folder with --out.")
    docs = []
    for d in dirs:
        path = Path(d) / "leaderboard.json"
        try:
            docs.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise ConfigError(f"leaderboard --combine: cannot read {path} ({e}); give folders written by "
                              "`fusion_bench leaderboard --out`.") from None
    base = docs[0]
    same = ("track", "scale", "variant", "max_samples", "corruption")
    refs = {r["method"]: r for r in base["rows"] if r["kind"] == "reference"}
    for d, doc in zip(dirs[1:], docs[1:]):
        for k in same:
            if doc["zoo"].get(k) != base["zoo"].get(k):
                raise ConfigError(f"leaderboard --combine: {d} has zoo {k}={doc['zoo'].get(k)!r}, {dirs[0]} has "
                                  f"{base['zoo'].get(k)!r}; combine runs of one zoo and test set only.")
        if doc["tasks"] != base["tasks"]:
            raise ConfigError(f"leaderboard --combine: {d} evaluated tasks {doc['tasks']}, {dirs[0]} {base['tasks']}.")
        for r in doc["rows"]:
            if r["kind"] == "reference" and r["method"] in refs and r["accuracy"] != refs[r["method"]]["accuracy"]:
                raise ConfigError(f"leaderboard --combine: the '{r['method']}' row of {d} differs from {dirs[0]}'s "
                                  "(another zoo or test subsample); combine runs of one zoo and test set only.")
    rows: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for doc in docs:
        for r in doc["rows"]:
            rows[r["method"]] = r
        skipped.update(doc.get("skipped", {}))
    grids = []
    for doc in docs:
        g = (doc.get("tune") or {}).get("grid")
        if g is not None and g not in grids:
            grids.append(g)
    failed = [f for doc in docs for f in doc.get("failed") or [] if f["method"] not in rows]
    combined = {**base, "rows": list(rows.values()), "skipped": {k: v for k, v in skipped.items() if k not in rows},
                "failed": failed,
                "tune": ({"option": TUNED_OPTION, "grid": grids[0] if len(grids) == 1 else None, "grids": grids,
                          "split": "validation"} if grids else None),
                "total_time_s": round(sum(d.get("total_time_s", 0) for d in docs), 2),
                "combined_from": [str(d) for d in dirs]}
    add_gain_kept(combined)
    combined["order_vs_fusionbench"] = order_vs_fusionbench(combined)
    if base["zoo"].get("track") == "text":
        combined["targets"] = quality_targets(combined)
    write_outputs(combined, Path(out))
    return combined


def add_gain_kept(doc: dict[str, Any]) -> None:
    """Each row's share of the fine-tuning gain kept: (avg - pretrained avg) / (fine-tuned avg - pretrained avg)."""
    refs = {r["method"]: r["average"] for r in doc["rows"] if r["kind"] == "reference"}
    pre, ft = refs.get(PRETRAINED_ROW), refs.get(FINETUNED_ROW)
    for r in doc["rows"]:
        ok = None not in (pre, ft, r["average"]) and ft != pre
        r["gain_kept"] = (r["average"] - pre) / (ft - pre) if ok else None


#: FusionBench's CLIP-ViT-B/32 on eight tasks (arXiv 2406.03280 and its documentation's re-runs): the share of
#: the fine-tuning gain each method keeps, R = (avg - pretrained 48.2) / (fine-tuned 90.3 - pretrained 48.2).
#: TSV-M, Iso-C and WUDI are FusionBench's own re-runs on its checkpoints (83.1, 82.8, 84.5 % average).
FUSIONBENCH_VITB32_R: dict[str, float] = {
    "simple_average": 0.43, "task_arithmetic": 0.47, "fisher_merging": 0.53, "ties_merging": 0.57,
    "regmean": 0.81, "adamerging": 0.82, "iso_c": 0.82, "tsv_merging": 0.83, "wudi_merging": 0.86,
}


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Kendall's tau-a of two paired score lists (1: same order, -1: reversed; None for fewer than 2)."""
    n = len(a)
    if n < 2:
        return None
    s = 0
    for i in range(n):
        for j in range(i + 1, n):
            x, y = a[i] - a[j], b[i] - b[j]
            s += (x > 0) - (x < 0) if y > 0 else ((x < 0) - (x > 0) if y < 0 else 0)
    return s / (n * (n - 1) / 2)


def order_vs_fusionbench(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The merging methods that FusionBench's ViT-B/32 table also has, ordered by gain kept here and there,
    with Kendall's tau between the two orders (None when fewer than two methods are shared)."""
    here = {r["method"]: r["gain_kept"] for r in doc["rows"]
            if r.get("gain_kept") is not None and r["method"] in FUSIONBENCH_VITB32_R}
    if len(here) < 2:
        return None
    names = sorted(here)
    return {"here": sorted(names, key=lambda n: -here[n]), "fusionbench": sorted(names, key=lambda n: -FUSIONBENCH_VITB32_R[n]),
            "gain_kept_here": here, "gain_kept_fusionbench": {n: FUSIONBENCH_VITB32_R[n] for n in names},
            "kendall_tau": kendall_tau([here[n] for n in names], [FUSIONBENCH_VITB32_R[n] for n in names])}


def order_markdown(order: dict[str, Any]) -> list[str]:
    fb = order["gain_kept_fusionbench"]
    here = order["gain_kept_here"]
    tau = order["kendall_tau"]
    return [f"Order of the methods by gain kept, here and on FusionBench's CLIP-ViT-B/32 (8 tasks; Kendall's tau "
            f"{tau:+.2f}, 1 = the same order):", "",
            "| rank | here | R (gain kept) | FusionBench ViT-B/32 | R |", "|---|---|---|---|---|",
            *[f"| {i + 1} | {a} | {here[a]:.2f} | {b} | {fb[b]:.2f} |"
              for i, (a, b) in enumerate(zip(order["here"], order["fusionbench"]))]]


def quality_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The text benchmark's targets, measured on the document's rows (each: name, value, target, met, detail).

    - every fine-tuned model >= 15 points above the pretrained encoder (with that task's head) on its task;
    - task arithmetic (tuned when the leaderboard was tuned) keeps >= 40 % of the pretrained -> fine-tuned gap;
    - the best merging method's average minus the worst's >= 5 points (methods giving one merged model; those
      returning one model per task are left out).
    """
    rows = {r["method"]: r for r in doc["rows"]}
    out: list[dict[str, Any]] = []
    pre, ft = rows.get(PRETRAINED_ROW), rows.get(FINETUNED_ROW)
    if pre and ft:
        gaps = {t: ft["accuracy"][t] - pre["accuracy"][t] for t in doc["tasks"]
                if ft["accuracy"].get(t) is not None and pre["accuracy"].get(t) is not None}
        if gaps:
            worst = min(gaps, key=gaps.get)
            out.append({"name": "fine-tuned - pretrained (with its head), every task", "value": gaps[worst],
                        "target": TARGET_FINETUNE_GAIN, "met": gaps[worst] >= TARGET_FINETUNE_GAIN,
                        "detail": f"smallest on {worst}; per task: "
                        + ", ".join(f"{t} {100 * g:+.1f}" for t, g in gaps.items())})
    ta = rows.get("task_arithmetic")
    if ta:
        kept = ta.get("gain_kept")
        out.append({"name": "task arithmetic" + (" (tuned)" if ta.get("tuned") else "") + ": share of the gap kept",
                    "value": kept, "target": TARGET_TA_RECOVERY, "met": kept is not None and kept >= TARGET_TA_RECOVERY,
                    "detail": f"{_label(ta)}: avg {_pct(ta['average']).strip()} between pretrained "
                    f"{_pct(pre['average']).strip() if pre else '-'} and fine-tuned {_pct(ft['average']).strip() if ft else '-'}"})
    # one merged model each: one-model-per-task results (the task id chooses the model) are not merges here
    merges = [r for r in doc["rows"] if r["kind"] == "merging" and r["average"] is not None
              and not r.get("needs_task_id")]
    if len(merges) >= 2:
        best = max(merges, key=lambda r: r["average"])
        worst_m = min(merges, key=lambda r: r["average"])
        spread = best["average"] - worst_m["average"]
        out.append({"name": "spread between the best and the worst merging method", "value": spread,
                    "target": TARGET_SPREAD, "met": spread >= TARGET_SPREAD,
                    "detail": f"{_label(best)} {_pct(best['average']).strip()} - {_label(worst_m)} "
                    f"{_pct(worst_m['average']).strip()} ({len(merges)} merging methods)"})
    return out


def targets_markdown(targets: list[dict[str, Any]]) -> list[str]:
    lines = ["Quality targets:", "", "| target | measured | required | met | detail |", "|---|---|---|---|---|"]
    for t in targets:
        value = "undefined" if t["value"] is None else f"{100 * t['value']:.1f}"
        lines.append(f"| {t['name']} | {value} {'%' if 'share' in t['name'] else 'points'} | "
                     f">= {100 * t['target']:.0f} {'%' if 'share' in t['name'] else 'points'} | "
                     f"{'yes' if t['met'] else 'NO'} | {t['detail']} |")
    return lines


def _params(pool) -> int:
    src = pool.source(pool.model_names[0])
    return int(sum(src.meta(k).numel for k in src.keys() if src.meta(k).dtype.is_floating_point))


def _label(r: dict[str, Any]) -> str:
    """The row's method name, with the chosen lambda when it was tuned: ``task_arithmetic (λ=0.1)``."""
    t = r.get("tuned")
    return f"{r['method']} (λ={t[TUNED_OPTION]:g})" if t else r["method"]


def _pct(v: float | None) -> str:
    return "  -  " if v is None else f"{100 * v:5.2f}"


def _sorted_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    refs = [r for r in doc["rows"] if r["kind"] == "reference"]
    rest = sorted((r for r in doc["rows"] if r["kind"] != "reference"),
                  key=lambda r: -(r["average"] if r["average"] is not None else -1))
    return refs + rest


def _fmt_num(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def to_markdown(doc: dict[str, Any]) -> str:
    tasks = doc["tasks"]
    head = ["method", "kind", *tasks, "avg", "norm", "gain kept", "merge s", "peak MB", "extra params",
            "extra storage", "task id", "data", "total params", "active params", "inference ×"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _sorted_rows(doc):
        cells = [_label(r), r["kind"], *[_pct(r["accuracy"][t]).strip() for t in tasks], _pct(r["average"]).strip(),
                 _pct(r["normalized"]).strip(), _pct(r.get("gain_kept")).strip(), _fmt_num(r.get("merge_time_s")), _fmt_num(r.get("peak_rss_mb"), 0),
                 _fmt_num(r.get("extra_parameters")), _fmt_bytes(r.get("extra_storage_bytes")),
                 "needed" if r.get("needs_task_id") else "no", r.get("data", ""),
                 _fmt_num(r.get("total_parameters")), _fmt_num(r.get("active_parameters")),
                 _fmt_num(r.get("inference_cost_ratio"))]
        lines.append("| " + " | ".join(cells) + " |")
    for name, kind in _failed_methods(doc).items():  # a failed job is reported in the table, never dropped
        cells = [name, kind, *["-"] * (len(head) - 6), "FAILED (see below)", "-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    z = doc["zoo"]
    zoo_name = (f"Text zoo (MiniLM, {z.get('variant', 'full')} fine-tuning), scale" if z.get("track") == "text"
                else "Zoo scale")
    note = [f"{zoo_name} `{z['scale']}`" + (f", corruption `{z['corruption']}`" if z.get("corruption") else "")
            + (f", at most {z['max_samples']} test examples per task" if z.get("max_samples") else "")
            + f"; accuracy in %, normalized = mean over tasks of accuracy / fine-tuned accuracy; gain kept = "
            "(avg - pretrained avg) / (fine-tuned avg - pretrained avg); one model "
            f"evaluated on {len(tasks)} tasks in {doc['evaluation_time_one_model_s']:.1f} s."]
    if any(r.get("tuned") for r in doc["rows"]):
        tn = doc.get("tune") or {}
        note.append("")
        grid = (f"the grid {tn.get('grid')}" if tn.get("grid") is not None else
                "the grid of the row's run (" + "; ".join(str(g) for g in tn.get("grids", [])) + ")")
        note.append(f"Rows marked (λ=...) are tuned: {TUNED_OPTION} was chosen on the validation split (best average "
                    f"validation accuracy over {grid}, ties to the smaller value), then the "
                    "method was run once more with it and evaluated on the test split; merge time is that final "
                    "run's. The other methods use their defaults.")
    if doc.get("order_vs_fusionbench"):
        note.append("")
        note += order_markdown(doc["order_vs_fusionbench"])
    if doc.get("targets"):
        note.append("")
        note += targets_markdown(doc["targets"])
    if doc.get("failed"):
        note.append("")
        note.append("Failed jobs (the error of each; a re-run runs them again):")
        note += [f"- `{f['label']}`: {_one_line(f['error'])}" for f in doc["failed"]]
    not_run = {k: v for k, v in doc["skipped"].items() if k not in _failed_methods(doc)}
    if not_run:
        note.append("")
        note.append("Not run:")
        note += [f"- `{k}`: {v}" for k, v in not_run.items()]
    return "\n".join(lines + [""] + note) + "\n"


def _failed_methods(doc: dict[str, Any]) -> dict[str, str]:
    """{method: kind} of the methods whose job failed and that have no row."""
    have = {r["method"] for r in doc["rows"]}
    return {f["method"]: f.get("kind", "") for f in doc.get("failed") or [] if f["method"] not in have}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def to_csv(doc: dict[str, Any]) -> str:
    tasks = doc["tasks"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "kind", *tasks, "average", "normalized", "gain_kept", "merge_time_s", "peak_rss_mb",
                "extra_parameters", "extra_storage_bytes", "needs_task_id", "data", "evaluation_time_s",
                "tuned_scaling_factor", "tuning_time_s", "total_parameters", "active_parameters",
                "inference_cost_ratio", "error"])
    for r in _sorted_rows(doc):
        w.writerow([r["method"], r["kind"], *[r["accuracy"][t] for t in tasks], r["average"], r["normalized"],
                    r.get("gain_kept"),
                    r.get("merge_time_s"), r.get("peak_rss_mb"), r.get("extra_parameters"),
                    r.get("extra_storage_bytes"), bool(r.get("needs_task_id")), r.get("data"),
                    r.get("evaluation_time_s"), (r.get("tuned") or {}).get(TUNED_OPTION), r.get("tuning_time_s"),
                    r.get("total_parameters"), r.get("active_parameters"), r.get("inference_cost_ratio"), ""])
    errors = {}
    for f in doc.get("failed") or []:
        errors.setdefault(f["method"], f"{f['label']}: {_one_line(f['error'])}")
    for name, kind in _failed_methods(doc).items():
        w.writerow([name, kind, *[""] * (len(tasks) + 15), errors[name]])
    return buf.getvalue()


def plot(doc: dict[str, Any], path: Path) -> None:
    """Average accuracy against merge wall time and against peak memory (PNG, matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r["average"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, label in ((axes[0], "merge_time_s", "merge wall time (s)"), (axes[1], "peak_rss_mb", "peak memory (MB)")):
        for r in rows:
            x = r.get(key)
            if r["kind"] == "reference":
                ax.axhline(100 * r["average"], ls="--", lw=1, color="grey")
                ax.text(0.01, 100 * r["average"], r["method"], transform=ax.get_yaxis_transform(), fontsize=8,
                        va="bottom", color="grey")
                continue
            if x is None:
                continue
            color = {"merging": "tab:blue", "ensemble": "tab:orange", "mixing": "tab:green"}.get(r["kind"], "tab:red")
            ax.scatter([x], [100 * r["average"]], color=color)
            ax.annotate(_label(r), (x, 100 * r["average"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("average accuracy (%)")
        ax.grid(alpha=0.3)
    z = doc["zoo"]
    zoo_name = f"text zoo, {z.get('variant', 'full')}" if z.get("track") == "text" else "CLIP zoo"
    fig.suptitle(f"fusion_bench leaderboard: {zoo_name} ({z['scale']}), accuracy vs cost")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_outputs(doc: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "leaderboard.json", "w") as f:
        json.dump(doc, f, indent=2, default=str)
    with atomic_file(out / "leaderboard.md", "w") as f:
        f.write(to_markdown(doc))
    with atomic_file(out / "leaderboard.csv", "w") as f:
        f.write(to_csv(doc))
    plot(doc, out / "leaderboard.png")


def main(argv: list[str] | None = None) -> int:
    """``fusion_bench leaderboard``; returns the exit code."""
    ap = argparse.ArgumentParser(prog="fusion_bench leaderboard",
                                 description="Run every registered method on an offline zoo (CLIP, or --track text) "
                                 "and tabulate.")
    ap.add_argument("--track", default="clip", choices=TRACKS,
                    help="clip: the offline CLIP zoo (default); text: the MiniLM text zoo")
    ap.add_argument("--variant", default="full", choices=("full", "lora"),
                    help="text track: fully fine-tuned or LoRA encoders (default full)")
    ap.add_argument("--scale", default="full", choices=("full", "tiny"))
    ap.add_argument("--root", default=None, help="zoo folder (default $FUSION_BENCH_ZOO or ~/.cache/fusion_bench/zoo-<scale>)")
    ap.add_argument("--out", default="leaderboard", help="output folder (default ./leaderboard)")
    ap.add_argument("--methods", default=None, help="comma-separated method names (default: every registered method)")
    ap.add_argument("--max-samples", type=int, default=None, help="test examples per task (default: all)")
    ap.add_argument("--val-max-samples", type=int, default=None,
                    help="validation examples per task when tuning (default: --max-samples)")
    ap.add_argument("--corruption", default=None, help="evaluate on this corrupted test split (robustness)")
    ap.add_argument("--tune", action="store_true",
                    help="choose scaling_factor on the validation split for every method that has one")
    ap.add_argument("--tune-grid", default=None,
                    help="comma-separated scaling_factor values for --tune (implies --tune; default "
                    + ",".join(f"{v:g}" for v in DEFAULT_TUNE_GRID) + ")")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (of each job; default: cores / --jobs for a parallel executor)")
    ap.add_argument("--executor", default="sequential", choices=("sequential", "process", "ray"),
                    help="where the jobs (one per method and grid value) run: sequential (default, here), process "
                    "(local worker processes) or ray (a local Ray instance, or the cluster at --ray-address)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="jobs run at once by a parallel executor (default: one per core)")
    ap.add_argument("--ray-address", default=None,
                    help="the Ray cluster to run on (e.g. ray://head:10001 or auto; default: start a local instance)")
    ap.add_argument("--no-resume", action="store_true",
                    help="run every job again (default: reuse the results of jobs finished by an earlier run into "
                    "the same --out, kept in OUT/jobs by a hash of their configuration)")
    ap.add_argument("--set", action="append", default=None, metavar="METHOD.KEY=VALUE",
                    help="an option of one method (repeatable), e.g. --set we_moe.steps=200; recorded in its row")
    ap.add_argument("--combine", nargs="+", default=None, metavar="DIR",
                    help="combine these leaderboard output folders (same zoo and test set) into one table in --out; "
                    "runs nothing")
    ap.add_argument("--web", action="store_true",
                    help="also write leaderboard.html: one self-contained page (sortable table, accuracy-vs-cost "
                    "scatter, per-task bars, filters, command builder) that works offline")
    from fusion_bench.tracking.reader import add_arguments as add_log_arguments
    from fusion_bench.tracking.reader import main_from_args as from_logs_main

    add_log_arguments(ap)  # --from-logs DIR, --from-mlflow URI, --mlflow-experiment, --references DIR
    args = ap.parse_args(argv)
    if (code := from_logs_main(args)) is not None:  # a table from logged runs; runs nothing
        return code

    def web(doc: dict[str, Any]) -> str:
        if not args.web:
            return ""
        from fusion_bench.benchmark.web import write_html

        write_html(doc, Path(args.out) / "leaderboard.html")
        return ", .html"

    if args.combine:
        doc = combine_leaderboards(args.combine, args.out)
        print(to_markdown(doc))
        print(f"written to {Path(args.out) / 'leaderboard.md'} (.csv, .json, .png{web(doc)})")
        return 0
    if args.threads and args.executor == "sequential":
        import torch

        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    options = parse_method_options(args.set)
    grid = None
    if args.tune_grid is not None:
        try:
            grid = [float(v) for v in args.tune_grid.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"leaderboard --tune-grid={args.tune_grid!r} must be comma-separated numbers, "
                              "e.g. 0.1,0.3,1.0.") from None
    from fusion_bench.benchmark.zoo import _quiet_transformers

    with _quiet_transformers():  # no "Loading weights" bar for each of the hundreds of model loads
        doc = run_leaderboard(args.scale, args.root, args.out, methods, args.max_samples, args.corruption,
                              tune=args.tune or grid is not None, tune_grid=grid, track=args.track,
                              variant=args.variant, val_max_samples=args.val_max_samples, method_options=options,
                              executor=args.executor, jobs=args.jobs, ray_address=args.ray_address,
                              threads=args.threads, resume=not args.no_resume)
    print(to_markdown(doc))
    print(f"written to {Path(args.out) / 'leaderboard.md'} (.csv, .json, .png{web(doc)}) in {doc['total_time_s']:.1f}s")
    return 0
