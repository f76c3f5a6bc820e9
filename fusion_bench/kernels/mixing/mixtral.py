"""Router (gate) initialisation of Mixtral-style upcycled / merged mixtures of experts.

A sparse MoE layer routes token state ``x`` (hidden size H) with ``logits = W x`` (``W``: E x H, one
row per expert), keeps the top ``k`` logits, softmaxes them (Mixtral: softmax over all E then
renormalised over the top k; the same thing) and sums the chosen experts' outputs with those
weights. Upcycling (Komatsuzaki et al., "Sparse Upcycling", ICLR 2023) copies one dense MLP into
every expert; merging (mergekit-moe; FusionBench's Mixtral merging) takes each expert's MLP from a
different fine-tune of one base. The router rows ``W[l]`` of every layer ``l`` are initialised as
mergekit-moe 0.1.5 does (``mergekit/moe/router.py``), one mode per function here:

- ``random``: every entry standard normal (unscaled; mergekit's ``torch.randn``).
- ``uniform_random``: uniform in ``[-1/sqrt(H), 1/sqrt(H))`` (torch's ``nn.Linear`` default).
- ``cheap_embed``: for each expert, the sum of the input embeddings of every non-padding token of its
  positive prompts, L2-normalised; minus the same vector of its negative prompts; L2-normalised
  again; the same row in every layer. Uses the tokenizer, not the model.
- ``hidden`` / ``hidden_last``: for each expert, the hidden state entering layer ``l`` (the
  model's ``hidden_states[l]``, l = 0 .. L-1) at the last position of each positive prompt
  (prompts left-padded), averaged over the prompts; minus the same for the negative prompts;
  L2-normalised per layer. Needs a forward pass of the base model over the prompts.
- ``hidden_avg``: as ``hidden`` but each prompt's state is the mean over all positions of the
  padded batch (mergekit divides by the padded length, padding positions included).

The functions are pure: the caller tokenizes and runs the model.
"""

from __future__ import annotations

import math

import torch

GATE_MODES = ("random", "uniform_random", "cheap_embed", "hidden", "hidden_last", "hidden_avg")
#: gate modes that need prompts (and, for the hidden modes, a forward pass of the base model)
PROMPT_GATE_MODES = ("cheap_embed", "hidden", "hidden_last", "hidden_avg")
HIDDEN_GATE_MODES = ("hidden", "hidden_last", "hidden_avg")


def random_gate(num_layers: int, num_experts: int, hidden_size: int, generator: torch.Generator) -> torch.Tensor:
    """Router weights ``(L, E, H)`` with standard-normal entries (mergekit ``gate_mode: random``)."""
    return torch.randn((num_layers, num_experts, hidden_size), generator=generator)


def uniform_random_gate(num_layers: int, num_experts: int, hidden_size: int,
                        generator: torch.Generator) -> torch.Tensor:
    """Router weights ``(L, E, H)`` uniform in ``[-1/sqrt(H), 1/sqrt(H))`` (mergekit ``uniform_random``)."""
    scale = math.sqrt(1.0 / hidden_size)
    return torch.rand((num_layers, num_experts, hidden_size), generator=generator) * 2 * scale - scale


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def cheap_embed_vector(embed: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Unit vector ``(H,)``: the sum over prompts and non-padding positions of the token embeddings.

    Args:
        embed: input embedding matrix ``(V, H)``.
        input_ids: ``(B, T)`` token ids of the prompts (padded).
        attention_mask: ``(B, T)``, 1 for real tokens.
    """
    h = embed.float()[input_ids]  # (B, T, H): the one-hot product of mergekit, done as a lookup
    s = (h * attention_mask.unsqueeze(-1).float()).sum(dim=(0, 1))
    return _unit(s)


def hidden_prompt_vectors(hidden_states: torch.Tensor, average: bool) -> torch.Tensor:
    """Per-layer prompt vector ``(L, H)`` from the states entering each layer.

    Args:
        hidden_states: ``(L, B, T, H)``, ``hidden_states[l]`` = input of layer ``l`` (left-padded prompts).
        average: mean over the T positions (padding included, as mergekit) instead of the last position.
    Returns:
        the mean over the B prompts (not normalised; :func:`expert_gate_vectors` normalises).
    """
    hs = hidden_states.float()
    per_prompt = hs.sum(dim=2) / hs.shape[2] if average else hs[:, :, -1, :]
    return per_prompt.sum(dim=1) / per_prompt.shape[1]


def expert_gate_vectors(positive: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
    """One expert's router row per layer: ``normalise(positive - negative)`` along the last axis."""
    v = positive.float()
    if negative is not None:
        v = v - negative.float()
    return _unit(v)


def stack_gates(per_expert: list[torch.Tensor]) -> torch.Tensor:
    """``E`` tensors ``(L, H)`` -> router weights ``(L, E, H)``."""
    return torch.stack(per_expert, dim=0).permute(1, 0, 2).contiguous()


def moe_layer_reference(x: torch.Tensor, gate: torch.Tensor, experts: list, top_k: int) -> torch.Tensor:
    """Reference sparse MoE layer (for tests): ``sum_{e in topk} softmax_topk(x W^T)_e * expert_e(x)``.

    Args:
        x: ``(N, H)`` token states; gate: ``(E, H)``; experts: callables ``(N, H) -> (N, H)``.
    """
    logits = x.float() @ gate.float().t()
    w, idx = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x, dtype=torch.float32)
    for e, f in enumerate(experts):
        sel = (idx == e)
        if sel.any():
            we = (w * sel).sum(dim=-1, keepdim=True)
            out = out + we * f(x).float()
    return out
