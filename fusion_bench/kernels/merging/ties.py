"""TIES-merging kernels: magnitude trim (exact k-th largest), sign election, disjoint merge.

Paper: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).

Variant implemented (:func:`ties_merge`), for task vectors tau_i = theta_i - theta_0:

1. **Trim**: keep exactly the k largest |tau_i| of model i, set the others to 0, with
   ``k = keep_count(n, density)`` = round-half-up(density * n) over the n entries in scope: one
   tensor (``trim_scope='tensor'``, as mergekit) or the whole flattened task vector of the model
   (``'global'``, as the paper and FusionBench; the caller finds the threshold with
   :class:`KthLargestSelector`, tensor by tensor). The threshold T is the k-th largest |tau_i|:
   every entry with |tau_i| > T is kept; **ties in magnitude** at T are kept lower flat index first
   until k entries are kept (:func:`exact_k_cut`; in the global scope the tensors are taken in the
   sorted order of their names, then by flat index). Without that tie-break (``tie_ends`` omitted
   with explicit thresholds, FusionBench's ``>=`` rule) every entry tied at T is kept. k = 0 keeps
   nothing.
2. **Elect** the sign per entry: ``'mass'`` (paper): gamma = sgn(sum_i trimmed tau_i);
   ``'count'``: gamma = sgn(sum_i sgn(trimmed tau_i)). When the vote is exactly 0 the elected
   sign is 0 and (as in the paper's Algorithm 1, where A^p = {t : sgn(tau_t^p) = gamma^p}) no
   non-zero entry agrees, so the merged entry is 0. (FusionBench replaces a zero sign by the
   majority sign of the whole vector; mergekit by +1. Both break the symmetry tau -> -tau.
   ``zero_sign`` gives FusionBench's rule: the sign used where the vote is 0, computed by the
   caller with :func:`vote_sign_total` over the whole model.)
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

import numpy as np
import torch

SignElection = Literal["mass", "count"]
DisjointMerge = Literal["mean", "sum", "max"]

#: entries per chunk in the chunked kernels: below torch's parallel grain size (32768), so each op
#: runs serially in its thread; bounded scratch memory, cache friendly
CHUNK = 1 << 14
#: tensors with at least this many entries per worker are split across Python threads
PARALLEL_MIN = 1 << 18


def keep_count(numel: int, density: float) -> int:
    """Number of entries kept by a top-``density`` trim of ``numel`` entries.

    k = floor(density * numel + 1/2) (round half up), clamped to [0, numel]; a tiny relative
    tolerance absorbs binary rounding of decimal densities (0.29 * 100 = 28.999999999999996).
    """
    return min(numel, max(0, math.floor(density * numel * (1 + 1e-12) + 0.5)))


def keep_count_fusionbench(numel: int, density: float) -> int:
    """FusionBench's keep count: its ``topk_values_mask`` keeps |x| >= the (n - int(n * K))-th smallest
    magnitude, i.e. the k-th largest with k = int(n * K) + 1 (plain float product, truncated; K = the
    threshold in percent / 100). Raises ValueError where FusionBench's ``kthvalue`` fails (k > n)."""
    k = int(numel * density) + 1
    if k > numel:
        raise ValueError(f"FusionBench's trim keeps int(n*K)+1 = {k} of n = {numel} entries: more than there are "
                         "(its kthvalue(0) fails); use a threshold below 100")
    return k


# ----------------------------------------------------------------------------------------------
# exact k-th largest magnitude by radix selection over float bit patterns
# ----------------------------------------------------------------------------------------------
_BITS = {torch.float32: (torch.int32, 32), torch.float64: (torch.int64, 64)}
#: top 16 bits of +inf (largest digit a finite or infinite magnitude can have)
_INF_DIGIT = {torch.float32: 0x7F80, torch.float64: 0x7FF0}
#: digits of smaller inputs are batched until this many, then counted with one bincount
_FLUSH = 1 << 20
#: kth_largest_abs on at most this many values uses torch.kthvalue (same exact value, less overhead)
_SMALL = 1 << 16
#: entries per op in the serial loops (below torch's parallel grain size of 32768)
_SERIAL_CHUNK = 32767
#: sampling pass: every SAMPLE_STRIDE-th entry (a prime, so that it does not alias with row lengths;
#: large enough that the pass skips most cache lines)
SAMPLE_STRIDE = 127
#: widest bracket, in top-16-bit digits (its histogram has MAX_BRACKET * 65536 bins)
MAX_BRACKET = 32
#: streams with fewer values than this skip the sampling pass (plain radix select)
MIN_SAMPLED = 1 << 22


