"""Why merges of a CLIP zoo do or do not land between pretrained and fine-tuned: task-vector figures.

    python benchmarks/zoo_diagnostics.py [--scale full] [--root DIR] [--max-samples 500] [--lams 0.1,0.3]

Prints, for the zoo's eight fine-tuned vision encoders against the pretrained one:

- ||tau_i|| / ||theta_0||, the size of each task vector relative to the pretrained weights;
- the pairwise cosine similarity of the task vectors;
- for each task i and each lambda: the accuracy of theta_0 + lambda * tau_i alone (how much of the
  fine-tuning gain a scaled task vector keeps), and of theta_0 + lambda * sum_{j != i} tau_j (how much
  the other tasks' vectors damage task i).

The lab notes in docs/benchmark.md were measured this way. Figures, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", default="full", choices=("full", "tiny"))
    ap.add_argument("--root", default=None, help="zoo folder (default $FUSION_BENCH_ZOO or the scale's cache folder)")
    ap.add_argument("--max-samples", type=int, default=500, help="test images per task")
    ap.add_argument("--lams", default="0.1,0.3", help="comma-separated scaling factors")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fusion_bench.modelpool.clip_zoo import CLIPZooModelPool
    from fusion_bench.taskpool.clip_zoo import CLIPZooTaskPool

    t0 = time.perf_counter()
    pool = CLIPZooModelPool({"scale": args.scale, "root": args.root})
    taskpool = CLIPZooTaskPool({"scale": args.scale, "root": args.root, "max_samples": args.max_samples})
    tasks = pool.model_names
    model = pool.load_pretrained_model()
    base = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    tau = {}
    for t in tasks:
        sd = pool.load_model(t).state_dict()
        tau[t] = {k: sd[k].float() - base[k].float() for k in base}
    flat = {t: torch.cat([v.flatten() for v in tau[t].values()]) for t in tasks}
    base_norm = torch.cat([v.float().flatten() for v in base.values()]).norm()

    print("task vector norm / pretrained norm:")
    for t in tasks:
        print(f"  {t:15s} {float(flat[t].norm() / base_norm):.3f}")
    print("pairwise cosine of task vectors:")
    print("  " + " ".join(f"{t[:6]:>6s}" for t in tasks))
    for a in tasks:
        row = [float(flat[a] @ flat[b] / (flat[a].norm() * flat[b].norm())) for b in tasks]
        print("  " + " ".join(f"{v:6.2f}" for v in row) + f"  {a}")

    def accuracy(weights: dict[str, torch.Tensor], task: str) -> float:
        model.load_state_dict({**model.state_dict(), **weights})
        rep = taskpool.evaluate(model, tasks=[task])
        return 100 * float(rep["tasks"][task]["accuracy"])

    lams = [float(x) for x in args.lams.split(",") if x.strip()]
    pre = {t: accuracy(base, t) for t in tasks}
    print("accuracy on task i (pretrained | own vector at each lambda | the other vectors at each lambda):")
    for t in tasks:
        own = [accuracy({k: base[k] + lam * tau[t][k] for k in base}, t) for lam in lams]
        rest = [accuracy({k: base[k] + lam * sum(tau[u][k] for u in tasks if u != t) for k in base}, t) for lam in lams]
        print(f"  {t:15s} {pre[t]:5.1f} | " + " ".join(f"{v:5.1f}" for v in own) + " | "
              + " ".join(f"{v:5.1f}" for v in rest))
    model.load_state_dict({**model.state_dict(), **base})
    print(f"lambdas {lams}; {args.max_samples} test images per task; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
