"""Mixture-of-experts modules built from task vectors: weight-ensembling MoE and rank-one MoE.

Both replace one module of a pretrained model (a transformer block's MLP) by the same module run with
routed weights: a router reads the module's input (the block's hidden states after its layer norm,
``(batch, tokens, hidden)``), its per-token outputs are averaged over the tokens (one routing vector per
sample; FusionBench's ``batch_first=True``), and the module's parameters become

- :class:`WeightEnsemblingMoE` (WEMoE, Tang et al. ICML 2024):
  ``theta(x) = theta_0 + sum_i r_i(x) tau_i`` with ``tau_i`` the task vectors of the module (dense, or
  magnitude-pruned for E-WEMoE), ``r`` the raw router outputs (no softmax);
- :class:`RankOneMoE` (FusionBench ``rankone_moe``): every weight matrix
  ``W(x) = W_0 + sum_e w_e(x) u_e (s_e v_e)^T`` over a pool of rank-one SVD pieces of the task vectors
  (optionally soft top-k selected); other parameters (biases) get the fixed ``lambda * sum_i tau_i``.

Routing is per sample (the papers; evaluation) or per batch (``batch_reduce``: the batch's mean routing
vector, FusionBench's setting during test-time adaptation). The per-sample forward merges one parameter
set per sample and runs the module on each sample with ``torch.func.vmap`` over
``torch.func.functional_call`` (chunks of ``chunk_size`` samples bound the memory).

Diagnostics shared by both: ``record`` (a list that receives every forward's per-sample routing weights)
and ``fixed_weights`` (routing weights that replace the router's output, e.g. one-hot on a task: the
oracle routing). Helpers: :func:`moe_layers`, :func:`recording`, :func:`fixed_routing`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench.kernels.mixing.rankone import rank_one_merge, soft_top_k
from fusion_bench.kernels.mixing.wemoe import sample_routing, weight_ensemble


class WeightEnsemblingRouter(nn.Module):
    """The router of WEMoE (FusionBench's ``construct_weight_ensembling_gate``).

    - ``depth=0``: a learned vector of ``num_experts`` weights, independent of the input;
    - ``depth=1``: ``Linear(in, E)``;
    - ``depth=2``: ``Linear(in, hidden) -> ReLU -> Linear(hidden, E)`` (``hidden``: ``in`` for WEMoE,
      ``2 E`` for rank-one MoE).

    Initialisation: linear weights ~ N(0, 0.01^2), hidden biases 0, output biases ``init_lambda``, so every
    routing weight starts at about ``init_lambda``. ``generator`` makes the draw reproducible.
    """

    def __init__(self, in_features: int, num_experts: int, init_lambda: float, depth: int = 2,
                 hidden: int | None = None, generator: torch.Generator | None = None):
        super().__init__()
        if depth not in (0, 1, 2):
            raise ValueError(f"router depth must be 0, 1 or 2, got {depth}")
        self.depth = depth
        self.num_experts = num_experts
        if depth == 0:
            self.weight = nn.Parameter(torch.full((num_experts,), float(init_lambda)))
            return
        if depth == 1:
            self.fc = nn.Linear(in_features, num_experts)
            last = self.fc
        else:
            self.fc1 = nn.Linear(in_features, hidden or in_features)
            self.fc2 = nn.Linear(hidden or in_features, num_experts)
            with torch.no_grad():
                self.fc1.weight.copy_(0.01 * torch.randn(self.fc1.weight.shape, generator=generator))
                self.fc1.bias.zero_()
            last = self.fc2
        with torch.no_grad():
            last.weight.copy_(0.01 * torch.randn(last.weight.shape, generator=generator))
            last.bias.fill_(float(init_lambda))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.depth == 0:
            return self.weight
        if self.depth == 1:
            return self.fc(x)
        return self.fc2(F.relu(self.fc1(x)))


class _RoutedModule(nn.Module):
    """Shared machinery: routing (per sample or per batch), recording, fixed weights, the per-sample forward."""

    def __init__(self, base: nn.Module, router: nn.Module, num_weights: int, batch_reduce: bool = False,
                 position_encoding: torch.Tensor | None = None, chunk_size: int = 64):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.router = router
        self.num_weights = int(num_weights)
        self.batch_reduce = bool(batch_reduce)
        self.chunk_size = int(chunk_size)
        if position_encoding is not None:
            self.register_buffer("position_encoding", position_encoding.detach().clone(), persistent=True)
        else:
            self.position_encoding = None
        self.record: list[torch.Tensor] | None = None
        self.fixed_weights: torch.Tensor | None = None
        self._names = [n for n, _ in base.named_parameters()]

    # -- routing --------------------------------------------------------------------------------------
    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights: ``(B, E)`` per sample, or ``(E,)`` when reduced over the batch / input independent."""
        if self.fixed_weights is not None:
            w = self.fixed_weights.to(x.device, torch.float32)
            return w.expand(x.shape[0], -1) if w.ndim == 1 and not self.batch_reduce else w
        inp = x
        if self.position_encoding is not None:
            pe = self.position_encoding.to(x.device, x.dtype).expand(*x.shape[:-1], -1)
            inp = torch.cat([pe, x], dim=-1)
        tok = self.router(inp)
        if tok.ndim == 1:  # depth-0 router: one vector for every input
            return tok if self.batch_reduce else tok.expand(x.shape[0], -1)
        if tok.ndim == 2:  # (B, hidden) inputs without a token axis
            tok = tok.unsqueeze(1)
        return sample_routing(tok.float(), batch_reduce=self.batch_reduce)

    def merged_params(self, w: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.routing(x)
        if self.record is not None:
            self.record.append(w.detach().float().cpu() if w.ndim == 2 else
                               w.detach().float().cpu().expand(x.shape[0], -1))
        if w.ndim == 1:
            params = {k: v.to(x.dtype) for k, v in self.merged_params(w).items()}
            return torch.func.functional_call(self.base, params, (x,))
        outs = []
        for s in range(0, x.shape[0], self.chunk_size):
            xs, ws = x[s:s + self.chunk_size], w[s:s + self.chunk_size]
            params = {k: v.to(x.dtype) for k, v in self.merged_params(ws).items()}

            def one(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
                return torch.func.functional_call(self.base, p, (xi.unsqueeze(0),)).squeeze(0)

            outs.append(torch.func.vmap(one)(params, xs))
        return torch.cat(outs, dim=0)


class WeightEnsemblingMoE(_RoutedModule):
    """A module (an MLP) whose parameters are ``theta_0 + sum_i r_i(x) tau_i`` (WEMoE; see the module docstring).

    Args:
        base: the pretrained module (frozen; its parameters are ``theta_0``).
        task_vectors: parameter name -> stacked task vectors ``(T, *shape)`` (every parameter of ``base``);
            stored as buffers in their dtype (e.g. bfloat16 to halve the memory), upcast when merging.
        router: maps the module's input ``(B, L, d)`` (with the position encoding prepended, if any) to
            ``(B, L, T)`` (or ``(T,)``); may be shared by several layers (E-WEMoE's shared gate).
        batch_reduce: one routing vector per batch (mean over samples) instead of one per sample.
        position_encoding: a vector prepended to each token's router input (E-WEMoE's layer encoding).
        expert_names: the task of each task vector (for reports).
    """

    def __init__(self, base: nn.Module, task_vectors: Mapping[str, torch.Tensor], router: nn.Module, *,
                 batch_reduce: bool = False, position_encoding: torch.Tensor | None = None,
                 expert_names: Sequence[str] | None = None, chunk_size: int = 64):
        shapes = {k: tuple(v.shape) for k, v in task_vectors.items()}
        T = {s[0] for s in shapes.values()}
        if len(T) != 1:
            raise ValueError(f"every parameter needs the same number of task vectors, got {shapes}")
        num = T.pop()
        super().__init__(base, router, num, batch_reduce, position_encoding, chunk_size)
        missing = [n for n in self._names if n not in task_vectors]
        if missing:
            raise ValueError(f"no task vectors for parameter '{missing[0]}' of the module")
        for j, n in enumerate(self._names):
            p = dict(base.named_parameters())[n]
            if tuple(task_vectors[n].shape[1:]) != tuple(p.shape):
                raise ValueError(f"task vectors of '{n}' have shape {tuple(task_vectors[n].shape)}, the parameter "
                                 f"{tuple(p.shape)}")
            self.register_buffer(f"task_vectors_{j}", task_vectors[n].detach().clone())
        self.expert_names = list(expert_names) if expert_names is not None else [str(i) for i in range(num)]

    def task_vector(self, name: str) -> torch.Tensor:
        return getattr(self, f"task_vectors_{self._names.index(name)}")

    def merged_params(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        base = dict(self.base.named_parameters())
        return {n: weight_ensemble(base[n], getattr(self, f"task_vectors_{j}"), w) for j, n in enumerate(self._names)}

    def stored_entries(self) -> tuple[int, int]:
        """(task-vector entries stored, of which non-zero)."""
        tot = nz = 0
        for j in range(len(self._names)):
            t = getattr(self, f"task_vectors_{j}")
            tot += t.numel()
            nz += int(torch.count_nonzero(t))
        return tot, nz


class RankOneMoE(_RoutedModule):
    """A module whose weight matrices are ``W_0 + sum_e w_e(x) u_e (s_e v_e)^T`` (rank-one MoE).

    Args:
        base: the pretrained module (frozen).
        experts: matrix parameter name -> ``(U, SVh)``, ``U`` ``(E, out)``, ``SVh`` ``(E, in)``: the pooled
            rank-one experts, task-major (task ``i`` owns rows ``i k .. (i + 1) k - 1``).
        fixed_deltas: every other parameter name -> its fixed update (``lambda * sum_i tau_i``).
        router: input ``(B, L, d)`` -> ``(B, L, E)``.
        select_k: soft top-k selection of the experts (``<= 0``: all).
        expert_names: the task of each group of ``k`` experts; ``rank_k``: experts per task.
    """

    def __init__(self, base: nn.Module, experts: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 fixed_deltas: Mapping[str, torch.Tensor], router: nn.Module, *, select_k: int = -1,
                 batch_reduce: bool = False, expert_names: Sequence[str] | None = None, rank_k: int = 1,
                 chunk_size: int = 64):
        sizes = {u.shape[0] for u, _ in experts.values()}
        if len(sizes) != 1:
            raise ValueError("every matrix needs the same number of rank-one experts")
        num = sizes.pop()
        super().__init__(base, router, num, batch_reduce, None, chunk_size)
        self.select_k = int(select_k)
        self.rank_k = int(rank_k)
        self._matrices = [n for n in self._names if n in experts]
        self._fixed = [n for n in self._names if n not in experts]
        missing = [n for n in self._fixed if n not in fixed_deltas]
        if missing:
            raise ValueError(f"parameter '{missing[0]}' has neither rank-one experts nor a fixed update")
        for j, n in enumerate(self._matrices):
            u, svh = experts[n]
            self.register_buffer(f"expert_u_{j}", u.detach().clone())
            self.register_buffer(f"expert_svh_{j}", svh.detach().clone())
        for j, n in enumerate(self._fixed):
            self.register_buffer(f"fixed_delta_{j}", fixed_deltas[n].detach().clone())
        self.expert_names = list(expert_names) if expert_names is not None else [str(i) for i in range(num)]

    def merged_params(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        w = soft_top_k(w, self.select_k)
        base = dict(self.base.named_parameters())
        out = {n: rank_one_merge(base[n], getattr(self, f"expert_u_{j}"), getattr(self, f"expert_svh_{j}"), w)
               for j, n in enumerate(self._matrices)}
        for j, n in enumerate(self._fixed):
            b = base[n].float() + getattr(self, f"fixed_delta_{j}").float()
            out[n] = b.expand(w.shape[0], *b.shape) if w.ndim == 2 else b
        return out


MoEModule = (WeightEnsemblingMoE, RankOneMoE)


def moe_layers(model: nn.Module) -> list[tuple[str, _RoutedModule]]:
    """The routed modules of ``model`` with their qualified names, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _RoutedModule)]


@contextmanager
def recording(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Collect every routed module's per-sample routing weights while the block runs: layer -> list of (B, E)."""
    layers = moe_layers(model)
    store: dict[str, list[torch.Tensor]] = {}
    for n, m in layers:
        store[n] = []
        m.record = store[n]
    try:
        yield store
    finally:
        for _, m in layers:
            m.record = None


@contextmanager
def fixed_routing(model: nn.Module, weights: torch.Tensor | Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Replace every routed module's router output by ``weights`` (one vector, or layer name -> vector)."""
    layers = moe_layers(model)
    for n, m in layers:
        m.fixed_weights = weights[n] if isinstance(weights, Mapping) else weights
    try:
        yield
    finally:
        for _, m in layers:
            m.fixed_weights = None


def set_batch_reduce(model: nn.Module, value: bool) -> None:
    """Set ``batch_reduce`` on every routed module (FusionBench sets it on the top model only, which has no
    effect on its MoE layers; here it reaches them)."""
    for _, m in moe_layers(model):
        m.batch_reduce = bool(value)


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routers' parameters (shared routers once)."""
    seen: dict[int, nn.Parameter] = {}
    for _, m in moe_layers(model):
        for p in m.router.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def describe_routing(records: Mapping[str, list[torch.Tensor]]) -> dict[str, Any]:
    """Mean routing weight of each expert per layer over the recorded samples: layer -> list of E floats."""
    return {n: torch.cat(v).mean(0).tolist() for n, v in records.items() if v}
