"""BitDelta: a fine-tune's weight delta as its sign bits and one scale per matrix.

Liu et al. 2024, "BitDelta: Your Fine-Tune May Only Be Worth One Bit" (arXiv 2402.10193). For a weight
matrix of the base ``W_base`` and of the fine-tune ``W_ft``, the delta ``D = W_ft - W_base`` is replaced by

    D_hat = alpha * S,   S = sign(D) in {-1, +1},   alpha = mean |D|   (the initial scale)

``alpha = mean|D|`` minimises ``||D - alpha S||_2`` for that ``S`` (``<D, S> / n``). Zero entries of ``D``
get ``+1``, as the authors' code does (a bit must hold one of the two values). The paper then refines each
``alpha`` by distillation (see :mod:`fusion_bench.methods.compression.bitdelta`); these kernels hold the
math: the bits, the initial scale, the rebuilt weight, and the packing of the bits (8 per byte) that the
stored delta and its byte count use. Arithmetic in float32; the rebuilt weight is rounded once to the
base's dtype.
"""

from __future__ import annotations

import math

import torch


def sign_bits(delta: torch.Tensor) -> torch.Tensor:
    """The sign bits of a delta: True for ``+1`` (``delta >= 0``), False for ``-1``."""
    return delta >= 0


def initial_scale(delta: torch.Tensor) -> torch.Tensor:
    """``mean |delta|`` in float32 (0-d): the L2-optimal scale for ``sign(delta)``."""
    return delta.float().abs().mean()


def compress(base: torch.Tensor, finetuned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bits, alpha)`` of ``finetuned - base`` (computed in float32)."""
    if base.shape != finetuned.shape:
        raise ValueError(f"base {tuple(base.shape)} and fine-tune {tuple(finetuned.shape)} differ in shape")
    delta = finetuned.float() - base.float()
    return sign_bits(delta), initial_scale(delta)


def signs(bits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``+1`` / ``-1`` of the bits, in ``dtype``."""
    return bits.to(dtype) * 2 - 1


def rebuild(base: torch.Tensor, bits: torch.Tensor, alpha: torch.Tensor | float,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """``base + alpha * S`` in float32, rounded once to ``dtype`` (default: the base's)."""
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=base.device)
    out = base.float() + alpha * signs(bits, torch.float32)
    return out.to(dtype or base.dtype)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Flattened bits packed 8 per byte (uint8, ``ceil(n / 8)`` bytes): element ``8j + i`` is bit ``i``
    (least significant first) of byte ``j``; the last byte is padded with zeros."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = (2 ** torch.arange(8, dtype=torch.int32, device=flat.device))
    return (flat.view(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The bool tensor of ``shape`` that :func:`pack_bits` packed."""
    n = math.prod(shape)
    if packed.numel() != packed_nbytes(n):
        raise ValueError(f"{packed.numel()} packed bytes do not hold {n} bits (need {packed_nbytes(n)})")
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32)[:, None] >> shifts) & 1
    return bits.reshape(-1)[:n].bool().reshape(tuple(shape))


def packed_nbytes(numel: int) -> int:
    """Bytes of ``numel`` packed bits."""
    return (int(numel) + 7) // 8


__all__ = ["compress", "initial_scale", "pack_bits", "packed_nbytes", "rebuild", "sign_bits", "signs", "unpack_bits"]
