"""Sequential vs Ray (and local processes): wall time of the same tiny-zoo leaderboard, and whether the tables agree.

    python benchmarks/leaderboard_ray.py [--root ZOO_DIR] [--methods a,b,...] [--tune-grid 0.1,0.3,1.0]
        [--max-samples N] [--executors sequential,ray] [--jobs 2] [--rerun] [--out rows.json]

Each run is one ``fusion_bench leaderboard --scale tiny`` subprocess into a fresh output folder (no cached job
results), one after another: ``sequential`` (the default executor), ``ray`` (``--executor ray --jobs N``: a local
Ray instance started by the run, N jobs of cores/N torch threads each) and ``process`` (``--executor process
--jobs N``); ``NAME:T`` adds ``--threads T`` (e.g. ``sequential:1``, one torch thread). Wall time includes everything the user waits for: start-up, Ray's start, the workers' imports and
pool loading, the reference rows, every job, the tables. ``cpu_s``: CPU time of the subprocess and the children
it waited for (Ray's workers are children of its raylet, so a Ray run's figure is partial: compare wall times).
``--rerun`` times a second Ray run into the same folder (every job's result taken from OUT/jobs).

The tables are compared without their measured columns (merge time, peak memory, evaluation and tuning time):
same rows, same order, same accuracies, same chosen lambda. The zoo is built first when ``--root`` holds none
(not timed). On a shared machine the figures vary with the other load: run it on an idle machine, or more than
once, and report the load (printed) with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMING = {"merge_time_s", "peak_rss_mb", "evaluation_time_s", "tuning_time_s"}


def _run(args: list[str], log: Path) -> tuple[float, float, int]:
    """(wall s, CPU s of the waited-for children, exit code) of one leaderboard subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, "-m", "fusion_bench.cli", "leaderboard", *args], stdout=f,
                               stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), code


def _table(out: Path) -> tuple[list[dict], dict, list]:
    doc = json.loads((out / "leaderboard.json").read_text())
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in doc["rows"]]
    return rows, doc["skipped"], doc.get("failed", [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="zoo folder (default: a temporary folder, built first)")
    ap.add_argument("--scale", default="tiny", choices=("tiny", "full"), help="zoo scale (default tiny)")
    ap.add_argument("--methods", default=None, help="comma-separated methods (default: every registered method)")
    ap.add_argument("--tune-grid", default="0.1,0.3,0.5,1.0", help="scaling_factor grid ('' for no tuning)")
    ap.add_argument("--max-samples", type=int, default=None, help="test examples per task (default: all)")
    ap.add_argument("--executors", default="sequential,ray",
                    help="comma-separated runs: sequential, ray, process; NAME:T gives each job T torch threads "
                    "(e.g. sequential:1)")
    ap.add_argument("--jobs", type=int, default=2, help="jobs at once for ray and process (default 2)")
    ap.add_argument("--rerun", action="store_true", help="also time a second Ray run that finds every job done")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="fb-lb-ray-"))
    root = Path(args.root) if args.root else tmp / "zoo"
    from fusion_bench.benchmark.zoo import Zoo

    zoo = Zoo(args.scale, root)
    if not zoo.is_built():
        print(f"building the {args.scale} zoo in {root} (not timed) ...", flush=True)
        zoo.build(progress=False, log=lambda s: None)
    common = ["--scale", args.scale, "--root", str(root)]
    if args.methods:
        common += ["--methods", args.methods]
    if args.tune_grid:
        common += ["--tune-grid", args.tune_grid]
    if args.max_samples:
        common += ["--max-samples", str(args.max_samples)]
    print(f"cores: {os.cpu_count()}, load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    rows, tables = [], {}
    runs = [e.strip() for e in args.executors.split(",") if e.strip()]
    if args.rerun and "ray" in runs:
        runs.append("ray (re-run)")
    for name in runs:
        executor, _, threads = name.split()[0].partition(":")
        tag = name.split()[0].replace(":", "-t")
        out = tmp / ("lb-" + tag)
        extra = [] if executor == "sequential" else ["--executor", executor, "--jobs", str(args.jobs)]
        extra += ["--threads", threads] if threads else []
        load = os.getloadavg()[0]
        log = tmp / f"{tag}{'-rerun' if 're-run' in name else ''}.log"
        wall, cpu, code = _run([*common, "--out", str(out), *extra], log)
        if code != 0:
            print(f"{name}: exit code {code}; see {log}")
            return 1
        doc = json.loads((out / "leaderboard.json").read_text())
        if "re-run" not in name:
            tables[name] = _table(out)
        jobs = doc.get("execution", {}).get("jobs", {})
        rows.append({"run": name, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_1min_before": round(load, 2),
                     "jobs": jobs.get("total"), "jobs_ran": jobs.get("ran"), "jobs_cached": jobs.get("cached"),
                     "jobs_failed": jobs.get("failed"), "rows": len(doc["rows"])})
        print(f"{name}: {wall:.1f} s wall", flush=True)
    first = next((r["run"] for r in rows if r["run"].startswith("sequential")), rows[0]["run"])
    base = tables.get(first)
    for r in rows:
        t = tables.get(r["run"])
        r["same_table_as_sequential"] = None if base is None or t is None or r["run"] == first else t == base
    print()
    print("| run | wall s | CPU s (waited-for children) | load before | jobs | ran | cached | failed | rows | same table |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = {None: "-", True: "yes", False: "NO"}[r["same_table_as_sequential"]]
        print(f"| {r['run']} | {r['wall_s']} | {r['cpu_s']} | {r['load_1min_before']} | {r['jobs']} | {r['jobs_ran']} "
              f"| {r['jobs_cached']} | {r['jobs_failed']} | {r['rows']} | {same} |")
    seq = next((r for r in rows if r["run"] == first), None)
    for r in rows:
        if seq and r is not seq:
            print(f"{r['run']}: {seq['wall_s'] / r['wall_s']:.2f}x the speed of {first}")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; logs and outputs in {tmp}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["same_table_as_sequential"] in (None, True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
