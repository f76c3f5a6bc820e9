"""SMILE's upscaled linear layer (a sparse mixture of low-rank experts) and the in-place upscaling of a module.

Paper: Tang et al., "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From Pre-Trained
Foundation Models", arXiv 2408.10174. The math (expert factors, router, routing weights) is in
:mod:`fusion_bench.kernels.mixing.smile`; this module holds it in ``nn.Module`` form:

- :class:`SmileLinear`: ``shared`` (the pretrained ``nn.Linear``), ``gate.weight`` (T * gate_k, n: the routers
  of the T tasks stacked), ``experts`` (T :class:`SmileExpert`: ``u`` (m, k) and ``svh`` (k, n), or ``weight``
  (m, n) for full-rank experts, and the bias delta). The state-dict names are what the saved causal-LM
  checkpoints hold (``...q_proj.shared.weight``, ``...q_proj.gate.weight``, ``...q_proj.experts.0.u``, ...).
- :func:`upscale_linears`: replace the ``nn.Linear`` modules of a copy of the base model whose names match the
  patterns by :class:`SmileLinear` built from the fine-tuned models.
- :func:`smile_parameter_counts`: total parameters, parameters active per input token, extra over one model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench.kernels.mixing import smile as K


class SmileExpert(nn.Module):
    """One task's expert: ``x -> u (svh x) + bias`` (rank k) or ``x -> weight x + bias`` (full rank, ``rank=0``)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        if rank > 0:
            self.u = nn.Parameter(torch.zeros(out_features, rank, **kw))
            self.svh = nn.Parameter(torch.zeros(rank, in_features, **kw))
        else:
            self.weight = nn.Parameter(torch.zeros(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank > 0:
            return F.linear(F.linear(x, self.svh), self.u, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={'full' if self.rank <= 0 else self.rank}"


class SmileLinear(nn.Module):
    """A linear layer upscaled by SMILE: ``W_0 x + b_0 + sum_{i in topk} lambda_i (U_i S_i V_i^T x + db_i)``.

    Args:
        in_features, out_features: the layer's shape.
        num_experts: T, the number of fine-tuned models.
        top_k: experts per input token.
        gate_k: router rank (rows per task in ``gate.weight``), already capped at min(m, n).
        rank: expert rank (already capped), 0 for full-rank experts.
        bias: whether the layer has a bias.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int, top_k: int, gate_k: int, rank: int,
                 bias: bool, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.top_k, self.gate_k, self.rank = num_experts, top_k, gate_k, rank
        self.shared = nn.Linear(in_features, out_features, bias=bias, **kw)
        self.gate = nn.Linear(in_features, num_experts * gate_k, bias=False, **kw)
        self.experts = nn.ModuleList(SmileExpert(in_features, out_features, rank, bias, **kw)
                                     for _ in range(num_experts))
        #: when set to a list, each forward appends (sum over its tokens of the applied routing weights (T,),
        #: number of tokens): the weights lambda_i of the top-k experts, 0 for the others (for reports)
        self.routing_log: list[tuple[torch.Tensor, int]] | None = None

    # a drop-in for nn.Linear where code reads .weight / .bias (device or dtype probes)
    @property
    def weight(self) -> torch.Tensor:
        return self.shared.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.shared.bias

    @classmethod
    @torch.no_grad()
    def from_linears(cls, base: nn.Linear, finetuned: Sequence[nn.Linear], gate_k: int, k: int,
                     top_k: int, routing_use_diff: bool = True, device: torch.device | str | None = None) -> SmileLinear:
        """Build from the pretrained layer and the T fine-tuned layers (dtype and device of ``base``; the SVDs run on
        ``device`` when given, on copies of the weights: the given layers are not moved)."""
        w0 = base.weight.detach()
        layer = cls(base.in_features, base.out_features, len(finetuned), top_k, K.effective_gate_k(gate_k, w0.shape),
                    K.effective_rank(k, w0.shape), base.bias is not None, device=w0.device, dtype=w0.dtype)
        dev = w0.device if device is None else torch.device(device)
        b0 = base.bias.detach() if base.bias is not None else None
        factors = [K.smile_factors(w0.to(dev), m.weight.detach().to(dev), gate_k, k,
                                   b0.to(dev) if b0 is not None else None,
                                   m.bias.detach().to(dev) if m.bias is not None else None, routing_use_diff)
                   for m in finetuned]
        layer.load_factors(w0, b0, factors)
        return layer

    @torch.no_grad()
    def load_factors(self, w0: torch.Tensor, b0: torch.Tensor | None, factors: Sequence[K.SmileFactors]) -> None:
        """Fill the layer from the pretrained weight/bias and the per-task :class:`SmileFactors`."""
        self.shared.weight.copy_(w0)
        if b0 is not None:
            self.shared.bias.copy_(b0)
        self.gate.weight.copy_(torch.cat([f.gate for f in factors]).to(self.gate.weight.device))
        for e, f in zip(self.experts, factors):  # copy_ casts dtype and moves device
            if self.rank > 0:
                e.u.copy_(f.u)
                e.svh.copy_(f.svh)
            else:
                e.weight.copy_(f.weight)
            if e.bias is not None:
                e.bias.copy_(f.bias)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (N, T), top-k weights (N, top_k), top-k indices (N, top_k)) of the flattened inputs ``h``."""
        gate = self.gate.weight.view(self.num_experts, self.gate_k, self.in_features)
        logits = K.routing_logits(h, gate)
        w, idx = K.routing_weights(logits, self.top_k)
        return logits, w, idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shared(x)
        h = x.reshape(-1, self.in_features)
        logits, w, idx = self.route(h)
        if self.routing_log is not None:  # the weights applied: lambda_i on the top-k experts, 0 elsewhere
            dense = torch.zeros(h.shape[0], self.num_experts, dtype=torch.float32, device=w.device)
            self.routing_log.append((dense.scatter_(1, idx, w.float()).sum(0).cpu(), int(h.shape[0])))
        mixed = torch.zeros(h.shape[0], self.out_features, dtype=out.dtype, device=out.device)
        for i, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == i)
            if tok.numel() == 0:
                continue
            mixed.index_add_(0, tok, (expert(h[tok]) * w[tok, slot, None].to(out.dtype)).to(out.dtype))
        return out + mixed.view(*out.shape)

    def expert_parameters(self) -> int:
        """Parameters of one expert."""
        return sum(p.numel() for p in self.experts[0].parameters())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, gate_k={self.gate_k}, rank={'full' if self.rank <= 0 else self.rank}")


def matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@torch.no_grad()
def upscale_linears(base: nn.Module, finetuned: Sequence[nn.Module], *, gate_k: int, k: int, top_k: int,
                    patterns: Sequence[str] = ("*",), exclude: Sequence[str] = (), average_experts: bool = False,
                    routing_use_diff: bool = True, device: torch.device | str | None = None,
                    progress: Callable[[str], None] | None = None) -> dict[str, list[str]]:
    """Upscale ``base`` in place: every ``nn.Linear`` whose module name matches ``patterns`` (and no ``exclude``
    pattern) becomes a :class:`SmileLinear` built from the same module of each fine-tuned model (SVDs on ``device``,
    default: where the weights are; no model is moved).

    A layer that no fine-tuned model changed (every delta is exactly zero) is kept as it is (FusionBench does the
    same). With ``average_experts`` the parameters outside the upscaled layers (norms, embeddings, ...) become the
    mean of the fine-tuned models' (FusionBench's ``average_experts``); otherwise they stay the pretrained ones.

    Returns:
        ``{"upscaled": [...], "unchanged": [...], "averaged": [...]}`` module / parameter names.
    """
    done: dict[str, list[str]] = {"upscaled": [], "unchanged": [], "averaged": []}
    ft_modules = [dict(m.named_modules()) for m in finetuned]
    targets = [n for n, mod in base.named_modules()
               if isinstance(mod, nn.Linear) and n and matches(n, patterns) and not matches(n, exclude)]
    for n in targets:
        layer = base.get_submodule(n)
        others = [fm[n] for fm in ft_modules]
        changed = any(not torch.equal(o.weight, layer.weight) or (
            layer.bias is not None and not torch.equal(o.bias, layer.bias)) for o in others)
        if not changed:
            done["unchanged"].append(n)
            continue
        if progress is not None:
            progress(n)
        _set_submodule(base, n, SmileLinear.from_linears(layer, others, gate_k, k, top_k, routing_use_diff, device))
        done["upscaled"].append(n)
    if average_experts:
        upscaled = set(done["upscaled"])
        ft_params = [dict(m.named_parameters()) for m in finetuned]
        for pname, p in base.named_parameters():
            owner = pname.rpartition(".")[0]
            if any(owner == u or owner.startswith(u + ".") for u in upscaled):
                continue
            mean = torch.stack([fp[pname].detach().to(K.compute_dtype(p.dtype)) for fp in ft_params]).mean(0)
            p.copy_(mean.to(p.dtype))
            done["averaged"].append(pname)
    return done


def smile_parameter_counts(model: nn.Module, base_parameters: int) -> dict[str, int]:
    """Parameter counts of an upscaled model.

    ``total_parameters``: every parameter; ``active_parameters_per_token``: those one input token uses (the
    shared layers and every router, plus ``top_k`` of the T experts of each upscaled layer);
    ``extra_parameters``: total minus one model of the pool (``base_parameters``).
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    layers = 0
    routers = 0
    for mod in model.modules():
        if isinstance(mod, SmileLinear):
            layers += 1
            inactive += (mod.num_experts - mod.top_k) * mod.expert_parameters()
            routers += mod.gate.weight.numel()
    return {"total_parameters": int(total), "active_parameters_per_token": int(total - inactive),
            "extra_parameters": int(total - base_parameters), "router_parameters": int(routers),
            "upscaled_layers": layers}


def smile_layers(model: nn.Module) -> list[tuple[str, SmileLinear]]:
    """The (name, layer) pairs of the SmileLinear layers of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SmileLinear)]


