"""TIES-merging: trim, elect sign, disjoint merge (Yadav et al., NeurIPS 2023)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from fusion_bench.config_schema import option
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.kernels.merging import ties as K
from fusion_bench.methods.base import FusionResult, TensorwiseConfig, TensorwiseMerge, register_method


def check_fraction(value: float, key: str, *, upper_open: bool = False) -> None:
    """Raise a ConfigError unless 0 <= value <= 1 (or < 1 when ``upper_open``)."""
    ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if not ok:
        rng = "[0, 1)" if upper_open else "[0, 1]"
        raise ConfigError(f"method.{key}={value} must be in {rng}: it is a fraction (e.g. 0.2 keeps 20% of the "
                          "entries; FusionBench's threshold=20 is density=0.2).")


@dataclass
class TiesMergingConfig(TensorwiseConfig):
    scaling_factor: float = option(0.3, ge=-1e3, le=1e3, help="lambda: theta = theta_0 + lambda * merged task vector.")
    density: float = option(
        0.2, ge=0.0, le=1.0, help="Fraction of each task vector's entries kept by the magnitude trim (top-k%, k = density; "
        "FusionBench's threshold=20 is density=0.2). keep_rule=round keeps exactly k entries (ties in magnitude: "
        "lower flat index first, tensors in name order); keep_rule=fusionbench keeps every entry tied at the threshold.")
    trim_scope: str = option(
        "global", choices=("global", "tensor"),
        help="'global': top-k over the whole flattened task vector of each model (paper, FusionBench; exact "
        "threshold from a radix-select pre-pass reading one tensor at a time); 'tensor': top-k per tensor (mergekit).")
    sign_election: str = option(
        "mass", choices=("mass", "count"),
        help="Elected sign per entry: 'mass' = sign of the sum of trimmed task vectors (paper); 'count' = "
        "sign of the sum of their signs. A zero vote elects 0 and the merged entry is 0.")
    merge_func: str = option(
        "mean", choices=("mean", "sum", "max"),
        help="Disjoint merge over entries agreeing with the elected sign: 'mean' (paper), 'sum' "
        "(FusionBench merge_func=sum) or 'max' (largest agreeing magnitude).")
    keep_rule: str = option(
        "round", choices=("round", "fusionbench"),
        help="How many entries the trim keeps of n: 'round': exactly k = round(density * n); 'fusionbench': "
        "|x| >= the k-th largest with k = int(density * n) + 1, ties all kept (FusionBench's topk_values_mask: "
        "|x| >= its (n - int(n*K))-th smallest).")
    zero_vote: str = option(
        "zero", choices=("zero", "majority"),
        help="Where the sign vote is exactly 0: 'zero' merges to 0 (paper); 'majority' elects the majority sign "
        "of the whole model (FusionBench's resolve_zero_signs; trim_scope=global only, one extra pass).")

    def __post_init__(self) -> None:
        check_fraction(self.density, "density")
        if self.zero_vote == "majority" and self.trim_scope != "global":
            raise ConfigError("method.zero_vote=majority needs method.trim_scope=global (the majority sign is taken "
                              "over the whole model, as FusionBench does).")


@register_method
class TiesMerging(TensorwiseMerge):
    """TIES-merging of task vectors.

    Paper: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
    Variant: see :mod:`fusion_bench.kernels.merging.ties` (trim to exactly the top-``density`` magnitudes
    globally per model or per tensor, ties in magnitude broken by lower flat index; sign by total mass (or count); disjoint mean
    of agreeing entries; theta_0 + lambda * merged).

    Args:
        config: :class:`TiesMergingConfig` (scaling_factor, density, trim_scope, sign_election,
            merge_func, exclude).
    """

    name = "ties_merging"
    config_class: ClassVar = TiesMergingConfig
    requires_pretrained = True
    summary = "TIES-merging: trim task vectors to their top-k% magnitudes, elect signs, disjoint mean."
    variant = ("Yadav et al. 2023 (TIES): tau_i = theta_i - theta_0 trimmed to exactly its k largest magnitudes "
               "(k = round(density * n), over the whole model when trim_scope=global, per tensor when "
               "trim_scope=tensor; ties in magnitude: lower flat index first, tensors in name order; "
               "keep_rule=fusionbench keeps all ties instead); sign elected per entry by total mass "
               "(sign_election=mass) or count; disjoint mean (merge_func) over non-zero entries agreeing with "
               "the elected sign (a zero vote gives 0); theta = theta_0 + lambda * merged.")

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self._thresholds: dict[str, float] | None = None
        # global exact-k trim: per model, one past the last kept tied entry in the concatenation of the merged
        # tensors in name order (None: every tie kept), and each tensor's offset in that concatenation
        self._tie_ends: dict[str, int | None] = {}
        self._key_offsets: dict[str, int] = {}
        self._zero_sign = 0.0
        self._threshold_dtype = torch.float32
        if self.config.trim_scope == "tensor":
            # streaming engine, large tensors in row blocks: per-model thresholds of the whole tensor first
            self.block_stats = self._tensor_threshold

    def prepare(self, base, sources, names, keys) -> None:
        """Global trim: the exact k-th largest |tau| of each model over all merged tensors.

        :class:`fusion_bench.kernels.merging.ties.KthLargestSelector` on the float bit patterns: a sampling pass
        (every 127th entry) and one full pass for large float32-computed models (else, or if the sampled
        bracket misses, radix select: 2 full passes, 4 for float64), one tensor of one model at a time.
        Ties in magnitude (keep_rule=round): the selection also tells how many of the entries tied at the
        threshold the top k holds; when that is fewer than all of them, one more pass (tensors in name order,
        stopping once found) locates the last kept tie, so exactly k entries are kept.
        """
        self._thresholds = None
        self._tie_ends = {}
        self._key_offsets = {}
        self._zero_sign = 0.0
        if self.config.trim_scope != "global":
            return
        if base is None:
            raise ModelMismatchError(f"Method '{self.name}' needs the base model: add '_pretrained_' to the pool.")
        metas = {k: base.meta(k) for k in keys}
        dtype = torch.float64 if any(self.compute_dtype(m.dtype) == torch.float64 for m in metas.values()) \
            else torch.float32
        self._threshold_dtype = dtype
        total = sum(m.numel for m in metas.values())
        k = self._keep(total)
        if k >= total or k <= 0:  # keep everything / nothing: no pass needed
            value = 0.0 if k >= total else float("inf")
            self._thresholds = {n: value for n in names}
        else:
            sel = K.KthLargestSelector([k] * len(names), dtype, totals=[total] * len(names))
            while not sel.done:
                sel.start_pass()
                for key in keys:
                    b = base.get(key)
                    if sel.stride == 1:
                        b = b.to(dtype)  # widened once, shared by the models (the sampling pass widens its slice)
                    for i, (n, src) in enumerate(zip(names, sources)):
                        if not self._select_add(sel, i, key, src.get(key), b, n):
                            raise ModelMismatchError(
                                f"Model '{n}' (or the base) has non-finite values (NaN/inf) in tensor '{key}'; "
                                "fix or drop that checkpoint.")
                sel.finish_pass()
            self._thresholds = dict(zip(names, sel.values()))
            if self.config.keep_rule == "round":
                self._locate_ties(base, sources, names, keys, metas, sel.tie_counts(), dtype)
        if self.config.zero_vote == "majority":  # FusionBench: one more pass for the majority sign
            thr = [self._thresholds[n] for n in names]
            votes = 0
            for key in keys:
                b = base.get(key).to(dtype)
                votes += K.vote_sign_total(self._taus(key, b, [src.get(key) for src in sources], names, dtype),
                                           thr, self.config.sign_election, self._global_tie_ends(key, names))
            self._zero_sign = K.fusionbench_zero_sign(votes, self.config.merge_func)

    def _locate_ties(self, base, sources, names, keys, metas, counts, dtype) -> None:
        """Global exact-k trim: per model, where (in the name-ordered concatenation of the tensors) the kept
        ties at the threshold end. Reads tensors only while some model's last kept tie is not found."""
        order = sorted(keys)
        off = 0
        for key in order:
            self._key_offsets[key] = off
            off += metas[key].numel
        todo = {}  # model index -> 0-based ordinal of its last kept tie among all its ties
        for i, (n, c) in enumerate(zip(names, counts)):
            self._tie_ends[n] = None
            if c is not None and c[0] < c[1] and 0.0 < self._thresholds[n] < float("inf"):
                todo[i] = c[0] - 1
        seen = dict.fromkeys(todo, 0)
        for key in order:
            if not todo:
                break
            b = base.get(key).to(dtype)
            idx = list(todo)
            taus = self._taus(key, b, [sources[i].get(key) for i in idx], [names[i] for i in idx], dtype)
            for i, tau in zip(idx, taus):
                (pos,), cnt = K.tie_positions(tau, self._thresholds[names[i]], [todo[i] - seen[i]], dtype=dtype)
                if pos is not None:
                    self._tie_ends[names[i]] = self._key_offsets[key] + pos + 1
                    del todo[i]
                else:
                    seen[i] += cnt

    def _global_tie_ends(self, key: str, names: list[str], offset: int = 0) -> list[int | None]:
        """Per model, the tie end within tensor ``key`` (or its block starting at flat index ``offset``)."""
        ends = []
        for n in names:
            e = self._tie_ends.get(n)
            ends.append(None if e is None else e - self._key_offsets[key] - offset)
        return ends

    def _keep(self, n: int) -> int:
        if self.config.keep_rule == "fusionbench":
            try:
                return K.keep_count_fusionbench(n, self.config.density)
            except ValueError as e:
                raise ConfigError(f"method.density={self.config.density} with keep_rule=fusionbench: {e}.") from None
        return K.keep_count(n, self.config.density)

    def _select_add(self, sel, i, key, tensor, base, name) -> bool:
        """Feed |tau_i| of one tensor to the threshold selection (DARE variants transform tau first)."""
        return sel.add_delta(i, tensor, base)  # |theta_i - theta_0|, never in place

    def _taus(self, key, base, tensors, names, dtype) -> list[torch.Tensor]:
        """The task vectors the trim and the vote see (DARE variants: after the random drop)."""
        return [t.to(dtype) - base for t in tensors]

    def _global_thresholds(self, names: list[str]) -> list[float]:
        if self._thresholds is None:
            raise RuntimeError(f"{self.name}: prepare() must run before merging with trim_scope=global "
                               "(the engines call it).")
        return [self._thresholds[n] for n in names]

    def merge_tensor(self, key, base, tensors, names):
        c = self.config
        if c.trim_scope == "tensor":
            cuts = [self._cut(t - base) for t in tensors]
            return self._merge_with(base, tensors, [t for t, _ in cuts], [e for _, e in cuts])
        return self._merge_with(base, tensors, self._global_thresholds(names), self._global_tie_ends(key, names))

    def _cut(self, tau: torch.Tensor) -> tuple[float, int | None]:
        """Per-tensor trim of one task vector: (threshold, tie end; None = every tie kept, keep_rule=fusionbench)."""
        k = self._keep(tau.numel())
        if self.config.keep_rule == "round":
            return K.exact_k_cut(tau, k)
        return K.kth_largest_abs(tau, k), None

    def _merge_with(self, base, tensors, thresholds, tie_ends=None):
        c = self.config
        if c.trim_scope == "global" and base.dtype != self._threshold_dtype:
            # mixed float32/float64 pool: compare in the type the thresholds were selected in
            base, tensors = base.to(self._threshold_dtype), [t.to(self._threshold_dtype) for t in tensors]
        return K.ties_merge(base, tensors, thresholds=thresholds, scaling_factor=c.scaling_factor,
                            sign_election=c.sign_election, merge=c.merge_func, zero_sign=self._zero_sign,
                            tie_ends=tie_ends)

    # streaming engine row-block protocol: with its thresholds known, TIES is element-wise
    def _tensor_threshold(self, key, base, tensor, name) -> tuple[float, int | None]:
        cd = self.compute_dtype(base.dtype)
        return self._cut(tensor.to(cd) - base.to(cd))

    def merge_block(self, key, base, tensors, names, ctx, rows):
        offset = rows[0] * math.prod(base.shape[1:])
        if ctx.stats is not None:
            thresholds = [t for t, _ in ctx.stats]
            ends = [None if e is None else e - offset for _, e in ctx.stats]
        else:
            thresholds, ends = self._global_thresholds(names), self._global_tie_ends(key, names, offset)
        return self._merge_with(base, tensors, thresholds, ends)

    def run(self, modelpool) -> FusionResult:
        result = super().run(modelpool)
        if self._thresholds is not None:
            result.metadata["trim_thresholds"] = dict(self._thresholds)
        if self.config.zero_vote == "majority":
            result.metadata["zero_vote_sign"] = self._zero_sign
        return result
