"""Where the leaderboard's jobs run: one after another, in local processes, or on Ray; each result cached.

A leaderboard (and its ``--tune`` sweep) is a list of independent **jobs**, one per (method, hyperparameter
value, pool, split): fuse the zoo's models with the method, evaluate the result on the split, return the
report. This module runs such lists:

- :class:`SequentialExecutor` (``--executor sequential``, the default): in this process, one at a time,
  on the pool and task pool objects the leaderboard already built (their in-memory caches shared);
- :class:`ProcessExecutor` (``--executor process``): ``N`` local worker processes
  (:mod:`concurrent.futures`, started with ``spawn``);
- :class:`RayExecutor` (``--executor ray``): tasks on a local Ray instance started for the run, or on the
  cluster at ``--ray-address`` (the zoo, the output folder and fusion_bench must then be the same on every
  node: a shared file system and one installation).

Every job is keyed by a hash of its full configuration (:func:`job_key`: method, options, pool and zoo
content, test or validation split, sample counts, seed, code version). :func:`run_jobs` writes each finished
job's result atomically to ``<out>/jobs/<key>.json`` and, on a re-run, loads the results that exist and are
complete instead of running their jobs again. A job that raises is returned as an error result (its message
and traceback), never dropped; failed jobs are run again by a re-run.

Threads: a parallel executor gives each job ``max(1, cores // N)`` torch threads (``--threads`` overrides),
so that N jobs do not oversubscribe the cores; the sequential executor leaves the thread count alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from fusion_bench.errors import ConfigError, FusionBenchError

EXECUTORS = ("sequential", "process", "ray")
#: bumped when the layout of a cached job result changes (old results are then run again)
JOB_FORMAT = 1
JOBS_DIR = "jobs"

Job = dict[str, Any]
JobResult = dict[str, Any]


# -- the configuration hash ------------------------------------------------------------------------------------
_CODE_VERSION: str | None = None
#: package files that cannot change a job's result (command-line front ends, other tools' translators, test
#: helpers, the static web page): left out of the code version so that editing them keeps the cached results
_NOT_IN_CODE_VERSION = ("cli.py", "cli_tools.py", "compat/", "testing/", "benchmark/web.py")


def code_version() -> str:
    """The installed fusion_bench: its version and a hash of the package's ``.py`` files that jobs run (cached).

    ``FUSION_BENCH_CODE_VERSION`` set in the environment replaces it (e.g. a release tag on a cluster whose nodes
    all run that release); results cached under one code version are never used under another.
    """
    global _CODE_VERSION
    if os.environ.get("FUSION_BENCH_CODE_VERSION"):
        return os.environ["FUSION_BENCH_CODE_VERSION"]
    if _CODE_VERSION is None:
        pkg = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for path in sorted(pkg.rglob("*.py")):
            rel = path.relative_to(pkg).as_posix()
            if rel.startswith(_NOT_IN_CODE_VERSION):
                continue
            h.update(rel.encode())
            h.update(b"\0")
            h.update(path.read_bytes())
        try:
            from importlib.metadata import version

            ver = version("fusion_bench")
        except Exception:
            ver = "unknown"
        _CODE_VERSION = f"{ver}+{h.hexdigest()[:16]}"
    return _CODE_VERSION


def zoo_fingerprint(zoo: Any) -> str:
    """A hash of the zoo's entries (each entry's content hash from its metadata): a rebuilt zoo changes it."""
    from fusion_bench.benchmark.zoo import content_hash, read_entry

    parts = []
    for name, path in zoo.entries():
        meta = read_entry(Path(path))
        parts.append([name, content_hash(meta["files"]) if meta and "files" in meta else "missing"])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def job_key(job: Job) -> str:
    """The hash that names a job's cached result: every field of the job that can change its result."""
    keyed = {k: job[k] for k in ("purpose", "method", "options", "track", "pool", "taskpool", "seed")}
    keyed["zoo_fingerprint"] = job.get("zoo_fingerprint")
    keyed["code_version"] = job.get("code_version")
    keyed["format"] = JOB_FORMAT
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:20]


