"""Benchmark of the pruning methods on a causal LM: sparsity, perplexity before/after, time, peak memory.

    python benchmarks/llm_pruning.py --model <HF folder> [--tokenizer <folder>] [--methods magnitude_pruning ...]
        [--sparsity 0.5] [--nm 2:4] [--n-samples 16] [--seq-len 512] [--ppl-tokens 4096] [--threads 2]

Every method runs in its own subprocess (so that its peak RSS is its own) on the same model and calibration text
(the shipped ``builtin`` text: the ``train`` part for calibration, the ``test`` part for perplexity, disjoint
windows of ``--ppl-window`` tokens). Without ``--tokenizer`` the model folder's tokenizer is used, or, when it has
none, the byte-level tokenizer of ``fusion_bench.testing.tiny_lm`` (ids 0-257, valid for any vocabulary of at
least 258 tokens; say so when reporting). Prints a Markdown table and writes the rows as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROW_KEYS = ("method", "pattern", "sparsity", "ppl_before", "ppl_after", "time_s", "peak_rss_gb", "layer_working_set_mb")


def _tokenizer_folder(model: str, tokenizer: str | None) -> tuple[str, str]:
    if tokenizer:
        return tokenizer, tokenizer
    if (Path(model) / "tokenizer.json").exists() or (Path(model) / "tokenizer_config.json").exists():
        return model, "the model's own"
    from fusion_bench.testing.tiny_lm import byte_tokenizer

    folder = tempfile.mkdtemp(prefix="byte_tokenizer_")
    byte_tokenizer().save_pretrained(folder)
    return folder, "fusion_bench.testing.tiny_lm byte tokenizer (the model folder has none)"


def run_one(args: argparse.Namespace) -> dict:
    """One method (or 'dense': the perplexity of the unpruned model) in this process; returns its row."""
    import torch

    torch.set_num_threads(args.threads)
    from fusion_bench.methods import build_method
    from fusion_bench.modelpool.causal_lm import CausalLMPool
    from fusion_bench.taskpool.base import build_taskpool
    from fusion_bench.utils import measure

    pool = CausalLMPool({"_pretrained_": args.model}, tokenizer=args.tokenizer_folder, dtype=args.dtype)
    ppl_cfg = {"type": "causal_lm_perplexity", "tasks": {"builtin": {"source": "builtin", "split": "test"}},
               "tokenizer": args.tokenizer_folder, "max_length": args.ppl_window, "stride": args.ppl_window,
               "max_tokens": args.ppl_tokens, "device": "cpu"}
    if args.one == "dense":
        model = pool.load_model("_pretrained_")
        t0 = time.perf_counter()
        ppl = build_taskpool(ppl_cfg).evaluate(model)["tasks"]["builtin"]
        return {"method": "dense", "ppl": ppl["perplexity"], "ppl_tokens": ppl["tokens"],
                "ppl_time_s": round(time.perf_counter() - t0, 1)}
    name, _, mode = args.one.partition("@")
    cfg = {"name": name, "sparsity": args.sparsity, "nm": args.nm, "device": "cpu", "progress": False}
    if name in ("wanda_pruning", "sparsegpt_pruning", "sparselo"):
        cfg.update(n_samples=args.n_samples, seq_len=args.seq_len, batch_size=args.batch_size)
    if name == "sparselo":
        cfg.update(rank=args.rank, variant="wanda")
    method = build_method(cfg)
    if mode == "ooc":  # out of core: one decoder layer in memory, written to a folder
        from transformers import AutoModelForCausalLM

        from fusion_bench.methods.compression.out_of_core import prune_to_folder

        out = Path(tempfile.mkdtemp(prefix="pruned_")) / "model"
        with measure() as m:
            md = prune_to_folder(method, pool, out, progress=False)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=pool.dtype).eval()
    else:
        with measure() as m:
            res = method.run(pool)
        md, model = res.metadata, res.model
    ppl = build_taskpool(ppl_cfg).evaluate(model)["tasks"]["builtin"]
    mem = md.get("memory") or {}
    return {"method": name + (" (out of core)" if mode == "ooc" else ""), "pattern": args.nm or "unstructured", "sparsity": md["sparsity_overall"],
            "ppl_after": ppl["perplexity"], "time_s": round(m.wall_time_s, 1),
            "peak_rss_gb": round(m.peak_rss_bytes / 2**30, 2),
            "layer_working_set_mb": round(mem.get("layer_working_set_bytes", 2 * mem["layer_input_bytes"]
                                                  + mem["largest_layer_bytes"]) / 2**20, 1) if mem else None,
            "calibration_tokens": (md.get("calibration") or {}).get("tokens")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model folder (causal LM).")
    p.add_argument("--tokenizer", default=None, help="Tokenizer folder (default: the model's, else the byte tokenizer).")
    p.add_argument("--methods", nargs="+", help="Method names; NAME@ooc runs the out-of-core path "
                   "(prune_to_folder) of a pruning method.", default=["magnitude_pruning", "random_pruning", "wanda_pruning",
                                                    "sparsegpt_pruning"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nm", default=None, help="N:M pattern, e.g. 2:4 (default: unstructured).")
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=32, help="SparseLo rank.")
    p.add_argument("--ppl-window", type=int, default=512)
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1: on a shared, "
                   "oversubscribed CPU more threads made SparseGPT's column loop 14x slower)")
    p.add_argument("--dtype", default="float32", help="Load (and calibrate) the model in this dtype (CPU: float32 "
                   "is faster than bf16).")
    p.add_argument("--out", default=None, help="Write the rows as JSON here.")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer-folder", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:
        print("ROW " + json.dumps(run_one(args)), flush=True)
        return

    tok, tok_note = _tokenizer_folder(args.model, args.tokenizer)
    print(f"model {args.model} ({args.dtype}); tokenizer: {tok_note}; threads {args.threads}; calibration {args.n_samples} x "
          f"{args.seq_len} tokens (builtin train); perplexity: builtin test, windows of {args.ppl_window}, first "
          f"{args.ppl_tokens} tokens", flush=True)
    base = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--tokenizer-folder", tok,
            "--sparsity", str(args.sparsity), "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--rank", str(args.rank), "--ppl-window", str(args.ppl_window),
            "--ppl-tokens", str(args.ppl_tokens), "--threads", str(args.threads), "--dtype", args.dtype]
    if args.nm:
        base += ["--nm", args.nm]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}

    def child(name: str) -> dict:
        t0 = time.perf_counter()
        out = subprocess.run(base + ["--one", name], capture_output=True, text=True, env=env)
        rows = [json.loads(line[4:]) for line in out.stdout.splitlines() if line.startswith("ROW ")]
        if out.returncode or not rows:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        print(f"  {name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
        return rows[0]

    def line(r: dict) -> str:
        ws = "-" if r["layer_working_set_mb"] is None else f"{r['layer_working_set_mb']}"
        return (f"| {r['method']} | {r['pattern']} | {r['sparsity']:.4f} | {r['ppl_before']:.2f} | "
                f"{r['ppl_after']:.2f} | {r['time_s']} | {r['peak_rss_gb']} | {ws} |")

    dense = child("dense")
    rows = []
    for name in args.methods:
        r = child(name)
        r["ppl_before"] = dense["ppl"]
        rows.append(r)
        print("ROWLINE " + line(r), flush=True)  # each row as soon as it is measured
    head = "| method | pattern | sparsity reached | perplexity before | perplexity after | time (s) | peak RSS (GB) | " \
           "one layer's working set (MB) |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    lines += [line(r) for r in rows]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"dense": dense, "rows": rows, "tokenizer": tok_note}, indent=2))


if __name__ == "__main__":
    main()
