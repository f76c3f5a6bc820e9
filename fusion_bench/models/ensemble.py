"""Output ensembles: keep every member model and combine their predictions.

An :class:`Ensemble` is an ``nn.Module``. Called directly it runs every member on the same input
and combines the outputs (tensors, or objects with ``logits``). Task pools that turn model outputs
into logits themselves (e.g. CLIP zero-shot heads) call :meth:`Ensemble.combine_logits` on the
members' logits instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

Combine = Literal["mean", "weighted", "max_confidence"]


def combine_logits(logits: Sequence[torch.Tensor], mode: Combine, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Combine members' logits of shape (batch, classes).

    - ``mean``: (1/M) sum_m z_m (simple ensemble, the average of outputs).
    - ``weighted``: sum_m w_m z_m with the given weights (normalised by the caller if desired).
    - ``max_confidence``: per example, the logits of the member whose softmax maximum is largest.
    """
    stacked = torch.stack([z.float() for z in logits])  # M, B, C
    if mode == "mean":
        return stacked.mean(0)
    if mode == "weighted":
        if weights is None or len(weights) != stacked.shape[0]:
            raise ValueError("weighted ensemble needs one weight per member")
        w = torch.as_tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
        return torch.einsum("m,mbc->bc", w, stacked)
    if mode == "max_confidence":
        conf = stacked.softmax(-1).amax(-1)  # M, B
        pick = conf.argmax(0)  # B
        return stacked[pick, torch.arange(stacked.shape[1], device=stacked.device)]
    raise ValueError(f"unknown ensemble mode {mode!r}")


class Ensemble(nn.Module):
    """Members plus a combination rule (``mean``, ``weighted`` or ``max_confidence``)."""

    def __init__(self, members: Sequence[nn.Module] | dict[str, nn.Module], mode: Combine = "mean",
                 weights: Sequence[float] | None = None):
        super().__init__()
        if isinstance(members, dict):
            self.member_names = list(members)
            members = list(members.values())
        else:
            self.member_names = [str(i) for i in range(len(members))]
        self.members = nn.ModuleList(members)
        self.mode = mode
        self.weights = list(weights) if weights is not None else None
        #: the device of each member when :meth:`place` spread them (None: wherever they are, together)
        self.member_devices: list[torch.device] | None = None

    def place(self, devices: Sequence[torch.device]) -> list[torch.device]:
        """Put member i on ``devices[i % len(devices)]`` (round-robin); calls then run each member on its
        device and combine on the first one. Returns the members' devices."""
        from fusion_bench.engine.devices import place_round_robin

        self.member_devices = place_round_robin(list(self.members), list(devices))
        return self.member_devices

    def combine_logits(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.member_devices is not None and logits:
            logits = [z.to(logits[0].device) for z in logits]
        return combine_logits(logits, self.mode, self.weights)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        outs = []
        placed = self.member_devices
        if placed is not None:
            from fusion_bench.engine.devices import to_device
        for i, m in enumerate(self.members):
            a, kw = (to_device(args, placed[i]), to_device(kwargs, placed[i])) if placed is not None else (args, kwargs)
            o = m(*a, **kw)
            z = o.logits if hasattr(o, "logits") else o
            outs.append(z.to(placed[0]) if placed is not None else z)
        return self.combine_logits(outs)
