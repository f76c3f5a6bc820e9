"""Where WEMoE's accuracy on the offline CLIP zoo is lost: the routed MLPs with oracle routing.

    python benchmarks/mixing_wemoe_oracle.py [--scale full] [--root DIR] [--merge-lambdas 0,0.05,0.3]
        [--max-samples 1000] [--threads 1] [--out rows.json]

For each ``merge_lambda`` (the task-arithmetic coefficient of every parameter outside the MLPs) the WEMoE model
is built without adaptation (``steps=0``) and every task is evaluated on its test split with

- ``init``: the initial routers (every routing weight about ``init_lambda`` 0.3: task arithmetic in the MLPs);
- ``oracle``: the routing fixed to one-hot on the evaluated task in every layer (each MLP is exactly that
  task's fine-tuned MLP: the best any router can do with these experts);
The gap between ``oracle`` and the fine-tuned model (the leaderboard's reference row) is what the task-arithmetic part (attention, embeddings,
norms) costs; the gap between a trained router and ``oracle`` is what the routing costs. Prints a Markdown table
(per-task accuracy, average) and writes the rows as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", default="full")
    ap.add_argument("--root", default=None)
    ap.add_argument("--merge-lambdas", default="0,0.05,0.3")
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import torch.nn.functional as F

    from fusion_bench.methods import build_method
    from fusion_bench.modelpool.clip_zoo import CLIPZooModelPool
    from fusion_bench.models.moe import fixed_routing, set_batch_reduce
    from fusion_bench.taskpool.clip_zoo import CLIPZooTaskPool

    pool = CLIPZooModelPool({"scale": args.scale, "root": args.root, "build": False})
    tp = CLIPZooTaskPool({"scale": args.scale, "root": args.root, "build": False, "max_samples": args.max_samples})
    tasks = tp.tasks
    names = pool.model_names
    rows = []
    for lam in [float(v) for v in args.merge_lambdas.split(",")]:
        t0 = time.perf_counter()
        res = build_method({"name": "we_moe", "steps": 0, "merge_lambda": lam, "cost_repeats": 0, "progress": False,
                            "max_test_samples": 16}).run(pool)
        model = res.model
        set_batch_reduce(model, True)  # one merged MLP per batch (the initial routers vary by < 0.01 per input)
        init = {t: tp.evaluate(model, tasks=[t])["tasks"][t]["accuracy"] for t in tasks}
        rows.append({"merge_lambda": lam, "routing": "init", "accuracy": _avg(init, tasks)})
        oracle = {}
        for t in tasks:
            with fixed_routing(model, F.one_hot(torch.tensor(names.index(t)), len(names)).float()):
                oracle[t] = tp.evaluate(model, tasks=[t])["tasks"][t]["accuracy"]
        rows.append({"merge_lambda": lam, "routing": "oracle", "accuracy": _avg(oracle, tasks)})
        print(f"merge_lambda {lam}: init {100 * rows[-2]['accuracy']['avg']:.2f}, oracle "
              f"{100 * rows[-1]['accuracy']['avg']:.2f} ({time.perf_counter() - t0:.0f}s)", flush=True)
        del model, res
    print("| merge_lambda | routing | " + " | ".join(tasks) + " | avg |")
    print("|---|---|" + "---|" * (len(tasks) + 1))
    for r in rows:
        print(f"| {r['merge_lambda']:g} | {r['routing']} | " + " | ".join(f"{100 * r['accuracy'][t]:.2f}" for t in tasks)
              + f" | {100 * r['accuracy']['avg']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "tasks": tasks, "max_samples": args.max_samples}, f, indent=2)
    return 0


def _avg(acc: dict[str, float], tasks: list[str]) -> dict[str, float]:
    return {**acc, "avg": sum(acc[t] for t in tasks) / len(tasks)}


if __name__ == "__main__":
    raise SystemExit(main())
