"""SMILE: expert construction and the parameter-free router of one upscaled linear layer.

Paper: Tang et al., "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From Pre-Trained
Foundation Models", arXiv 2408.10174 (2024); FusionBench's ``smile_upscaling``.

Variant implemented, for a linear layer ``y = W_0 x + b_0`` and T fine-tuned versions ``(W_i, b_i)``:

- each task's delta ``dW_i = W_i - W_0`` is decomposed by a thin SVD ``dW_i = U_i S_i V_i^T`` (float32, or
  float64 for float64 weights);
- expert i is the rank-k truncation ``U_i[:, :k] S_i[:k] V_i[:, :k]^T`` plus the bias delta ``db_i = b_i - b_0``;
  ``k <= 0`` keeps the whole delta ``dW_i`` (full-rank expert); ``k`` larger than ``min(m, n)`` is capped there.
  It is stored as the two factors ``u = U_i[:, :k]`` and ``svh = S_i[:k] V_i[:, :k]^T`` when they hold fewer
  entries than the dense (m, n) matrix, else densely (:func:`effective_rank`);
- the router of task i is ``V_i[:, :gate_k]^T`` (its top ``gate_k`` right singular vectors, ``gate_k`` capped at
  ``min(m, n)``); the routing logit of input x is ``r_i = || V_i[:, :gate_k]^T x ||_2``;
- the routing weights are ``p = softmax(r)`` over all T experts; the ``top_k`` largest are kept and
  renormalised to sum to 1 (``lambda_i = p_i / sum_{j in topk} p_j``; the others get 0), as the authors' code
  (FusionBench 0.2.33) does; no scale or temperature on the logits (none there either);
- ``y = W_0 x + b_0 + sum_{i in topk} lambda_i (U_i S_i V_i^T x + db_i)``.

With one expert the weight is 1, so with ``k <= 0`` (or k >= rank) the layer equals the fine-tuned layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 weights, else float32 (the SVD of half-precision deltas is taken in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def truncation_rank(k: int, shape: tuple[int, ...]) -> int:
    """The number of singular triplets an expert keeps: ``min(k, m, n)``, or 0 for the whole delta (k <= 0)."""
    return 0 if k <= 0 else min(int(k), int(shape[0]), int(shape[1]))


def effective_rank(k: int, shape: tuple[int, ...]) -> int:
    """How an expert is stored: as the factors ``u`` (m, r) and ``svh`` (r, n) with r = :func:`truncation_rank`
    when they are smaller than the dense matrix (``r (m + n) < m n``), else densely (returns 0): the rank-r
    product (or the whole delta) as one (m, n) matrix. Same function either way; FusionBench always stores the
    factors, which for r close to min(m, n) holds up to twice the entries of the delta."""
    m, n = int(shape[0]), int(shape[1])
    r = truncation_rank(k, shape)
    return r if 0 < r and r * (m + n) < m * n else 0


def effective_gate_k(gate_k: int, shape: tuple[int, ...]) -> int:
    """Router rank: ``min(gate_k, m, n)`` (a thin SVD has no more right singular vectors)."""
    return min(int(gate_k), int(shape[0]), int(shape[1]))


@dataclass
class SmileFactors:
    """What the upscaled layer stores for one task: router rows, expert factors, bias delta.

    ``gate``: (gate_k, n) rows ``V_i[:, :gate_k]^T``. Low-rank expert: ``u`` (m, k) and ``svh`` (k, n);
    full-rank expert: ``weight`` (m, n) = dW_i. ``bias``: db_i (m,) or None.
    """

    gate: torch.Tensor
    u: torch.Tensor | None = None
    svh: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def smile_factors(w0: torch.Tensor, w: torch.Tensor, gate_k: int, k: int, b0: torch.Tensor | None = None,
                  b: torch.Tensor | None = None, routing_use_diff: bool = True) -> SmileFactors:
    """Router rows and expert of one task for one linear layer (results in the compute dtype).

    Args:
        w0: pretrained weight (m, n).
        w: the task's fine-tuned weight (m, n).
        gate_k: router rank (>= 1).
        k: expert rank; ``k <= 0`` keeps the full delta.
        b0, b: pretrained and fine-tuned biases (m,), or None.
        routing_use_diff: router rows from the SVD of the delta (the paper); False: from the SVD of ``w``
            itself (FusionBench's ``routing_use_diff=false``).
    """
    cd = compute_dtype(w0.dtype)
    dw = w.to(cd) - w0.to(cd)
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    g = effective_gate_k(gate_k, dw.shape)
    gate = vh[:g] if routing_use_diff else torch.linalg.svd(w.to(cd), full_matrices=False)[2][:g]
    out = SmileFactors(gate=gate.contiguous())
    r = truncation_rank(k, dw.shape)
    if effective_rank(k, dw.shape) > 0:
        out.u = u[:, :r].contiguous()
        out.svh = (s[:r, None] * vh[:r]).contiguous()
    elif 0 < r < min(dw.shape):  # the truncated delta, stored densely (smaller than its factors)
        out.weight = (u[:, :r] * s[:r]) @ vh[:r]
    else:
        out.weight = dw
    if b0 is not None and b is not None:
        out.bias = b.to(cd) - b0.to(cd)
    return out


def routing_logits(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``r[t, i] = || gate[i] x_t ||_2``: the norm of the projection of each input row on each task's router.

    Args:
        x: (N, n) inputs.
        gate: (T, gate_k, n) router rows of the T tasks.
    Returns:
        (N, T) logits.
    """
    t, g, n = gate.shape
    proj = F.linear(x, gate.reshape(t * g, n)).view(x.shape[0], t, g)
    return proj.norm(p=2, dim=-1)


def routing_weights(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, keep the ``top_k`` largest, renormalise them to sum to 1.

    Args:
        logits: (N, T) routing logits.
        top_k: experts per input (1 <= top_k <= T).
    Returns:
        (weights (N, top_k), expert indices (N, top_k)); the softmax is taken in float32 (or float64).
    """
    p = torch.softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)
    w, idx = torch.topk(p, top_k, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), idx
