"""Weight-ensembling mixture of experts (WEMoE) and its sparse variant (E-WEMoE).

Both upscale the pretrained model: every module matched by ``moe_modules`` (default: each transformer
block's MLP, ``*.mlp``) becomes a :class:`~fusion_bench.models.moe.WeightEnsemblingMoE` whose parameters are
``theta_0 + sum_i r_i(x) tau_i`` with a router ``r`` on the block's hidden states; every other parameter is
merged by task arithmetic, ``theta_0 + merge_lambda * sum_i tau_i``. The routers (only they) are trained by
test-time adaptation: Adam on the summed mean prediction entropy of an unlabeled batch of every task (its
``split``, default test). :class:`_RoutedMoEMethod` holds the shared pipeline (also used by rank-one MoE).
"""

from __future__ import annotations

import copy
import fnmatch
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.errors import ConfigError, FusionBenchError, ModelMismatchError
from fusion_bench.kernels.mixing.wemoe import layer_position_encoding, magnitude_prune, prediction_entropy
from fusion_bench.methods._task_data import TaskDataMethod, TaskExamples, check_tasks, make_adapter, progress
from fusion_bench.methods.base import FusionResult, MethodConfig, register_method
from fusion_bench.methods.mixing._moe_report import (
    measure_inference_cost,
    mixed_model_summary,
    write_routing_plot,
)
from fusion_bench.models.moe import (
    WeightEnsemblingMoE,
    WeightEnsemblingRouter,
    describe_routing,
    moe_layers,
    recording,
    router_parameters,
    set_batch_reduce,
)
from fusion_bench.utils import float_numel, resolve_device, seeded_generator, shuffled_batches

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool

TV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RoutedMoEConfig(MethodConfig):
    """Options shared by WEMoE, sparse WEMoE and rank-one MoE."""

    init_lambda: float = option(0.3, ge=-100.0, le=100.0,
                                help="Initial routing weight of every expert (router output bias; FusionBench 0.3).")
    merge_lambda: float | None = option(
        None, ge=-100.0, le=100.0,
        help="Task-arithmetic coefficient of every parameter outside the MoE modules (attention, embeddings, norms): "
        "theta_0 + merge_lambda * sum_i tau_i. null: init_lambda, as FusionBench. On the offline CLIP zoo the "
        "validated coefficient is 0.05 (see docs/mixing_wemoe.md).")
    router_hidden_layers: int = option(2, choices=(0, 1, 2), ge=0, le=2,
                                       help="Router depth: 0 (input-independent weights), 1 (linear), 2 (MLP).")
    moe_modules: list[str] = option(["*.mlp"], help="Glob patterns of the qualified module names upscaled to MoE "
                                    "modules (default: every transformer block's MLP).")
    steps: int = option(1000, ge=0, le=10**7, help="Test-time adaptation steps (each one batch of every task); 0: "
                        "keep the initial routers.")
    lr: float = option(1e-4, gt=0.0, le=10.0, help="Adam learning rate of the routers.")
    batch_size: int = option(16, ge=1, le=2**20, help="Unlabeled inputs of each task per step.")
    batch_reduce: bool = option(True, help="During adaptation, one routing vector per batch (the mean over its "
                                "samples), as FusionBench; false: per sample.")
    eval_routing: str = option(
        "per_sample", choices=("per_sample", "per_batch"),
        help="Routing of the returned model: per_sample (the papers: each input its own weights) or per_batch "
        "(the mean routing vector of each evaluated batch; what FusionBench's code does in effect, since its "
        "batch_reduce=False reaches only the top model, and its evaluation batches hold one task).")
    split: str = option("test", help="The split whose inputs (never labels) the routers adapt to.")
    max_test_samples: int | None = option(None, ge=1, le=10**9, help="At most this many evenly spaced inputs per "
                                          "task for adaptation and the routing report (null: the whole split).")
    task_vector_dtype: str = option("float32", choices=tuple(TV_DTYPES),
                                    help="dtype the experts' task vectors are stored in (merged in float32).")
    cost_batch_size: int = option(64, ge=1, le=2**16, help="Batch size of the inference-cost measurement.")
    cost_repeats: int = option(5, ge=0, le=1000, help="Timed forwards of the inference-cost measurement (0: not "
                               "measured).")
    adapter: str = option("auto", choices=("auto", "clip", "generic"),
                          help="How models become classifiers: clip (zero-shot heads of the pool's CLIP), generic "
                          "(model(x) -> logits), auto (clip for CLIP pools).")
    image_column: str | None = option(None, help="Image column of CLIP datasets (null: detected).")
    label_column: str | None = option(None, help="Label column name, only to locate the images (never read).")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")
    seed: int = option(0, **SEED_RANGE, help="Seed of the router initialisation and of the batch sampling.")
    progress: bool = option(True, help="Progress bar on a terminal (else a line every 10 %).")


