"""AdaMerging: task-arithmetic coefficients learned by entropy minimisation on unlabeled test inputs."""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.kernels.data.adamerging import merge_params, ties_task_vectors
from fusion_bench.methods._task_data import (
    TaskDataMethod,
    TaskExamples,
    check_tasks,
    make_adapter,
    progress,
)
from fusion_bench.methods.base import FusionResult, MethodConfig, register_method
from fusion_bench.utils import count_parameters, resolve_device, seeded_generator

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool


@dataclass
class AdaMergingConfig(MethodConfig):
    granularity: str = option("layer_wise", choices=("task_wise", "layer_wise"),
                              help="task_wise: one lambda per task vector; layer_wise: one lambda per task vector "
                              "and parameter tensor.")
    init_lambda: float = option(0.3, ge=-100.0, le=100.0, help="Initial value of every lambda (the paper's 0.3).")
    steps: int = option(200, ge=1, le=10**7, help="Adam steps (each on one batch of every task).")
    lr: float = option(1e-3, gt=0.0, le=10.0, help="Adam learning rate of the lambdas.")
    batch_size: int = option(16, ge=1, le=2**20, help="Unlabeled test inputs of each task per step.")
    max_test_samples: int | None = option(None, ge=1, le=10**9, help="Use at most this many evenly spaced test inputs per task "
                                          "(null: the whole split).")
    clamp_lambdas: bool = option(False, help="Use clamp(lambda, 0, 1) in the merge (forward), as the paper's code and "
                                 "FusionBench's clamp_weights; the reported lambdas are the clamped ones.")
    task_vectors: str = option("task_arithmetic", choices=("task_arithmetic", "ties"),
                               help="task_arithmetic: tau_i = theta_i - theta_0 (AdaMerging); ties: each tau_i trimmed "
                               "to its top ties_density magnitudes over the whole model and restricted to the entries "
                               "whose sign agrees with the elected sign (AdaMerging++).")
    ties_density: float = option(0.2, gt=0.0, le=1.0, help="AdaMerging++ (task_vectors=ties): share of each task "
                                 "vector's entries kept by magnitude (the paper's K = 20 percent).")
    task_heads: list[str] = option([], help="Glob patterns of task-specific tensors (e.g. 'classifier.*'): not "
                                   "merged; task t's classifier uses model t's own, and the result is one model per "
                                   "task (merged body + that task's head).")
    weights: str | None = option(None, help="A lambdas file written by save_weights (JSON): load it and skip the "
                                 "test-time adaptation.")
    save_weights: str | None = option(None, help="Write the learned lambdas to this JSON file (reload with "
                                      "method.weights).")
    split: str = option("test", help="The split whose inputs (never labels, unless objective=cross_entropy) the "
                        "lambdas adapt to.")
    objective: str = option("entropy", choices=("entropy", "cross_entropy"), help="entropy: the paper's unsupervised "
                            "test-time objective; cross_entropy: a supervised diagnostic that reads the split's labels "
                            "(use split=validation) to separate the objective from the optimisation.")
    adapter: str = option("auto", choices=("auto", "clip", "generic"),
                          help="How models become classifiers: clip (zero-shot text heads of the pool's CLIP), "
                          "generic (model(x) -> logits), auto (clip for CLIP pools).")
    image_column: str | None = option(None, help="Image column of CLIP datasets (null: detected).")
    label_column: str | None = option(None, help="Label column name, only to locate the images (never read).")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")
    seed: int = option(0, **SEED_RANGE, help="Seed of the batch sampling.")
    progress: bool = option(True, help="Show a progress bar on a terminal.")

    def __post_init__(self) -> None:
        for k in ("steps", "batch_size"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"method.{k}={getattr(self, k)} must be positive.")
        if self.lr <= 0:
            raise ConfigError(f"method.lr={self.lr} must be positive.")
        if self.max_test_samples is not None and self.max_test_samples <= 0:
            raise ConfigError(f"method.max_test_samples={self.max_test_samples} must be positive or null.")
        if not 0.0 < self.ties_density <= 1.0:
            raise ConfigError(f"method.ties_density={self.ties_density} must be in (0, 1].")