def _finite_chunk(t: torch.Tensor) -> bool:
    """No NaN/inf in ``t``: a finite sum proves it (NaN and inf propagate); an overflowing sum is
    re-checked exactly."""
    if math.isfinite(float(t.sum())):
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _bracket_range(x: torch.Tensor, b: torch.Tensor | None, int_dtype: torch.dtype, abs_mask: int, lo: int, hi: int,
                   shift: int) -> tuple[int, list[torch.Tensor], bool]:
    """For values v = x - b (or x when ``b`` is None), in the dtype of ``b`` (or of x):
    (number of |v| with bit pattern >= hi, the bins (p - lo) >> shift of the magnitude patterns p
    in [lo, hi), whether every v was finite), in serial chunks with reused buffers."""
    n = x.numel()
    size = min(max(n, 1), _SERIAL_CHUNK)
    dtype = b.dtype if b is not None else x.dtype
    v_full = torch.empty(size, dtype=dtype)
    a_full = torch.empty(size, dtype=int_dtype)
    hi_full = torch.empty(size, dtype=torch.bool)
    in_full = torch.empty(size, dtype=torch.bool)
    above = 0
    inside: list[torch.Tensor] = []
    for start in range(0, n, size):
        c = min(size, n - start)
        v, a, m_hi, m_in = v_full[:c], a_full[:c], hi_full[:c], in_full[:c]
        v.copy_(x[start:start + c])  # widen first: faster than a mixed-dtype subtraction
        if b is not None:
            v.sub_(b[start:start + c])
        if not _finite_chunk(v):
            return above, inside, False
        torch.bitwise_and(v.view(int_dtype), abs_mask, out=a)
        torch.ge(a, hi, out=m_hi)
        above += int(torch.count_nonzero(m_hi))
        torch.ge(a, lo, out=m_in)
        m_in.logical_xor_(m_hi)  # lo <= pattern < hi  (hi >= lo, so ">= hi" implies ">= lo")
        sel = a[m_in]
        if sel.numel():
            sel.sub_(lo)
            inside.append(sel >> shift if shift else sel)
    return above, inside, True