@dataclass
class WEMoEConfig(RoutedMoEConfig):
    pass


@dataclass
class SparseWEMoEConfig(RoutedMoEConfig):
    tv_prune_ratio: float = option(0.9, ge=0.0, le=1.0, help="Fraction of each task-vector tensor of the MoE modules "
                                   "set to zero by magnitude (E-WEMoE; FusionBench 0.9).")
    shared_gate: bool = option(True, help="One router shared by every MoE layer (FusionBench default true).")
    position_encoding: bool = option(False, help="Shared router: prepend a sinusoidal encoding of the layer index to "
                                     "its input.")
    position_encoding_dim: int = option(8, ge=2, le=4096, help="Size of that encoding.")
    post_sparse_gate: bool = option(False, help="After adaptation, prune the routers' parameters by magnitude.")
    gate_prune_ratio: float = option(0.0, ge=0.0, le=1.0, help="Fraction of each router tensor pruned when "
                                     "post_sparse_gate.")


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class _RoutedMoEMethod(TaskDataMethod):
    """The pipeline of the routed-MoE methods: build (task arithmetic outside, MoE modules inside), adapt the
    routers by entropy minimisation, report parameters, inference cost and routing."""

    family = "mixing"
    uses_data = True
    requires_pretrained = True
    identity_on_equal_inputs = True
    permutation_invariant = False  # router initialisation and batch order follow the pool's order

    # -- construction (subclasses) --------------------------------------------------------------------
    def build_module(self, name: str, base: nn.Module, deltas: dict[str, torch.Tensor], names: list[str],
                     layer_idx: int, gen: torch.Generator, shared: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def count_module(self, module: nn.Module) -> tuple[int, int]:
        """(stored float entries, bytes) of one MoE module's experts (excluding base and router)."""
        raise NotImplementedError

    def after_adaptation(self, model: nn.Module) -> dict[str, Any]:
        return {}

    def expert_groups(self, module: nn.Module) -> list[str]:
        return list(module.expert_names)

    # -- the pipeline -------------------------------------------------------------------------------
    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        cfg = self.config
        if not modelpool.has_pretrained:
            raise ModelMismatchError(f"{self.name} needs the base model: add '_pretrained_' to modelpool.models.")
        names = check_tasks(modelpool, self.name, custom_adapter=self.adapter is not None)
        device = resolve_device(cfg.device)
        adapter = self.adapter or make_adapter(modelpool, cfg.adapter, cfg.image_column, cfg.label_column)
        log = _Log(cfg.progress)
        base_model = modelpool.load_pretrained_model()
        moe_names = [n for n, _ in base_model.named_modules() if n and _matches(n, list(cfg.moe_modules))]
        moe_names = [n for n in moe_names if not any(n.startswith(o + ".") for o in moe_names)]  # outermost only
        if not moe_names:
            some = [n for n, _ in base_model.named_modules() if n][:6]
            raise ConfigError(f"method.moe_modules={list(cfg.moe_modules)} matches no module of '_pretrained_' "
                              f"(its modules are named like {some}); give glob patterns of module names.")
        model, deltas_by_module = self._build(modelpool, base_model, names, moe_names, device)
        log(f"{self.name}: {len(moe_names)} MoE modules ({moe_names[0]}, ...), {len(names)} experts each")

        data: dict[str, TaskExamples] = {n: adapter.examples(n, cfg.split, cfg.max_test_samples, with_labels=False)
                                         for n in names}
        history = self._adapt(model, adapter, names, data, device, log)
        set_batch_reduce(model, cfg.eval_routing == "per_batch")
        extra_meta = self.after_adaptation(model)
        model.eval()
        routing = self._routing_report(model, adapter, names, data, device)
        summary, storage = self._cost(model, base_model, data[names[0]], device)
        model = model.cpu()
        _refuse_hf_save(model, self.name)
        meta = self._metadata(
            t0, extra_parameters=summary["extra_parameters"], extra_storage_bytes=storage,
            parameters=summary["total_parameters"], mixed_model=summary, routing=routing, adapter=adapter.kind,
            moe_modules=moe_names, experts=names, merge_lambda=self._merge_lambda(),
            entropy_first=history[0] if history else None, entropy_last=history[-1] if history else None,
            entropy_history=history[:: max(1, len(history) // 50)],
            data_used={"split": cfg.split, "labels_read": False, "unlabeled_inputs_per_task": {n: len(d) for n, d in
                                                                                               data.items()},
                       "unlabeled_inputs": int(sum(len(d) for d in data.values())),
                       "inputs_seen": cfg.steps * sum(min(cfg.batch_size, len(d)) for d in data.values())},
            **extra_meta)
        del deltas_by_module
        return FusionResult("merged", model=model, metadata=meta)

    def write_artifacts(self, report: dict[str, Any], report_path: Path, overwrite: bool = False) -> dict[str, str]:
        """Called by the program once the report is complete: the routing plot beside it."""
        return write_routing_plot(report, report_path, overwrite)

    def _merge_lambda(self) -> float:
        c = self.config
        return float(c.init_lambda if c.merge_lambda is None else c.merge_lambda)

    def _build(self, modelpool: ModelPool, base_model: nn.Module, names: list[str], moe_names: list[str],
               device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
        cfg = self.config
        base_state = {k: v.detach() for k, v in base_model.state_dict().items()}
        pkeys = [k for k, p in base_model.named_parameters() if p.dtype.is_floating_point]
        inside = {k for k in pkeys if any(k.startswith(m + ".") for m in moe_names)}
        lam = self._merge_lambda()
        merged = {k: base_state[k].float().clone() for k in pkeys if k not in inside}
        deltas: dict[str, dict[str, list[torch.Tensor]]] = {m: {} for m in moe_names}
        tv_dtype = TV_DTYPES[cfg.task_vector_dtype]
        for name in names:
            sd = modelpool.load_model(name).state_dict()
            for k in pkeys:
                if k not in sd or sd[k].shape != base_state[k].shape:
                    raise ModelMismatchError(f"Tensor '{k}' is missing or has another shape in model '{name}' than in "
                                             "'_pretrained_'; mix models fine-tuned from the base.")
                d = sd[k].detach().float() - base_state[k].float()
                if not torch.isfinite(d).all():
                    raise ModelMismatchError(f"Model '{name}' has non-finite values in tensor '{k}'; fix or drop it.")
                if k in inside:
                    m = next(m for m in moe_names if k.startswith(m + "."))
                    deltas[m].setdefault(k[len(m) + 1:], []).append(d.to(tv_dtype))
                else:
                    merged[k] += lam * d
            del sd
        model = copy.deepcopy(base_model)
        model.load_state_dict({**base_state, **{k: v.to(base_state[k].dtype) for k, v in merged.items()}})
        model.requires_grad_(False)
        gen = seeded_generator(cfg.seed, self.name, "routers")
        shared: dict[str, Any] = {}
        for i, m in enumerate(moe_names):
            sub = copy.deepcopy(base_model.get_submodule(m)).float()
            stacked = {pn: torch.stack(v) for pn, v in deltas[m].items()}
            model.set_submodule(m, self.build_module(m, sub, stacked, names, i, gen, shared))
        return model.to(device), deltas

    def _adapt(self, model: nn.Module, adapter, names: list[str], data: dict[str, TaskExamples],
               device: torch.device, log: _Log) -> list[float]:
        cfg = self.config
        params = router_parameters(model)
        set_batch_reduce(model, cfg.batch_reduce)
        if cfg.steps == 0 or not params:
            return []
        for p in params:
            p.requires_grad_(True)
        classifiers = {n: adapter.classifier(model, n).to(device) for n in names}
        for c in classifiers.values():
            for p in c.parameters():
                if not any(p is q for q in params):
                    p.requires_grad_(False)
        opt = torch.optim.Adam(params, lr=cfg.lr)
        gen = seeded_generator(cfg.seed, self.name, "batches")
        batches = {n: shuffled_batches(len(data[n]), cfg.batch_size, gen) for n in names}
        history: list[float] = []
        model.train()
        show = cfg.progress and sys.stderr.isatty()
        with progress(f"{self.name} test-time adaptation", cfg.steps, show) as adv:
            for step in range(cfg.steps):
                total = 0.0
                for n in names:  # per-task backward: the summed loss's gradient, one graph at a time
                    x = data[n].take(next(batches[n])).to(device)
                    loss = prediction_entropy(classifiers[n](x))
                    loss.backward()
                    total += float(loss.detach())
                opt.step()
                opt.zero_grad(set_to_none=True)
                history.append(total)
                adv()
                if not show and cfg.steps >= 10 and (step + 1) % max(1, cfg.steps // 10) == 0:
                    log(f"{self.name}: step {step + 1}/{cfg.steps}, summed entropy {total:.4f}")
        for p in params:
            p.requires_grad_(False)
        return history

    @torch.no_grad()
    def _routing_report(self, model: nn.Module, adapter, names: list[str], data: dict[str, TaskExamples],
                        device: torch.device) -> dict[str, Any]:
        layers = moe_layers(model)
        experts = self.expert_groups(layers[0][1])
        per_task: dict[str, Any] = {}
        bs = 256
        for n in names:
            d = data[n]
            clf = adapter.classifier(model, n).to(device).eval()
            with recording(model) as rec:
                for s in range(0, len(d), bs):
                    clf(d.take(slice(s, s + bs)).to(device))
            per_layer = {k: self._group(v, layers[0][1]) for k, v in describe_routing(rec).items()}
            mean = torch.tensor(list(per_layer.values())).mean(0).tolist()
            per_task[n] = {"mean": mean, "layers": per_layer}
        return {"experts": experts, "split": self.config.split, "eval_routing": self.config.eval_routing,
                "samples_per_task": {n: len(d) for n, d in data.items()}, "per_task": per_task}

    def _group(self, weights: list[float], module: nn.Module) -> list[float]:
        return [float(w) for w in weights]

    def _cost(self, model: nn.Module, base_model: nn.Module, d: TaskExamples, device: torch.device
              ) -> tuple[dict[str, Any], int]:
        cfg = self.config
        one = float_numel(base_model)
        layers = moe_layers(model)
        stored, stored_bytes = 0, 0
        for _, m in layers:
            n_entries, n_bytes = self.count_module(m)
            stored += n_entries
            stored_bytes += n_bytes
        routers = sum(p.numel() for p in router_parameters(model))
        moe_base = sum(float_numel(m.base) for _, m in layers)
        prefixes = tuple(n + "." for n, _ in layers)
        rest = sum(v.numel() for k, v in model.state_dict().items()  # outside the MoE modules
                   if v.is_floating_point() and not k.startswith(prefixes))
        pos = sum(m.position_encoding.numel() for _, m in layers if m.position_encoding is not None)
        total = rest + moe_base + stored + routers + pos
        applied = one + routers + pos
        storage = 4 * (rest + moe_base + routers + pos) + stored_bytes - 4 * one
        inference = None
        if cfg.cost_repeats > 0:
            ref = copy.deepcopy(base_model).to(device).float()
            x = d.take(slice(0, cfg.cost_batch_size)).to(device)
            inference = measure_inference_cost(model, ref, x, repeats=cfg.cost_repeats,
                                               call=lambda m, xb: m(pixel_values=xb) if _takes_pixels(m) else m(xb))
            del ref
        return mixed_model_summary(total=total, active=total, applied=applied, one_model=one, router=routers,
                                   inference=inference), int(storage)


def _takes_pixels(model: nn.Module) -> bool:
    import inspect

    try:
        return "pixel_values" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _refuse_hf_save(model: nn.Module, method: str) -> None:
    """The upscaled model keeps its Hugging Face class but not its architecture: ``save_pretrained`` would
    write a folder that reloads as the plain model without its MoE layers. Refuse it with the reason."""
    if not hasattr(model, "save_pretrained"):
        return

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise FusionBenchError(f"{method}: the upscaled model (MoE layers inside a {type(model).__name__}) has no "
                               "Hugging Face architecture to save as; run without merged_model_path (the report "
                               "keeps its routing and costs), or save model.state_dict() from Python.")

    model.save_pretrained = refuse  # type: ignore[method-assign]


class _Log:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=sys.stderr, flush=True)


@register_method
class WEMoE(_RoutedMoEMethod):
    """Weight-ensembling MoE: each MLP's weights routed per input over the task vectors.

    Tang, Shen, Du, Luong, Tao, "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts", ICML 2024
    (arXiv 2402.00433), as FusionBench's ``we_moe`` (``clip_weight_ensembling_moe``): parameters outside the
    MLPs merged by task arithmetic (``merge_lambda``, default ``init_lambda`` 0.3); each MLP replaced by
    ``theta(x) = theta_0 + sum_i r_i(x) tau_i`` with a router (2-layer MLP, hidden = model width, ReLU; output
    biases ``init_lambda``, weights N(0, 0.01^2)) on the MLP's input hidden states, per token, averaged over the
    tokens of each sample; routers trained by Adam (1000 steps, lr 1e-4) on the summed mean prediction entropy
    of a batch of 16 unlabeled test inputs of every task (batch-averaged routing while training), everything
    else frozen; the returned model routes each input by itself (``eval_routing``).

    Args:
        config: :class:`WEMoEConfig`.
    """

    name = "we_moe"
    config_class: ClassVar = WEMoEConfig
    summary = "Weight-ensembling MoE: MLPs routed per input over the task vectors, routers trained by test-time " \
              "entropy minimisation."
    variant = ("Tang et al. 2024: non-MLP parameters theta_0 + lambda sum tau (lambda = merge_lambda or init_lambda); "
               "MLP params theta_0 + sum_i r_i(x) tau_i, r = 2-layer router on the MLP input, mean over tokens, raw "
               "outputs (bias init 0.3); Adam lr 1e-4, 1000 steps, summed entropy of 16 unlabeled test inputs per "
               "task, batch-averaged routing in training, per-sample at evaluation.")

    def build_module(self, name, base, deltas, names, layer_idx, gen, shared):
        cfg = self.config
        width = _in_features(base, name)
        router = WeightEnsemblingRouter(width, len(names), cfg.init_lambda, cfg.router_hidden_layers, generator=gen)
        return WeightEnsemblingMoE(base, deltas, router, batch_reduce=cfg.batch_reduce, expert_names=names)

    def count_module(self, module):
        tot = sum(getattr(module, f"task_vectors_{j}").numel() for j in range(len(module._names)))
        item = TV_DTYPES[self.config.task_vector_dtype].itemsize
        return tot, tot * item


@register_method
class SparseWEMoE(WEMoE):
    """Sparse weight-ensembling MoE (E-WEMoE): magnitude-pruned task vectors, optionally one shared router.

    Shen, Tang, Yang, et al., "Efficient and Effective Weight-Ensembling Mixture of Experts for Multi-Task Model
    Merging" (arXiv 2410.21804), as FusionBench's ``sparse_we_moe`` (``sparse_clip_weight_ensembling_moe``):
    WEMoE whose MLP task vectors keep only the ``1 - tv_prune_ratio`` largest-magnitude entries of each tensor
    (default 90 % pruned; the count is exact here), with one router shared by every layer (default; its input
    optionally prefixed by a sinusoidal layer-index encoding) and optional magnitude pruning of the routers after
    adaptation. Summed entropy over the tasks, backward once per step (FusionBench ``use_grad_accumulate: false``;
    the gradient is the same).

    Args:
        config: :class:`SparseWEMoEConfig`.
    """

    name = "sparse_we_moe"
    config_class: ClassVar = SparseWEMoEConfig
    summary = "Sparse WEMoE (E-WEMoE): magnitude-pruned task vectors in the routed MLPs, one shared router."
    variant = ("E-WEMoE: WEMoE with each MLP task-vector tensor pruned by magnitude to round((1-ratio) n) entries "
               "(ratio 0.9), a router shared across layers (optional layer position encoding), optional post-hoc "
               "router pruning; stored size counts non-zeros (values + 1-bit mask).")

    def build_module(self, name, base, deltas, names, layer_idx, gen, shared):
        cfg = self.config
        pruned = {k: torch.stack([magnitude_prune(t.float(), cfg.tv_prune_ratio).to(t.dtype) for t in v])
                  for k, v in deltas.items()}
        width = _in_features(base, name)
        pe = layer_position_encoding(layer_idx, cfg.position_encoding_dim) if (
            cfg.shared_gate and cfg.position_encoding) else None
        in_f = width + (0 if pe is None else pe.numel())
        if cfg.shared_gate:
            if "router" not in shared:
                shared["router"] = WeightEnsemblingRouter(in_f, len(names), cfg.init_lambda, cfg.router_hidden_layers,
                                                          generator=gen)
            router = shared["router"]
        else:
            router = WeightEnsemblingRouter(in_f, len(names), cfg.init_lambda, cfg.router_hidden_layers, generator=gen)
        return WeightEnsemblingMoE(base, pruned, router, batch_reduce=cfg.batch_reduce, position_encoding=pe,
                                   expert_names=names)

    def count_module(self, module):
        item = TV_DTYPES[self.config.task_vector_dtype].itemsize
        nz = nbytes = 0
        for j in range(len(module._names)):
            t = getattr(module, f"task_vectors_{j}")
            k = int(torch.count_nonzero(t))
            nz += k
            nbytes += k * item + (t.numel() + 7) // 8  # values + a 1-bit mask
        return nz, nbytes

    def after_adaptation(self, model):
        cfg = self.config
        if not cfg.post_sparse_gate or cfg.gate_prune_ratio == 0:
            return {}
        with torch.no_grad():
            for p in router_parameters(model):
                p.copy_(magnitude_prune(p, cfg.gate_prune_ratio))
        return {"router_pruned": cfg.gate_prune_ratio}


def _in_features(module: nn.Module, name: str) -> int:
    """The width of a module's input: the in_features of its first Linear layer."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise ModelMismatchError(f"MoE module '{name}' has no Linear layer to size its router from; choose other "
                             "method.moe_modules.")
