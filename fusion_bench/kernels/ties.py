"""TIES-merging kernels: magnitude trim (exact k-th largest), sign election, disjoint merge.

Paper: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).

Variant implemented (:func:`ties_merge`), for task vectors tau_i = theta_i - theta_0:

1. **Trim**: keep the entries of tau_i whose magnitude is at least the magnitude threshold of
   model i, set the others to 0. The threshold is the k-th largest |tau_i| with
   ``k = keep_count(n, density)`` = round-half-up(density * n) over the n entries in scope: one
   tensor (``trim_scope='tensor'``, as mergekit) or the whole flattened task vector of the model
   (``'global'``, as the paper and FusionBench; the caller computes it with
   :class:`KthLargestSelector`, tensor by tensor). **Ties in magnitude**: every entry equal to the
   threshold is kept, so slightly more than k entries survive when magnitudes tie at the
   threshold; the result never depends on the order of entries. k = 0 keeps nothing.
2. **Elect** the sign per entry: ``'mass'`` (paper): gamma = sgn(sum_i trimmed tau_i);
   ``'count'``: gamma = sgn(sum_i sgn(trimmed tau_i)). When the vote is exactly 0 the elected
   sign is 0 and (as in the paper's Algorithm 1, where A^p = {t : sgn(tau_t^p) = gamma^p}) no
   non-zero entry agrees, so the merged entry is 0. (FusionBench replaces a zero sign by the
   majority sign of the whole vector; mergekit by +1. Both break the symmetry tau -> -tau.)
3. **Disjoint merge** over the agreeing entries A = {i : sgn(trimmed tau_i) = gamma, gamma != 0}:
   ``'mean'`` (paper): sum_{i in A} tau_i / |A| (0 when A is empty); ``'sum'``: the sum
   (FusionBench's ``merge_func=sum``); ``'max'``: gamma * max_{i in A} |tau_i|.
4. theta = theta_0 + lambda * merged.

All functions are pure; large tensors are processed in flat chunks with reused buffers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

SignElection = Literal["mass", "count"]
DisjointMerge = Literal["mean", "sum", "max"]

#: elements per chunk in the chunked kernels (bounded scratch memory, cache friendly)
CHUNK = 1 << 14


def keep_count(numel: int, density: float) -> int:
    """Number of entries kept by a top-``density`` trim of ``numel`` entries.

    k = floor(density * numel + 1/2) (round half up), clamped to [0, numel]; a tiny relative
    tolerance absorbs binary rounding of decimal densities (0.29 * 100 = 28.999999999999996).
    """
    return min(numel, max(0, math.floor(density * numel * (1 + 1e-12) + 0.5)))


# ----------------------------------------------------------------------------------------------
# exact k-th largest magnitude by radix selection over float bit patterns
# ----------------------------------------------------------------------------------------------
_BITS = {torch.float32: (torch.int32, 32), torch.float64: (torch.int64, 64)}
#: digits of smaller inputs are batched until this many, then counted with one bincount
_FLUSH = 1 << 18
#: kth_largest on at most this many values uses torch.kthvalue (same exact value, less overhead)
_SMALL = 1 << 16


class KthLargestSelector:
    """Exact k-th largest magnitude |x| of finite floats fed in several passes (radix select).

    Non-negative IEEE floats order like their bit patterns read as integers (the sign bit masked
    off gives the magnitude), so the k-th largest magnitude is found digit by digit, most significant 16 bits first: each pass counts, with
    ``torch.bincount``, the next 16-bit digit of the values whose higher digits equal the prefix
    found so far, and picks the digit that holds the k-th largest. float32 needs 2 passes, float64
    4. Memory is one 65536-bin histogram per stream, whatever the number of values, and the
    result is exact (it is one of the values).

    Several independent streams (e.g. one per model, each with its own k) share the passes, so a
    caller reads every tensor once per pass.

    Usage::

        sel = KthLargestSelector([k_0, k_1], torch.float32)
        while not sel.done:
            sel.start_pass()
            for tensor ...: sel.add(stream, values)     # finite, any shape; the sign is ignored
            sel.finish_pass()
        thresholds = sel.values()       # k-th largest |x|; +inf for k = 0, 0.0 when k > count

    Args:
        ks: k per stream (k >= 1 selects the k-th largest; k <= 0 gives +inf: nothing is >= it).
        dtype: float32 or float64: values are converted to it (exactly, when it is not narrower).
    """

    def __init__(self, ks: Sequence[int], dtype: torch.dtype = torch.float32):
        if dtype not in _BITS:
            raise ValueError(f"KthLargestSelector works on float32 or float64, not {dtype}")
        self.dtype = dtype
        self.int_dtype, self.nbits = _BITS[dtype]
        self._abs_mask = (1 << (self.nbits - 1)) - 1
        self.ks = [int(k) for k in ks]
        self._remaining = list(self.ks)
        self._prefix = [0] * len(self.ks)
        self._shift = self.nbits - 16  # shift of the digit counted in the current pass
        self._hist: list[torch.Tensor] = []
        self._active = [k > 0 for k in self.ks]
        self._exhausted = [False] * len(self.ks)  # k larger than the number of values
        self._total = [0] * len(self.ks)
        self._pass = 0

    @property
    def done(self) -> bool:
        return self._shift < 0 or not any(self._active)

    def start_pass(self) -> None:
        self._hist = [torch.zeros(1 << 16, dtype=torch.int64) for _ in self.ks]
        self._pending: list[list[torch.Tensor]] = [[] for _ in self.ks]
        self._pending_n = [0] * len(self.ks)

    def add(self, stream: int, values: torch.Tensor) -> None:
        if not self._active[stream]:
            return
        v = values.detach().reshape(-1)
        if v.dtype != self.dtype:
            v = v.to(self.dtype)
        if self._pass == 0:
            self._total[stream] += v.numel()
        bits = v.view(self.int_dtype)
        if self._pass == 0:  # the top digit without the sign bit: the magnitude's
            digit = (bits >> self._shift) & 0x7FFF
        else:  # magnitudes whose higher digits match the prefix found so far
            bits = bits & self._abs_mask
            bits = bits[(bits >> (self._shift + 16)) == self._prefix[stream]]
            digit = (bits >> self._shift) & 0xFFFF
        if digit.numel() >= _FLUSH:
            self._hist[stream] += torch.bincount(digit, minlength=1 << 16)
            return
        # small tensors: batch their digits, one bincount per ~_FLUSH values (bincount has a fixed cost)
        pend = self._pending[stream]
        pend.append(digit.to(torch.int32))
        self._pending_n[stream] += digit.numel()
        if self._pending_n[stream] >= _FLUSH:
            self._flush(stream)

    def _flush(self, stream: int) -> None:
        if self._pending[stream]:
            self._hist[stream] += torch.bincount(torch.cat(self._pending[stream]), minlength=1 << 16)
        self._pending[stream] = []
        self._pending_n[stream] = 0

    def finish_pass(self) -> None:
        for s in range(len(self.ks)):
            if self._active[s]:
                self._flush(s)
        for s, active in enumerate(self._active):
            if not active:
                continue
            k = self._remaining[s]
            if self._pass == 0 and k > self._total[s]:
                self._exhausted[s] = True
                self._active[s] = False
                continue
            h = self._hist[s]
            # counts of values with digit >= d, for every d (suffix sums)
            ge = h.flip(0).cumsum(0).flip(0)
            d = int((ge >= k).nonzero().max())  # the largest digit with at least k values >= it
            above = int(ge[d + 1]) if d + 1 < ge.numel() else 0
            self._remaining[s] = k - above
            self._prefix[s] = (self._prefix[s] << 16) | d
        self._shift -= 16
        self._pass += 1
        self._hist = []

    def values(self) -> list[float]:
        """The k-th largest value per stream (+inf when k <= 0; 0.0 when k exceeds the count)."""
        if not self.done:
            raise RuntimeError("KthLargestSelector.values() called before the last pass")
        out = []
        for s, k in enumerate(self.ks):
            if k <= 0:
                out.append(math.inf)
            elif self._exhausted[s]:
                out.append(0.0)
            else:
                bits = torch.tensor([self._prefix[s]], dtype=self.int_dtype)
                out.append(float(bits.view(self.dtype)[0]))
        return out


def kth_largest_abs(values: torch.Tensor, k: int) -> float:
    """Exact k-th largest magnitude |x| of a tensor of finite floats (+inf for k <= 0, 0.0 for k > numel).

    Radix selection (:class:`KthLargestSelector`) on the float bit patterns: two ``bincount``
    passes for float32, no sort (``torch.kthvalue`` for up to 65536 values: the same value).
    float16/bfloat16 values are widened to float32 (exactly).
    """
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    v = values.reshape(-1).to(dtype)
    n = v.numel()
    if k <= 0:
        return math.inf
    if k > n:
        return 0.0
    if n <= _SMALL:
        return float(v.abs().kthvalue(n - k + 1).values)
    sel = KthLargestSelector([k], dtype)
    while not sel.done:
        sel.start_pass()
        sel.add(0, v)
        sel.finish_pass()
    return sel.values()[0]


def magnitude_threshold(tau: torch.Tensor, density: float) -> float:
    """The trim threshold of one task vector: the k-th largest |tau| with k = keep_count(n, density)."""
    return kth_largest_abs(tau, keep_count(tau.numel(), density))


def trim(tau: torch.Tensor, density: float | None = None, threshold: float | None = None) -> torch.Tensor:
    """Keep the entries with |tau| >= threshold (default: the top-``density`` threshold of ``tau``)."""
    if threshold is None:
        if density is None:
            raise ValueError("trim needs density or threshold")
        threshold = magnitude_threshold(tau, density)
    return torch.where(tau.abs() >= threshold, tau, torch.zeros((), dtype=tau.dtype))


# ----------------------------------------------------------------------------------------------
# sign election + disjoint merge
# ----------------------------------------------------------------------------------------------
def elect_sign(taus: torch.Tensor, method: SignElection = "mass") -> torch.Tensor:
    """Elected sign per entry of stacked (already trimmed) task vectors ``taus`` (N, ...).

    ``mass``: sgn(sum_i tau_i); ``count``: sgn(sum_i sgn(tau_i)). 0 where the vote is exactly 0.
    """
    if method == "mass":
        return taus.sum(0).sign()
    if method == "count":
        return taus.sign().sum(0).sign()
    raise ValueError(f"unknown sign election {method!r}; use 'mass' or 'count'")


def disjoint_merge(taus: torch.Tensor, sign: torch.Tensor, merge: DisjointMerge = "mean") -> torch.Tensor:
    """Merge stacked task vectors (N, ...) over the entries whose sign equals the elected ``sign``.

    ``mean``: sum over agreeing entries / their count (0 if none); ``sum``: the sum; ``max``:
    sign * the largest agreeing magnitude. Entries where ``sign`` is 0 give 0.
    """
    agree = (taus * sign) > 0
    if merge == "max":
        return (taus.abs() * agree).amax(0) * sign
    total = (taus * agree).sum(0)
    if merge == "sum":
        return total
    if merge == "mean":
        return total / agree.sum(0).clamp_min(1)
    raise ValueError(f"unknown disjoint merge {merge!r}; use 'mean', 'sum' or 'max'")


def _shrink_level(threshold: float, dtype: torch.dtype) -> float:
    """hardshrink keeps |x| > lambda; the largest float of ``dtype`` below ``threshold`` keeps |x| >= threshold."""
    if threshold <= 0.0:
        return 0.0  # keep everything (zeros stay zero)
    t = torch.tensor(threshold, dtype=dtype)
    return float(torch.nextafter(t, torch.zeros((), dtype=dtype)))


def _chunked_sign_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], thresholds: Sequence[float] | None,
                        scaling_factor: float, sign_election: SignElection, merge: DisjointMerge,
                        transform=None) -> torch.Tensor:
    """theta_0 + lambda * disjoint_merge(elect(trimmed taus)), computed in flat chunks.

    Same arithmetic as :func:`elect_sign` + :func:`disjoint_merge`, arranged for speed: chunks of
    :data:`CHUNK` entries stay in cache, scratch buffers are reused, the trim is one ``hardshrink``
    per model, and agreement uses relu(tau_i * gamma) (> 0 exactly where tau_i agrees with gamma != 0).
    ``transform(i, tau_i)`` (optional) replaces the whole task vector of model i before the trim
    (DARE uses it); it is applied to whole tensors, so random draws do not depend on the chunking.
    """
    n = len(tensors)
    flat_base = base.reshape(-1)
    numel = flat_base.numel()
    out = torch.empty_like(flat_base)
    if transform is not None:
        flats = [transform(i, t - base).reshape(-1) for i, t in enumerate(tensors)]
    else:
        flats = [t.reshape(-1) for t in tensors]
    size = min(CHUNK, max(numel, 1))
    buf = torch.empty((n, size), dtype=base.dtype)
    work = torch.empty((n, size), dtype=base.dtype)
    levels = None
    if thresholds is not None:
        levels = [_shrink_level(float(t), base.dtype) if math.isfinite(t) else math.inf for t in thresholds]
    for start in range(0, numel, size):
        stop = min(numel, start + size)
        c = stop - start
        taus, w = buf[:, :c], work[:, :c]
        b = flat_base[start:stop]
        for i in range(n):
            row = taus[i]
            if transform is not None:
                row.copy_(flats[i][start:stop])
            else:
                torch.sub(flats[i][start:stop], b, out=row)
            if levels is not None:
                if levels[i] == math.inf:
                    row.zero_()
                elif levels[i] > 0.0:
                    torch.ops.aten.hardshrink.out(row, levels[i], out=row)
        if sign_election == "mass":
            sign = taus.sum(0).sign_()
        elif sign_election == "count":
            sign = torch.sign(taus, out=w).sum(0).sign_()
        else:
            raise ValueError(f"unknown sign election {sign_election!r}; use 'mass' or 'count'")
        torch.mul(taus, sign, out=w)
        w.relu_()  # |tau_i| where tau_i agrees with the elected sign, else 0
        if merge == "max":
            merged = w.amax(0).mul_(sign)
        elif merge in ("sum", "mean"):
            merged = w.sum(0).mul_(sign)
            if merge == "mean":
                merged.div_(w.sign_().sum(0).clamp_(min=1))
        else:
            raise ValueError(f"unknown disjoint merge {merge!r}; use 'mean', 'sum' or 'max'")
        torch.add(b, merged, alpha=scaling_factor, out=out[start:stop])
    return out.reshape(base.shape)


def ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, density: float = 0.2,
               scaling_factor: float = 0.3, thresholds: Sequence[float] | None = None,
               sign_election: SignElection = "mass", merge: DisjointMerge = "mean") -> torch.Tensor:
    """TIES-merging of one tensor: trim, elect sign, disjoint merge, add to the base.

    Paper: Yadav et al., NeurIPS 2023 (see the module docstring for the exact variant: trim keeps
    |tau_i| >= the k-th largest magnitude, ties at the threshold kept; sign by total mass; mean
    over agreeing non-zero entries; a zero vote gives 0).

    Args:
        base: theta_0 (float32/float64).
        tensors: theta_i of the N models, same shape and dtype as ``base``.
        density: fraction of entries of each task vector kept when ``thresholds`` is None (the
            per-tensor trim: k = keep_count(numel, density) largest magnitudes of this tensor).
        scaling_factor: lambda.
        thresholds: per-model magnitude thresholds (e.g. whole-model thresholds of the global
            trim); entries with |tau_i| >= thresholds[i] are kept. Overrides ``density``.
        sign_election: 'mass' (paper) or 'count'.
        merge: 'mean' (paper), 'sum' or 'max'.
    """
    if thresholds is None:
        k = keep_count(base.numel(), density)
        thresholds = [kth_largest_abs(t - base, k) for t in tensors]
    elif len(thresholds) != len(tensors):
        raise ValueError(f"ties_merge got {len(thresholds)} thresholds for {len(tensors)} tensors")
    return _chunked_sign_merge(base, tensors, thresholds, scaling_factor, sign_election, merge)
