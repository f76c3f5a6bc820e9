"""Model recombination: each unit (tensor, or layer) of a new model drawn from a random model.

FusionBench's ``model_recombination`` (``fusion_bench/method/model_recombination.py``, 0.2.x): for
every unit ``u`` (a layer of an ``nn.ModuleList``, an entry of an ``nn.ModuleDict``, else a tensor
of the state dict) the N models' units are shuffled, and recombined model ``i`` takes the unit of
model ``perm_u[i]``. Nothing is averaged. FusionBench shuffles with Python's global ``random``;
here every unit's permutation comes from a generator seeded by a hash of ``(seed, unit id)``, so a
unit's draw does not depend on the order in which units are visited (the streaming and the
in-memory paths agree) and a run is reproducible from its seed.
"""

from __future__ import annotations

import hashlib

import torch


def unit_permutation(seed: int, unit: str, num_models: int) -> list[int]:
    """The permutation of ``range(num_models)`` drawn for ``unit`` (recombined model i takes model perm[i])."""
    h = hashlib.sha256(f"{int(seed)}\x00{unit}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))
    return [int(x) for x in torch.randperm(num_models, generator=g)]


def assign_units(units: list[str], num_models: int, seed: int, model_index: int = 0) -> dict[str, int]:
    """unit -> index of the model whose unit recombined model ``model_index`` takes."""
    return {u: unit_permutation(seed, u, num_models)[model_index] for u in units}
