"""Side-by-side speed of ``fusion_bench mergekit`` and ``mergekit-yaml`` on the same mergekit YAMLs (issue 18).

    python benchmarks/mergekit_speed.py --zoo ZOO_DIR --mergekit-bin PATH/TO/mergekit-yaml \\
        [--zoo4 DIR --build-4x] [--runs 3] [--methods task_arithmetic ties dare_ties linear slerp]
    python benchmarks/mergekit_speed.py --tiny --mergekit-bin PATH/TO/mergekit-yaml   # a check that it runs

Each run is a whole process (interpreter start, imports, planning, reading, merging, writing the shards and the
config/tokenizer files), timed from the parent: wall time, CPU time (user + system) and peak RSS from
``os.wait4``'s rusage of the child. For every (zoo, method) the zoo's files are read once first (warm page
cache), then the tools alternate, ``--runs`` times each (default 3), each run into a fresh output folder
(removed afterwards, outside the timing); the table shows the medians and mergekit / fusion_bench ratios. TIES is also timed
with ``fusion_bench mergekit --tie-break index`` (row "ties (index)"): the same number of kept entries, the lower
index first among tied magnitudes, so no full sort per tensor; that merge is not mergekit's (default: it is).

Zoos: ``--zoo`` is a base + 8 variants bf16 Llama zoo as ``benchmarks/streaming_merge.py`` builds it (scale 1:
162.8 M parameters per model, ~2.9 GB). ``--zoo4 DIR`` adds the 4x zoo (651 M parameters per model, ~11.7 GB);
with ``--build-4x`` it is built there when missing (default DIR: a folder under the temporary directory, kept for
later runs; delete it afterwards). ``--tiny`` builds a tiny zoo in a temporary folder instead (seconds; checks the
script, the numbers mean nothing). Run on an otherwise idle machine: the wall time of a shared CPU includes waiting.

mergekit is not a dependency of fusion_bench: install it in its own virtual environment (see
benchmarks/mergekit_equivalence.py) and pass its ``mergekit-yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the methods timed: mergekit YAML (models: every variant unless 'pair'), as mergekit's examples write them
METHODS: dict[str, dict] = {
    "task_arithmetic": {"merge_method": "task_arithmetic", "model_params": {"weight": 0.3}},
    "ties": {"merge_method": "ties", "model_params": {"weight": 0.3, "density": 0.2},
             "parameters": {"normalize": False}},
    "dare_ties": {"merge_method": "dare_ties", "model_params": {"weight": 0.3, "density": 0.5},
                  "parameters": {"normalize": False}},
    "linear": {"merge_method": "linear", "model_params": {"weight": 1.0}, "no_base": True},
    "slerp": {"merge_method": "slerp", "parameters": {"t": 0.5}, "pair": True},
}
TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512)


def mergekit_yaml(models: dict[str, str], method: str) -> dict:
    spec = METHODS[method]
    variants = [p for n, p in models.items() if n != "_pretrained_"]
    doc: dict = {"merge_method": spec["merge_method"], "dtype": "bfloat16"}
    if spec.get("pair"):  # slerp: the base (t = 0) and one variant
        doc["base_model"] = models["_pretrained_"]
        doc["models"] = [{"model": models["_pretrained_"]}, {"model": variants[0]}]
    else:
        if not spec.get("no_base"):
            doc["base_model"] = models["_pretrained_"]
        doc["models"] = [{"model": p, "parameters": dict(spec["model_params"])} for p in variants]
    if spec.get("parameters"):
        doc["parameters"] = dict(spec["parameters"])
    return doc


def build(root: Path, scale: int | str) -> dict[str, str]:
    """The zoo of ``benchmarks/streaming_merge.py`` (scale 1 or 4), or the tiny one ('tiny')."""
    import benchmarks.streaming_merge as sm

    if scale == "tiny":
        sm.ZOOS.setdefault("tiny", TINY)
    return sm.build_zoo(root, scale)


def with_architectures(models: dict[str, str], view: Path) -> dict[str, str]:
    """mergekit needs ``architectures`` in config.json (benchmarks/streaming_merge.py's zoos lack it): a view of the
    zoo whose folders link every file but a config.json that names LlamaForCausalLM (the zoo is not modified)."""
    if all("architectures" in json.loads((Path(p) / "config.json").read_text()) for p in models.values()):
        return models
    out = {}
    for name, p in models.items():
        d = view / Path(p).name
        d.mkdir(parents=True, exist_ok=True)
        for f in Path(p).iterdir():
            if f.name != "config.json" and not (d / f.name).exists():
                (d / f.name).symlink_to(f.resolve())
        c = json.loads((Path(p) / "config.json").read_text())
        c.setdefault("architectures", ["LlamaForCausalLM"])
        (d / "config.json").write_text(json.dumps(c, indent=2))
        out[name] = str(d)
    print(f"note: {Path(next(iter(models.values()))).parent}: config.json has no 'architectures' (mergekit needs it); "
          f"both tools read a view with it added in {view}", flush=True)
    return out


def warm(models: dict[str, str]) -> float:
    """Read every file of the zoo once (page cache); returns the seconds it took."""
    t0 = time.perf_counter()
    for p in models.values():
        for f in Path(p).iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass
    return time.perf_counter() - t0


def run_child(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int, int, str]:
    """(wall s, CPU s, peak RSS bytes, exit code, last stderr line) of one whole process."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        err.seek(0)
        lines = [ln for ln in err.read().decode(errors="replace").splitlines() if ln.strip()]
    rc = os.waitstatus_to_exitcode(status)
    return wall, ru.ru_utime + ru.ru_stime, int(ru.ru_maxrss * 1024), rc, (lines[-1] if lines else "")


def ours_command(cfg: Path, out: Path, extra: list[str] | None = None) -> list[str]:
    exe = Path(sys.executable).with_name("fusion_bench")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "fusion_bench.cli"]
    return [*base, "mergekit", str(cfg), str(out), *(extra or [])]


