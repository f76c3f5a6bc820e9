"""DELLA-merging (Deep et al., 2024): magnitude-ranked random drop, rescale, sign election, fuse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.config_schema import option
from fusion_bench.kernels.merging import sparsify as K
from fusion_bench.methods.base import register_method
from fusion_bench.methods.merging.sparsify import GeneralizedTaskArithmetic, GTAConfig


@dataclass
class DellaConfig(GTAConfig):
    sparsification: str = option("della", choices=("della",), help="Fixed: DELLA MagPrune.")
    density: float = option(0.7, ge=0.0, le=1.0, help="Mean keep probability of each entry.")
    epsilon: float = option(0.15, ge=0.0, lt=1.0, help="Keep probabilities run from density - epsilon (smallest magnitude in a row) "
                            "to density + epsilon (largest).")
    rescale: bool = option(True, help="Divide kept entries by their keep probability (paper).")
    consensus: str = option("sum", choices=K.CONSENSUS,
                            help="'sum' (paper's sign election; mergekit della) or 'none' (mergekit della_linear).")
    normalize: bool = option(True, help="Divide by the sum of the agreeing weights (mean of agreeing entries).")
    scaling_factor: float = option(1.0, ge=-1e3, le=1e3, help="lambda: theta = theta_0 + lambda * merged delta.")


@register_method
class Della(GeneralizedTaskArithmetic):
    """DELLA-merging: MagPrune (rank-dependent drop), rescale, TIES sign election, disjoint mean.

    Paper: Deep, Bhardwaj & Poria, "DELLA-Merging: Reducing Interference in Model Merging through
    Magnitude-Based Sampling" (2024). Variant: within each row, entry of magnitude rank r (0 = smallest,
    stable order) is kept with probability p = density - epsilon + 2 epsilon r / (m - 1) (u < p, u from a
    generator seeded per (seed, tensor, model)) and divided by p; sign elected by the weighted sum (+1
    on a zero vote); mean of the agreeing weighted entries; theta = theta_0 + lambda * merged.

    Args:
        config: :class:`DellaConfig`.
    """

    name = "della"
    config_class: ClassVar = DellaConfig
    summary = "DELLA: magnitude-rank-dependent random drop with rescaling, sign election, disjoint mean."
    variant = ("Deep et al. 2024 (DELLA, MagPrune per row as in mergekit): p = density - eps + 2 eps r/(m-1), "
               "kept entries / p; consensus sum (+1 on a zero vote); weighted mean of agreeing entries; "
               "theta = theta_0 + lambda delta.")
