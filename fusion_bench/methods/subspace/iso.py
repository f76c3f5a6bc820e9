"""Isotropic merging: Iso-C (common subspace) and Iso-CTS (common and task-specific subspaces).

Paper: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
2025 (arXiv 2502.04959). The tensor math is in :mod:`fusion_bench.kernels.subspace.iso`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.config_schema import option
from fusion_bench.kernels.subspace import iso as K
from fusion_bench.methods.base import TensorwiseConfig, register_method
from fusion_bench.methods.subspace.tsv import MEAN_KEYS_HELP, SvdTaskMerge

SCALING_HELP = ("alpha: theta = theta_0 + alpha * merged task vector. The paper picks alpha on validation data "
                "(the authors' code searches 0.1, 0.2, ..., 3.0); 1.0 is FusionBench's default.")


@dataclass
class IsoCConfig(TensorwiseConfig):
    scaling_factor: float = option(1.0, ge=-1e3, le=1e3, help=SCALING_HELP)
    mean_keys: list[str] = option([], help=MEAN_KEYS_HELP)


@dataclass
class IsoCtsConfig(IsoCConfig):
    common_space_fraction: float = option(
        0.8, ge=0.0, le=1.0, help="f: the common subspace keeps int(k * f) of the k = min(m, n) directions of the "
        "summed task matrix (then adjusted so that the rest divides evenly among the T tasks); the rest is filled "
        "with task-specific directions (0.8 in the paper).")


class _IsoBase(SvdTaskMerge):
    family = "merging"
    _variant: ClassVar[str] = "c"

    def svd_merge(self, base, tensors, use_svd):
        f = getattr(self.config, "common_space_fraction", 0.8)
        return K.iso_merge(base, tensors, self.config.scaling_factor, variant=self._variant,
                           common_space_fraction=f, use_svd=use_svd)


@register_method
class IsoC(_IsoBase):
    """Iso-C: the task-arithmetic sum of each 2-D tensor with a flat (isotropic) singular spectrum.

    Paper: Marczak et al. 2025. Variant: see :mod:`fusion_bench.kernels.subspace.iso` (M = sum_i Delta_i =
    U diag(s) V^T, Delta = mean(s) U V^T; tensors that are not 2-D, and 2-D tensors matching ``mean_keys``, get
    the mean task vector, as in the authors' code); theta = theta_0 + alpha * Delta.

    Args:
        config: :class:`IsoCConfig` (scaling_factor, mean_keys, exclude).
    """

    name = "iso_c"
    config_class: ClassVar = IsoCConfig
    _variant = "c"
    summary = "Iso-C: summed task matrix per layer with its singular values flattened to their mean (Marczak et al. 2025)."
    variant = ("Marczak et al. 2025 (Iso-C), authors' code: per 2-D tensor, M = sum_i (theta_i - theta_0) = U S V^T, "
               "Delta = U (mean(S) I) V^T; tensors that are not 2-D (and mean_keys) get the mean task vector; "
               "theta = theta_0 + alpha * Delta.")


@register_method
class IsoCts(_IsoBase):
    """Iso-CTS: isotropic merge over the common subspace plus task-specific directions.

    Paper: Marczak et al. 2025. Variant: see :mod:`fusion_bench.kernels.subspace.iso` (common subspace: top
    c = k - T p directions of the summed task matrix, c close to int(f k); per task the top p directions of its task
    matrix with the common left subspace projected out; concatenated U and V^T orthogonalised by their polar
    factors; every singular value replaced by the mean of the k kept ones); tensors that are not 2-D (and
    ``mean_keys``) get the mean task vector; theta = theta_0 + alpha * Delta.

    Args:
        config: :class:`IsoCtsConfig` (scaling_factor, common_space_fraction, mean_keys, exclude).
    """

    name = "iso_cts"
    config_class: ClassVar = IsoCtsConfig
    _variant = "cts"
    summary = ("Iso-CTS: isotropic merge in the common subspace of the summed task matrix plus task-specific "
               "directions (Marczak et al. 2025).")
    variant = ("Marczak et al. 2025 (Iso-CTS), authors' code: per 2-D tensor (k = min(m, n), T tasks), c = int(k f), "
               "p = round((k - c) / T), c = k - T p; U_c, s_c, V_c = top-c SVD of sum_i Delta_i; per task the top-p SVD "
               "of Delta_i - U_c U_c^T Delta_i; U = [U_1..U_T, U_c], V^T likewise, each replaced by its polar factor "
               "P Q^T; Delta = U_perp (mean of the k singular values) V_perp^T; tensors that are not 2-D (and "
               "mean_keys) get the mean task vector; theta = theta_0 + alpha * Delta.")
