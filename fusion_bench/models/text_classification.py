"""Text classifiers made of a (merged) backbone and a task's own classification head.

FusionBench's GPT-2 GLUE protocol: the backbone (``transformer.*`` of ``GPT2ForSequenceClassification``)
is merged, and each task is evaluated with its own fine-tuned head: the task's classification
checkpoint is loaded and its backbone attribute (``base_model_prefix``: ``transformer`` for GPT-2,
``bert`` for BERT/MiniLM) is replaced by the model under evaluation. The same helpers serve the text
classification task pool and the data methods' adapter.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fusion_bench.errors import CheckpointError, ModelMismatchError


def load_text_tokenizer(ref: str, what: str):
    """AutoTokenizer from a folder or Hub id; without a pad token, pad = unk (else eos), as FusionBench's
    ``load_gpt2_tokenizer``."""
    from transformers import AutoTokenizer

    from fusion_bench.modelpool.base import resolve_hf_path

    path = resolve_hf_path(ref, what)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise CheckpointError(f"{what}: cannot load a tokenizer from {path} ({type(e).__name__}: {e}).") from e
    if tok.pad_token is None:
        if tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        elif tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            raise CheckpointError(f"{what}: the tokenizer at {path} has no pad, unk or eos token to pad with.")
    return tok


def load_head_skeleton(ref: str, what: str, pad_token_id: int | None) -> nn.Module:
    """The sequence-classification model of ``ref`` with its backbone removed (replaced by an empty
    placeholder), frozen, float32, eval mode; attach a backbone with :func:`attach_backbone`."""
    from transformers import AutoModelForSequenceClassification

    from fusion_bench.modelpool.base import _quiet_from_pretrained, resolve_hf_path

    path = resolve_hf_path(ref, what)
    try:
        clf = _quiet_from_pretrained(AutoModelForSequenceClassification, path).float().eval()
    except Exception as e:
        raise CheckpointError(f"{what}: cannot load a sequence-classification head from {path} "
                              f"({type(e).__name__}: {e}).") from e
    prefix = getattr(clf, "base_model_prefix", "")
    if not prefix or not isinstance(getattr(clf, prefix, None), nn.Module):
        raise ModelMismatchError(f"{what}: {type(clf).__name__} has no backbone attribute (base_model_prefix) to "
                                 "replace with the evaluated model.")
    if getattr(clf.config, "pad_token_id", None) is None and pad_token_id is not None:
        clf.config.pad_token_id = pad_token_id
    setattr(clf, prefix, nn.Identity())
    clf.requires_grad_(False)
    return clf


def attach_backbone(skeleton: nn.Module, backbone: nn.Module) -> nn.Module:
    """A copy of the head skeleton (small: the backbone was removed) whose backbone is ``backbone``."""
    prefix = skeleton.base_model_prefix
    saved = getattr(skeleton, prefix)
    clf = copy.deepcopy(skeleton)
    setattr(clf, prefix, backbone)
    if saved is not getattr(skeleton, prefix):  # pragma: no cover - defensive
        raise RuntimeError("head skeleton modified")
    return clf


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to one length: (input_ids, attention_mask), both long (B, L)."""
    n = max(1, length if length is not None else max((len(x) for x in ids), default=1))
    out = torch.full((len(ids), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), n), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, :len(x)] = torch.as_tensor(list(x), dtype=torch.long)
        mask[i, :len(x)] = 1
    return out, mask


def encode_pairs(tokenizer, columns: Sequence[Sequence[str]], max_length: int) -> list[list[int]]:
    """Token ids of single texts or text pairs (``columns`` = one or two lists of texts), truncated to
    ``max_length`` (longest first), without padding."""
    if len(columns) == 1:
        enc = tokenizer(list(columns[0]), truncation=True, max_length=max_length)
    elif len(columns) == 2:
        enc = tokenizer(list(columns[0]), list(columns[1]), truncation=True, max_length=max_length)
    else:
        raise ModelMismatchError(f"text classification takes one or two text fields, got {len(columns)}.")
    return [list(x) for x in enc["input_ids"]]


def classify(clf: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = clf(input_ids=input_ids, attention_mask=attention_mask)
    return out.logits if hasattr(out, "logits") else out[0]


class PackedTextClassifier(nn.Module):
    """``x`` of shape (B, 2, L) (token ids, attention mask) -> logits, through ``clf`` (head + backbone).
    The form the data methods' adapter gives: one input tensor per example."""

    def __init__(self, clf: nn.Module):
        super().__init__()
        self.clf = clf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.long()
        return classify(self.clf, x[:, 0], x[:, 1])


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return torch.stack([input_ids, attention_mask], 1)


def describe_columns(ds: Any) -> list[str]:
    return list(getattr(ds, "column_names", []) or [])
