"""What a mixed (upscaled) model's report holds beyond accuracy: parameter counts, inference cost, routing.

Shared by every method of the mixing family (WEMoE, sparse WEMoE, rank-one MoE, SMILE, Mixtral
upcycling, depth upscaling) so that the report and the leaderboard read one format. A method puts

``metadata["mixed_model"]`` = :func:`mixed_model_summary` (...)::

    {"total_parameters": int,             # weights the mixed model stores (non-zeros of pruned tensors)
     "active_parameters_per_input": int,  # stored weights that take part in one input's forward
     "applied_parameters_per_input": int, # size of the network one input runs through (routed weights merged)
     "one_model_parameters": int,         # one model of the pool
     "extra_parameters": int,             # total - one model
     "router_parameters": int,
     "inference_cost_ratio": float,       # forward time per batch / one model's, same batch (None: not measured)
     "inference": {...}}                  # batch size, repeats, seconds, threads, device

and ``metadata["routing"]`` = {"experts": [...], "split": ..., "samples_per_task": {...},
"per_task": {task: {"mean": [E floats], "layers": {layer: [E floats]}}}}: the routing weights averaged over
each task's inputs (``mean``: also over the layers). :func:`plot_routing` draws it (a PNG beside the report).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


def mixed_model_summary(*, total: int, active: int, applied: int, one_model: int, router: int,
                        inference: dict[str, Any] | None) -> dict[str, Any]:
    """The ``mixed_model`` metadata block (see the module docstring)."""
    return {"total_parameters": int(total), "active_parameters_per_input": int(active),
            "applied_parameters_per_input": int(applied), "one_model_parameters": int(one_model),
            "extra_parameters": int(total - one_model), "router_parameters": int(router),
            "inference_cost_ratio": None if inference is None else inference.get("ratio"),
            "inference": inference}


@torch.inference_mode()
def measure_inference_cost(mixed: nn.Module, reference: nn.Module, inputs: Any, *, repeats: int = 5,
                           call=None) -> dict[str, Any]:
    """Forward time of ``mixed`` and of ``reference`` (one model of the pool) on the same batch.

    Each is run once to warm up, then ``repeats`` times alternately; the medians are compared. ``call(model,
    inputs)`` runs one forward (default ``model(inputs)``). Timings on a shared CPU are noisy: the ratio, not
    the seconds, is the figure to compare.
    """
    call = call or (lambda m, x: m(x))
    ta: list[float] = []
    tb: list[float] = []
    modes = (mixed.training, reference.training)
    mixed.eval()
    reference.eval()
    try:
        call(mixed, inputs)
        call(reference, inputs)
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            call(reference, inputs)
            t1 = time.perf_counter()
            call(mixed, inputs)
            t2 = time.perf_counter()
            tb.append(t1 - t0)
            ta.append(t2 - t1)
    finally:
        mixed.train(modes[0])
        reference.train(modes[1])
    one, mix = statistics.median(tb), statistics.median(ta)
    n = inputs.shape[0] if isinstance(inputs, torch.Tensor) else None
    return {"batch_size": n, "repeats": int(max(1, repeats)), "one_model_s": round(one, 6), "mixed_s": round(mix, 6),
            "ratio": round(mix / one, 3) if one > 0 else None, "threads": torch.get_num_threads(),
            "device": str(next(mixed.parameters()).device) if any(True for _ in mixed.parameters()) else "cpu"}


def plot_routing(routing: dict[str, Any], path: Path, title: str) -> None:
    """Heat maps of the mean routing weight of each expert (columns) for each evaluated task's inputs (rows):
    one panel for the mean over layers, one per layer. Written atomically; PNG with a ``Software`` tag
    naming fusion_bench (so a later run may replace it)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from fusion_bench.io.atomic import atomic_path

    per_task = routing["per_task"]
    tasks = list(per_task)
    experts = routing["experts"]
    layers = list(next(iter(per_task.values()))["layers"]) if tasks else []
    panels = [("mean over layers", [per_task[t]["mean"] for t in tasks])]
    panels += [(name, [per_task[t]["layers"][name] for t in tasks]) for name in layers]
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, mat) in zip(axes.flat, panels):
        im = ax.imshow(mat, aspect="auto", cmap="viridis")
        ax.set_title(name, fontsize=8)
        ax.set_xticks(range(len(experts)), experts, rotation=90, fontsize=6)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=6)
        ax.set_xlabel("expert (task vector)", fontsize=7)
        ax.set_ylabel("inputs of task", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": "fusion_bench routing plot"})
    plt.close(fig)


def is_our_plot(path: Path) -> bool:
    """True when ``path`` is a PNG that :func:`plot_routing` wrote (its Software tag)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and b"fusion_bench routing plot" in head


def write_routing_plot(report: dict[str, Any], report_path: Path, overwrite: bool) -> dict[str, str]:
    """The routing PNG beside the report (``<report stem>_routing.png``); returns {"routing_plot": path} or
    {"routing_plot_note": why not}. An existing file is replaced only with ``overwrite`` and only when this
    function wrote it."""
    routing = report.get("metadata", {}).get("routing")
    if not routing or not routing.get("per_task"):
        return {}
    path = report_path.with_name(report_path.stem + "_routing.png")
    if path.exists() and not (overwrite and is_our_plot(path)):
        return {"routing_plot_note": f"{path} exists and was not replaced (overwrite=true replaces a plot fusion_bench "
                                     "wrote)"}
    try:
        plot_routing(routing, path, f"{report.get('method', {}).get('name', '')}: mean routing weight per task's "
                     f"{routing.get('split', 'test')} inputs")
    except ImportError:
        return {"routing_plot_note": "matplotlib is not installed: no routing plot (the weights are in the report)"}
    return {"routing_plot": str(path)}
