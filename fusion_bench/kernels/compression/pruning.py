"""Pruning masks for linear weights: magnitude, random and Wanda scores; unstructured and N:M selection.

Papers:
- magnitude: Han et al., "Learning both Weights and Connections for Efficient Neural Networks" (NeurIPS
  2015), as the baseline of Wanda and SparseGPT: score ``|W_ij|``, the smallest scores of one **layer**
  (the whole weight matrix) are removed.
- Wanda: Sun et al., "A Simple and Effective Pruning Approach for Large Language Models" (ICLR 2024,
  arXiv 2306.11695): score ``S_ij = |W_ij| * ||X_j||_2`` where ``X_j`` is input feature ``j`` over every
  calibration token; the comparison group is the **output row** (each row loses the same number of weights).
- random: scores drawn uniformly from a seeded generator (the sanity baseline).

Variants implemented (all exact to those definitions):
- unstructured, group ``row``: in every row of the ``(out, in)`` weight, the ``floor(in * sparsity)`` entries
  with the smallest scores are pruned; group ``layer``: the ``floor(out * in * sparsity)`` smallest of the
  whole matrix. Ties are broken by position (stable sort: the earlier index is pruned first), so the number
  pruned is exactly the target (the reference codes' ``score <= threshold`` can prune more on ties).
- N:M semi-structured, written ``N:M`` as in the Wanda and SparseGPT code and FusionBench (``2:4``): in every
  group of ``M`` consecutive input weights of a row, the ``N`` with the smallest scores are pruned. For 2:4 and
  4:8 this is the same pattern as NVIDIA's "N nonzeros of M". ``in`` must be a multiple of ``M``.

Masks are boolean tensors, True where a weight is **pruned** (set to zero).
"""

from __future__ import annotations

import torch


def parse_nm(nm: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; None or ``""`` -> None. Raises ValueError for anything else."""
    if nm is None or str(nm).strip().lower() in ("", "none", "null"):
        return None
    parts = str(nm).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"N:M pattern {nm!r} is not of the form 'N:M' (e.g. '2:4')")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ValueError(f"N:M pattern {nm!r} needs 0 < N < M")
    return n, m


def unstructured_mask(scores: torch.Tensor, sparsity: float, group: str = "row") -> torch.Tensor:
    """Prune the lowest ``sparsity`` fraction of ``scores`` (2-D ``(out, in)``) per ``group`` ('row' | 'layer').

    Returns a boolean mask, True = pruned; exactly ``floor(in * sparsity)`` per row or
    ``floor(numel * sparsity)`` per layer are True.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (out, in), got shape {tuple(scores.shape)}")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    s = scores.float()
    mask = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    if group == "row":
        k = int(s.shape[1] * sparsity)
        if k:
            idx = torch.sort(s, dim=1, stable=True).indices[:, :k]
            mask.scatter_(1, idx, True)
    elif group == "layer":
        k = int(s.numel() * sparsity)
        if k:
            idx = torch.sort(s.flatten(), stable=True).indices[:k]
            mask.view(-1)[idx] = True
    else:
        raise ValueError(f"group must be 'row' or 'layer', got {group!r}")
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask: in each group of ``m`` consecutive input columns of each row, the ``n`` smallest scores are
    pruned (True). ``scores.shape[1]`` must be a multiple of ``m``."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (out, in), got shape {tuple(scores.shape)}")
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pruning needs the input size ({cols}) to be a multiple of M={m}")
    g = scores.float().reshape(rows, cols // m, m)
    idx = torch.sort(g, dim=2, stable=True).indices[:, :, :n]
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask.scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def select_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, group: str) -> torch.Tensor:
    """N:M mask when ``nm`` is given, else the unstructured mask of ``group``."""
    return nm_mask(scores, *nm) if nm is not None else unstructured_mask(scores, sparsity, group)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``|W|`` in float32."""
    return weight.float().abs()


def random_scores(shape: tuple[int, ...] | torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Uniform [0, 1) float32 scores from ``generator`` (CPU)."""
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float32)


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's ``|W_ij| * ||X_j||_2`` for ``weight`` (out, in) and ``input_sq_norms`` (in,) = ``sum_t x_tj^2``
    over the calibration tokens (any positive rescaling of it gives the same masks)."""
    if input_sq_norms.shape != (weight.shape[1],):
        raise ValueError(f"input norms of shape {tuple(input_sq_norms.shape)} do not match weight "
                         f"{tuple(weight.shape)}")
    return weight.float().abs() * input_sq_norms.float().sqrt().unsqueeze(0)


def apply_mask_(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the pruned entries of ``weight`` in place (dtype kept); returns it."""
    return weight.masked_fill_(mask.to(weight.device), 0)


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return float((weight == 0).sum().item()) / max(1, weight.numel())


def nm_ok(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive input weights of every row has at least ``n`` zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(dim=2)
    return bool((zeros >= n).all())
