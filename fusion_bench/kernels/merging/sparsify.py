"""Task-vector sparsification and generalized task arithmetic (the mergekit family of merges).

A task vector tau_i = theta_i - theta_0 is sparsified (some entries set to 0, the kept ones
possibly rescaled), weighted by w_i, optionally filtered by a sign consensus, summed and
optionally normalised, then added to the base. Sparsifications (one tensor at a time):

Entries are ranked by magnitude, descending, ties in magnitude by flat index, ascending (the lower
index ranks first); the magnitude methods keep a range of ranks, so exactly as many entries as the
rule says (:func:`rank_band`):

- ``magnitude`` (TIES trim, Yadav et al. NeurIPS 2023 as in mergekit): keep ranks [0, k) with
  k = floor(density * n) (mergekit's k).
- ``breadcrumbs`` (Model Breadcrumbs, Davari & Belilovsky 2023): remove the n_top = floor(gamma * n)
  largest magnitudes (outliers) and the smallest ones so that floor(density * n) entries stay
  (n_top shrinks when density + gamma > 1): keep ranks [n_top, n_top + floor(density * n)).

(:func:`magnitude_thresholds` + :func:`band_keep` give the older rule that keeps every entry tied at
the lower bound and removes every entry tied at the upper one: ``tie_break='all'``; mergekit's own
choice among ties is :func:`mergekit_kept`.)
- ``random`` (DARE, Yu et al. ICML 2024): keep entry j when u_j >= 1 - density, u = torch.rand
  from the caller's generator (the draw of :func:`fusion_bench.kernels.merging.dare.dare_mask`); kept
  entries are divided by density when ``rescale``.
- ``della`` (DELLA MagPrune, Deep et al. 2024): within each row (a 1-D tensor is one row; more
  dimensions are flattened after the first), entries are ranked by magnitude (ascending, ties
  broken by position: a stable sort), rank r in 0..m-1, and kept with probability
  p = density - epsilon + 2 * epsilon * r / (m - 1) (p = density when m = 1): kept when u < p with
  u = torch.rand from the caller's generator; kept entries are divided by p when ``rescale``.

Consensus (TIES sign election as in mergekit): ``sum``: the elected sign is +1 where
sum_i w_i tau~_i >= 0, else -1; ``count``: +1 where sum_i sgn(w_i tau~_i) >= 0. Entry i
participates where sgn(w_i tau~_i) equals the elected sign (so zeros never do). Without
consensus every entry participates.

Merge: delta = sum_i w_i tau~_i m_i; with ``normalize`` delta /= sum_i w_i m_i (with consensus: a
zero divisor becomes 1; without: the divisor is sum_i w_i, replaced by 1 when |.| < 1e-8);
theta = theta_0 + lambda * delta.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fusion_bench.kernels.merging import ties as T
from fusion_bench.kernels.merging.dare import dare_mask
from fusion_bench.kernels.merging.ties import KthLargestSelector

#: elements per chunk when streaming |a - b| through the radix selector
CHUNK = 1 << 20

SPARSIFICATIONS = ("none", "magnitude", "breadcrumbs", "random", "della")
CONSENSUS = ("none", "sum", "count")


def magnitude_k(numel: int, density: float) -> int:
    """mergekit's number of kept entries: floor(density * numel), clamped to [0, numel]."""
    return min(numel, max(0, math.floor(density * numel * (1 + 1e-12))))