# -- one job -----------------------------------------------------------------------------------------------
#: pools and task pools built in this process, by their configuration (a worker builds each once)
_POOLS: dict[str, Any] = {}
_TASKPOOLS: dict[str, Any] = {}


def _ctx_key(track: str, cfg: dict[str, Any]) -> str:
    return json.dumps([track, cfg], sort_keys=True, default=str)


def pool_classes(track: str) -> tuple[type, type]:
    """(model pool class, task pool class) of a leaderboard track."""
    if track == "text":
        from fusion_bench.modelpool.text_zoo import TextZooModelPool
        from fusion_bench.taskpool.text_zoo import TextZooTaskPool

        return TextZooModelPool, TextZooTaskPool
    from fusion_bench.modelpool.clip_zoo import CLIPZooModelPool
    from fusion_bench.taskpool.clip_zoo import CLIPZooTaskPool

    return CLIPZooModelPool, CLIPZooTaskPool


def register_context(track: str, pool_cfg: dict[str, Any] | None = None, pool: Any = None,
                     taskpool_cfg: dict[str, Any] | None = None, taskpool: Any = None) -> None:
    """Let jobs of this process use pool objects built already (their in-memory caches are kept)."""
    if pool is not None:
        _POOLS[_ctx_key(track, pool_cfg or {})] = pool
    if taskpool is not None:
        _TASKPOOLS[_ctx_key(track, taskpool_cfg or {})] = taskpool


def clear_context() -> None:
    """Forget the pools of this process (the leaderboard calls it when it is done)."""
    _POOLS.clear()
    _TASKPOOLS.clear()


def _context(job: Job) -> tuple[Any, Any]:
    pool_cls, task_cls = pool_classes(job["track"])
    pk = _ctx_key(job["track"], job["pool"])
    if pk not in _POOLS:  # the driver built (and checked) the zoo: a worker never builds it
        _POOLS[pk] = pool_cls({**job["pool"], "build": False})
    tk = _ctx_key(job["track"], job["taskpool"])
    if tk not in _TASKPOOLS:
        _TASKPOOLS[tk] = task_cls({**job["taskpool"], "build": False})
    return _POOLS[pk], _TASKPOOLS[tk]


def run_job(job: Job) -> JobResult:
    """Run one job (in whatever process this is) and return its result; an exception becomes an error result.

    ``job``: a plain mapping (see :func:`make_job`). The result: ``{"key", "status": "ok" | "error",
    "report" (ok), "error", "error_type", "traceback" (error), "wall_time_s", "threads", "host", "pid"}``.
    """
    import socket

    import torch

    for k, v in (job.get("env") or {}).items():
        os.environ[k] = v
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    t0 = time.perf_counter()
    out: JobResult = {"key": job["key"], "label": job.get("label"), "threads": torch.get_num_threads(),
                      "host": socket.gethostname(), "pid": os.getpid()}
    from fusion_bench.benchmark.zoo import _quiet_transformers

    with _quiet_transformers():  # no model-loading bars from every worker
        _run(job, out)
    out["wall_time_s"] = round(time.perf_counter() - t0, 3)
    return out


def _run(job: Job, out: JobResult) -> None:
    from fusion_bench.methods import get_method_class
    from fusion_bench.programs.fusion import run_program

    try:
        pool, taskpool = _context(job)
        if job["purpose"] == "reference":  # the leaderboard's reference rows
            from fusion_bench.benchmark.leaderboard import evaluate_references

            out.update(status="ok", report=json.loads(json.dumps(evaluate_references(pool, taskpool), default=str)))
            return
        method = get_method_class(job["method"])(dict(job["options"]))
        cfg = {"print_table": False, "seed": job["seed"]}
        if job.get("report_path"):
            # overwrite: a rerun refreshes its own reports (only fusion_bench reports are ever replaced)
            cfg.update(report_path=job["report_path"], overwrite=True)
        rep = run_program(cfg, modelpool=pool, method=method, taskpool=taskpool, log=lambda s: None)
        out.update(status="ok", report=json.loads(json.dumps(rep, default=str)))
    except FusionBenchError as e:
        out.update(status="error", error=str(e), error_type=type(e).__name__, user_error=True,
                   traceback=traceback.format_exc(limit=6))
    except Exception as e:  # a method bug must not stop the other jobs; it is reported
        out.update(status="error", error=f"{type(e).__name__}: {e}", error_type=type(e).__name__, user_error=False,
                   traceback=traceback.format_exc(limit=6))


