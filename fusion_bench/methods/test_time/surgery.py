"""Representation Surgery: per-task adapters that pull a merged model's representations back toward each fine-tuned
model's."""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.methods._task_data import CLIPTaskData, TaskDataMethod, check_tasks, make_adapter, progress
from fusion_bench.methods.base import FusionResult, MethodConfig, build_method, register_method
from fusion_bench.utils import count_parameters, resolve_device, seeded_generator

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool


@dataclass
class SurgeryConfig(MethodConfig):
    base_method: str = option("adamerging", help="The merge to operate on: any registered method that returns one "
                              "merged model (the paper's strongest: adamerging, layer-wise).")
    base_options: dict[str, Any] = option({}, help="Options of base_method (e.g. {steps: 500} or, with "
                                          "base_method=task_arithmetic, {scaling_factor: 0.05}).")
    hidden_dim: int = option(16, ge=1, le=2**16, help="Rank r of each task's adapter W_up ReLU(W_down z) (the paper: 16).")
    surgery_steps: int = option(1000, ge=1, le=10**7, help="Steps; each takes one batch of every task and one Adam "
                                "step per task.")
    lr: float = option(1e-3, gt=0.0, le=10.0, help="Adam learning rate of the adapters.")
    batch_size: int = option(16, ge=1, le=2**20, help="Unlabeled inputs of a task per step.")
    max_test_samples: int | None = option(None, ge=1, le=10**9, help="Use at most this many evenly spaced inputs per "
                                          "task (null: the whole split).")
    split: str = option("test", help="The split whose inputs (never labels) the adapters are trained on.")
    adapter: str = option("auto", choices=("auto", "clip"), help="clip (the only family here: the representation is "
                          "CLIP's normalised projected image embedding); auto picks it for CLIP pools.")
    image_column: str | None = option(None, help="Image column of CLIP datasets (null: detected).")
    label_column: str | None = option(None, help="Label column name, only to locate the images (never read).")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")
    seed: int = option(0, **SEED_RANGE, help="Seed of the adapters' initialisation and of the batch sampling.")
    progress: bool = option(True, help="Show a progress bar on a terminal.")

    def __post_init__(self) -> None:
        if self.base_method == "representation_surgery":
            raise ConfigError("method.base_method cannot be representation_surgery itself.")
        if "name" in self.base_options:
            raise ConfigError("method.base_options must not hold 'name'; set method.base_method instead.")


class SurgeryAdapter(nn.Module):
    """``z - W_up ReLU(W_down z)`` (Yang et al. 2024, eq. of the representation surgery), ``W_up`` starting at 0."""

    def __init__(self, dim: int, hidden: int, generator: torch.Generator | None = None):
        super().__init__()
        self.down = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(hidden, dim, bias=False)
        bound = 1.0 / math.sqrt(dim)  # kaiming_uniform(a=sqrt(5)) of a (hidden, dim) weight, as nn.Linear
        with torch.no_grad():
            self.down.weight.copy_((torch.rand(hidden, dim, generator=generator) * 2 - 1) * bound)
            self.up.weight.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z - self.up(F.relu(self.down(z)))


class SurgeryProjection(nn.Module):
    """The visual projection followed by normalisation and a task's surgery adapter: what a task's classifier sees."""

    def __init__(self, projection: nn.Module, adapter: SurgeryAdapter):
        super().__init__()
        self.projection = projection
        self.surgery = adapter
        self.in_features = getattr(projection, "in_features", None)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.surgery(F.normalize(self.projection(pooled).float(), dim=-1))


class SurgeryCLIPModel(nn.Module):
    """One task's model after surgery: the merged vision encoder (shared between tasks) and its projection with the
    task's adapter. The CLIP task pool reads ``vision_model`` and ``visual_projection`` (and renormalises the
    adapted embedding, which changes no prediction)."""

    def __init__(self, vision_model: nn.Module, visual_projection: SurgeryProjection):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_model(pixel_values=pixel_values)
        pooled = out.pooler_output if hasattr(out, "pooler_output") else out[1]
        return self.visual_projection(pooled)