class MergedForward(nn.Module):
    """Runs ``module`` with the tensors ``params`` (set before each call) through ``torch.func.functional_call``,
    so that gradients of its outputs reach whatever ``params`` was computed from."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._module = [module]  # not a submodule: its own parameters are never used
        self.params: dict[str, torch.Tensor] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self._module[0], self.params, args, kwargs, strict=False)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the softmax of ``logits`` over a batch."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


@register_method
class AdaMerging(TaskDataMethod):
    """AdaMerging: task-arithmetic coefficients learned by minimising prediction entropy on unlabeled test data.

    Yang et al., ICLR 2024, "AdaMerging: adaptive model merging for multi-task learning":
    ``theta = theta_0 + sum_i lambda_i tau_i`` with ``tau_i = theta_i - theta_0`` over every floating
    parameter tensor (task-wise: one ``lambda_i``; layer-wise: one ``lambda_i^k`` per parameter tensor
    ``k``, as FusionBench's layer-wise variant), all initialised to ``init_lambda`` (0.3). The lambdas
    minimise ``sum_t H(p_theta(. | x))``, the mean Shannon entropy of the merged model's predictions on a
    batch of UNLABELED inputs of each task ``t`` (its ``split``, default test: test-time adaptation;
    labels are never read), with Adam for ``steps`` steps (one batch per task per step, sampled with a
    seeded generator). Task ``t``'s predictions use its classifier (CLIP: its zero-shot head). The
    merged model's forward is ``torch.func.functional_call`` with the merged tensors, so gradients
    reach the lambdas. Non-floating buffers come from the base model. ``clamp_lambdas`` uses
    ``clamp(lambda, 0, 1)`` in the merge (the paper's code clamps always; FusionBench's ``clamp_weights``
    defaults to off, as here).

    AdaMerging++ (same paper, ``task_vectors=ties``): the adaptation runs on TIES-processed task vectors,
    each trimmed to its top ``ties_density`` (20 %) magnitudes over the whole model and restricted to the
    entries agreeing with the elected sign (:func:`fusion_bench.kernels.data.adamerging.ties_task_vectors`).

    Any classifier: the adapter turns a model into a classifier of a task (CLIP zero-shot heads, a
    sequence-classification pool's per-task heads, or ``model(x) -> logits``). With ``task_heads`` (globs),
    the matched tensors of a plain classifier are task-specific: each task's forward uses its model's own
    head, they are not merged, and the result is one model per task.

    Learned lambdas can be written (``save_weights``) and reloaded (``weights``, no adaptation).

    Args:
        config: :class:`AdaMergingConfig` (granularity, init_lambda, steps, lr, batch_size,
            max_test_samples, clamp_lambdas, split, adapter, device, seed).
    """

    name = "adamerging"
    config_class: ClassVar = AdaMergingConfig
    uses_data = True
    requires_pretrained = True
    identity_on_equal_inputs = True
    permutation_invariant = False  # sampling order follows the pool's order
    summary = "Task-wise or layer-wise task-arithmetic coefficients learned by test-time entropy minimisation."
    variant = ("Yang et al. 2024: theta = theta_0 + sum_i lambda_i(^k) tau_i, lambdas (init 0.3; per task or per task "
               "and parameter tensor) minimise the summed mean prediction entropy on unlabeled test batches of every "
               "task with Adam for a fixed number of steps; functional_call forward; task_vectors=ties: AdaMerging++ "
               "(global top-20% trim + elected sign per task vector).")

    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        cfg = self.config
        tv = load_task_vectors(self, modelpool)
        names, keys, device = tv.names, tv.keys, tv.device
        if cfg.task_vectors == "ties":
            tv.vectors = ties_task_vectors(tv.vectors, cfg.ties_density)
        shape = (len(names),) if cfg.granularity == "task_wise" else (len(names), len(keys))
        history: list[float] = []
        n_images: dict[str, int] = {}
        if cfg.weights is not None:
            lam = read_lambdas(cfg.weights, names, keys, cfg.granularity).to(device)
        else:
            lambdas = torch.full(shape, cfg.init_lambda, dtype=torch.float32, device=device, requires_grad=True)
            supervised = cfg.objective == "cross_entropy"
            data, classifiers, proxy = tv.task_data(self, modelpool, with_labels=supervised)
            n_images = {n: len(d) for n, d in data.items()}
            opt = torch.optim.Adam([lambdas], lr=cfg.lr)
            gen = seeded_generator(cfg.seed, "adamerging")
            show = cfg.progress and sys.stderr.isatty()
            with progress("adamerging", cfg.steps, show) as adv:
                for _ in range(cfg.steps):
                    lam_used = lambdas.clamp(0.0, 1.0) if cfg.clamp_lambdas else lambdas
                    merged = merge_params(tv.theta0, tv.vectors, keys, lam_used)
                    loss = torch.zeros((), device=device)
                    for n in names:
                        proxy.params = {**merged, **tv.heads.get(n, {})}
                        d = data[n]
                        idx = torch.randint(0, len(d), (min(cfg.batch_size, len(d)),), generator=gen)
                        logits = classifiers[n](d.take(idx).to(device))
                        loss = loss + (F.cross_entropy(logits.float(), d.labels[idx].to(device)) if supervised
                                       else entropy(logits))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    history.append(float(loss.detach()))
                    adv()
            proxy.params = {}
            lam = lambdas.detach().clamp(0.0, 1.0) if cfg.clamp_lambdas else lambdas.detach()
        if cfg.save_weights is not None:
            write_lambdas(cfg.save_weights, lam, names, keys, cfg.granularity)
        if cfg.granularity == "task_wise":
            lam_meta: Any = {n: float(lam[i]) for i, n in enumerate(names)}
        else:
            lam_meta = {n: {k: float(lam[i, j]) for j, k in enumerate(keys)} for i, n in enumerate(names)}
        meta: dict[str, Any] = dict(
            adapter=tv.adapter_kind, granularity=cfg.granularity, task_vectors=cfg.task_vectors,
            objective=cfg.objective, lambdas=lam_meta,
            lambda_mean={n: float(lam[i].mean()) for i, n in enumerate(names)})
        if history:
            meta.update(entropy_first=history[0], entropy_last=history[-1],
                        entropy_history=history[:: max(1, len(history) // 50)],
                        data_used={"split": cfg.split, "labels_read": supervised, "unlabeled_inputs_per_task": n_images,
                                   "unlabeled_inputs": int(sum(n_images.values())),
                                   "inputs_seen": cfg.steps * sum(min(cfg.batch_size, v) for v in n_images.values())})
        else:
            meta.update(weights_loaded=cfg.weights, data_used={"split": None, "labels_read": False,
                                                               "unlabeled_inputs": 0, "note": "lambdas loaded"})
        with torch.no_grad():
            merged = merge_params(tv.theta0, tv.vectors, keys, lam)
        return tv.result(self, t0, merged, meta)


@dataclass
class TaskVectors:
    """The base model and the task vectors of a pool, on ``device`` in float32 (see :func:`load_task_vectors`)."""

    names: list[str]
    keys: list[str]
    device: torch.device
    base_model: nn.Module
    base_state: dict[str, torch.Tensor]
    theta0: dict[str, torch.Tensor]
    vectors: dict[str, list[torch.Tensor]]
    heads: dict[str, dict[str, torch.Tensor]]  # task -> its own task-specific tensors (task_heads)
    adapter: Any
    adapter_kind: str

    def task_data(self, method: Any, modelpool: ModelPool, split: str | None = None, max_examples: int | None = None,
                  with_labels: bool = False) -> tuple[dict[str, TaskExamples], dict[str, nn.Module], MergedForward]:
        """Unlabeled inputs of every task's ``split`` (default: the method's), and each task's classifier around
        one :class:`MergedForward` stand-in (set its ``params`` before calling a classifier)."""
        cfg = method.config
        split = split or cfg.split
        n_max = max_examples if max_examples is not None else getattr(cfg, "max_test_samples", None)
        data = {n: self.adapter.examples(n, split, n_max, with_labels=with_labels) for n in self.names}
        classifiers, proxy = self.classifiers()
        return data, classifiers, proxy

    def classifiers(self) -> tuple[dict[str, nn.Module], MergedForward]:
        """Each task's classifier (frozen) around one :class:`MergedForward` stand-in of the base model."""
        work = copy.deepcopy(self.base_model).to(self.device).float().eval()
        for p in work.parameters():
            p.requires_grad_(False)
        proxy = MergedForward(work)
        classifiers = {n: self.adapter.classifier(proxy, n).to(self.device).eval() for n in self.names}
        for c in classifiers.values():
            for p in c.parameters():
                p.requires_grad_(False)
        return classifiers, proxy

    def result(self, method: Any, t0: float, merged: dict[str, torch.Tensor], meta: dict[str, Any]) -> FusionResult:
        """The merged model (or, with task heads, one model per task: merged body + the task's own head)."""
        def build(extra: dict[str, torch.Tensor]) -> nn.Module:
            out = copy.deepcopy(self.base_model).cpu()
            state = {k: (merged[k].detach().cpu().to(v.dtype) if k in merged else
                         extra[k].cpu().to(v.dtype) if k in extra else v.clone()) for k, v in self.base_state.items()}
            out.load_state_dict(state, strict=False)
            return out

        if not self.heads:
            out = build({})
            return FusionResult("merged", model=out, metadata=method._metadata(
                t0, extra_parameters=0, parameters=count_parameters(out), **meta))
        models = {n: build(self.heads[n]) for n in self.names}
        head_params = sum(t.numel() for t in self.heads[self.names[0]].values())
        return FusionResult("per_task", models=models, metadata=method._metadata(
            t0, extra_parameters=head_params * (len(self.names) - 1), parameters=count_parameters(models[self.names[0]]),
            task_id="needed (each task uses its own head)", head_tensors=sorted(self.heads[self.names[0]]), **meta))


def load_task_vectors(method: Any, modelpool: ModelPool) -> TaskVectors:
    """Check the pool (base model, each model's task data), load the base and the task vectors ``theta_i - theta_0``
    of every floating parameter tensor in float32 on the method's device. Tensors matched by the method's
    ``task_heads`` globs are kept per task instead (not merged)."""
    import fnmatch

    cfg = method.config
    if not modelpool.has_pretrained:
        raise ModelMismatchError(f"{method.name} needs the base model: add '_pretrained_' to modelpool.models.")
    no_data = getattr(cfg, "weights", None) is not None  # lambdas loaded: no task data needed
    names = check_tasks(modelpool, method.name, custom_adapter=method.adapter is not None or no_data)
    device = resolve_device(cfg.device)
    adapter = None if no_data else (method.adapter or make_adapter(modelpool, cfg.adapter, cfg.image_column,
                                                                   cfg.label_column))
    base_model = modelpool.load_pretrained_model()
    base_state = {k: v.detach() for k, v in base_model.state_dict().items()}
    patterns = list(getattr(cfg, "task_heads", []) or [])
    floating = [k for k, _ in base_model.named_parameters() if base_state[k].dtype.is_floating_point]
    head_keys = [k for k in floating if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    if patterns and not head_keys:
        raise ConfigError(f"method.task_heads={patterns} matches no parameter of '_pretrained_' (e.g. "
                          f"{floating[-1] if floating else '-'}); give globs of the task-specific head's tensor names.")
    keys = [k for k in floating if k not in head_keys]
    theta0 = {k: base_state[k].to(device, torch.float32) for k in keys}
    vectors: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        sd = modelpool.load_model(name).state_dict()
        for k in keys:
            if k not in sd or sd[k].shape != base_state[k].shape:
                raise ModelMismatchError(f"Tensor '{k}' is missing or has another shape in model '{name}' than in "
                                         "'_pretrained_'; merge models fine-tuned from the base (or list it in "
                                         "method.task_heads if it is a task-specific head).")
            vectors[k].append(sd[k].detach().to(device, torch.float32) - theta0[k])
        if head_keys:
            missing = [k for k in head_keys if k not in sd or sd[k].shape != base_state[k].shape]
            if missing:
                raise ModelMismatchError(f"Head tensor '{missing[0]}' is missing or has another shape in model "
                                         f"'{name}' than in '_pretrained_'.")
            heads[name] = {k: sd[k].detach().to(device, torch.float32) for k in head_keys}
    return TaskVectors(names, keys, device, base_model, base_state, theta0, vectors, heads, adapter,
                       adapter.kind if adapter is not None else "none")


def write_lambdas(path: str, lam: torch.Tensor, names: list[str], keys: list[str], granularity: str) -> None:
    """Save learned lambdas as JSON (tasks, tensor names, granularity, values), atomically; reload with
    :func:`read_lambdas`."""
    import json

    from fusion_bench.io.outputs import REPORT_MARK, output_file, tool_version

    doc = {REPORT_MARK: tool_version(), "what": "adamerging lambdas", "granularity": granularity, "tasks": names,
           "tensors": keys if granularity == "layer_wise" else None, "lambdas": lam.detach().cpu().tolist()}
    with output_file(path, "w", overwrite=True, what="lambdas file", hint="another method.save_weights path") as f:
        json.dump(doc, f)


def read_lambdas(path: str, names: list[str], keys: list[str], granularity: str) -> torch.Tensor:
    """Lambdas written by :func:`write_lambdas`, checked against the pool's tasks and tensors."""
    import json
    from pathlib import Path

    p = Path(path).expanduser()
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"method.weights={path}: cannot read a lambdas JSON ({type(e).__name__}: {e}).") from e
    if not isinstance(doc, dict) or "lambdas" not in doc:
        raise ConfigError(f"method.weights={path} is not a lambdas file written by method.save_weights.")
    if doc.get("granularity") != granularity:
        raise ConfigError(f"method.weights={path} holds {doc.get('granularity')} lambdas; set "
                          f"method.granularity={doc.get('granularity')}.")
    if doc.get("tasks") != names:
        raise ConfigError(f"method.weights={path} was learned for tasks {doc.get('tasks')}, the pool has {names}.")
    if granularity == "layer_wise" and doc.get("tensors") != keys:
        raise ConfigError(f"method.weights={path} was learned for other tensors than the pool's models have.")
    lam = torch.tensor(doc["lambdas"], dtype=torch.float32)
    want = (len(names),) if granularity == "task_wise" else (len(names), len(keys))
    if tuple(lam.shape) != want or not torch.isfinite(lam).all():
        raise ConfigError(f"method.weights={path}: lambdas of shape {tuple(lam.shape)} (finite), expected {want}.")
    return lam
