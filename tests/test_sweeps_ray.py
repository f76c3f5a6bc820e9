"""Distributed sweeps: the leaderboard's jobs on a local Ray instance give the sequential run's table; a failing
job is reported with its error; a re-run skips the jobs already done; Hydra multirun through the joblib launcher
plugin gives the results of single runs. (Timings: benchmarks/leaderboard_ray.py.)"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_bench.benchmark.zoo import Zoo
from fusion_bench.errors import ConfigError

#: a small leaderboard: one untuned method, one tuned on a two-value grid, one whose option makes its jobs fail
METHODS = ["simple_average", "task_arithmetic", "ties_merging"]
GRID = [0.3, 1.0]
BAD = {"ties_merging": {"no_such_option": 1}}
MAX_SAMPLES = 12
#: columns that are measurements of this run (times, memory), not results
TIMING = {"merge_time_s", "peak_rss_mb", "evaluation_time_s", "tuning_time_s"}


@pytest.fixture(scope="module")
def tiny_zoo(tiny_clip_zoo) -> Zoo:
    """The session's tiny zoo (tests/conftest.py)."""
    return tiny_clip_zoo


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance with two CPUs for this module's tests."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _leaderboard(zoo: Zoo, out: Path, **kw):
    from fusion_bench.benchmark.leaderboard import run_leaderboard

    return run_leaderboard("tiny", str(zoo.root), out, methods=METHODS, max_samples=MAX_SAMPLES, tune=True,
                           tune_grid=GRID, method_options=BAD, log=lambda s: None, **kw)


def _results(doc: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in doc["rows"]]