def smile_linear_layout(prefix: str, shape: tuple[int, int], has_bias: bool, num_experts: int, gate_k: int,
                        k: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the state-dict entries of a :class:`SmileLinear` at ``prefix`` (its state-dict order),
    for a linear layer of weight shape ``shape`` = (m, n)."""
    m, n = int(shape[0]), int(shape[1])
    g, r = K.effective_gate_k(gate_k, shape), K.effective_rank(k, shape)
    out: list[tuple[str, tuple[int, ...]]] = [(f"{prefix}.shared.weight", (m, n))]
    if has_bias:
        out.append((f"{prefix}.shared.bias", (m,)))
    out.append((f"{prefix}.gate.weight", (num_experts * g, n)))
    for i in range(num_experts):
        e = f"{prefix}.experts.{i}"
        out += [(f"{e}.u", (m, r)), (f"{e}.svh", (r, n))] if r > 0 else [(f"{e}.weight", (m, n))]
        if has_bias:
            out.append((f"{e}.bias", (m,)))
    return out


def smile_linear_tensors(prefix: str, w0: torch.Tensor, b0: torch.Tensor | None, ws: Sequence[torch.Tensor],
                         bs: Sequence[torch.Tensor | None], gate_k: int, k: int,
                         routing_use_diff: bool = True) -> dict[str, torch.Tensor]:
    """The state-dict entries of a :class:`SmileLinear` at ``prefix`` built from the pretrained weight/bias and
    the fine-tuned ones (compute dtype; same names and order as :func:`smile_linear_layout`)."""
    factors = [K.smile_factors(w0, w, gate_k, k, b0, b, routing_use_diff) for w, b in zip(ws, bs)]
    cd = K.compute_dtype(w0.dtype)
    out = {f"{prefix}.shared.weight": w0.to(cd)}
    if b0 is not None:
        out[f"{prefix}.shared.bias"] = b0.to(cd)
    out[f"{prefix}.gate.weight"] = torch.cat([f.gate for f in factors])
    for i, f in enumerate(factors):
        e = f"{prefix}.experts.{i}"
        if f.u is not None:
            out[f"{e}.u"], out[f"{e}.svh"] = f.u, f.svh
        else:
            out[f"{e}.weight"] = f.weight
        if b0 is not None:
            out[f"{e}.bias"] = f.bias
    return out