#: methods with a magnitude trim: also timed with ``--tie-break index`` (same kept count, lower index first among
#: tied magnitudes; not mergekit's entries), as a third tool against the same mergekit runs
TRIM_METHODS = ("ties",)
INDEX = "fusion_bench --tie-break index"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-bin", required=True, help="mergekit-yaml of a separate mergekit install")
    ap.add_argument("--zoo", type=Path, help="the scale-1 zoo (base + 8 variants, bf16)")
    ap.add_argument("--zoo4", type=Path, help="the 4x zoo (with --build-4x: built there when missing)")
    ap.add_argument("--build-4x", action="store_true", help="build the 4x zoo when missing (default folder: "
                    "<tmp>/fb_llama_zoo_x4)")
    ap.add_argument("--tiny", action="store_true", help="a tiny zoo in a temporary folder: checks the script only")
    ap.add_argument("--runs", type=int, default=3, help="runs per tool, method and zoo (the median is shown)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--work", type=Path, help="folder for the configs and outputs (default: a temporary folder)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if not Path(args.mergekit_bin).exists():
        ap.error(f"--mergekit-bin {args.mergekit_bin} does not exist")
    work = args.work or Path(tempfile.mkdtemp(prefix="mk_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    zoos: list[tuple[str, dict[str, str]]] = []
    if args.tiny:
        zoos.append(("tiny", build(work / "tiny_zoo", "tiny")))
    if args.zoo:
        if not (args.zoo / "zoo.json").exists():
            ap.error(f"--zoo {args.zoo} has no zoo.json (build it with benchmarks/streaming_merge.py)")
        zoos.append(("1x", json.loads((args.zoo / "zoo.json").read_text())["models"]))
    if args.zoo4 or args.build_4x:
        z4 = args.zoo4 or Path(tempfile.gettempdir()) / "fb_llama_zoo_x4"
        if not (z4 / "zoo.json").exists():
            if not args.build_4x:
                ap.error(f"--zoo4 {z4} has no zoo.json; pass --build-4x to build it (~11.7 GB)")
            build(z4, 4)
        zoos.append(("4x", json.loads((z4 / "zoo.json").read_text())["models"]))
    if not zoos:
        ap.error("give --zoo, --zoo4/--build-4x or --tiny")
    zoos = [(z, with_architectures(m, work / f"view_{z}")) for z, m in zoos]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    rows = []
    for zname, models in zoos:
        for method in args.methods:
            cfg = work / f"{zname}_{method}.yml"
            cfg.write_text(yaml.safe_dump(mergekit_yaml(models, method), sort_keys=False))
            w = warm(models)
            tools = ["fusion_bench", "mergekit"] + ([INDEX] if method in TRIM_METHODS else [])
            res: dict[str, list] = {t: [] for t in tools}
            fails: dict[str, str] = {}
            for i in range(args.runs):
                for tool in tools:
                    out = work / "out_tool"
                    if out.exists():
                        shutil.rmtree(out)
                    if tool == "mergekit":
                        cmd = [args.mergekit_bin, str(cfg), str(out)]
                    else:
                        cmd = ours_command(cfg, out, ["--tie-break", "index"] if tool == INDEX else None)
                    wall, cpu, rss, rc, last = run_child(cmd, env)
                    if rc != 0:
                        fails[tool] = f"exit {rc}: {last[:160]}"
                    else:
                        res[tool].append((wall, cpu, rss))
                    print(f"  {zname} {method:<16} {tool:<31} run {i + 1}: {wall:7.2f} s wall, {cpu:7.2f} s CPU, "
                          f"{rss / 2**30:5.2f} GiB peak RSS{'' if rc == 0 else '  FAILED ' + fails[tool]}", flush=True)
                    if out.exists():
                        shutil.rmtree(out)
            rows.append((zname, method, w, res, fails))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print()
    print(f"whole process, median of {args.runs} run(s) per tool, warm page cache; {os.cpu_count()} CPUs visible, "
          f"load average {load:.1f} at the end")
    hdr = (f"{'zoo':<5}{'method':<17}{'fb wall s':>10}{'mk wall s':>10}{'mk/fb':>7}{'fb CPU s':>10}{'mk CPU s':>10}"
           f"{'fb RSS GiB':>11}{'mk RSS GiB':>11}")
    print(hdr)
    print("-" * len(hdr))
    ok = True

    def med(xs: list, i: int) -> float:
        return statistics.median(x[i] for x in xs) if xs else float("nan")

    for zname, method, _w, res, fails in rows:
        mk = res["mergekit"]
        for tool, label in (("fusion_bench", method), (INDEX, method + " (index)")):
            fb = res.get(tool)
            if fb is None:
                continue
            ratio = med(mk, 0) / med(fb, 0) if fb and mk else float("nan")
            print(f"{zname:<5}{label:<17}{med(fb, 0):>10.2f}{med(mk, 0):>10.2f}{ratio:>7.1f}{med(fb, 1):>10.2f}"
                  f"{med(mk, 1):>10.2f}{med(fb, 2) / 2**30:>11.2f}{med(mk, 2) / 2**30:>11.2f}")
        for tool, msg in fails.items():
            print(f"      {tool} FAILED: {msg}")
            ok = False
    print(f"(page-cache warm-up read of each zoo: {', '.join(f'{z} {w:.1f} s' for z, _m, w, _r, _f in rows[:: max(1, len(args.methods))])})")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
