"""Would soft zero-shot failures make the CLIP zoo's merges behave like the field's? A probe on a built zoo.

    python benchmarks/zoo_shift_probe.py --root ZOO [--visible-only] [--shift SPEC] [--steps 800] [--lr 5e-4]
    python benchmarks/zoo_shift_probe.py --root ZOO --visible-only --shift blur --zero-shot-only

The zoo's fine-tuning gain sits on its hidden classes (docs/benchmark.md, lab notes), which a scaled task
vector cannot reach. This probe asks what the merges would do without them, without a new pretraining
(about 13 minutes per try): it takes the zoo's pretrained CLIP and task data and

- with ``--visible-only`` keeps only each task's visible classes (those whose names the pretraining
  captions used), with a zero-shot head over those names only;
- with ``--shift`` applies a per-image domain shift to every split of a task (the pretrained encoder saw
  the unshifted images only), e.g. ``grid`` for all tasks or ``letters:grid,fashion:invert,...``;
  the kinds are in :data:`SHIFTS` (``grid+blur``: one after the other);
- fine-tunes each task's vision encoder as the zoo does (``clip_finetune``'s ``finetune_vision``), then
  prints pretrained, fine-tuned, simple averaging and task arithmetic (coefficient chosen on the
  validation split) with the share of the gain kept, R = mean over tasks of (merged - pretrained) /
  (fine-tuned - pretrained); the own-vector curve (theta_0 + lambda tau_i on task i at lambda = 1/8, 1/4, 1/2)
  and the cost of the other seven vectors at 1/8.

Figures, not a test: nothing is asserted. Seeds are fixed (the shift of image i of a split is drawn from
``(seed, task, split, i)``; fine-tuning uses ``clip_finetune``'s seeding).
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from fusion_bench.benchmark.shifts import SHIFTS, apply_shift

TASKS = ("letters", "fashion", "aerial", "shapes", "house_numbers", "signs", "digits", "textures")


def parse_shift(spec: str) -> dict[str, str]:
    """``kind`` for every task, or ``task:kind,task:kind`` (others: none); a kind may join several with ``+``."""
    if not spec:
        return dict.fromkeys(TASKS, "none")
    if ":" not in spec:
        out = dict.fromkeys(TASKS, spec)
    else:
        out = dict.fromkeys(TASKS, "none")
        for part in spec.split(","):
            task, kind = part.split(":")
            if task not in out:
                raise SystemExit(f"--shift names unknown task {task!r}; tasks: {', '.join(TASKS)}")
            out[task] = kind
    bad = sorted({k for kind in out.values() for k in kind.split("+")} - set(SHIFTS))
    if bad:
        raise SystemExit(f"--shift: unknown kind {bad[0]!r}; kinds: {', '.join(SHIFTS)}")
    return out


def load_split(data_root: Path, task: str, split: str, n: int | None, shift: str, processor,
               visible: list[int] | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from datasets import load_from_disk

    ds = load_from_disk(str(data_root / task))[split]
    labels = np.array(ds["label"])
    idx = np.arange(len(labels))
    if visible is not None:
        idx = idx[np.isin(labels, visible)]
    idx = idx[:n] if n else idx
    key = zlib.crc32(f"{task}/{split}".encode())
    ims = [apply_shift(shift, ds[int(i)]["image"].convert("RGB"), np.random.default_rng([seed, key, int(i)]))
           for i in idx]
    px = processor(images=ims, return_tensors="pt")["pixel_values"].float()
    y = labels[idx]
    if visible is not None:
        remap = {c: j for j, c in enumerate(visible)}
        y = np.array([remap[int(v)] for v in y])
    return px, torch.tensor(y)


@torch.no_grad()
def accuracy(vision, projection, head, px, y, batch: int = 500) -> float:
    from fusion_bench.models.clip import image_features

    vision.eval()
    hit = 0
    for i in range(0, len(y), batch):
        hit += int((image_features(vision, projection, px[i:i + batch]) @ head.T).argmax(-1).eq(y[i:i + batch]).sum())
    return 100.0 * hit / len(y)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="a built full zoo (default $FUSION_BENCH_ZOO or the full scale's cache)")
    ap.add_argument("--visible-only", action="store_true", help="drop each task's hidden classes")
    ap.add_argument("--hidden-fraction", type=float, default=0.3, help="the zoo's hidden_class_fraction")
    ap.add_argument("--shift", default="", help="a kind of SHIFTS for every task, or task:kind,task:kind")
    ap.add_argument("--zero-shot-only", action="store_true")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=80)
    ap.add_argument("--augment-shift", type=int, default=3)
    ap.add_argument("--test", type=int, default=500, help="test images per task")
    ap.add_argument("--validation", type=int, default=300, help="validation images per task (selects lambda)")
    ap.add_argument("--lams", default="0.1,0.2,0.3,0.4,0.5,0.7,1.0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write every figure to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import CLIPModel, CLIPProcessor

    from fusion_bench.benchmark import tasks as T
    from fusion_bench.benchmark.zoo import Zoo
    from fusion_bench.methods.training.clip_finetune import (
        CLIPFinetuneConfig,
        finetune_vision,
        vision_from_clip,
    )
    from fusion_bench.models.clip import zeroshot_head

    t0, c0 = time.perf_counter(), time.process_time()
    zoo = Zoo("full", args.root)
    clip = CLIPModel.from_pretrained(zoo.pretrained_path).eval()
    proc = CLIPProcessor.from_pretrained(zoo.pretrained_path)
    shifts = parse_shift(args.shift)
    projection = torch.nn.Linear(clip.visual_projection.in_features, clip.visual_projection.out_features, bias=False)
    projection.load_state_dict(clip.visual_projection.state_dict())
    heads, data = {}, {}
    for t in TASKS:
        spec = T.get_task_spec(t)
        visible = None
        names = list(spec.classnames)
        if args.visible_only:
            hidden = set(T.hidden_classes(t, args.hidden_fraction, args.seed))
            visible = [c for c in range(spec.num_classes) if c not in hidden]
            names = [names[c] for c in visible]
        heads[t] = zeroshot_head(clip, proc.tokenizer, names, list(spec.templates))
        wanted = {"test": args.test} if args.zero_shot_only else \
            {"test": args.test, "validation": args.validation, "train": None}
        data[t] = {s: load_split(zoo.root / "data", t, s, n, shifts[t], proc.image_processor, visible, args.seed)
                   for s, n in wanted.items()}
    vision = vision_from_clip(clip).eval()
    base = {k: v.clone() for k, v in vision.state_dict().items()}

    def evaluate(weights, split="test", tasks=TASKS):
        vision.load_state_dict(weights)
        return {t: accuracy(vision, projection, heads[t], *data[t][split]) for t in tasks}

    def mean(d):
        return float(np.mean(list(d.values())))

    pre = evaluate(base)
    out: dict = {"args": vars(args), "shifts": shifts, "pretrained": pre}
    print(f"pretrained {mean(pre):.2f}  " + " ".join(f"{t}={v:.1f}" for t, v in pre.items()), flush=True)
    if args.zero_shot_only:
        return _done(out, args, t0, c0)
    cfg = CLIPFinetuneConfig(mode="full", steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             warmup_steps=args.warmup, augment_shift=args.augment_shift, seed=args.seed)
    tau, ft = {}, {}
    for t in TASKS:
        tt = time.perf_counter()
        v, st = finetune_vision(clip, heads[t], *data[t]["train"], cfg, t, torch.device("cpu"))
        sd = v.state_dict()
        tau[t] = {k: sd[k].float() - base[k].float() for k in base}
        ft[t] = evaluate(sd, tasks=[t])[t]
        print(f"  fine-tuned {t}: {ft[t]:.1f} (pretrained {pre[t]:.1f}; train accuracy "
              f"{st['train_accuracy_last_steps']:.3f}; {time.perf_counter() - tt:.0f} s)", flush=True)

    def merged(lam, only=None, without=None):
        return {k: base[k] + lam * sum(tau[u][k] for u in TASKS if (only in (None, u)) and u != without)
                for k in base}

    def kept(acc):
        return float(np.mean([(acc[t] - pre[t]) / max(1e-6, ft[t] - pre[t]) for t in TASKS]))

    simple = evaluate(merged(1 / len(TASKS)))
    lams = [float(x) for x in args.lams.split(",")]
    val = {lam: mean(evaluate(merged(lam), "validation")) for lam in lams}
    best = max(lams, key=lambda lam: (val[lam], -lam))
    ta = evaluate(merged(best))
    own = {lam: {t: evaluate(merged(lam, only=t), tasks=[t])[t] for t in TASKS} for lam in (0.125, 0.25, 0.5)}
    others = {t: evaluate(merged(1 / len(TASKS), without=t), tasks=[t])[t] for t in TASKS}
    flat = {t: torch.cat([v.flatten() for v in tau[t].values()]) for t in TASKS}
    norm0 = torch.cat([v.float().flatten() for v in base.values()]).norm()
    cos = [float(flat[a] @ flat[b] / (flat[a].norm() * flat[b].norm())) for i, a in enumerate(TASKS) for b in TASKS[i + 1:]]
    out.update(finetuned=ft, simple_average=simple, task_arithmetic=ta, lambda_validation=val, lam=best,
               own_vector=own, others_at_one_eighth=others,
               tau_relative_norm={t: float(flat[t].norm() / norm0) for t in TASKS}, mean_cosine=float(np.mean(cos)))
    print(f"fine-tuned {mean(ft):.2f}; simple average {mean(simple):.2f} (R {kept(simple):.2f}); task arithmetic "
          f"{mean(ta):.2f} (R {kept(ta):.2f}, lambda {best:g} on validation)")
    print("own vector keeps (R) at lambda 1/8, 1/4, 1/2: " + ", ".join(f"{kept(own[lam]):.2f}" for lam in own)
          + f"; the other seven at 1/8 cost {mean(pre) - mean(others):.1f} points; |tau|/|theta0| "
          f"{np.mean(list(out['tau_relative_norm'].values())):.3f}; mean cosine {out['mean_cosine']:.3f}")
    print("per task (pretrained / fine-tuned / simple average / task arithmetic / own at 1/8 / others at 1/8):")
    for t in TASKS:
        print(f"  {t:14s} {pre[t]:5.1f} {ft[t]:5.1f} {simple[t]:5.1f} {ta[t]:5.1f} {own[0.125][t]:5.1f} {others[t]:5.1f}")
    return _done(out, args, t0, c0)


def _done(out: dict, args, t0: float, c0: float) -> int:
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out["cpu_s"] = round(time.process_time() - c0, 1)
    print(f"{out['wall_s']:.0f} s wall, {out['cpu_s']:.0f} s CPU")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
