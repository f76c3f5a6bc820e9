"""Fine-tuning of a BERT-style encoder (MiniLM) with a classification head, full or LoRA, for the text zoo.

Plain supervised fine-tuning on a task's train split: ``AutoModelForSequenceClassification`` on the
pretrained encoder (pooler + linear head, a new head per task), cross-entropy, AdamW, linear warm-up
then linear decay to zero, gradient clipping at 1.0. Inputs are tokenized exactly as the text task pool
and the data methods tokenize them (:func:`fusion_bench.models.text_classification.encode_pairs`: one
text or a text pair, truncated to ``max_length``, ids and attention mask only, right-padded per batch),
so what is trained is what is evaluated. Batches are drawn length-bucketed (:func:`length_bucketed_batches`:
less padding, hence less compute on a CPU).

- ``mode="full"``: every parameter is trained.
- ``mode="lora"``: LoRA (Hu et al. 2022, ``W = W_0 + (alpha / r) B A``) on the encoder's linear layers
  named in ``target_modules`` (PEFT), the classification head trained in full; the encoder is then kept as
  a PEFT adapter and folded into full weights with ``merge_and_unload`` for merging.

Randomness (head initialisation, dropout, LoRA's A, batch order) comes only from ``seed``; with a fixed
torch thread count two runs give identical weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class TextFinetuneConfig:
    """Options of one fine-tuning run (part of the text zoo's build key)."""

    mode: str = field(default="full", metadata={"help": "full (every weight) or lora (adapters + head)"})
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "examples per step"})
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate (AdamW)"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps, then linear decay to 0"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    max_length: int = field(default=64, metadata={"help": "tokens per example (truncation)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (mode=lora)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    target_modules: list[str] = field(default_factory=lambda: ["query", "key", "value", "dense"],
                                      metadata={"help": "encoder linear layers that get LoRA adapters"})


def lr_at(step: int, cfg: TextFinetuneConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then linear decay to 0 at ``steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    rest = max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * max(0.0, 1.0 - (step - cfg.warmup_steps) / rest)


def length_bucketed_batches(lengths: list[int], batch_size: int, g: torch.Generator, bucket: int = 8) -> list[list[int]]:
    """One epoch of batches: a random permutation cut into chunks of ``bucket`` batches, each chunk sorted by
    length and cut into batches, the batches shuffled (less padding, same examples per epoch)."""
    perm = torch.randperm(len(lengths), generator=g).tolist()
    batches: list[list[int]] = []
    step = batch_size * bucket
    for s in range(0, len(perm), step):
        chunk = sorted(perm[s:s + step], key=lambda i: (lengths[i], i))
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if b]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def finetune_text_classifier(pretrained: str | Path, train, text_fields: list[str], num_labels: int,
                             cfg: TextFinetuneConfig, seed: int, label_names: list[str] | None = None,
                             on_step: Callable[[int, int, float], None] | None = None) -> tuple[Any, Any, dict]:
    """Fine-tune the encoder at ``pretrained`` with a new head on ``train`` (a ``datasets.Dataset``).

    Args:
        pretrained: folder of the pretrained encoder (config, weights, tokenizer).
        train: the train split, with ``text_fields`` columns and an integer ``label`` column.
        text_fields: ``["text"]`` or ``["text", "text_pair"]``.
        num_labels: classes of the head.
        cfg: the run's options.
        seed: seed of head init, dropout, LoRA init and batch order.
        label_names: class names stored in the model config (id2label).
        on_step: called as ``on_step(step, steps, loss)`` after each step.

    Returns:
        ``(classifier, peft_encoder, stats)``: the trained ``...ForSequenceClassification`` (for LoRA, its
        encoder is the PEFT-wrapped one, not yet folded), the PEFT encoder (None for full) and statistics.
    """
    from transformers import AutoModelForSequenceClassification

    from fusion_bench.modelpool.base import _quiet_from_pretrained
    from fusion_bench.models.text_classification import classify, encode_pairs, load_text_tokenizer, pad_batch

    if cfg.mode not in ("full", "lora"):
        from fusion_bench.errors import ConfigError

        raise ConfigError(f"text fine-tuning mode must be full or lora, got {cfg.mode!r}.")
    t0 = time.perf_counter()
    tok = load_text_tokenizer(str(pretrained), "text zoo tokenizer")
    ids = encode_pairs(tok, [train[c] for c in text_fields], cfg.max_length)
    labels = torch.as_tensor(train["label"], dtype=torch.long)
    n = len(ids)
    torch.manual_seed(seed)
    kw: dict[str, Any] = {"num_labels": num_labels}
    if label_names:
        kw["id2label"] = dict(enumerate(label_names))
        kw["label2id"] = {c: i for i, c in enumerate(label_names)}
    clf = _quiet_from_pretrained(AutoModelForSequenceClassification, str(pretrained), **kw).float()
    prefix = clf.base_model_prefix
    peft_encoder = None
    if cfg.mode == "lora":
        from peft import LoraConfig, get_peft_model

        encoder = getattr(clf, prefix)
        peft_encoder = get_peft_model(encoder, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                          lora_dropout=cfg.lora_dropout,
                                                          target_modules=list(cfg.target_modules)))
        setattr(clf, prefix, peft_encoder)
        for name, p in clf.named_parameters():  # the head (outside the encoder) is trained in full
            if not name.startswith(prefix + "."):
                p.requires_grad_(True)
    params = [p for p in clf.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    g = torch.Generator().manual_seed(seed)
    order: list[list[int]] = []
    pad = int(tok.pad_token_id)
    losses: list[float] = []
    clf.train()
    for step in range(cfg.steps):
        if not order:
            order = length_bucketed_batches([len(x) for x in ids], cfg.batch_size, g)
        batch = order.pop(0)
        x, mask = pad_batch([ids[i] for i in batch], pad)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        logits = classify(clf, x, mask)
        loss = F.cross_entropy(logits, labels[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, cfg.steps, losses[-1])
    clf.eval()
    tail = losses[-max(1, len(losses) // 10):]
    stats = {"mode": cfg.mode, "steps": cfg.steps, "train_examples": n,
             "epochs": round(cfg.steps * cfg.batch_size / max(n, 1), 2),
             "trainable_parameters": int(sum(p.numel() for p in params)),
             "first_loss": round(losses[0], 4) if losses else None,
             "final_loss": round(sum(tail) / len(tail), 4) if tail else None,
             "train_time_s": round(time.perf_counter() - t0, 2)}
    if any(not math.isfinite(v) for v in losses):
        from fusion_bench.errors import FusionBenchError

        raise FusionBenchError(f"text fine-tuning diverged (non-finite loss) with lr={cfg.lr}; lower the lr.")
    return clf, peft_encoder, stats
