"""DAWE: data-adaptive weight ensembling: a gate maps each input to task-arithmetic coefficients."""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.errors import ConfigError
from fusion_bench.methods._task_data import CLIPTaskData, GenericTaskData, TaskDataMethod, progress
from fusion_bench.methods.base import FusionResult, MethodConfig, register_method
from fusion_bench.methods.test_time.adamerging import entropy, load_task_vectors
from fusion_bench.utils import seeded_generator

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool


@dataclass
class DAWEConfig(MethodConfig):
    merge_mode: str = option("task_wise", choices=("task_wise", "layer_wise"), help="task_wise: the gate gives one "
                             "coefficient per task vector; layer_wise: one per task vector and parameter tensor.")
    init_lambda: float = option(0.3, ge=-100.0, le=100.0, help="The gate's output bias at start (every coefficient "
                                "starts near it).")
    gate_hidden_layers: int = option(1, ge=0, le=2, help="0: input-independent coefficients; 1: one linear layer "
                                     "(the authors' default); 2: linear-ReLU-linear.")
    max_steps: int = option(1000, ge=0, le=10**7, help="Adam steps of the gate (each on one batch of every task).")
    learning_rate: float = option(1e-5, gt=0.0, le=10.0, help="Adam learning rate of the gate.")
    batch_size: int = option(1, ge=1, le=2**20, help="Unlabeled test inputs of each task per step (the authors: 1).")
    batch_reduce: bool = option(True, help="Training: merge once per batch with the batch-mean coefficients.")
    eval_batch_reduce: bool = option(False, help="Inference: merge once per batch (true) or once per input (false, "
                                     "the authors' default).")
    max_test_samples: int | None = option(None, ge=1, le=10**9, help="Use at most this many evenly spaced test inputs "
                                          "per task (null: the whole split).")
    split: str = option("test", help="The split whose inputs (never labels) the gate adapts to.")
    adapter: str = option("auto", choices=("auto", "clip", "generic"),
                          help="How models become classifiers: clip (zero-shot text heads of the pool's CLIP), "
                          "generic (model(x) -> logits), auto (clip for CLIP pools).")
    image_column: str | None = option(None, help="Image column of CLIP datasets (null: detected).")
    label_column: str | None = option(None, help="Label column name, only to locate the images (never read).")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")
    seed: int = option(0, **SEED_RANGE, help="Seed of the gate's initialisation and of the batch sampling.")
    progress: bool = option(True, help="Show a progress bar on a terminal.")


def make_gate(hidden: int, out: int, depth: int, init_lambda: float, gen: torch.Generator) -> nn.Module:
    """The authors' gates: depth 0 a learned constant; 1 ``Linear`` (weights N(0, 0.001^2), bias ``init_lambda``);
    2 ``Linear-ReLU-Linear`` (weights N(0, 0.01^2), biases 0 and ``init_lambda``)."""
    if depth == 0:
        return _ConstGate(out, init_lambda)
    if depth == 1:
        g = nn.Linear(hidden, out)
        with torch.no_grad():
            g.weight.copy_(torch.randn(g.weight.shape, generator=gen) * 0.001)
            g.bias.fill_(init_lambda)
        return g
    g = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out))
    with torch.no_grad():
        g[0].weight.copy_(torch.randn(g[0].weight.shape, generator=gen) * 0.01)
        g[0].bias.zero_()
        g[2].weight.copy_(torch.randn(g[2].weight.shape, generator=gen) * 0.01)
        g[2].bias.fill_(init_lambda)
    return g


