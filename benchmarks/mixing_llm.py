"""Benchmark of Mixtral upcycling / merging and depth up-scaling on the Llama-style zoo (issue 14).

    python benchmarks/mixing_llm.py ZOO_DIR                    # the zoo of benchmarks/streaming_merge.py (built if absent)
    python benchmarks/mixing_llm.py ZOO_DIR --runs up4 up8 merge4 --inference

Each run is one ``fusion_bench`` process on the zoo as a causal-LM pool, streamed to OUT_DIR
(``evaluate=false``, so ``engine=auto`` streams): whole-process wall time, CPU time and peak RSS
(``os.wait4`` rusage), plus the method's own wall time and parameter figures read from its report.
``--inference`` then loads each output with ``from_pretrained`` (float32 by default) and prints its forward time on
a batch of random token ids relative to the dense base, and the largest logit difference to it
(zero up to rounding for upcycling with plain copies). On a shared machine wall times include
waiting for a CPU.

Runs: up4 / up8 (upcycle the base into 4 / 8 experts, random routers), merge4 (variant1-4 as experts,
base tensors from _pretrained_), deep (SOLAR-style 30 -> 48 layers: [[0,24],[6,30]]), recomb
(layer-wise recombination of variant1-4).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming_merge import build_zoo, run_child  # noqa: E402

RUNS = {
    "up4": ("mixtral_upscaling", ["method.num_experts=4"], "base"),
    "up8": ("mixtral_upscaling", ["method.num_experts=8"], "base"),
    "merge4": ("mixtral_merging", [], "four"),
    "deep": ("depth_upscaling", ["method.layer_indices=[[0,24],[6,30]]"], "base"),
    "recomb": ("model_recombination", ["method.granularity=layer"], "four"),
}


def command(models: dict[str, str], run: str, out: Path, report: Path) -> list[str]:
    method, opts, which = RUNS[run]
    names = ["_pretrained_"] if which == "base" else ["_pretrained_", "variant1", "variant2", "variant3", "variant4"]
    pool = [f"+modelpool.models.{n}={models[n]}" for n in names]
    return [sys.executable, "-m", "fusion_bench.cli", f"method={method}", *opts, "modelpool=causal_lm_merge",
            "~modelpool.models", *pool, "~taskpool", "evaluate=false", f"merged_model_path={out}",
            f"report_path={report}", "overwrite=true", f"hydra.run.dir={out.parent / ('hydra_' + run)}"]


def inference(base: str, outs: dict[str, Path], batch: int, seq: int, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))

    def fwd(m):
        with torch.inference_mode():
            m(input_ids=ids)
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                logits = m(input_ids=ids).logits.float()
                ts.append(time.perf_counter() - t)
        return logits, sorted(ts)[1]

    dt = getattr(torch, dtype)
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=dt).eval()
    ref, td = fwd(dense)
    del dense
    print(f"\ninference, batch {batch} x {seq} tokens, {dtype}, median of 3 (dense: {td:.3f} s)")
    print("| run | class | forward s | ratio to dense | max abs logit diff to dense |")
    print("|---|---|---|---|---|")
    for run, out in outs.items():
        m = AutoModelForCausalLM.from_pretrained(out, dtype=dt).eval()
        logits, tf = fwd(m)
        diff = float((logits - ref).abs().max()) if logits.shape == ref.shape else float("nan")
        print(f"| {run} | {type(m).__name__} | {tf:.3f} | {tf / td:.2f} | {diff:.4g} |", flush=True)
        del m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoo", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary folder, removed at the end)")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--inference", action="store_true", help="also time a forward pass of each output")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="dtype of the inference timing (CPUs without native bf16 run bf16 matmuls slowly)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    a = ap.parse_args(argv)
    models = build_zoo(a.zoo, 1)
    out_root = a.out or Path(tempfile.mkdtemp(prefix="fusion_bench_mixing_"))
    out_root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    print("| run | method | process wall s | CPU s | peak RSS MiB | method wall s | total params | active params "
          "| extra params | output GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    outs = {}
    for run in a.runs:
        out, rep = out_root / run, out_root / f"{run}.json"
        wall, rss, code, cpu = run_child(command(models, run, out, rep), env)
        if code != 0:
            print(f"| {run} | failed (exit {code}) |")
            continue
        md = json.loads(rep.read_text())["metadata"]
        size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**30
        print(f"| {run} | {RUNS[run][0]} | {wall:.1f} | {cpu:.1f} | {rss / 2**20:.0f} | {md['method_wall_time_s']:.1f} "
              f"| {md['total_parameters'] / 1e6:.1f} M | {md['active_parameters_per_token'] / 1e6:.1f} M "
              f"| {md['extra_parameters'] / 1e6:.1f} M | {size:.2f} |", flush=True)
        outs[run] = out
    if a.inference:
        inference(models["_pretrained_"], outs, a.batch, a.seq, a.dtype)
    if not a.keep and a.out is None:
        shutil.rmtree(out_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