def make_job(purpose: str, method: str, options: dict[str, Any], track: str, pool: dict[str, Any],
             taskpool: dict[str, Any], *, seed: int = 0, report_path: str | None = None, label: str | None = None,
             zoo_fingerprint: str | None = None) -> Job:
    """A job as plain data (it travels to other processes and machines), with its :func:`job_key`."""
    job: Job = {"purpose": purpose, "method": method, "options": dict(options), "track": track, "pool": dict(pool),
                "taskpool": dict(taskpool), "seed": seed, "report_path": report_path, "label": label or method,
                "zoo_fingerprint": zoo_fingerprint, "code_version": code_version()}
    if os.environ.get("FUSION_BENCH_CACHE"):
        job["env"] = {"FUSION_BENCH_CACHE": os.environ["FUSION_BENCH_CACHE"]}
    job["key"] = job_key(job)
    return job


def _crash_result(job: Job, e: BaseException, wall: float | None = None) -> JobResult:
    """The result of a job whose worker died or could not run it (the executor's own failure)."""
    return {"key": job["key"], "label": job.get("label"), "status": "error", "error": f"{type(e).__name__}: {e}",
            "error_type": type(e).__name__, "user_error": False, "traceback": "", "wall_time_s": wall}


# -- executors ---------------------------------------------------------------------------------------------
def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class SequentialExecutor:
    """Runs the jobs here, one after another (the default; the leaderboard's own pool objects are reused)."""

    name = "sequential"

    def __init__(self, threads: int | None = None):
        self.jobs = 1
        self.threads = threads

    def run(self, queue: list[Job]) -> Iterator[tuple[Job, JobResult]]:
        """Take jobs from the front of ``queue`` (the caller may add to it meanwhile) and yield their results."""
        while queue:
            job = queue.pop(0)
            yield job, run_job({**job, "threads": self.threads})

    def close(self) -> None:
        pass


