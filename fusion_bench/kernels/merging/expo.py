"""ExPO, weak-to-strong extrapolation (Zheng et al., 2024, "Weak-to-Strong Extrapolation Expedites
Alignment", arXiv 2404.16792).

Exact variant (the paper's Eq.): theta = theta_1 + alpha (theta_1 - theta_0), theta_0 the weaker (SFT)
model, theta_1 the aligned one, alpha > 0 the extrapolation factor (FusionBench ``extrapolation_factor``).
"""

from __future__ import annotations

import torch


def expo(sft: torch.Tensor, aligned: torch.Tensor, alpha: float) -> torch.Tensor:
    """theta_aligned + alpha * (theta_aligned - theta_sft)."""
    return aligned + alpha * (aligned - sft)
