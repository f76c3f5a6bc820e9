"""The continual-merging interface: ``start(pretrained, template)``, then ``update(name, model)`` once per
arriving model, each returning the merged model so far.

A continual method holds a fixed number of model-sized tensors between steps (the pretrained weights,
its accumulators and the merged model it returns), never the list of past models: its memory is
constant in the number of models. :meth:`ContinualMethod.state_bytes` counts those tensors, and the
continual program (``program=continual``) reports it after every step.

``run(modelpool)`` (the ordinary fusion program, the conformance suite, the leaderboard) consumes the
pool's models in the pool's order (or a seeded shuffle of it) and returns the final merged model.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.errors import ModelMismatchError
from fusion_bench.methods.base import FusionMethod, FusionResult, MethodConfig, all_finite
from fusion_bench.utils import count_parameters

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool

Tensors = dict[str, torch.Tensor]


@dataclass
class ContinualConfig(MethodConfig):
    """Options shared by every continual method."""

    shuffle_order: bool = option(False, help="run() only: merge the pool's models in a random order drawn from "
                                 "'seed' instead of the pool's order (FusionBench's shuffle_order). The continual "
                                 "program sets its own orders (program.orders).")
    seed: int = option(0, **SEED_RANGE, help="Seed of the shuffled order when shuffle_order is true.")


def linear_weight_keys(module: nn.Module) -> set[str]:
    """State-dict names of the weights of ``nn.Linear`` modules (the matrices OPCM and DOP project); for
    a module without submodules (a bag of tensors), every 2-D floating-point tensor."""
    keys = {f"{name}.weight" if name else "weight" for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    if not keys and not any(True for _ in module.children()):
        keys = {k for k, v in module.state_dict().items() if v.dim() == 2 and v.is_floating_point()}
    return keys


def seeded_order(names: Sequence[str], seed: int) -> list[str]:
    """``names`` shuffled by ``random.Random(seed)`` (the order a seed stands for, reproducible)."""
    out = list(names)
    random.Random(seed).shuffle(out)
    return out


class ContinualMethod(FusionMethod):
    """Base of continual methods: subclasses implement :meth:`init_state` and :meth:`step`.

    Tensors are merged in float32 (float64 for float64 models) and written back, in each tensor's dtype,
    into one module (a copy of the pretrained model, or of the first model without one) that every
    :meth:`update` returns. Non-floating tensors (integer buffers) are copied from that module.
    """

    family: ClassVar = "continual"
    config_class: ClassVar[type[MethodConfig]] = ContinualConfig
    requires_pretrained = True
    permutation_invariant = False

    # -- the step interface -------------------------------------------------------------------------
    def start(self, pretrained: nn.Module | None, template: nn.Module | None = None) -> None:
        """Begin a new sequence. ``pretrained`` is theta_0 (None for methods that do not need it);
        ``template`` the module that receives the merged weights (default: a copy of ``pretrained``)."""
        if self.requires_pretrained and pretrained is None:
            raise ModelMismatchError(f"Method '{self.name}' needs the base model: add '_pretrained_' to the model "
                                     "pool's models.")
        like = template if template is not None else pretrained
        if like is None:
            raise ModelMismatchError(f"Method '{self.name}': start() needs the pretrained model or a template module.")
        self._out = copy.deepcopy(like)
        sd = self._out.state_dict()
        self._keys = [k for k, v in sd.items() if v.is_floating_point()]
        self._shapes = {k: tuple(sd[k].shape) for k in self._keys}
        self._linear = linear_weight_keys(self._out) & set(self._keys)
        self._cd = torch.float64 if any(sd[k].dtype == torch.float64 for k in self._keys) else torch.float32
        self._pre: Tensors | None = None
        if pretrained is not None and self.requires_pretrained:  # (weight averaging never reads theta_0)
            psd = pretrained.state_dict()
            self._check(psd, "_pretrained_")
            self._pre = {k: psd[k].detach().to(self._cd, copy=True) for k in self._keys}
        self.t = 0
        self.order: list[str] = []
        self.init_state()

    def update(self, name: str, model: nn.Module) -> nn.Module:
        """Merge the next model (``name`` only labels errors and the order) and return the merged model."""
        if not hasattr(self, "_out"):
            raise RuntimeError(f"{type(self).__name__}.update() before start()")
        sd = model.state_dict()
        self._check(sd, name)
        task = {k: sd[k].detach().to(self._cd) for k in self._keys}
        for k, v in task.items():
            if not all_finite(v):
                raise ModelMismatchError(f"Model '{name}' has non-finite values (NaN/inf) in tensor '{k}'; fix or drop "
                                         "that checkpoint.")
        self.t += 1
        self.order.append(name)
        with torch.no_grad():
            merged = self.step(task)
            out_sd = self._out.state_dict()
            for k in self._keys:
                v = merged[k]
                if not all_finite(v):
                    raise ModelMismatchError(f"Method '{self.name}' produced non-finite values in tensor '{k}' at step "
                                             f"{self.t} (model '{name}'); nothing was written.")
                out_sd[k].copy_(v)
        return self._out

    def steps(self, modelpool: ModelPool, order: Sequence[str]) -> Iterator[tuple[int, str, nn.Module]]:
        """Start, then merge the models of ``order`` one by one, yielding ``(step, name, merged_model)``."""
        pretrained = modelpool.load_pretrained_model() if modelpool.has_pretrained else None
        if self.requires_pretrained and pretrained is None:
            raise ModelMismatchError(f"Method '{self.name}' needs the base model: add '_pretrained_' to the model "
                                     "pool's models.")
        first = None if pretrained is not None else modelpool.load_model(order[0])
        self.start(pretrained, pretrained if pretrained is not None else first)
        for i, name in enumerate(order):
            model = first if (i == 0 and first is not None) else modelpool.load_model(name)
            yield i + 1, name, self.update(name, model)
            del model

    def state_bytes(self) -> int:
        """Bytes of the tensors the method holds between steps (pretrained copy, accumulators, merged model)."""
        seen: set[int] = set()
        total = 0
        tensors = list(self.state_tensors()) + list(self._out.state_dict().values())
        tensors += list(self._pre.values()) if self._pre is not None else []
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                continue
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return total

    # -- what subclasses implement ------------------------------------------------------------------
    def init_state(self) -> None:
        """Set the accumulators up for a new sequence (``self._pre``, ``self._keys`` are ready)."""

    def state_tensors(self) -> Iterator[torch.Tensor]:
        """The accumulator tensors (for :meth:`state_bytes`)."""
        return iter(())

    def step(self, task: Tensors) -> Tensors:
        """Merge the next model's floating tensors ``task`` (compute dtype); return the merged tensors
        (``self.t`` is the 1-based step number)."""
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------------------
    def _check(self, sd: dict[str, torch.Tensor], name: str) -> None:
        for k in self._keys:
            if k not in sd:
                raise ModelMismatchError(f"Model '{name}' has no tensor '{k}'; every model of a continual merge needs "
                                         "the base model's tensors.")
            if tuple(sd[k].shape) != self._shapes[k]:
                raise ModelMismatchError(f"Model '{name}': tensor '{k}' has shape {tuple(sd[k].shape)}, the base model "
                                         f"{self._shapes[k]}; all models must share one architecture.")

    def tv(self, task: Tensors) -> Tensors:
        """Task vector of ``task`` (needs the pretrained model)."""
        return {k: task[k] - self._pre[k] for k in self._keys}

    @staticmethod
    def global_norm(tensors: Tensors) -> float:
        return float(torch.sqrt(sum((v.double() ** 2).sum() for v in tensors.values())))

    # -- FusionMethod ------------------------------------------------------------------------------
    def run_order(self, modelpool: ModelPool) -> list[str]:
        names = list(modelpool.model_names)
        return seeded_order(names, self.config.seed) if self.config.shuffle_order else names

    def run(self, modelpool: ModelPool) -> FusionResult:
        t0 = time.perf_counter()
        order = self.run_order(modelpool)
        if not order:
            raise ModelMismatchError(f"Method '{self.name}' needs at least one model besides '_pretrained_'.")
        model = None
        for step in self.steps(modelpool, order):
            model = step[2]
        return FusionResult("merged", model=model, metadata=self._metadata(
            t0, order=order, steps=len(order), state_bytes=self.state_bytes(), extra_parameters=0,
            parameters=count_parameters(model)))


def _matches_any(name: str, patterns: Sequence[str]) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