class KthLargestSelector:
    """Exact k-th largest magnitude |x| of finite floats fed in several passes over the data.

    Non-negative IEEE floats order like their bit patterns read as integers (masking off the sign
    bit gives the magnitude), so the k-th largest magnitude can be found on the integer patterns:

    - **Radix select** (always exact, bounded memory): each pass counts, with ``torch.bincount``,
      the next 16-bit digit of the patterns whose higher digits equal the prefix found so far and
      keeps the digit holding the k-th largest: 2 passes for float32, 4 for float64; memory is one
      65536-bin histogram per stream.
    - **Sample and bracket** (float32, when ``totals`` are given and large): pass 1 reads only
      every ``sample_stride``-th value (the caller slices its inputs with :attr:`stride`) and
      estimates from their top-digit histogram a range of top digits that holds the k-th largest
      with a wide margin (5 standard deviations of the sampling error plus 16 values); pass 2 reads
      everything, counts the values above the range and histograms the bit patterns inside it
      (at most MAX_BRACKET x 65536 bins; the full patterns when the range spans at most
      MAX_BRACKET digits, which gives the k-th largest exactly however many values tie, else
      bins of 2^s patterns and one more radix pass inside the bin). If the rank falls outside the
      range, the stream falls back to radix select. The answer is the same exact value either way;
      only the number of passes differs (a cheap sampling pass + 1 full pass in the common case).

    Several independent streams (e.g. one per model, each with its own k) share the passes, so a
    caller reads every tensor once per pass.

    Usage::

        sel = KthLargestSelector([k_0, k_1], torch.float32, totals=[n_0, n_1])
        while not sel.done:
            sel.start_pass()
            for tensor ...:  # finite values, any shape; the sign is ignored
                sel.add(stream, values.reshape(-1)[::sel.stride])
                # or, for differences: sel.add_delta(stream, x, base)  (whole tensors; no temporary)
            sel.finish_pass()
        thresholds = sel.values()       # k-th largest |x|; +inf for k = 0, 0.0 when k > count

    Args:
        ks: k per stream (k >= 1 selects the k-th largest; k <= 0 gives +inf: nothing is >= it).
        dtype: float32 or float64: values are converted to it (exactly, when it is not narrower).
        totals: the number of values of each stream (enables the sampling pass; optional).
        sample_stride: the sampling pass reads every ``sample_stride``-th value (1 disables it;
            default :data:`SAMPLE_STRIDE`).
        min_sampled: streams smaller than this are not sampled (all must be large enough; default
            :data:`MIN_SAMPLED`).
    """

    def __init__(self, ks: Sequence[int], dtype: torch.dtype = torch.float32, totals: Sequence[int] | None = None,
                 sample_stride: int | None = None, min_sampled: int | None = None):
        if dtype not in _BITS:
            raise ValueError(f"KthLargestSelector works on float32 or float64, not {dtype}")
        self.dtype = dtype
        self.int_dtype, self.nbits = _BITS[dtype]
        self._abs_mask = (1 << (self.nbits - 1)) - 1
        self._top = self.nbits - 16  # shift of the top digit
        self.ks = [int(k) for k in ks]
        m = len(self.ks)
        self._totals = [int(t) for t in totals] if totals is not None else None
        self._result: list[float | None] = [None] * m
        for s, k in enumerate(self.ks):
            if k <= 0:
                self._result[s] = math.inf
            elif self._totals is not None and k > self._totals[s]:
                self._result[s] = 0.0
        open_streams = [s for s in range(m) if self._result[s] is None]
        sample_stride = SAMPLE_STRIDE if sample_stride is None else sample_stride
        min_sampled = MIN_SAMPLED if min_sampled is None else min_sampled
        sampling = (dtype == torch.float32 and self._totals is not None and sample_stride > 1 and bool(open_streams)
                    and all(self._totals[s] >= min_sampled for s in open_streams))
        self.sample_stride = int(sample_stride)
        self._phase = "sample" if sampling else "radix"
        self.passes = 0
        # radix state per stream: rank still to find, prefix of the pattern found so far (None: none
        # yet), shift and width of the digit counted next
        self._remaining = list(self.ks)
        self._prefix: list[int | None] = [None] * m
        self._rshift = [self._top] * m
        self._dbits = [16] * m
        # bracket state: magnitude patterns [lo, hi) per stream, histogram bin width 2^bin_shift
        self._lo = [0] * m
        self._hi = [0] * m
        self._bin_shift = [0] * m
        self._above = [0] * m
        self._seen = [0] * m
        # per stream, once found: (entries equal to the answer that the top k holds, entries equal to it)
        self._ties: list[tuple[int, int] | None] = [None] * m

    @property
    def done(self) -> bool:
        return all(r is not None for r in self._result)

    @property
    def stride(self) -> int:
        """Feed every ``stride``-th value in the current pass (> 1 only in the sampling pass)."""
        return self.sample_stride if self._phase == "sample" else 1

    def start_pass(self) -> None:
        m = len(self.ks)
        # histograms are numpy arrays: their bookkeeping is serial and cheap (no thread pool); in the
        # bracket pass they count the bins of the bracket (at most MAX_BRACKET * 65536)
        self._nbins = [1 << 16] * m
        if self._phase == "bracket":
            self._nbins = [(self._hi[s] - self._lo[s]) >> self._bin_shift[s] for s in range(m)]
        self._hist = [np.zeros(nb, dtype=np.int64) if self._result[s] is None else np.zeros(0, dtype=np.int64)
                      for s, nb in enumerate(self._nbins)]
        self._pending: list[list[torch.Tensor]] = [[] for _ in range(m)]
        self._pending_n = [0] * m
        self._seen = [0] * m
        if self._phase == "bracket":
            self._above = [0] * m

    def add(self, stream: int, values: torch.Tensor) -> None:
        """Count ``values`` (their magnitudes) for ``stream`` in the current pass."""
        if self._result[stream] is not None:
            return
        v = values.detach().reshape(-1)
        if v.dtype != self.dtype:
            v = v.to(self.dtype)
        self._seen[stream] += v.numel()
        if self._phase == "bracket":
            self._bracket_add(stream, v)
            return
        bits = v.view(self.int_dtype)
        prefix = self._prefix[stream]
        if self._phase == "sample" or prefix is None:
            self._count(stream, (bits >> self._top) & 0x7FFF)  # top digit of the magnitude
            return
        shift, width = self._rshift[stream], self._dbits[stream]
        ab = bits & self._abs_mask
        ab = ab[(ab >> (shift + width)) == prefix]  # magnitudes whose higher digits match the prefix
        self._count(stream, (ab >> shift) & ((1 << width) - 1))

    def add_delta(self, stream: int, x: torch.Tensor, base: torch.Tensor) -> bool:
        """Count the magnitudes of x - base (computed here in the selector's dtype, chunk by chunk in
        the bracket pass: no full-size temporary) for ``stream``; pass whole tensors (``base`` best
        already in the selector's dtype when :attr:`stride` is 1: it is shared by the streams), the
        selector applies :attr:`stride` itself. Returns False if a difference is NaN/inf in a full
        pass (nothing is counted from that tensor then; the caller should raise)."""
        if self._result[stream] is not None:
            return True
        x = x.detach().reshape(-1)
        b = base.detach().reshape(-1)
        st = self.stride
        if st > 1:  # sampling pass: widen only the sampled entries
            self.add(stream, x[::st].to(self.dtype) - b[::st].to(self.dtype))
            return True
        if b.dtype != self.dtype:
            b = b.to(self.dtype)
        if self._phase == "bracket":
            self._seen[stream] += x.numel()
            return self._bracket_add(stream, x, b)
        else:
            d = x.to(self.dtype, copy=True).sub_(b)
            if not _finite_chunk(d):
                return False
        self.add(stream, d)
        return True

    def _bracket_add(self, stream: int, x: torch.Tensor, b: torch.Tensor | None = None) -> bool:
        """Count patterns >= hi and histogram those in [lo, hi) (split across threads when large)."""
        lo, hi, sh = self._lo[stream], self._hi[stream], self._bin_shift[stream]
        parts = parallel_ranges(x.numel(), lambda a, z: _bracket_range(
            x[a:z], b[a:z] if b is not None else None, self.int_dtype, self._abs_mask, lo, hi, sh))
        if not all(p[2] for p in parts):
            return False
        for above, inside, _ in parts:
            self._above[stream] += above
            for t in inside:
                self._count(stream, t)
        return True

    def _count(self, stream: int, digit: torch.Tensor) -> None:
        if digit.numel() >= _FLUSH:
            self._hist[stream] += torch.bincount(digit, minlength=self._nbins[stream]).numpy()
            return
        # small inputs: batch their digits, one bincount per ~_FLUSH values (bincount has a fixed cost)
        self._pending[stream].append(digit.to(torch.int32))
        self._pending_n[stream] += digit.numel()
        if self._pending_n[stream] >= _FLUSH:
            self._flush(stream)

    def _flush(self, stream: int) -> None:
        if self._pending[stream]:
            counts = torch.bincount(torch.cat(self._pending[stream]), minlength=self._nbins[stream])
            self._hist[stream] += counts.numpy()
        self._pending[stream] = []
        self._pending_n[stream] = 0

    def finish_pass(self) -> None:
        open_streams = [s for s in range(len(self.ks)) if self._result[s] is None]
        for s in open_streams:
            self._flush(s)
        self.passes += 1
        if self._phase == "sample":
            for s in open_streams:
                self._set_bracket(s)
            self._phase = "bracket"
        elif self._phase == "bracket":
            for s in open_streams:
                self._finish_bracket(s)
            self._phase = "radix"  # streams still open continue (or fall back) with radix select
        else:
            for s in open_streams:
                self._finish_radix(s)
        self._hist = []

    def _finish_bracket(self, s: int) -> None:
        kk = self.ks[s] - self._above[s]
        fine = self._hist[s]
        if not 1 <= kk <= int(fine.sum()):
            return  # missed: radix select from the top digit
        ge = np.cumsum(fine[::-1])[::-1]  # patterns in bins >= j
        j = int(np.flatnonzero(ge >= kk).max())
        sh = self._bin_shift[s]
        if sh == 0:
            self._result[s] = self._pattern_value(self._lo[s] + j)
            self._ties[s] = (kk - (int(ge[j + 1]) if j + 1 < ge.size else 0), int(fine[j]))
            return
        # the bin of 2^sh patterns holding the answer is known: one radix pass over its low bits
        self._remaining[s] = kk - (int(ge[j + 1]) if j + 1 < ge.size else 0)
        self._prefix[s] = (self._lo[s] >> sh) + j
        self._rshift[s] = 0
        self._dbits[s] = sh

    def _finish_radix(self, s: int) -> None:
        k = self._remaining[s]
        if self._prefix[s] is None and k > self._seen[s]:
            self._result[s] = 0.0  # more requested than there are values: keep all
            return
        ge = np.cumsum(self._hist[s][::-1])[::-1]  # values with digit >= d
        d = int(np.flatnonzero(ge >= k).max())  # the largest digit with at least k values >= it
        self._remaining[s] = k - (int(ge[d + 1]) if d + 1 < ge.size else 0)
        prefix = self._prefix[s]
        self._prefix[s] = d if prefix is None else (prefix << self._dbits[s]) | d
        if self._rshift[s] == 0:
            self._result[s] = self._pattern_value(self._prefix[s])
            self._ties[s] = (self._remaining[s], int(self._hist[s][d]))
        else:
            self._rshift[s] -= 16
            self._dbits[s] = 16

    def _set_bracket(self, s: int) -> None:
        """Digit range [lo, hi] holding the k-th largest, from the sampled top-digit histogram."""
        ge = np.cumsum(self._hist[s][::-1])[::-1]
        ns = int(ge[0])
        n = self._totals[s]
        k = self.ks[s]
        target = k * ns / n
        margin = 5.0 * math.sqrt(max(target * (1.0 - k / n), 1.0)) + 16.0
        ge_above = np.append(ge[1:], 0)  # values with digit > d
        fits = np.flatnonzero(ge_above <= target - margin)
        hi = int(fits.min()) if fits.size else _INF_DIGIT[self.dtype]
        hi = min(hi, _INF_DIGIT[self.dtype])
        enough = np.flatnonzero(ge >= target + margin)
        lo = int(enough.max()) if enough.size else 0
        lo = min(lo, hi)
        width = hi - lo + 1
        # at most MAX_BRACKET * 65536 bins: wider ranges use bins of 2^bin_shift patterns
        self._bin_shift[s] = max(0, math.ceil(math.log2(width / MAX_BRACKET))) if width > MAX_BRACKET else 0
        self._lo[s] = lo << self._top
        self._hi[s] = (hi + 1) << self._top

    def _pattern_value(self, pattern: int) -> float:
        return float(torch.tensor([pattern], dtype=self.int_dtype).view(self.dtype)[0])

    def values(self) -> list[float]:
        """The k-th largest magnitude per stream (+inf when k <= 0; 0.0 when k exceeds the count)."""
        if not self.done:
            raise RuntimeError("KthLargestSelector.values() called before the last pass")
        return [float(r) for r in self._result]

    def tie_counts(self) -> list[tuple[int, int] | None]:
        """Per stream (take, tied): of the ``tied`` values whose magnitude equals the k-th largest, the top k
        holds ``take`` (1 <= take <= tied); None where the answer needed no selection (k <= 0, k > count)."""
        if not self.done:
            raise RuntimeError("KthLargestSelector.tie_counts() called before the last pass")
        return list(self._ties)