def breadcrumbs_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_top, n_keep): outliers removed from the top and entries kept (see the module docstring)."""
    n_keep = magnitude_k(numel, density)
    n_top = min(numel, max(0, math.floor(gamma * numel * (1 + 1e-12))))
    n_bot = numel - n_keep - n_top
    if n_bot < 0:
        n_top += n_bot
    return n_top, n_keep


def _radix_kth(a: torch.Tensor, b: torch.Tensor | None, ks: Sequence[int], dt: torch.dtype,
               chunk: int) -> list[float]:
    """Exact k-th largest of |a - b| per k by radix selection (the fallback of :func:`kth_largest_abs_diff`)."""
    fa = a.reshape(-1)
    fb = b.reshape(-1) if b is not None else None
    n = fa.numel()
    sel = KthLargestSelector(list(ks), dt)
    while not sel.done:
        sel.start_pass()
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            v = fa[s:e].to(dt)
            v = (v - fb[s:e].to(dt)).abs_() if fb is not None else v.abs()  # never modify the input
            for i in range(len(ks)):
                sel.add(i, v)
        sel.finish_pass()
    return sel.values()


#: sample size and rank margin of the bracketing selection
SAMPLE = 1 << 14
MARGIN = 600


def kth_largest_abs_diff(a: torch.Tensor, b: torch.Tensor | None, ks: Sequence[int],
                         chunk: int = CHUNK) -> list[float]:
    """Exact k-th largest of |a - b| (|a| when b is None) for each k in ``ks``, computed in chunks.

    The difference is formed in float32 (float64 for float64 inputs) chunk by chunk, so memory is
    the inputs plus one chunk and the candidates. Selection: a deterministic sample (every
    (n / s)-th entry, s = min(16384, n / 8)) brackets the k-th largest value between two sample
    order statistics (about 4 sqrt(s) ranks around the expected rank); one pass counts the entries above the bracket and
    keeps those inside it; the answer is the exact order statistic among them (``torch.kthvalue``).
    When the bracket misses (possible only for adversarial data), the exact radix selection of
    :class:`fusion_bench.kernels.merging.ties.KthLargestSelector` is used. Returns +inf for k <= 0 and 0 for
    k > n, like the radix selector.
    """
    dt = torch.float64 if a.dtype == torch.float64 else torch.float32
    fa = a.reshape(-1)
    fb = b.reshape(-1) if b is not None else None
    n = fa.numel()
    out: list[float | None] = [None] * len(ks)
    todo = []
    for i, k in enumerate(ks):
        if k <= 0:
            out[i] = math.inf
        elif k > n:
            out[i] = 0.0
        else:
            todo.append(i)
    if not todo:
        return [float(x) for x in out]  # type: ignore[arg-type]
    if n <= 8192:  # small: one exact selection on the whole tensor
        v = (fa.to(dt) - fb.to(dt)).abs_() if fb is not None else fa.to(dt).abs()
        for i in todo:
            out[i] = float(torch.kthvalue(v, n - ks[i] + 1).values)
        return [float(x) for x in out]  # type: ignore[arg-type]
    size = min(SAMPLE, n // 8)
    margin = min(MARGIN, 4 * math.isqrt(size) + 16)
    pos = torch.linspace(0, n - 1, size, dtype=torch.float64).long()
    samp = (fa[pos].to(dt) - fb[pos].to(dt)).abs_() if fb is not None else fa[pos].to(dt).abs()
    brackets = {}
    for i in todo:
        r = ks[i] * size / n  # expected (1-based) rank in the sample
        i_hi = math.floor(r) - margin - 1  # 0-based ranks in descending order
        i_lo = math.ceil(r) + margin - 1
        hi = float(torch.kthvalue(samp, size - i_hi).values) if i_hi >= 0 else math.inf
        lo = float(torch.kthvalue(samp, size - i_lo).values) if i_lo < size else 0.0
        brackets[i] = (lo, hi)
    above = dict.fromkeys(todo, 0)
    cands: dict[int, list[torch.Tensor]] = {i: [] for i in todo}
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        v = fa[s:e].to(dt)
        v = (v - fb[s:e].to(dt)).abs_() if fb is not None else v.abs()
        for i in todo:
            lo, hi = brackets[i]
            if hi != math.inf:
                m = v <= hi
                above[i] += m.numel() - int(m.sum())
                m &= v >= lo
            else:
                m = v >= lo
            cands[i].append(v[m])
    retry = []
    for i in todo:
        c = torch.cat(cands[i])
        need = ks[i] - above[i]
        if 0 < need <= c.numel():
            out[i] = float(torch.kthvalue(c, c.numel() - need + 1).values)
        else:
            retry.append(i)
    if retry:
        vals = _radix_kth(a, b, [ks[i] for i in retry], dt, chunk)
        for i, v in zip(retry, vals):
            out[i] = v
    return [float(x) for x in out]  # type: ignore[arg-type]


def magnitude_thresholds(tau_or_theta: torch.Tensor, base: torch.Tensor | None, method: str, density: float,
                         gamma: float = 0.01) -> tuple[float, float]:
    """(lo, hi): the kept magnitude band of one task vector for ``magnitude`` or ``breadcrumbs``.

    ``tau_or_theta - base`` is the task vector (``base=None``: the first argument is the task vector).
    """
    n = tau_or_theta.numel()
    if method == "magnitude":
        k = magnitude_k(n, density)
        return kth_largest_abs_diff(tau_or_theta, base, [k])[0], math.inf
    if method == "breadcrumbs":
        n_top, n_keep = breadcrumbs_counts(n, density, gamma)
        lo, hi = kth_largest_abs_diff(tau_or_theta, base, [n_top + n_keep, n_top])
        if n_keep == 0:
            lo = math.inf
        return lo, (math.inf if n_top == 0 else hi)
    raise ValueError(f"no magnitude thresholds for sparsification {method!r}")


#: a kept rank range of one tensor: (lo, hi, windows): entries with lo < |tau| < hi, plus, for each window
#: (value, start, end), the entries with |tau| == value at flat index in [start, end)
Band = tuple[float, float, tuple[tuple[float, int, int], ...]]


def rank_band(tau: torch.Tensor, r0: int, r1: int, base: torch.Tensor | None = None) -> Band:
    """The entries of ranks [r0, r1) of |tau - base| (``base=None``: of |tau|) as a :data:`Band`.

    Ranks: magnitude descending, ties by flat index ascending. Two exact order statistics (the
    (r0 + 1)-th and r1-th largest), one counting pass, and, only when a boundary value's ties are split,
    one pass that locates the split (chunk by chunk: memory is the inputs plus one chunk).
    """
    n = tau.numel()
    r0, r1 = max(r0, 0), min(r1, n)
    if r1 <= r0:
        return math.inf, math.inf, ()
    if base is None and tau.dtype in (torch.float32, torch.bfloat16, torch.float16) and n > FAST_BAND_MIN:
        return _rank_band_bits(tau, r0, r1)
    dt = torch.float64 if tau.dtype == torch.float64 else torch.float32
    hi_v, lo_v = kth_largest_abs_diff(tau, base, [r0 + 1, r1])
    windows = []
    for v in ((hi_v,) if lo_v == hi_v else (hi_v, lo_v)):
        gt, eq = T.magnitude_counts(tau, v, base, dt)
        a, b = max(r0 - gt, 0), min(r1 - gt, eq)  # ordinals [a, b) of the kept entries among those == v
        if v == 0.0 or (a == 0 and b == eq):
            windows.append((v, 0, n))
            continue
        (first, last), _ = T.tie_positions(tau, v, [a, b - 1], base, dt)
        windows.append((v, int(first), int(last) + 1))
    return lo_v, hi_v, tuple(windows)


#: tensors above this many elements take the bit-histogram path of :func:`rank_band`
FAST_BAND_MIN = 1 << 16


def _rank_band_bits(tau: torch.Tensor, r0: int, r1: int) -> Band:
    """:func:`rank_band` for a whole float32 (or narrower) tensor in memory, by a two-level radix histogram.

    |tau| in float32 is a non-negative float, so its bit pattern read as int32 orders exactly as the value
    (no NaN: inputs are checked finite). One ``bincount`` of the upper 16 bits (the bfloat16 truncation) gives
    how many entries lie above each upper-bits bucket; the bucket holding a wanted rank is resolved exactly
    among its own entries (for bfloat16-valued task vectors every entry of a bucket has one value, so this is
    free). Tie windows as :func:`rank_band`: the flat indices of the entries equal to a boundary value.
    A bfloat16 tensor is histogrammed on its own 15 magnitude bits. Workspace: 2-3 bytes per element for bfloat16,
    about 9 for float32 (|tau| as float32, the upper bits as int32, one mask).
    """
    n = tau.numel()
    if tau.dtype == torch.bfloat16:  # the magnitude's 15 bits directly: 2 bytes per element, one value per bucket
        bits = tau.reshape(-1).view(torch.int16).bitwise_and(0x7FFF)
        upper, shift, one_value_per_bucket = bits, 0, True

        def to_f(v: int) -> float:
            return float(torch.tensor([v], dtype=torch.int16).view(torch.bfloat16))
    else:
        bits = tau.reshape(-1).float().abs().view(torch.int32)
        upper, shift = bits >> 16, 16
        one_value_per_bucket = not bool(torch.any(bits.bitwise_and(0xFFFF)))  # bfloat16-valued (the usual case)

        def to_f(v: int) -> float:
            return float(torch.tensor([v], dtype=torch.int32).view(torch.float32))
    counts = torch.bincount(upper, minlength=1 << 15)
    at_or_above = torch.flip(torch.cumsum(torch.flip(counts, (0,)), 0), (0,))  # entries in bucket b or higher

    def kth(k: int) -> tuple[int, int, int]:
        """(value bits, #entries > value, #entries == value) of the k-th largest |tau| (1-based k)."""
        b = int((at_or_above >= k).nonzero()[-1])  # the highest bucket holding rank k (non-increasing)
        n_above = int(at_or_above[b]) - int(counts[b])
        if one_value_per_bucket:
            return b << shift, n_above, int(counts[b])
        vals, cts = torch.unique(bits[upper == b], sorted=True, return_counts=True)  # ascending values
        ge = torch.flip(torch.cumsum(torch.flip(cts, (0,)), 0), (0,))  # entries of the bucket >= each value
        j = int((ge >= k - n_above).nonzero()[-1])  # the largest value with rank k among those >= it
        return int(vals[j]), n_above + int(ge[j]) - int(cts[j]), int(cts[j])

    hi_b, hi_gt, hi_eq = kth(r0 + 1)
    lo_b, lo_gt, lo_eq = kth(r1)
    hi_v, lo_v = to_f(hi_b), to_f(lo_b)
    windows = []
    for vb, gt, eq in ((hi_b, hi_gt, hi_eq),) if lo_b == hi_b else ((hi_b, hi_gt, hi_eq), (lo_b, lo_gt, lo_eq)):
        a, b = max(r0 - gt, 0), min(r1 - gt, eq)
        v = to_f(vb)
        if v == 0.0 or (a == 0 and b == eq):
            windows.append((v, 0, n))
            continue
        pos = (bits == vb).nonzero().view(-1)
        windows.append((v, int(pos[a]), int(pos[b - 1]) + 1))
    return lo_v, hi_v, tuple(windows)


# ---- the same ranks from row blocks: a histogram per block, ordinals among ties counted while merging ------
#: a kept rank range from a magnitude histogram: (lo, hi, windows): entries with lo < |tau| < hi, plus, for each
#: window (value, first, end), the entries with |tau| == value whose ordinal among those entries (in flat order,
#: 0-based) is in [first, end)
OrdinalBand = tuple[float, float, tuple[tuple[float, int, int], ...]]


def bf16_magnitude_histogram(tau: torch.Tensor) -> torch.Tensor:
    """Counts of |tau| per bfloat16 magnitude (32768 buckets: the 15 magnitude bits) of a bfloat16-valued tensor
    (bfloat16, or float32 holding bfloat16 values: the conversion is exact). Histograms of row blocks add up to
    the whole tensor's."""
    t = tau if tau.dtype == torch.bfloat16 else tau.to(torch.bfloat16)
    return torch.bincount(t.reshape(-1).view(torch.int16).bitwise_and(0x7FFF), minlength=1 << 15)


def ordinal_band(counts: torch.Tensor, r0: int, r1: int) -> OrdinalBand:
    """Ranks [r0, r1) of |tau| (descending, ties by lower flat index) as an :data:`OrdinalBand`, from the
    bfloat16 magnitude histogram of the whole tensor (:func:`bf16_magnitude_histogram`, summed over blocks)."""
    counts = counts.to(torch.int64)
    n = int(counts.sum())
    r0, r1 = max(r0, 0), min(r1, n)
    if r1 <= r0:
        return math.inf, math.inf, ()
    at_or_above = torch.flip(torch.cumsum(torch.flip(counts, (0,)), 0), (0,))

    def kth(k: int) -> tuple[int, int, int]:  # (bucket, #entries above it, #entries in it) of the k-th largest
        b = int((at_or_above >= k).nonzero()[-1])
        return b, int(at_or_above[b]) - int(counts[b]), int(counts[b])

    def val(b: int) -> float:
        return float(torch.tensor([b], dtype=torch.int16).view(torch.bfloat16))

    hi, lo = kth(r0 + 1), kth(r1)
    windows = []
    for b, gt, eq in ((hi,) if hi[0] == lo[0] else (hi, lo)):
        v = val(b)
        first, end = max(r0 - gt, 0), min(r1 - gt, eq)
        windows.append((v, 0, eq) if v == 0.0 else (v, first, end))  # zeros: kept or not changes nothing
    return val(lo[0]), val(hi[0]), tuple(windows)


def ordinal_band_mask(tau: torch.Tensor, band: OrdinalBand, seen: list[int]) -> torch.Tensor:
    """Mask of the entries of ``band`` in ``tau``, the next row block of the tensor in flat order; ``seen[w]``
    counts the entries equal to window w's value in the blocks before (updated here, so blocks must come in
    order)."""
    lo, hi, windows = band
    a = tau.abs().float()
    m = (a > lo) & (a < hi)
    fm, fa = m.view(-1), a.reshape(-1)
    for w, (v, first, end) in enumerate(windows):
        eq = fa == v
        c = int(eq.sum())
        s0 = seen[w]
        if c and s0 < end and s0 + c > first:
            if first <= s0 and s0 + c <= end:
                fm |= eq
            else:
                ordinal = torch.cumsum(eq, 0).sub_(1 - s0)
                fm |= eq & (ordinal >= first) & (ordinal < end)
        seen[w] = s0 + c
    return m


def rank_band_mask(tau: torch.Tensor, band: Band, offset: int = 0) -> torch.Tensor:
    """Mask of the entries of ``band`` in ``tau``, a block whose first entry has flat index ``offset``."""
    lo, hi, windows = band
    dt = torch.float64 if tau.dtype == torch.float64 else torch.float32
    a = tau.abs().to(dt)
    m = (a > lo) & (a < hi)
    fm, fa = m.view(-1), a.reshape(-1)
    n = fm.numel()
    for v, start, end in windows:
        s, e = max(start - offset, 0), min(end - offset, n)
        if s < e:
            fm[s:e] |= fa[s:e] == v
    return m


def magnitude_band(tau: torch.Tensor, method: str, density: float, gamma: float = 0.01) -> Band:
    """The kept :data:`Band` of one task vector for ``magnitude`` (ranks [0, k)) or ``breadcrumbs`` (ranks
    [n_top, n_top + n_keep)), see the module docstring."""
    n = tau.numel()
    if method == "magnitude":
        return rank_band(tau, 0, magnitude_k(n, density))
    if method == "breadcrumbs":
        n_top, n_keep = breadcrumbs_counts(n, density, gamma)
        return rank_band(tau, n_top, n_top + n_keep)
    raise ValueError(f"no magnitude band for sparsification {method!r}")


def band_mask(tau: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Entries with lo <= |tau| < hi."""
    a = tau.abs()
    m = a >= lo
    if hi != math.inf:
        m &= a < hi
    return m


def band_keep(tau: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """tau where lo <= |tau| < hi, else 0 (one ``hardshrink`` pass for the lower bound)."""
    if lo == math.inf:
        return torch.zeros_like(tau)
    if lo > 0:
        below = torch.nextafter(torch.tensor(lo, dtype=tau.dtype), torch.tensor(0.0, dtype=tau.dtype))
        out = torch.nn.functional.hardshrink(tau, float(below))  # keeps |x| > below, i.e. |x| >= lo
    else:
        out = tau.clone()
    if hi != math.inf:
        out.masked_fill_(out.abs() >= hi, 0.0)
    return out


def mergekit_kept(tau: torch.Tensor, method: str, density: float, gamma: float = 0.01) -> tuple[float, float, torch.Tensor]:
    """The entries mergekit (0.1.5, ``sparsify.magnitude`` / ``magnitude_outliers``) keeps, as (lo, hi, ties).

    Exactly k entries are kept: ``magnitude``: k = max(1, int(density n)), the first k positions of
    ``torch.argsort(|tau|, descending=True)``; ``breadcrumbs``: target = int(density n), n_top = int(gamma n),
    n_bot = max(0, n - target - n_top), positions [n_bot, n_bot + target) of ``torch.sort(|tau|)`` (ascending).
    Magnitudes are compared in float32, and the default (unstable) sort decides among entries of equal
    magnitude, as in mergekit on CPU. The kept set is every entry with lo < |tau| < hi plus the flat
    indices ``ties`` (the kept entries whose magnitude is lo or hi), so a row block can be masked with
    :func:`kept_mask` without the whole tensor. Nothing kept: lo = +inf.
    """
    n = tau.numel()
    w = tau.abs().reshape(-1).float()
    if method == "magnitude":
        k = max(1, int(density * n)) if n else 0
        idx = torch.argsort(w, descending=True)[:k]
    elif method == "breadcrumbs":
        target = int(density * n)
        n_top = int(gamma * n)
        n_bot = max(0, n - target - n_top)
        idx = torch.sort(w, descending=False).indices[n_bot:n_bot + target]
    else:
        raise ValueError(f"no magnitude selection for sparsification {method!r}")
    if idx.numel() == 0:
        return math.inf, math.inf, torch.empty(0, dtype=torch.long)
    kv = w[idx]
    lo, hi = float(kv.min()), float(kv.max())
    ties = torch.sort(idx[(kv == lo) | (kv == hi)]).values
    return lo, hi, ties


def kept_mask(tau: torch.Tensor, lo: float, hi: float, ties: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Mask of the entries kept by :func:`mergekit_kept` in ``tau``, a block whose first entry has flat index
    ``offset`` in the whole tensor."""
    w = tau.abs().float()
    if lo == math.inf:
        return torch.zeros(tau.shape, dtype=torch.bool)
    m = (w > lo) & (w < hi)
    n = tau.numel()
    if ties.numel():
        a = int(torch.searchsorted(ties, offset))
        b = int(torch.searchsorted(ties, offset + n))
        if b > a:
            m.view(-1)[ties[a:b] - offset] = True
    return m


def l1_rescale_factor(tau: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> float:
    """mergekit 0.1.5 ``rescale``: ||tau||_1 / ||tau * mask||_1 (1 when either is below ``eps``)."""
    before = float(tau.abs().sum())
    after = float((tau * kept).abs().sum())
    if before < eps or after < eps:
        return 1.0
    return before / after


def della_keep_prob(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune keep probabilities, row by row (see the module docstring)."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    m = rows.shape[1]
    if m == 1:
        return torch.full_like(tau, density)
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(m).expand_as(order).contiguous())
    p = (density - epsilon) + (2 * epsilon / (m - 1)) * ranks.to(tau.dtype)
    return p.reshape(tau.shape)


def sparsify(tau: torch.Tensor, method: str, density: float, *, rescale: bool = False,
             generator: torch.Generator | None = None, thresholds: tuple[float, float] | None = None,
             gamma: float = 0.01, epsilon: float = 0.15, band: Band | None = None, offset: int = 0) -> torch.Tensor:
    """Sparsify one task vector (see the module docstring for each method's exact rule).

    Args:
        tau: the task vector (or a row block of it; then pass ``thresholds`` for magnitude methods,
            and a generator whose stream continues from the previous block for random ones).
        method: 'none', 'magnitude', 'breadcrumbs', 'random' or 'della'.
        density: fraction of entries kept (expected fraction for random methods); >= 1 keeps all.
        rescale: random methods: divide kept entries by their keep probability.
        generator: random methods: the source of the uniforms.
        thresholds: magnitude methods, ties all kept: keep lo <= |tau| < hi (from :func:`magnitude_thresholds`).
        band: magnitude methods: the whole tensor's :data:`Band` (default: :func:`magnitude_band` of ``tau``).
        offset: with ``band``: flat index of the first entry of ``tau`` (a row block) in the whole tensor.
        gamma: breadcrumbs: fraction of largest magnitudes removed.
        epsilon: della: half-width of the keep probabilities around density.
    """
    if method == "none" or density >= 1.0:
        return tau
    if method in ("magnitude", "breadcrumbs"):
        if thresholds is not None:
            return band_keep(tau, *thresholds)
        if band is None:
            band = magnitude_band(tau, method, density, gamma)
        return tau * rank_band_mask(tau, band, offset)
    if generator is None:
        raise ValueError(f"sparsification {method!r} needs a seeded generator")
    if method == "random":
        if density <= 0:
            return torch.zeros_like(tau)
        out = tau * dare_mask(tau.shape, 1.0 - density, generator)
        return out.div_(density) if rescale else out
    if method == "della":
        if density <= 0:
            return torch.zeros_like(tau)
        p = della_keep_prob(tau, density, epsilon)
        u = torch.rand(tau.shape, generator=generator, dtype=torch.float32).to(tau.dtype)
        keep = u < p
        out = tau * keep
        return torch.where(keep, out / p, out) if rescale else out
    raise ValueError(f"unknown sparsification {method!r}; use one of {SPARSIFICATIONS}")


def gta_merge(base: torch.Tensor, taus: Sequence[torch.Tensor], weights: Sequence[float], *,
              consensus: str = "none", normalize: bool = False, scaling_factor: float = 1.0) -> torch.Tensor:
    """theta_0 + lambda * (sum_i w_i tau_i m_i) [/ sum_i w_i m_i]: the merge step of generalized task arithmetic.

    Args:
        base: theta_0.
        taus: the (already sparsified) task vectors, same shape as ``base``.
        weights: w_i, one per task vector.
        consensus: 'none', 'sum' or 'count' (module docstring).
        normalize: divide by the participating weights' sum.
        scaling_factor: lambda.
    """
    out = torch.zeros_like(base)
    if consensus == "none":
        for w, t in zip(weights, taus):
            out.add_(t, alpha=float(w))
        if normalize:
            div = float(sum(weights))
            out.div_(div if abs(div) >= 1e-8 else 1.0)
        return base + scaling_factor * out
    if consensus not in CONSENSUS:
        raise ValueError(f"unknown consensus {consensus!r}; use one of {CONSENSUS}")
    # participating entries: w_i tau_i > 0 where the elected sign is +1, < 0 where it is -1, so the
    # agreeing sum is the sum of the positive (or negative) weighted entries
    pos = torch.zeros_like(base)
    neg = torch.zeros_like(base)
    pos_w = torch.zeros_like(base) if normalize else None
    neg_w = torch.zeros_like(base) if normalize else None
    pos_n = torch.zeros_like(base) if consensus == "count" else None
    neg_n = torch.zeros_like(base) if consensus == "count" else None
    for w, t in zip(weights, taus):
        wt = t if float(w) == 1.0 else t * float(w)
        pos.add_(wt.clamp(min=0))
        neg.add_(wt.clamp(max=0))
        if pos_w is not None or pos_n is not None:
            gt = wt > 0
            lt = wt < 0
            if pos_w is not None:
                pos_w.add_(gt, alpha=float(w))
                neg_w.add_(lt, alpha=float(w))
            if pos_n is not None:
                pos_n.add_(gt)
                neg_n.add_(lt)
    if consensus == "sum":
        plus = (pos + neg) >= 0
    elif consensus == "count":
        plus = pos_n >= neg_n
    else:
        raise ValueError(f"unknown consensus {consensus!r}; use one of {CONSENSUS}")
    out = torch.where(plus, pos, neg)
    if normalize:
        div = torch.where(plus, pos_w, neg_w)
        div[div == 0] = 1.0
        out.div_(div)
    return base + scaling_factor * out
