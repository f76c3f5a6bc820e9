"""Benchmark of the language-model task pools and BitDelta on a causal LM: time, tokens/s, peak memory,
perplexity before/after.

    python benchmarks/llm_eval.py --base <HF folder> --finetuned <HF folder> [--tokenizer <folder>]
        [--dtype float32] [--threads 2] [--ppl-window 1024] [--ppl-stride 512] [--ppl-tokens 0]
        [--gen-tokens 32] [--bitdelta-steps 200] [--bitdelta-ppl-tokens 2048] [--out rows.json]

Rows, each measured in its own subprocess (so that its peak RSS is its own; ``process_cpu_s`` is that
subprocess's CPU time, a figure less sensitive than wall time to other jobs on a shared machine):

- ``perplexity <model>``: the ``causal_lm_perplexity`` pool on the test part of the shipped ``builtin`` text
  (windows ``--ppl-window``, stride ``--ppl-stride``; ``--ppl-tokens`` > 0 caps the tokens scored);
- ``generation``: the ``causal_lm_generation`` pool, its three default prompts, greedy, ``--gen-tokens`` new tokens;
- ``bitdelta``: method ``bitdelta`` compressing ``--finetuned`` against ``--base`` (``--bitdelta-steps`` distillation
  steps of 4 x 128 tokens of the builtin text's train part), with the perplexity of the base, the fine-tune,
  BitDelta with the initial scales and after distillation (disjoint windows of ``--ppl-window`` tokens, the first
  ``--bitdelta-ppl-tokens`` tokens of the test part).

Without ``--tokenizer`` the base folder's tokenizer is used, or, when it has none, the byte-level tokenizer of
``fusion_bench.testing.tiny_lm`` (ids 0-257, valid for any vocabulary of at least 258 tokens; say so when
reporting). Prints a Markdown table per kind of row and writes every row as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


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
    row = _run_one(args)
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    row["process_cpu_s"] = round(ru.ru_utime + ru.ru_stime, 1)  # the whole subprocess: import, load, run
    return row


def _run_one(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from fusion_bench.methods import build_method
    from fusion_bench.modelpool.causal_lm import CausalLMPool
    from fusion_bench.taskpool.base import build_taskpool
    from fusion_bench.utils import measure

    kind, _, which = args.one.partition(":")
    if kind in ("perplexity", "generation"):
        path = args.base if which in ("", "base") else args.finetuned
        pool = CausalLMPool({"_pretrained_": path}, tokenizer=args.tokenizer_folder, dtype=args.dtype)
        with measure() as m:
            model = pool.load_model("_pretrained_")
        load_s = m.wall_time_s
        if kind == "perplexity":
            cfg = {"type": "causal_lm_perplexity", "tasks": {"builtin": {"source": "builtin", "split": "test"}},
                   "tokenizer": args.tokenizer_folder, "max_length": args.ppl_window, "stride": args.ppl_stride,
                   "max_tokens": args.ppl_tokens or None, "device": "cpu"}
        else:
            cfg = {"type": "causal_lm_generation", "tokenizer": args.tokenizer_folder,
                   "max_new_tokens": args.gen_tokens, "device": "cpu"}
        tp = build_taskpool(cfg)
        with measure() as m:
            res = tp.evaluate(model)
        r = res["tasks"]["builtin" if kind == "perplexity" else "generation"]
        row = {"row": args.one, "load_s": round(load_s, 1), "eval_s": round(m.wall_time_s, 1),
               "peak_rss_gb": round(m.peak_rss_bytes / 2**30, 2), **r}
        if kind == "perplexity":
            row.update(window=args.ppl_window, stride=args.ppl_stride)
        return row
    # bitdelta
    pool = CausalLMPool({"_pretrained_": args.base, "ft": args.finetuned}, tokenizer=args.tokenizer_folder,
                        dtype=args.dtype)
    method = build_method({"name": "bitdelta", "num_steps": args.bitdelta_steps, "device": "cpu", "progress": False,
                           "perplexity_data": "builtin", "perplexity_max_length": args.ppl_window,
                           "perplexity_max_tokens": args.bitdelta_ppl_tokens or None, "seed": 0})
    t0 = time.perf_counter()
    with measure() as m:
        res = method.run(pool)
    md = res.metadata
    ppl = md.get("perplexity", {})
    d = md["distillation"]
    return {"row": "bitdelta", "steps": args.bitdelta_steps, "time_s": round(time.perf_counter() - t0, 1),
            "distill_s": d.get("wall_time_s"), "peak_rss_gb": round(m.peak_rss_bytes / 2**30, 2),
            "loss_first": d.get("loss_first"), "loss_last": d.get("loss_last"),
            **{f"ppl_{k}": v["perplexity"] for k, v in ppl.items()},
            "ppl_time_s": round(sum(v["wall_time_s"] for v in ppl.values()), 1),
            "ppl_tokens": next(iter(ppl.values()))["tokens"] if ppl else None,
            "bytes_delta_full": md["bytes"]["delta_full"], "bytes_delta_1bit": md["bytes"]["delta_1bit_packed"],
            "bytes_other": md["bytes"]["other_changed_tensors_full"], "matrices": md["compressed_matrices"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--finetuned", required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ppl-window", type=int, default=1024)
    ap.add_argument("--ppl-stride", type=int, default=512)
    ap.add_argument("--ppl-tokens", type=int, default=0)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--bitdelta-steps", type=int, default=200)
    ap.add_argument("--bitdelta-ppl-tokens", type=int, default=2048)
    ap.add_argument("--rows", nargs="+", default=["perplexity:base", "generation", "bitdelta"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer-folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("ROW " + json.dumps(run_one(args)))
        return
    folder, desc = _tokenizer_folder(args.base, args.tokenizer)
    rows = []
    for r in args.rows:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", r, "--tokenizer-folder", folder]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")]
        if out.returncode or not line:
            print(f"{r}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[0][4:]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\ntokenizer: {desc}; dtype {args.dtype}; {args.threads} threads")
    for r in rows:
        print("| " + " | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"tokenizer": desc, "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