def kth_largest_abs(values: torch.Tensor, k: int) -> float:
    """Exact k-th largest magnitude |x| of a tensor of finite floats (+inf for k <= 0, 0.0 for k > numel).

    :class:`KthLargestSelector` on the float bit patterns (sample-and-bracket, else radix select),
    no sort of the whole tensor (``torch.kthvalue`` for up to 65536 values: the same value).
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
    sel = KthLargestSelector([k], dtype, totals=[n])
    while not sel.done:
        sel.start_pass()
        sel.add(0, v[:: sel.stride])
        sel.finish_pass()
    return sel.values()[0]


def magnitude_threshold(tau: torch.Tensor, density: float) -> float:
    """The trim threshold of one task vector: the k-th largest |tau| with k = keep_count(n, density)."""
    return kth_largest_abs(tau, keep_count(tau.numel(), density))


# ----------------------------------------------------------------------------------------------
# exactly k: the tie-break among entries of equal magnitude
# ----------------------------------------------------------------------------------------------
#: entries per step when scanning for tied magnitudes
TIE_CHUNK = 1 << 18


def _abs_chunks(x: torch.Tensor, base: torch.Tensor | None, dtype: torch.dtype):
    """(start, |x - base| of entries [start, start + TIE_CHUNK)) in ``dtype``, the difference formed as the
    selection forms it (both operands converted to ``dtype`` first)."""
    fx = x.reshape(-1)
    fb = base.reshape(-1) if base is not None else None
    n = fx.numel()
    for s in range(0, n, TIE_CHUNK):
        e = min(n, s + TIE_CHUNK)
        v = fx[s:e].to(dtype, copy=True)
        if fb is not None:
            v.sub_(fb[s:e].to(dtype))
        yield s, v.abs_()


def magnitude_counts(x: torch.Tensor, value: float, base: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """(number of |x - base| > value, number equal to it), in ``dtype`` chunk by chunk."""
    gt = eq = 0
    for _, a in _abs_chunks(x, base, dtype):
        gt += int(torch.count_nonzero(a > value))
        eq += int(torch.count_nonzero(a == value))
    return gt, eq


def tie_positions(x: torch.Tensor, value: float, ordinals: Sequence[int], base: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[list[int | None], int]:
    """Flat indices of the entries with |x - base| == ``value`` whose 0-based ordinals among those entries (in
    flat order) are ``ordinals`` (None for an ordinal past the last one), and how many such entries there are."""
    out: list[int | None] = [None] * len(ordinals)
    seen = 0
    for s, a in _abs_chunks(x, base, dtype):
        eq = a == value
        c = int(torch.count_nonzero(eq))
        want = [j for j, o in enumerate(ordinals) if seen <= o < seen + c]
        if want:
            idx = torch.nonzero(eq).reshape(-1)
            for j in want:
                out[j] = s + int(idx[ordinals[j] - seen])
        seen += c
    return out, seen


def exact_k_cut(tau: torch.Tensor, k: int, threshold: float | None = None) -> tuple[float, int]:
    """(threshold T, tie end E) of the top-k trim of one task vector that keeps **exactly** k entries.

    T is the k-th largest |tau|; every entry with |tau| > T is kept, and of the entries with |tau| == T
    those at flat index < E (lower flat index first): E is one past the flat index of the (k - #{|tau| > T})-th
    of them (E = numel when all of them fit). k <= 0 gives (+inf, 0), T = 0 (fewer than k non-zero entries)
    gives (0, numel): the zeros kept or not change nothing. Magnitudes in float32 (float64 for float64).
    """
    n = tau.numel()
    dtype = torch.float64 if tau.dtype == torch.float64 else torch.float32
    t = kth_largest_abs(tau, k) if threshold is None else threshold
    if not 0.0 < t < math.inf:
        return t, (0 if t == math.inf else n)
    gt, eq = magnitude_counts(tau, t, dtype=dtype)
    take = k - gt
    if take >= eq:
        return t, n
    pos, _ = tie_positions(tau, t, [take - 1], dtype=dtype)
    return t, int(pos[0]) + 1


def trim(tau: torch.Tensor, density: float | None = None, threshold: float | None = None) -> torch.Tensor:
    """Top-``density`` trim keeping exactly k = keep_count(n, density) entries (ties in magnitude: lower flat
    index first); with ``threshold`` instead, keep every entry with |tau| >= threshold (ties all kept)."""
    if threshold is None:
        if density is None:
            raise ValueError("trim needs density or threshold")
        t, end = exact_k_cut(tau, keep_count(tau.numel(), density))
        return trim_to(tau, t, end)
    return torch.where(tau.abs() >= threshold, tau, torch.zeros((), dtype=tau.dtype))


def trim_to(tau: torch.Tensor, threshold: float, end: int | None = None, offset: int = 0) -> torch.Tensor:
    """Entries with |tau| > threshold, and those equal to it at flat index < ``end`` (None: all of them), of
    a block whose first entry has flat index ``offset``."""
    a = tau.abs()
    keep = a >= threshold
    if end is not None and 0.0 < threshold < math.inf:
        flat = keep.view(-1)
        cut = max(end - offset, 0)
        if cut < flat.numel():
            flat[cut:] &= a.reshape(-1)[cut:] != threshold
    return torch.where(keep, tau, torch.zeros((), dtype=tau.dtype))


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


def _sign_merge_range(flats: Sequence[torch.Tensor], flat_base: torch.Tensor, out: torch.Tensor, lo: int, hi: int,
                      levels: list[float] | None, scaling_factor: float, sign_election: str, merge: str,
                      subtract: bool, zero_sign: float = 0.0,
                      cuts: Sequence[tuple[float, int] | None] | None = None) -> None:
    """Entries [lo, hi) of the sign merge, in chunks of at most CHUNK entries per model. ``cuts[i]`` =
    (threshold, end): entries of model i equal in magnitude to the threshold at flat index >= end are dropped.

    Every torch op works on one chunk of one model (< 32768 entries: below torch's parallel grain
    size), so the ops run serially in the calling thread without thread-pool barriers.
    """
    n = len(flats)
    size = min(CHUNK, max(hi - lo, 1))
    taus = torch.empty((n, size), dtype=flat_base.dtype)
    w = torch.empty(size, dtype=flat_base.dtype)
    acc = torch.empty(size, dtype=flat_base.dtype)
    num = torch.empty(size, dtype=flat_base.dtype)
    cnt = torch.empty(size, dtype=flat_base.dtype)
    for start in range(lo, hi, size):
        stop = min(hi, start + size)
        c = stop - start
        b = flat_base[start:stop]
        vote, wc, nm, ct = acc[:c], w[:c], num[:c], cnt[:c]
        vote.zero_()
        for i in range(n):
            row = taus[i, :c]
            if subtract:
                torch.sub(flats[i][start:stop], b, out=row)
            else:
                row.copy_(flats[i][start:stop])
            if levels is not None:
                if levels[i] == math.inf:
                    row.zero_()
                elif levels[i] > 0.0:
                    torch.ops.aten.hardshrink.out(row, levels[i], out=row)  # |x| >= threshold kept
                cut = cuts[i] if cuts is not None else None
                if cut is not None and cut[1] < stop and levels[i] != math.inf:  # ties past the end: dropped
                    seg = row[max(cut[1] - start, 0):]
                    seg.masked_fill_(seg.abs() == cut[0], 0.0)
            if sign_election == "mass":
                vote.add_(row)
            else:
                vote.add_(torch.sign(row, out=wc))
        sign = vote.sign_()
        if zero_sign != 0.0:
            sign.masked_fill_(sign == 0, zero_sign)
        nm.zero_()
        ct.zero_()
        for i in range(n):
            torch.mul(taus[i, :c], sign, out=wc)
            wc.relu_()  # |tau_i| where tau_i agrees with the elected (non-zero) sign, else 0
            if merge == "max":
                torch.maximum(nm, wc, out=nm)
            else:
                nm.add_(wc)
                if merge == "mean":
                    ct.add_(wc.sign_())
        nm.mul_(sign)
        if merge == "mean":
            nm.div_(ct.clamp_(min=1))
        torch.add(b, nm, alpha=scaling_factor, out=out[start:stop])


def _chunked_sign_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], thresholds: Sequence[float] | None,
                        scaling_factor: float, sign_election: SignElection, merge: DisjointMerge,
                        transform=None, zero_sign: float = 0.0,
                        tie_ends: Sequence[int | None] | None = None) -> torch.Tensor:
    """theta_0 + lambda * disjoint_merge(elect(trimmed taus)), computed in flat chunks.

    Same arithmetic as :func:`elect_sign` + :func:`disjoint_merge`, arranged for speed: chunks stay
    in cache, scratch buffers are reused, the trim is one ``hardshrink`` per model, agreement uses
    relu(tau_i * gamma) (> 0 exactly where tau_i agrees with gamma != 0). Large tensors are split
    into ``torch.get_num_threads()`` contiguous ranges merged by Python threads (torch ops release
    the GIL), each running serial ops: no per-op thread-pool barriers, which cost milliseconds on a
    busy machine. ``transform(i, tau_i)`` (optional) replaces the whole task vector of model i
    before the trim (DARE uses it); it is applied to whole tensors, so random draws do not depend
    on the chunking. ``zero_sign`` (FusionBench): the elected sign where the vote is exactly 0
    (default 0: such entries merge to 0). ``tie_ends[i]`` (optional; None: keep every tie): of model i's
    entries whose magnitude equals thresholds[i], only those at flat index < tie_ends[i] are kept.
    """
    if sign_election not in ("mass", "count"):
        raise ValueError(f"unknown sign election {sign_election!r}; use 'mass' or 'count'")
    if merge not in ("mean", "sum", "max"):
        raise ValueError(f"unknown disjoint merge {merge!r}; use 'mean', 'sum' or 'max'")
    flat_base = base.reshape(-1)
    numel = flat_base.numel()
    out = torch.empty_like(flat_base)
    if transform is not None:
        flats = [transform(i, t - base).reshape(-1) for i, t in enumerate(tensors)]
    else:
        flats = [t.reshape(-1) for t in tensors]
    levels = cuts = None
    if thresholds is not None:
        levels = [_shrink_level(float(t), base.dtype) if math.isfinite(t) else math.inf for t in thresholds]
        if tie_ends is not None:
            if len(tie_ends) != len(thresholds):
                raise ValueError(f"got {len(tie_ends)} tie ends for {len(thresholds)} thresholds")
            cuts = [None if e is None or e >= numel else (float(t), int(e)) for t, e in zip(thresholds, tie_ends)]
    args = (levels, scaling_factor, sign_election, merge, transform is None, zero_sign, cuts)
    parallel_ranges(numel, lambda a, z: _sign_merge_range(flats, flat_base, out, a, z, *args))
    return out.reshape(base.shape)


def parallel_ranges(numel: int, fn) -> list:
    """Run ``fn(lo, hi)`` over contiguous ranges covering [0, numel): one range per torch thread
    (``torch.get_num_threads()``) when each gets at least PARALLEL_MIN entries, in Python threads
    (torch ops release the GIL); else one call. Returns the results in range order."""
    workers = max(1, min(torch.get_num_threads(), numel // PARALLEL_MIN))
    if workers == 1:
        return [fn(0, numel)]
    from concurrent.futures import ThreadPoolExecutor

    step = -(-numel // workers)
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda a: fn(a, min(numel, a + step)), range(0, numel, step)))


def ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, density: float = 0.2,
               scaling_factor: float = 0.3, thresholds: Sequence[float] | None = None,
               sign_election: SignElection = "mass", merge: DisjointMerge = "mean",
               zero_sign: float = 0.0, tie_ends: Sequence[int | None] | None = None) -> torch.Tensor:
    """TIES-merging of one tensor: trim, elect sign, disjoint merge, add to the base.

    Paper: Yadav et al., NeurIPS 2023 (see the module docstring for the exact variant: trim keeps
    exactly the k largest |tau_i|, ties in magnitude broken by lower flat index; sign by total mass;
    mean over agreeing non-zero entries; a zero vote gives 0).

    Args:
        base: theta_0 (float32/float64).
        tensors: theta_i of the N models, same shape and dtype as ``base``.
        density: fraction of entries of each task vector kept when ``thresholds`` is None (the
            per-tensor trim: k = keep_count(numel, density) largest magnitudes of this tensor).
        scaling_factor: lambda.
        thresholds: per-model magnitude thresholds (e.g. whole-model thresholds of the global
            trim); entries with |tau_i| >= thresholds[i] are kept (see ``tie_ends``). Overrides ``density``.
        sign_election: 'mass' (paper) or 'count'.
        merge: 'mean' (paper), 'sum' or 'max'.
        zero_sign: the sign elected where the vote is exactly 0 (0: the paper; FusionBench: see
            :func:`fusionbench_zero_sign`).
        tie_ends: with ``thresholds``: of the entries with |tau_i| == thresholds[i], keep only those at flat
            index < tie_ends[i] (from :func:`exact_k_cut`; None or omitted: keep them all).
    """
    if thresholds is None:
        k = keep_count(base.numel(), density)
        cuts = [exact_k_cut(t - base, k) for t in tensors]
        thresholds = [c[0] for c in cuts]
        tie_ends = [c[1] for c in cuts]
    elif len(thresholds) != len(tensors):
        raise ValueError(f"ties_merge got {len(thresholds)} thresholds for {len(tensors)} tensors")
    return _chunked_sign_merge(base, tensors, thresholds, scaling_factor, sign_election, merge, zero_sign=zero_sign,
                               tie_ends=tie_ends)


def vote_sign_total(taus: Sequence[torch.Tensor], thresholds: Sequence[float], sign_election: SignElection = "mass",
                    tie_ends: Sequence[int | None] | None = None) -> int:
    """sum_j sgn(vote_j) over the entries of one tensor: the vote of the trimmed task vectors ``taus``
    (entries with |tau_i| >= thresholds[i] kept, ties only below ``tie_ends[i]`` when given). Summed over all
    tensors it gives FusionBench's majority sign (``resolve_zero_signs``: sgn of the sum of the elected signs
    of the whole flattened model)."""
    vote = None
    ends = list(tie_ends) if tie_ends is not None else [None] * len(taus)
    for t, thr, end in zip(taus, thresholds, ends):
        kept = trim_to(t, thr, end)
        v = kept if sign_election == "mass" else kept.sign()
        vote = v if vote is None else vote + v
    return int(vote.sign().sum()) if vote is not None else 0


def fusionbench_zero_sign(total: int, merge: DisjointMerge) -> float:
    """The elected sign FusionBench uses where the vote is 0, from :func:`vote_sign_total` summed over
    the model: the majority sign; when that is 0 too, its ``where(sign > 0, v > 0, v < 0)`` selects the
    negative entries (-1) for 'sum'/'mean', while 'max' multiplies by the sign (0)."""
    m = float(np.sign(total))
    if m == 0.0 and merge != "max":
        return -1.0
    return m