def train_surgery(merged: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], hidden: int, steps: int,
                  lr: float, batch_size: int, seed: int, advance=lambda n=1: None) -> dict[str, SurgeryAdapter]:
    """Train one adapter per task on cached representations: for every step and every task ``t`` in order, a batch
    of ``batch_size`` indices (``torch.randint`` with the generator ``seeded_generator(seed, "surgery", "batches")``),
    ``loss = mean |adapter_t(merged[t][idx]) - target[t][idx]|`` and one step of one Adam optimiser over every
    adapter (as the authors' code). Adapter ``t`` is initialised from ``seeded_generator(seed, "surgery", t)``."""
    tasks = list(merged)
    dim = merged[tasks[0]].shape[1]
    adapters = {t: SurgeryAdapter(dim, hidden, seeded_generator(seed, "surgery", t)).to(merged[t].device)
                for t in tasks}
    opt = torch.optim.Adam([p for a in adapters.values() for p in a.parameters()], lr=lr)
    gen = seeded_generator(seed, "surgery", "batches")
    for _ in range(steps):
        for t in tasks:
            n = merged[t].shape[0]
            idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
            loss = F.l1_loss(adapters[t](merged[t][idx]), target[t][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        advance()
    return adapters


@register_method
class RepresentationSurgery(TaskDataMethod):
    """Representation Surgery on a merged model: one adapter per task; the result is one model per task.

    Yang et al., ICML 2024, "Representation Surgery for Multi-Task Model Merging". After a merge (``base``; the
    paper's strongest: layer-wise AdaMerging), task ``t``'s representation ``z`` (CLIP: the unit-norm projected image
    embedding) becomes ``z - W_up^t ReLU(W_down^t z)`` (rank ``hidden_dim``, ``W_up`` initialised at 0, so training
    starts from the merged model). The adapters minimise the L1 distance to the fine-tuned model ``t``'s
    representation of the same unlabeled inputs of task ``t`` (``split``, labels never read), with Adam. The merged
    model and the fine-tuned models are fixed, so their representations of every input are computed once and
    cached; training then runs on the cache (the same objective as recomputing them per batch). Each task's model
    is the merged encoder plus that task's adapter: a task id is needed at inference, and the adapters are extra
    parameters (``2 * dim * hidden_dim`` per task).

    Args:
        config: :class:`SurgeryConfig`.
    """

    name = "representation_surgery"
    config_class: ClassVar = SurgeryConfig
    uses_data = True
    requires_pretrained = True
    identity_on_equal_inputs = False  # one model per task
    permutation_invariant = False
    summary = "Per-task representation adapters trained after a merge toward each fine-tuned model's features."
    variant = ("Yang et al. 2024: z_t' = z - W_up ReLU(W_down z) per task (r=16, W_up=0 at start) on the merged model's "
               "normalised CLIP image embedding, L1 to the fine-tuned model's embedding on unlabeled test inputs, "
               "Adam lr 1e-3, batch 16; base merge: layer-wise AdaMerging by default.")

    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        cfg = self.config
        names = check_tasks(modelpool, self.name, custom_adapter=self.adapter is not None)
        device = resolve_device(cfg.device)
        adapter = self.adapter or make_adapter(modelpool, "clip" if cfg.adapter == "auto" else cfg.adapter,
                                               cfg.image_column, cfg.label_column)
        if not isinstance(adapter, CLIPTaskData):
            raise ConfigError(f"{self.name} works on CLIP pools (the representation is CLIP's image embedding); this "
                              f"pool's adapter is '{adapter.kind}'.")
        base_method = build_method({"name": cfg.base_method, **dict(cfg.base_options)})
        base_result = base_method.run(modelpool)
        if base_result.kind != "merged":
            raise ModelMismatchError(f"method.base_method={base_method.name} returns {base_result.kind} models; surgery needs "
                                     "one merged model.")
        merged_model = base_result.model.to(device).float().eval()
        from fusion_bench.models.clip import image_features

        proj = adapter.projection.to(device)
        show = cfg.progress and sys.stderr.isatty()
        feats_m: dict[str, torch.Tensor] = {}
        feats_t: dict[str, torch.Tensor] = {}
        used: dict[str, int] = {}
        with torch.no_grad():
            for n in names:
                data = adapter.examples(n, cfg.split, cfg.max_test_samples, with_labels=False)
                used[n] = len(data)
                ft = copy.deepcopy(modelpool.load_model(n)).to(device).float().eval()
                fm, ff = [], []
                with progress(f"surgery features {n}", len(data), show) as adv:
                    for x, _ in data.batches(64):
                        x = x.to(device)
                        fm.append(image_features(merged_model, proj, x))
                        ff.append(image_features(ft, proj, x))
                        adv(len(x))
                feats_m[n], feats_t[n] = torch.cat(fm), torch.cat(ff)
                del ft
        l1_before = {n: float(F.l1_loss(feats_m[n], feats_t[n])) for n in names}
        with progress("surgery", cfg.surgery_steps, show) as adv:
            adapters = train_surgery(feats_m, feats_t, cfg.hidden_dim, cfg.surgery_steps, cfg.lr, cfg.batch_size,
                                     cfg.seed, adv)
        with torch.no_grad():
            l1_after = {n: float(F.l1_loss(adapters[n](feats_m[n]), feats_t[n])) for n in names}
        merged_cpu = merged_model.cpu()
        projection = copy.deepcopy(adapter.projection).cpu()
        models = {n: SurgeryCLIPModel(merged_cpu, SurgeryProjection(projection, adapters[n].cpu().eval()))
                  for n in names}
        extra = sum(p.numel() for a in adapters.values() for p in a.parameters())
        base_meta = {k: v for k, v in base_result.metadata.items() if k in ("method", "variant", "hyperparameters",
                                                                             "method_wall_time_s", "data_used")}
        return FusionResult("per_task", models=models, metadata=self._metadata(
            t0, extra_parameters=extra, parameters=count_parameters(merged_cpu), adapter=adapter.kind,
            task_id="needed (each task has its own adapter)", base=base_meta,
            l1_to_finetuned_before=l1_before, l1_to_finetuned_after=l1_after,
            data_used={"split": cfg.split, "labels_read": False, "unlabeled_inputs_per_task": used,
                       "unlabeled_inputs": int(sum(used.values())),
                       "note": "plus the base merge's data (metadata.base.data_used)"}))