def _csv_without_timing(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def sequential(tiny_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("lb_seq") / "lb"
    return out, _leaderboard(tiny_zoo, out)


def test_ray_leaderboard_equals_sequential_and_reports_the_failed_jobs(ray_local, tiny_zoo, sequential, tmp_path):
    seq_out, seq = sequential
    out = tmp_path / "lb_ray"
    doc = _leaderboard(tiny_zoo, out, executor="ray")
    ex = doc["execution"]
    assert ex["executor"] == "ray" and ex["parallel_jobs"] == 2 and ex["threads_per_job"] == 1
    # 1 reference job + 2 grid values + 1 final for task_arithmetic + 2 grid values for ties_merging + simple_average
    assert ex["jobs"] == {"total": 7, "ran": 7, "cached": 0, "failed": 2}
    assert seq["execution"]["jobs"] == ex["jobs"]

    # the same table: rows, order, accuracies, chosen lambda and validation scores, every non-timing column
    assert [r["method"] for r in doc["rows"]] == ["pretrained", "fine-tuned (individual)", "simple_average",
                                                  "task_arithmetic"]
    assert _results(doc) == _results(seq)
    assert doc["skipped"] == seq["skipped"] and doc["failed"] == seq["failed"]
    assert _csv_without_timing(out / "leaderboard.csv") == _csv_without_timing(seq_out / "leaderboard.csv")
    ta = {r["method"]: r for r in doc["rows"]}["task_arithmetic"]
    assert set(ta["tuned"]["validation_average"]) == set(GRID)

    # the failing method: every one of its jobs listed with its error, in the JSON, the CSV and the markdown
    failed = doc["failed"]
    assert [f["method"] for f in failed] == ["ties_merging", "ties_merging"]
    assert sorted(f["options"]["scaling_factor"] for f in failed) == GRID
    assert all("no_such_option" in f["error"] and f["error_type"] == "ConfigError" for f in failed)
    assert "no_such_option" in doc["skipped"]["ties_merging"]
    saved = json.loads((out / "leaderboard.json").read_text())
    assert saved["failed"] == failed
    rec = {r["method"]: r for r in csv.DictReader(open(out / "leaderboard.csv"))}
    assert "no_such_option" in rec["ties_merging"]["error"] and rec["ties_merging"]["average"] == ""
    md = (out / "leaderboard.md").read_text()
    assert "| ties_merging | merging |" in md and "FAILED" in md and "no_such_option" in md

    # every job's result saved under its configuration hash, with its configuration
    files = sorted((out / "jobs").glob("*.json"))
    assert len(files) == 7
    stored = [json.loads(p.read_text()) for p in files]
    assert all(s["complete"] and s["key"] == p.stem for s, p in zip(stored, files))
    assert {s["config"]["label"] for s in stored if s["status"] == "error"} == {
        f"ties_merging scaling_factor={v:g} (validation)" for v in GRID}
    assert all(s["threads"] == 1 for s in stored if s["status"] == "ok")


def test_rerun_skips_finished_jobs(tiny_zoo, sequential, tmp_path):
    import shutil

    from fusion_bench.benchmark.executors import load_result

    seq_out, seq = sequential
    out = tmp_path / "lb"
    shutil.copytree(seq_out, out)
    shutil.rmtree(out / "reports")
    doc = _leaderboard(tiny_zoo, out)
    # the 5 jobs that succeeded are taken from out/jobs; the 2 failed ones run again (and fail again)
    assert doc["execution"]["jobs"] == {"total": 7, "ran": 2, "cached": 5, "failed": 2}
    assert _results(doc) == _results(seq) and doc["failed"] == seq["failed"]
    # the methods' reports are written again from the cached results
    for name in ("simple_average", "task_arithmetic"):
        rep = json.loads((out / "reports" / f"{name}.json").read_text())
        row = {r["method"]: r for r in doc["rows"]}[name]
        assert {t: m["accuracy"] for t, m in rep["evaluation"]["tasks"].items()} == row["accuracy"]

    # a half-written result (no "complete" mark) is not a result: that job alone runs again
    ta = {r["method"]: r for r in doc["rows"]}["task_arithmetic"]
    victim = next(p for p in sorted((out / "jobs").glob("*.json"))
                  if json.loads(p.read_text())["config"]["label"] == f"task_arithmetic (λ={ta['tuned']['scaling_factor']:g})")
    victim.write_text(victim.read_text()[:200])
    assert load_result(out / "jobs", victim.stem) is None
    doc = _leaderboard(tiny_zoo, out)
    assert doc["execution"]["jobs"] == {"total": 7, "ran": 3, "cached": 4, "failed": 2}
    assert _results(doc) == _results(seq)
    assert load_result(out / "jobs", victim.stem) is not None

    # another option value is another job; resume=False runs everything again
    from fusion_bench.benchmark.leaderboard import run_leaderboard

    doc = run_leaderboard("tiny", str(tiny_zoo.root), out, methods=["simple_average", "task_arithmetic"],
                          max_samples=MAX_SAMPLES, log=lambda s: None)
    assert doc["execution"]["jobs"] == {"total": 3, "ran": 1, "cached": 2, "failed": 0}  # task_arithmetic untuned
    doc = run_leaderboard("tiny", str(tiny_zoo.root), out, methods=["simple_average"], max_samples=MAX_SAMPLES,
                          log=lambda s: None, resume=False)
    assert doc["execution"]["jobs"] == {"total": 2, "ran": 2, "cached": 0, "failed": 0}


def test_job_key_covers_the_configuration(tmp_path):
    from fusion_bench.benchmark.executors import code_version, make_job

    pool = {"scale": "tiny", "root": str(tmp_path / "zoo")}
    tp = {**pool, "max_samples": 5, "corruption": None}
    base = make_job("final", "task_arithmetic", {"scaling_factor": 0.3}, "clip", pool, tp, zoo_fingerprint="z1")
    same = make_job("final", "task_arithmetic", {"scaling_factor": 0.3}, "clip", dict(pool), dict(tp),
                    zoo_fingerprint="z1", label="another label", report_path="elsewhere.json")
    assert base["key"] == same["key"] and code_version() in base["code_version"]
    others = [
        make_job("final", "task_arithmetic", {"scaling_factor": 0.4}, "clip", pool, tp, zoo_fingerprint="z1"),
        make_job("final", "ties_merging", {"scaling_factor": 0.3}, "clip", pool, tp, zoo_fingerprint="z1"),
        make_job("final", "task_arithmetic", {"scaling_factor": 0.3}, "clip", pool, {**tp, "max_samples": 6},
                 zoo_fingerprint="z1"),
        make_job("tune", "task_arithmetic", {"scaling_factor": 0.3}, "clip", pool, {**tp, "split": "validation"},
                 zoo_fingerprint="z1"),
        make_job("final", "task_arithmetic", {"scaling_factor": 0.3}, "clip", pool, tp, zoo_fingerprint="z2"),
        make_job("final", "task_arithmetic", {"scaling_factor": 0.3}, "clip", pool, tp, zoo_fingerprint="z1",
                 seed=1),
    ]
    assert len({base["key"], *(o["key"] for o in others)}) == len(others) + 1


def test_executor_options_are_checked(tmp_path):
    from fusion_bench.benchmark.executors import available_cores, make_executor

    with pytest.raises(ConfigError, match="--executor"):
        make_executor("dask")
    with pytest.raises(ConfigError, match="--jobs"):
        make_executor("sequential", jobs=2)
    with pytest.raises(ConfigError, match="--jobs"):
        make_executor("process", jobs=0)
    with pytest.raises(ConfigError, match="--ray-address"):
        make_executor("process", address="auto")
    ex = make_executor("process", jobs=2)
    assert ex.jobs == 2 and ex.threads == max(1, available_cores() // 2)
    assert make_executor("process", jobs=2, threads=3).threads == 3
    # the leaderboard checks them before any work (here: before it would build a zoo in the missing folder)
    from fusion_bench.benchmark.leaderboard import main

    root = tmp_path / "no_zoo"
    with pytest.raises(ConfigError, match="--jobs"):
        main(["--scale", "tiny", "--root", str(root), "--out", str(tmp_path / "lb"), "--jobs", "2"])
    with pytest.raises(ConfigError, match="--ray-address"):
        main(["--scale", "tiny", "--root", str(root), "--out", str(tmp_path / "lb"), "--ray-address", "auto"])
    assert not root.exists() and not (tmp_path / "lb").exists()


def _job_or_die(job: dict) -> dict:
    """A stand-in for run_job in worker processes: the job labelled 'dies' kills its worker."""
    if job["label"] == "dies":
        os._exit(3)
    return {"key": job["key"], "label": job["label"], "status": "ok", "report": {"pid": os.getpid()},
            "wall_time_s": 0.0}


def test_a_killed_worker_is_a_failed_job_not_a_lost_one(tmp_path):
    """A worker process that dies (killed, out of memory) turns its job, and those the broken pool can no longer
    take, into error results; every job gets a result and the successful ones are cached."""
    from fusion_bench.benchmark.executors import ProcessExecutor, run_jobs

    jobs = [{"key": f"k{i}", "label": label} for i, label in enumerate(["fine", "dies", "after"])]
    runner = ProcessExecutor(jobs=1, threads=1, fn=_job_or_die)
    stats: dict = {}
    try:
        results = run_jobs(jobs, runner, tmp_path / "jobs", stats=stats)
    finally:
        runner.close()
    assert set(results) == {"k0", "k1", "k2"}
    assert results["k0"]["status"] == "ok"
    assert results["k1"]["status"] == "error" and "BrokenProcessPool" in results["k1"]["error"]
    assert results["k2"]["status"] == "error"
    assert stats == {"total": 3, "ran": 3, "cached": 0, "failed": 2}
    assert json.loads((tmp_path / "jobs" / "k0.json").read_text())["complete"] is True


def _have_joblib_launcher() -> bool:
    try:
        import hydra_plugins.hydra_joblib_launcher  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _have_joblib_launcher(), reason="hydra-joblib-launcher is not installed")
def test_hydra_multirun_with_the_joblib_launcher_equals_single_runs(tiny_zoo, tmp_path):
    """``fusion_bench -m method=a,b hydra/launcher=joblib``: two jobs in two processes; each report's accuracies
    equal a single run of that method."""
    from fusion_bench.methods.base import build_method
    from fusion_bench.modelpool.base import build_modelpool
    from fusion_bench.programs.fusion import run_program
    from fusion_bench.taskpool.base import build_taskpool

    root = str(tiny_zoo.root)
    sweep = tmp_path / "multirun"
    cmd = [sys.executable, "-m", "fusion_bench.cli", "-m", "method=simple_average,task_arithmetic",
           "modelpool=clip_zoo_tiny", "taskpool=clip_zoo_tiny", f"modelpool.root={root}", f"taskpool.root={root}",
           "modelpool.build=false", "taskpool.build=false", f"taskpool.max_samples={MAX_SAMPLES}",
           "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}", "print_table=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr  # Hydra's joblib launcher ran the sweep
    reports = {}
    for path in sorted(sweep.glob("*/report.json")):
        rep = json.loads(path.read_text())
        reports[rep["method"]["name"]] = rep
    assert set(reports) == {"simple_average", "task_arithmetic"}

    pool = build_modelpool({"type": "clip_zoo", "scale": "tiny", "root": root, "build": False})
    tp = build_taskpool({"type": "clip_zoo", "scale": "tiny", "root": root, "build": False,
                         "max_samples": MAX_SAMPLES})
    for name, rep in reports.items():
        single = run_program({"print_table": False, "seed": 0}, modelpool=pool, method=build_method({"name": name}),
                             taskpool=tp, log=lambda s: None)
        got = {t: m["accuracy"] for t, m in rep["evaluation"]["tasks"].items()}
        want = {t: m["accuracy"] for t, m in single["evaluation"]["tasks"].items()}
        assert got == want and len(got) == len(tiny_zoo.tasks)
        assert rep["method"]["hyperparameters"] == single["method"]["hyperparameters"]
