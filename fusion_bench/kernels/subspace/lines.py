"""LiNeS: layer-increasing network scaling of a (merged) task vector (Wang et al., ICLR 2025, "LiNeS:
Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging", arXiv 2410.17146).

Exact variant (the paper and its official code): the task vector of a tensor in residual block l
(0-based, l = 0..L-1) is multiplied by lambda(l) = alpha + beta * l / (L - 1) -- the paper's
alpha + beta (l-1)/(L-1) with 1-based l -- and every tensor outside the numbered blocks (embeddings,
final norm, heads) by alpha, the shallow value. For multi-task merging the paper sets
alpha = (||sum_i tau_i||_1 / ||tau_MTL||_1) / N, with tau_MTL the base method's merged task vector and
N the number of tasks (L1 norms over the whole model), and tunes beta on validation data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: block naming schemes: layers.N. (Llama, CLIP HF), layer.N. (BERT), h.N. (GPT-2), resblocks.N.
#: (OpenCLIP), blocks.N. (timm), block.N. (T5)
DEFAULT_LAYER_PATTERN = r"(?:^|\.)(?:layers|layer|h|resblocks|blocks|block)\.(\d+)(?:\.|$)"


def compile_layer_pattern(pattern: str | None) -> re.Pattern:
    """The regex whose first group is the block number (``None`` or '': :data:`DEFAULT_LAYER_PATTERN`)."""
    rx = re.compile(pattern or DEFAULT_LAYER_PATTERN)
    if rx.groups < 1:
        raise ValueError(f"layer pattern {pattern!r} has no capturing group for the layer number")
    return rx


def layer_index(key: str, pattern: re.Pattern | str | None = None) -> int | None:
    """The block number of tensor ``key`` (the leftmost match), or None outside numbered blocks."""
    rx = pattern if isinstance(pattern, re.Pattern) else compile_layer_pattern(pattern)
    m = rx.search(key)
    return int(m.group(1)) if m else None


def num_layers(keys: Iterable[str], pattern: re.Pattern | str | None = None) -> int:
    """L = 1 + the largest block number among ``keys`` (0 when none is numbered)."""
    rx = pattern if isinstance(pattern, re.Pattern) else compile_layer_pattern(pattern)
    idx = [i for i in (layer_index(k, rx) for k in keys) if i is not None]
    return max(idx) + 1 if idx else 0


def lines_scale(layer: int | None, n_layers: int, alpha: float, beta: float) -> float:
    """lambda(l) = alpha + beta * l / (L - 1) for block l of L (0-based); alpha outside the blocks
    (``layer`` None) and for a model with a single block."""
    if layer is None or n_layers <= 1:
        return alpha
    return alpha + beta * layer / (n_layers - 1)


def auto_alpha(l1_summed: float, l1_merged: float, n_tasks: int) -> float:
    """The paper's multi-task alpha: (||sum_i tau_i||_1 / ||tau_MTL||_1) / N (1/N when tau_MTL is 0)."""
    ratio = l1_summed / l1_merged if l1_merged > 0.0 else 1.0
    return ratio / n_tasks
