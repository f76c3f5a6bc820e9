"""PCB-Merging: parameter competition balancing (Du et al., NeurIPS 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fusion_bench.config_schema import option
from fusion_bench.errors import ModelMismatchError
from fusion_bench.kernels.merging.ties import KthLargestSelector
from fusion_bench.kernels.subspace import pcb as K
from fusion_bench.methods.base import TensorwiseConfig, TensorwiseMerge, all_finite, register_method


@dataclass
class PCBMergingConfig(TensorwiseConfig):
    pcb_ratio: float = option(
        0.1, gt=0.0, le=1.0,
        help="r: fraction of each task's balanced scores kept (top r over the whole model; the others get weight "
        "0). Official code default 0.1.")
    scaling_factor: float = option(
        1.0, ge=-1e3, le=1e3,
        help="lambda: theta = theta_0 + lambda * sum_i w_i tau~_i / sum_i w_i (the official code searches it "
        "per task in [0.8, 1.3] with an evolutionary strategy, starting at 1.0).")
    clip_ratio: float = option(
        1e-4, ge=0.0, lt=0.5,
        help="Magnitudes of each task vector are clipped to its [clip_ratio, 1 - clip_ratio] quantiles over the "
        "whole model before balancing (official code: 1e-4).")


@register_method
class PCBMerging(TensorwiseMerge):
    """PCB-Merging: intra- and inter-balanced scores, drop to the top r, score-weighted mean of task vectors.

    Paper: Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024.
    Variant: the official code's whole-model computation (see :mod:`fusion_bench.kernels.subspace.pcb`).
    :meth:`prepare` computes each task's whole-model statistics one tensor at a time: the two clip
    quantiles of |tau_i| (exact radix select, 2 passes over the models for float32, 4 for float64),
    one counting pass over the scores (their signs and maxima), and the exact drop threshold of the
    scores (2-4 more passes); then every tensor is merged with them. Peak memory: the N + 1 tensors of
    one key (plus the scores of that key).

    Args:
        config: :class:`PCBMergingConfig` (pcb_ratio, scaling_factor, clip_ratio, exclude).
    """

    name = "pcb_merging"
    config_class: ClassVar = PCBMergingConfig
    requires_pretrained = True
    summary = "PCB-Merging: balance parameter competition within and across tasks, drop, weighted merge."
    variant = ("Du et al. 2024 (PCB), official pcb-merging.py on the flattened whole model: |tau_i| clipped to its "
               "[int(d*c), int(d*(1-c))-1] sorted entries (c=clip_ratio); score_i = exp(N*minmax(|tau~_i|)^2) * "
               "tanh(tau_i * sum_j tau_j); weights w_i = minmax(clamp(score_i, sorted(score_i)[int(d*(1-r))], max)); "
               "theta = theta_0 + lambda * sum_i w_i tau~_i / max(sum_i w_i, 1e-12); 0/0 normalisations give 0.")

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self._stats: list[K.PCBStats] | None = None

    def _dtype(self, base, keys) -> torch.dtype:
        return torch.float64 if any(self.compute_dtype(base.meta(k).dtype) == torch.float64 for k in keys) \
            else torch.float32

    def _taus(self, key, base, sources, names, dtype):
        b = base.get(key).to(dtype)
        out = []
        for n, src in zip(names, sources):
            t = src.get(key)
            if not all_finite(t):
                raise ModelMismatchError(f"Model '{n}' has non-finite values (NaN/inf) in tensor '{key}'; "
                                         "fix or drop that checkpoint.")
            out.append((t.to(dtype) - b).reshape(-1))
        return out

    def prepare(self, base, sources, names, keys) -> None:
        """Whole-model statistics of each task (see the class docstring), reading one tensor at a time."""
        self._stats = None
        if base is None:
            raise ModelMismatchError(f"Method '{self.name}' needs the base model: add '_pretrained_' to the pool.")
        if not keys:
            self._stats = []
            return
        c, r = self.config.clip_ratio, self.config.pcb_ratio
        dtype = self._dtype(base, keys)
        d = sum(base.meta(k).numel for k in keys)
        n = len(names)
        j_lo = K.wrap(K.sorted_index(d, c), d)
        j_hi = K.wrap(K.sorted_index(d, 1 - c) - 1, d)
        # 1) clip quantiles of |tau_i|: ascending position j is the (d - j)-th largest
        sel = KthLargestSelector([d - j_lo, d - j_hi] * n, dtype)
        while not sel.done:
            sel.start_pass()
            for key in keys:
                for i, t in enumerate(self._taus(key, base, sources, names, dtype)):
                    sel.add(2 * i, t)
                    sel.add(2 * i + 1, t)
            sel.finish_pass()
        v = sel.values()
        stats = [K.PCBStats(v[2 * i], v[2 * i + 1]) for i in range(n)]
        # 2) signs and maxima of the scores
        neg, zero = [0] * n, [0] * n
        mx = [-float("inf")] * n
        for key in keys:
            for i, s in enumerate(K.pcb_scores(self._taus(key, base, sources, names, dtype), stats)):
                neg[i] += int((s < 0).sum())
                zero[i] += int((s == 0).sum())
                mx[i] = max(mx[i], float(s.max()))
        # 3) drop threshold: ascending position j of the scores, among the negatives, zeros or positives
        j = K.wrap(K.sorted_index(d, 1 - r), d)
        ks, side = [], []
        for i in range(n):
            if j < neg[i]:
                ks.append(j + 1)  # (j+1)-th largest magnitude among the negatives
                side.append(-1)
            elif j < neg[i] + zero[i]:
                ks.append(0)
                side.append(0)
            else:
                ks.append(d - j)  # (d - j)-th largest among the positives
                side.append(1)
        thr = [0.0] * n
        if any(s != 0 for s in side):
            sel = KthLargestSelector([k if s != 0 else 0 for k, s in zip(ks, side)], dtype)
            while not sel.done:
                sel.start_pass()
                for key in keys:
                    for i, s in enumerate(K.pcb_scores(self._taus(key, base, sources, names, dtype), stats)):
                        if side[i] != 0:
                            sel.add(i, (s * side[i]).clamp_min(0))
                sel.finish_pass()
            thr = [side[i] * val if side[i] != 0 else 0.0 for i, val in enumerate(sel.values())]
        for st, t, m in zip(stats, thr, mx):
            st.threshold, st.maximum = float(t), float(m)
        self._stats = stats

    def merge_tensor(self, key, base, tensors, names):
        if self._stats is None:
            raise RuntimeError("pcb_merging: prepare() must run before merge_tensor (the engines call it)")
        shape = base.shape
        out = K.pcb_merge(base.reshape(-1), [t.reshape(-1) for t in tensors], self._stats,
                          scaling_factor=self.config.scaling_factor)
        return out.reshape(shape)