def _threads_for(jobs: int, threads: int | None, cores: int) -> int:
    return int(threads) if threads else max(1, cores // max(1, jobs))


class ProcessExecutor:
    """Runs the jobs in ``jobs`` local worker processes (``spawn``), ``cores // jobs`` torch threads each."""

    name = "process"

    def __init__(self, jobs: int | None = None, threads: int | None = None,
                 fn: Callable[[Job], JobResult] = run_job):
        cores = available_cores()
        self.jobs = int(jobs or cores)
        self.threads = _threads_for(self.jobs, threads, cores)
        self._fn = fn  # a module-level function (the workers import it): run_job, or a stand-in in tests
        self._pool = None

    def run(self, queue: list[Job]) -> Iterator[tuple[Job, JobResult]]:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        if self._pool is None and queue:
            self._pool = ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_limit_threads, initargs=(self.threads,))
        inflight: dict[Any, Job] = {}
        while queue or inflight:
            while queue and len(inflight) < self.jobs:
                job = queue.pop(0)
                try:
                    inflight[self._pool.submit(self._fn, {**job, "threads": self.threads})] = job
                except Exception as e:  # a worker died earlier and broke the pool: this job cannot run
                    yield job, _crash_result(job, e)
            if not inflight:
                continue
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for f in done:
                job = inflight.pop(f)
                try:
                    res = f.result()
                except Exception as e:  # the worker process died (killed, out of memory)
                    res = _crash_result(job, e)
                yield job, res

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _limit_threads(threads: int) -> None:
    """Worker initializer: one thread count for torch and the BLAS/OpenMP libraries before they start."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


class RayExecutor:
    """Runs the jobs as Ray tasks: on the Ray instance this process is connected to, else on the cluster at
    ``address``, else on a local instance started here (and shut down by :meth:`close`). Ray is joined when the
    first job is submitted: a run whose jobs are all cached starts nothing.

    At most ``jobs`` tasks are in flight (default: the cluster's CPUs divided by the threads per job); each
    task asks Ray for as many CPUs as it uses torch threads.
    """

    name = "ray"

    def __init__(self, jobs: int | None = None, address: str | None = None, threads: int | None = None):
        try:
            import ray
        except ImportError:
            raise ConfigError("leaderboard --executor ray needs the ray package: pip install ray (or "
                              "'fusion_bench[scale]'); or use --executor process.") from None
        self._ray = ray
        self._address = address
        self._want_jobs, self._want_threads = jobs, threads
        self.jobs, self.threads = jobs, threads  # filled in when Ray is joined
        self._started = False
        self._task = None

    def _connect(self) -> None:
        ray = self._ray
        if not ray.is_initialized():
            if self._address:
                ray.init(address=self._address, log_to_driver=False)
            else:
                ray.init(num_cpus=available_cores(), include_dashboard=False, log_to_driver=False)
                self._started = True
        cpus = int(ray.cluster_resources().get("CPU", 1)) or 1
        # a task asking for more CPUs than the largest node has would wait for ever
        node_cpus = max([int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [cpus])
        if self._want_jobs:
            self.jobs = int(self._want_jobs)
            self.threads = min(_threads_for(self.jobs, self._want_threads, cpus), max(1, node_cpus))
        else:
            self.threads = min(int(self._want_threads) if self._want_threads else 1, max(1, node_cpus))
            self.jobs = max(1, cpus // self.threads)
        self._task = ray.remote(num_cpus=self.threads, max_retries=0)(run_job)

    def run(self, queue: list[Job]) -> Iterator[tuple[Job, JobResult]]:
        ray = self._ray
        if queue and self._task is None:
            self._connect()
        inflight: dict[Any, tuple[Job, float]] = {}
        # twice as many tasks as slots: Ray queues the extra ones, so a worker that finishes starts its next
        # job at once instead of waiting for this loop to hear of it and submit one (short jobs idled on that)
        depth = 2 * self.jobs
        while queue or inflight:
            while queue and len(inflight) < depth:
                job = queue.pop(0)
                inflight[self._task.remote({**job, "threads": self.threads})] = (job, time.perf_counter())
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                job, t0 = inflight.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as e:  # the worker died, or Ray could not run the task
                    res = _crash_result(job, e, round(time.perf_counter() - t0, 3))
                yield job, res

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


def make_executor(name: str = "sequential", jobs: int | None = None, address: str | None = None,
                  threads: int | None = None):
    """The executor called ``name`` (:data:`EXECUTORS`); ``address``: a Ray cluster (``ray`` only)."""
    check_executor_options(name, jobs, address, threads)
    if name == "ray":
        return RayExecutor(jobs, address, threads)
    if name == "process":
        return ProcessExecutor(jobs, threads)
    return SequentialExecutor(threads)


def check_executor_options(name: str, jobs: int | None = None, address: str | None = None,
                           threads: int | None = None) -> None:
    """ConfigError naming the option when the executor options do not fit together (before any work starts)."""
    if name not in EXECUTORS:
        from fusion_bench.errors import did_you_mean

        raise ConfigError(f"leaderboard --executor {name!r} is unknown; choose one of {', '.join(EXECUTORS)}."
                          f"{did_you_mean(name, EXECUTORS)}")
    if jobs is not None and int(jobs) < 1:
        raise ConfigError(f"leaderboard --jobs {jobs} must be at least 1.")
    if threads is not None and int(threads) < 1:
        raise ConfigError(f"leaderboard --threads {threads} must be at least 1.")
    if address and name != "ray":
        raise ConfigError(f"leaderboard --ray-address applies to --executor ray, not {name}.")
    if name == "sequential" and jobs not in (None, 1):
        raise ConfigError(f"leaderboard --jobs {jobs} needs a parallel executor: add --executor process or ray.")


# -- the cache of results ----------------------------------------------------------------------------------
def load_result(folder: Path, key: str) -> JobResult | None:
    """The cached result of job ``key`` when it exists, is complete and succeeded; else None."""
    path = folder / f"{key}.json"
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(res, dict) or not res.get("complete") or res.get("key") != key or res.get("status") != "ok":
        return None
    return res


def save_result(folder: Path, job: Job, result: JobResult) -> None:
    """Write a job's result (with its configuration) atomically under ``folder/<key>.json``."""
    from fusion_bench.io.atomic import atomic_file

    folder.mkdir(parents=True, exist_ok=True)
    doc = {**result, "config": {k: v for k, v in job.items() if k not in ("env", "threads")}, "complete": True}
    with atomic_file(folder / f"{job['key']}.json", "w") as f:
        json.dump(doc, f, indent=1, default=str)


def run_jobs(jobs: Iterable[Job], executor: Any, cache: str | Path | None = None,
             log: Callable[[str], None] | None = None, stats: dict[str, int] | None = None,
             then: Callable[[Job, JobResult, dict[str, JobResult]], list[Job]] | None = None,
             reuse: bool = True) -> dict[str, JobResult]:
    """Run ``jobs`` on ``executor``; return {key: result}.

    Args:
        jobs: the jobs (:func:`make_job`); a job given twice (same key) runs once.
        executor: a :func:`make_executor` object.
        cache: a folder: complete successful results found there are used instead of running their jobs, and
            every new result is written there atomically (failed ones too, for inspection; they run again).
        log: progress lines.
        stats: updated in place: ``total``, ``ran``, ``cached``, ``failed``.
        then: called with (job, result, all results so far) after every result; the jobs it returns are run
            next (before the jobs still waiting), e.g. the final run once a sweep is done.
        reuse: False: run every job again (``cache`` still receives the new results).
    """
    log = log or (lambda s: None)
    stats = stats if stats is not None else {}
    for k in ("total", "ran", "cached", "failed"):
        stats.setdefault(k, 0)
    folder = Path(cache) if cache is not None else None
    results: dict[str, JobResult] = {}
    queue: list[Job] = []
    seen: set[str] = set()

    def admit(new: Iterable[Job], front: bool) -> None:
        fresh = []
        for job in new:
            if job["key"] in seen:
                continue
            seen.add(job["key"])
            stats["total"] += 1
            hit = load_result(folder, job["key"]) if folder is not None and reuse else None
            if hit is None:
                fresh.append(job)
                continue
            results[job["key"]] = {**hit, "cached": True}
            stats["cached"] += 1
            if then is not None:
                admit(then(job, results[job["key"]], results), front=True)
        if front:
            queue[0:0] = fresh
        else:
            queue.extend(fresh)

    admit(jobs, front=False)
    if stats["cached"]:
        log(f"leaderboard: {stats['cached']} job(s) done by an earlier run (results in {folder}), {len(queue)} to run")
    for job, res in executor.run(queue):
        stats["ran"] += 1
        results[job["key"]] = res
        if folder is not None:
            save_result(folder, job, res)
        done = f"[{stats['ran'] + stats['cached']}/{stats['total']}] {job['label']}"
        if res["status"] == "ok":
            log(f"leaderboard: {done} done in {res.get('wall_time_s') or 0:.1f}s")
        else:
            stats["failed"] += 1
            log(f"leaderboard: {done} FAILED: {res['error']}"
                + ("" if res.get("user_error") or not res.get("traceback") else "\n" + res["traceback"]))
        if then is not None:
            admit(then(job, res, results), front=True)
    return results