class _ConstGate(nn.Module):
    def __init__(self, out: int, init_lambda: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((out,), float(init_lambda)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.expand(x.shape[0], -1)


class DAWEModel(nn.Module):
    """``f(x; theta_0 + sum_i c_i(x) tau_i)`` with ``c(x) = gate(features(x))`` (features from a frozen extractor).

    Calls like the pool's models (``pixel_values=...`` for CLIP vision encoders, a tensor for plain classifiers); a
    CLIP encoder's output is a ``BaseModelOutputWithPooling`` whose ``pooler_output`` rows come from each input's
    own merge (``batch_reduce=False``) or from one merge with the batch-mean coefficients.
    """

    def __init__(self, base: nn.Module, features: nn.Module, gate: nn.Module,
                 vectors: dict[str, list[torch.Tensor]], keys: list[str], merge_mode: str, batch_reduce: bool,
                 clip: bool):
        super().__init__()
        self.base = base  # a template: its parameters are replaced by the merged tensors (functional_call)
        self.features = features.requires_grad_(False)
        self.gate = gate
        self.keys = list(keys)
        self.n_tasks = len(vectors[self.keys[0]])
        self.merge_mode = merge_mode
        self.batch_reduce = batch_reduce
        self.clip = clip
        self.config = getattr(base, "config", None)
        for j, k in enumerate(self.keys):
            self.register_buffer(f"tau_{j}", torch.stack([v.detach() for v in vectors[k]]))

    def coefficients(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """(batch, tasks) or (batch, tasks, tensors) coefficients of the inputs."""
        with torch.no_grad():
            f = self.features(*args, **kwargs)
        f = f.pooler_output if hasattr(f, "pooler_output") else f
        c = self.gate(f.float())
        return c if self.merge_mode == "task_wise" else c.view(c.shape[0], self.n_tasks, len(self.keys))

    def merged(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameters for one coefficient vector ``c`` ((tasks,) or (tasks, tensors))."""
        out = {}
        theta0 = dict(self.base.named_parameters())  # the base's own tensors are theta_0
        for j, k in enumerate(self.keys):
            w = c if c.ndim == 1 else c[:, j]
            tau = getattr(self, f"tau_{j}")
            out[k] = theta0[k] + torch.tensordot(w.to(tau.dtype), tau, dims=1)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        c = self.coefficients(*args, **kwargs)
        base = self.base
        if self.batch_reduce:
            return torch.func.functional_call(base, self.merged(c.mean(0)), args, kwargs, strict=False)
        x = kwargs.get("pixel_values", args[0] if args else None)
        outs = []
        for i in range(c.shape[0]):
            xi = x[i:i + 1]
            call_args, call_kwargs = ((), {**kwargs, "pixel_values": xi}) if "pixel_values" in kwargs else \
                ((xi, *args[1:]), kwargs)
            outs.append(torch.func.functional_call(base, self.merged(c[i]), call_args, call_kwargs, strict=False))
        if self.clip:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            return BaseModelOutputWithPooling(pooler_output=torch.cat([o.pooler_output for o in outs]))
        return torch.cat([o if isinstance(o, torch.Tensor) else o.logits for o in outs])


class _PretrainedFeatures(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.model(*args, **kwargs)
        if hasattr(out, "pooler_output"):
            return out.pooler_output
        return out if isinstance(out, torch.Tensor) else out.logits


@register_method
class DAWE(TaskDataMethod):
    """DAWE: data-adaptive weight ensembling, coefficients of task arithmetic predicted per input by a gate.

    Tang et al. 2024, "Data-adaptive weight-ensembling for multi-task model fusion" (FusionBench's ``dawe``):
    ``theta(x) = theta_0 + sum_i c_i(x) tau_i`` with ``c(x) = gate(phi(x))``, ``phi`` a frozen feature extractor and
    the gate a linear layer (``gate_hidden_layers``) whose bias starts at ``init_lambda``. The gate minimises the
    summed mean prediction entropy on batches of unlabeled test inputs of every task (Adam, ``learning_rate``);
    in training the batch is merged once with the batch-mean coefficients (``batch_reduce``), at inference every
    input gets its own merged weights (``eval_batch_reduce=false``). Deviation: the authors' extractor is an
    ImageNet ResNet-18 from the hub; here ``phi`` is the pool's frozen pretrained model (CLIP: its pooled image
    embedding; plain classifiers: its logits), which works offline and on any classifier.

    The result keeps the N task vectors and the gate: extra parameters of N models plus the gate.

    Args:
        config: :class:`DAWEConfig`.
    """

    name = "dawe"
    config_class: ClassVar = DAWEConfig
    family: ClassVar = "ensemble"
    requires_pretrained = True
    identity_on_equal_inputs = False  # the result is a DAWEModel wrapper, not a model of the pool's class
    permutation_invariant = False
    summary = "Per-input task-arithmetic coefficients from a gate on frozen features, trained by test-time entropy."
    variant = ("Tang et al. 2024 (DAWE): theta(x) = theta_0 + sum_i gate(phi(x))_i tau_i, linear gate (bias 0.3, "
               "weights N(0,1e-3)), entropy on unlabeled test batches with Adam lr 1e-5; per-input merge at inference; "
               "phi = the frozen pretrained model (the authors: ResNet-18).")

    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        cfg = self.config
        tv = load_task_vectors(self, modelpool)
        if tv.heads:
            raise ConfigError("dawe does not take method.task_heads.")
        if not isinstance(tv.adapter, (CLIPTaskData, GenericTaskData)) and self.adapter is None:
            raise ConfigError(f"dawe runs on CLIP pools and plain classifiers; this pool's adapter is "
                              f"'{tv.adapter.kind}'.")
        clip = isinstance(tv.adapter, CLIPTaskData)
        data = {n: tv.adapter.examples(n, cfg.split, cfg.max_test_samples, with_labels=False) for n in tv.names}
        base = copy.deepcopy(tv.base_model).to(tv.device).float().eval().requires_grad_(False)
        features = _PretrainedFeatures(copy.deepcopy(base))
        probe = data[tv.names[0]].take(slice(0, 1)).to(tv.device)
        with torch.no_grad():
            hidden = features(pixel_values=probe).shape[-1] if clip else features(probe).shape[-1]
        out_dim = len(tv.names) * (1 if cfg.merge_mode == "task_wise" else len(tv.keys))
        gate = make_gate(hidden, out_dim, cfg.gate_hidden_layers, cfg.init_lambda,
                         seeded_generator(cfg.seed, "dawe", "gate")).to(tv.device)
        model = DAWEModel(base, features, gate, tv.vectors, tv.keys, cfg.merge_mode, True, clip)
        classifiers = {n: tv.adapter.classifier(model, n).to(tv.device) for n in tv.names}
        opt = torch.optim.Adam(list(gate.parameters()), lr=cfg.learning_rate)
        gen = seeded_generator(cfg.seed, "dawe", "batches")
        history = []
        with progress(self.name, cfg.max_steps, cfg.progress and sys.stderr.isatty()) as adv:
            for _ in range(cfg.max_steps):
                loss = torch.zeros((), device=tv.device)
                for n in tv.names:
                    d = data[n]
                    idx = torch.randint(0, len(d), (min(cfg.batch_size, len(d)),), generator=gen)
                    loss = loss + entropy(classifiers[n](d.take(idx).to(tv.device)))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                history.append(float(loss.detach()))
                adv()
        model.batch_reduce = cfg.eval_batch_reduce
        model = model.cpu().eval()
        for p in model.parameters():
            p.requires_grad_(False)
        n_images = {n: len(d) for n, d in data.items()}
        one = sum(p.numel() for p in tv.base_model.parameters())
        extra = sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers()) - one
        return FusionResult("merged", model=model, metadata=self._metadata(
            t0, extra_parameters=int(extra), adapter=tv.adapter_kind, merge_mode=cfg.merge_mode,
            gate_parameters=sum(p.numel() for p in gate.parameters()), feature_extractor="pretrained model (frozen)",
            entropy_first=history[0] if history else None, entropy_last=history[-1] if history else None,
            data_used={"split": cfg.split, "labels_read": False, "unlabeled_inputs_per_task": n_images,
                       "unlabeled_inputs": int(sum(n_images.values()))}))
