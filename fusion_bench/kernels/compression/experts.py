"""Expert pruning and dynamic expert skipping for top-k mixture-of-experts layers (Mixtral, Qwen2-MoE).

Paper: Lu et al., "Not All Experts are Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts
Large Language Models" (ACL 2024, arXiv 2402.14800).

- Expert pruning (their Sec. 3.1): for one MoE layer with ``n`` experts, keep the subset ``S`` of ``r`` experts
  that minimises the reconstruction loss ``||F(X) - F_S(X)||_F`` over the calibration tokens ``X``, where ``F``
  is the layer's routed output and ``F_S`` the same layer with the other experts removed (the router's logits of
  removed experts dropped, so the softmax and the top-k run over ``S``). Every one of the ``C(n, r)`` subsets is
  enumerated. Here the loss is the Frobenius norm over **all** calibration tokens (the paper's objective);
  FusionBench 0.2.33 sums per-batch norms, which can pick another subset when batches differ.
  *Layer-wise* pruning uses each layer's inputs from the unpruned model; *progressive* pruning feeds each
  layer the outputs of the already pruned earlier layers.
- Dynamic skipping (their Sec. 3.2), for top-2 routing: with routing weights ``w_1 >= w_2`` of a token, the
  second expert is skipped when ``w_2 < beta * w_1`` (its weight set to 0 and the kept weight renormalised to
  1); ``beta`` of a layer is the median of ``w_2 / w_1`` over the calibration tokens.

Routing convention (Mixtral, and Qwen2-MoE with ``norm_topk_prob``): ``p = softmax(logits)``, top-k of ``p``,
the k weights renormalised to sum 1 when ``normalize``. The shared expert of Qwen2-MoE is not routed and
cancels in the loss.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch


def route(logits: torch.Tensor, top_k: int, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, indices)`` (tokens, k) of top-k softmax routing (float32)."""
    p = torch.softmax(logits.float(), dim=-1)
    w, idx = torch.topk(p, top_k, dim=-1)
    if normalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, idx


def routed_output(expert_outputs: torch.Tensor, logits: torch.Tensor, top_k: int, keep: list[int] | None = None,
                  normalize: bool = True) -> torch.Tensor:
    """The routed MoE output ``sum_k w_k E_{i_k}(x)`` (tokens, hidden), float32.

    Args:
        expert_outputs: ``E_e(x)`` for every expert (tokens, n_experts, hidden).
        logits: router logits (tokens, n_experts).
        top_k: experts per token.
        keep: experts kept (None: all); the others' logits are dropped before the softmax.
        normalize: renormalise the top-k weights to sum 1.
    """
    if keep is not None:
        keep_t = torch.as_tensor(list(keep), dtype=torch.long, device=logits.device)
        logits = logits.index_select(1, keep_t)
        expert_outputs = expert_outputs.index_select(1, keep_t)
    w, idx = route(logits, top_k, normalize)
    chosen = torch.gather(expert_outputs.float(), 1, idx.unsqueeze(-1).expand(-1, -1, expert_outputs.shape[-1]))
    return (w.unsqueeze(-1) * chosen).sum(dim=1)


class ExpertSubsetLoss:
    """Accumulates ``||F(X) - F_S(X)||_F^2`` for every subset ``S`` of ``r`` experts over batches of tokens."""

    def __init__(self, n_experts: int, r: int, top_k: int, normalize: bool = True):
        if not top_k <= r <= n_experts:
            raise ValueError(f"need top_k ({top_k}) <= experts kept ({r}) <= experts ({n_experts})")
        self.subsets = [list(s) for s in itertools.combinations(range(n_experts), r)]
        self.sq = torch.zeros(len(self.subsets), dtype=torch.float64)
        self.top_k = top_k
        self.normalize = normalize
        self.tokens = 0

    def add(self, expert_outputs: torch.Tensor, logits: torch.Tensor) -> None:
        full = routed_output(expert_outputs, logits, self.top_k, None, self.normalize)
        for j, s in enumerate(self.subsets):
            d = (full - routed_output(expert_outputs, logits, self.top_k, s, self.normalize)).double()
            self.sq[j] += float((d * d).sum())
        self.tokens += logits.shape[0]

    def losses(self) -> dict[tuple[int, ...], float]:
        """Subset -> Frobenius loss ``sqrt(sum of squares)``."""
        return {tuple(s): float(v) ** 0.5 for s, v in zip(self.subsets, self.sq)}

    def best(self) -> list[int]:
        """The subset with the smallest loss (the first in lexicographic order on ties)."""
        return self.subsets[int(torch.argmin(self.sq))]


def all_expert_outputs(x: torch.Tensor, expert_fn: Callable[[int, torch.Tensor], torch.Tensor],
                       n_experts: int) -> torch.Tensor:
    """``E_e(x)`` for every expert: (tokens, n_experts, hidden)."""
    return torch.stack([expert_fn(e, x) for e in range(n_experts)], dim=1)


def skip_ratios(logits: torch.Tensor) -> torch.Tensor:
    """``w_2 / w_1`` of the two largest softmax probabilities of every token (float32): the statistic whose
    median is the layer's skipping threshold ``beta``."""
    p = torch.softmax(logits.float(), dim=-1)
    top = torch.topk(p, 2, dim=-1).values
    return top[:, 1] / top[:, 0]


def skip_second(weights: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic skipping on top-2 routing ``weights`` (tokens, 2), sorted descending: the second weight becomes 0
    where ``w_2 < beta * w_1`` and the row is renormalised to its original sum. Returns (new weights, skipped mask)."""
    skipped = weights[:, 1] < beta * weights[:, 0]
    total = weights.sum(dim=-1, keepdim=True)
    w = weights.clone()
    w[skipped, 1] = 0
    w = w / w.sum(dim=-1, keepdim=True) * total
    return w, skipped
