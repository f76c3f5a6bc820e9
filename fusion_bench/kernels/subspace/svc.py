"""SVC, singular value calibration of a merged weight matrix (Li et al., 2026, "When Shared Knowledge Hurts:
Spectral Over-Accumulation in Model Merging", arXiv 2602.05536; code github.com/lyymuwu/SVC, FusionBench
``SingularValueCalibration``).

Exact variant (Algorithm 1; FusionBench's vectorised form, computed in float64): with
dW = W_merge - W_0 = U diag(sigma) V^T (thin SVD) and dW_i = W_i - W_0, for every direction r and task i
the subspace responses are a_r = u_r^T dW and a_r^i = u_r^T dW_i, the projection coefficient is
s_r^i = <a_r, a_r^i> / max(||a_r^i||^2, 1e-12) (NaN, -inf -> alpha) and the calibration factor is
gamma_r = N / sum_i max(alpha, s_r^i); the result is W_0 + U diag(gamma * sigma) V^T.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def svc_calibrate(base: torch.Tensor, tensors: Sequence[torch.Tensor], merged: torch.Tensor,
                  alpha: float) -> torch.Tensor:
    """Calibrate the singular values of ``merged - base`` (2-D); returns the calibrated weight in float64.

    Args:
        base: W_0 (out, in).
        tensors: the fine-tuned W_i.
        merged: W_merge from any merge.
        alpha: the lower clip of the projection coefficients (calibration strength).
    """
    b = base.to(torch.float64)
    d_m = merged.to(torch.float64) - b
    u, s, vh = torch.linalg.svd(d_m, full_matrices=False)
    ut = u.T.contiguous()  # (R, out)
    a_m = ut @ d_m  # (R, in)
    coeffs = []
    for t in tensors:
        a_i = ut @ (t.to(torch.float64) - b)  # (R, in)
        denom = (a_i * a_i).sum(dim=1).clamp_min(1e-12)
        coeffs.append((a_m * a_i).sum(dim=1) / denom)
    c = torch.stack(coeffs, dim=1)  # (R, N)
    c = torch.nan_to_num(c, nan=alpha, neginf=alpha)
    gamma = len(tensors) / torch.clamp(c, min=alpha).sum(dim=1)
    return b + (u * (gamma * s).unsqueeze(0)) @ vh
