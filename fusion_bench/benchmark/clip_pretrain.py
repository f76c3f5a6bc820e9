"""A small CLIP trained contrastively from scratch on image-caption pairs, saved like a hub CLIP.

The result is a folder that ``transformers.CLIPModel.from_pretrained(folder)`` and
``transformers.CLIPProcessor.from_pretrained(folder)`` load exactly as they load
``openai/clip-vit-base-patch32``: ``config.json`` + ``model.safetensors`` (both towers), a
CLIP byte-level BPE tokenizer (``vocab.json``, ``merges.txt``, ``tokenizer.json``) trained
locally on the captions with the ``tokenizers`` library, and a ``CLIPImageProcessor`` for
``image_size`` pixels. Nothing is downloaded.

Training: Radford et al. 2021 (CLIP), the symmetric InfoNCE loss over a batch,
``L = (CE(s * I T^T, Y) + CE(s * T I^T, Y)) / 2`` with unit-norm image and text embeddings ``I``,
``T``, a learnable temperature ``s = exp(logit_scale)`` clamped at 100, and targets ``Y`` uniform
over the pairs of the batch that share the caption (the captions repeat: class templates), AdamW
with linear warm-up then cosine decay, gradient norm clipped at 1. Images are preprocessed once into a tensor and captions tokenized once
(no PIL work inside the training loop).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.errors import ConfigError
from fusion_bench.utils import shuffled_batches

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


@dataclass
class CLIPPretrainConfig:
    """Size and schedule of the from-scratch CLIP (the zoo's ``pretrained`` stage)."""

    image_size: int = option(32, ge=1, le=2**20, help="Input resolution (the task images' size).")
    patch_size: int = option(4, ge=1, le=2**20, help="ViT patch size (image_size must be a multiple).")
    vision_hidden: int = option(128, ge=1, le=2**20, help="Vision transformer width.")
    vision_layers: int = option(4, ge=1, le=2**20, help="Vision transformer depth.")
    vision_heads: int = option(4, ge=1, le=2**20, help="Vision attention heads.")
    text_hidden: int = option(128, ge=1, le=2**20, help="Text transformer width.")
    text_layers: int = option(2, ge=1, le=2**20, help="Text transformer depth.")
    text_heads: int = option(4, ge=1, le=2**20, help="Text attention heads.")
    projection_dim: int = option(128, ge=1, le=2**20, help="Joint embedding size.")
    vocab_size: int = option(1024, ge=1, le=2**20, help="BPE vocabulary size (including the 512 byte-level base tokens).")
    max_length: int = option(32, ge=1, le=2**20, help="Maximum caption length in tokens (text position embeddings).")
    steps: int = option(1500, ge=1, le=10**7, help="Optimizer steps.")
    batch_size: int = option(128, ge=1, le=2**20, help="Pairs per contrastive batch.")
    lr: float = option(1e-3, gt=0.0, le=10.0, help="Peak learning rate (AdamW).")
    weight_decay: float = option(0.1, ge=0.0, le=10.0, help="AdamW weight decay (not applied to biases, norms, embeddings).")
    warmup_steps: int = option(100, ge=0, le=10**7, help="Linear warm-up steps.")
    seed: int = option(0, **SEED_RANGE, help="Seed of initialisation and batch order.")

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}; "
                              "choose a patch size that divides the image size.")
        for k in ("vision_hidden", "text_hidden"):
            heads = self.vision_heads if k.startswith("vision") else self.text_heads
            if getattr(self, k) % heads:
                raise ConfigError(f"{k}={getattr(self, k)} is not divisible by its number of heads ({heads}).")
        if self.vocab_size < 600:
            raise ConfigError(f"vocab_size={self.vocab_size} is too small: the byte-level base alphabet alone "
                              "takes 512 entries; use at least 600.")


# ----------------------------------------------------------------------------------------------
# tokenizer and processor
# ----------------------------------------------------------------------------------------------
def train_tokenizer(captions: Sequence[str], vocab_size: int = 1024, max_length: int = 32):
    """A ``transformers.CLIPTokenizer`` whose byte-level BPE is trained on ``captions``.

    Same normalisation (NFC, whitespace, lower case), pre-tokenisation (CLIP's split regex, then
    byte level) and ``</w>`` end-of-word suffix as CLIP's tokenizer, so the saved folder loads as
    an ordinary CLIP tokenizer. Every byte, alone and word-final, is in the vocabulary (no unknown
    tokens for any input).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    proto = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[])  # borrow CLIP's exact pipeline
    tok = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = proto.backend_tokenizer.normalizer
    tok.pre_tokenizer = proto.backend_tokenizer.pre_tokenizer
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", show_progress=False, min_frequency=2)
    tok.train_from_iterator(list(captions), trainer=trainer)
    trained = tok.get_vocab()
    import json

    merges = [tuple(m) if isinstance(m, (list, tuple)) else tuple(m.split(" "))
              for m in json.loads(tok.to_str())["model"]["merges"]]
    vocab: dict[str, int] = {}
    for ch in alphabet:  # base alphabet first, as in CLIP: bytes, then bytes + </w>
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    for t, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        if t not in vocab:
            vocab[t] = len(vocab)
    kept = []
    for a, b in merges:  # a merge is valid only if its parts and result are in the vocabulary
        if a in vocab and b in vocab and (a + b) in vocab:
            kept.append((a, b))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=kept, model_max_length=max_length)


def build_image_processor(image_size: int = 32):
    """A ``CLIPImageProcessor`` for ``image_size`` pixels with CLIP's mean and std."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              do_resize=True, do_center_crop=True, do_normalize=True, do_convert_rgb=True)


def preprocess_images(images: Sequence[Any], processor, batch_size: int = 1024) -> torch.Tensor:
    """Pixel values (N, 3, H, W) float32 of PIL images through ``processor`` (batched, once).

    When every image is already RGB at the processor's crop size and the processor only rescales and normalizes
    after a resize and crop that leave such an image unchanged (the zoo's processor), the pixels are rescaled and
    normalized in vectorized chunks with the processor's own arithmetic (the same bits, about 3x faster);
    otherwise each batch goes through ``processor``.
    """
    fast = _fast_pixels(images, processor)
    if fast is not None:
        return fast
    out = []
    for i in range(0, len(images), batch_size):
        pv = processor(images=list(images[i:i + batch_size]), return_tensors="pt")["pixel_values"]
        out.append(pv.float())
    if not out:
        raise ConfigError("No images to preprocess: the pretraining data is empty.")
    return torch.cat(out)


def _fast_pixels(images: Sequence[Any], processor, chunk: int = 4096) -> torch.Tensor | None:
    """The vectorized path of :func:`preprocess_images`, or None when it does not apply.

    Bit for bit the NumPy arithmetic of transformers' PIL image processor: ``float32(float64(x) * rescale_factor)``,
    then ``(x - mean) / std`` in float32. The pixels therefore do not depend on whether torchvision is installed
    (transformers' torchvision backend fuses the two steps and rounds differently).
    """
    crop = getattr(processor, "crop_size", None) or {}
    size = getattr(processor, "size", None) or {}
    h, w = crop.get("height"), crop.get("width")
    if not images or h is None or h != w or size.get("shortest_edge") != h:
        return None
    if not (getattr(processor, "do_rescale", False) and getattr(processor, "do_normalize", False)):
        return None
    if any(getattr(im, "mode", None) != "RGB" or getattr(im, "size", None) != (w, h) for im in images):
        return None
    mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    scale = float(processor.rescale_factor)
    out = torch.empty(len(images), 3, h, w, dtype=torch.float32)
    for i in range(0, len(images), chunk):
        arr = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images[i:i + chunk]]))
        x = (arr.permute(0, 3, 1, 2).to(torch.float64) * scale).to(torch.float32)
        out[i:i + len(x)] = (x - mean) / std
    return out


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
def build_clip_config(cfg: CLIPPretrainConfig, tokenizer):
    """A ``CLIPConfig`` of the requested size whose text tower matches ``tokenizer``."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
                         num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                         max_position_embeddings=cfg.max_length, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         projection_dim=cfg.projection_dim),
        vision_config=dict(hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                           num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                           image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.projection_dim),
        projection_dim=cfg.projection_dim,
    )


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in n or "norm" in n or n == "logit_scale":
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor | float,
                     caption_ids: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE on unit-norm embeddings (batch, dim), duplicate captions as joint positives.

    ``logits = scale * I T^T``; the loss is ``(CE(logits, Y) + CE(logits^T, Y)) / 2`` where row ``i`` of
    the target ``Y`` is uniform over the pairs whose caption equals caption ``i`` (``caption_ids``):
    two images with the same caption are not negatives of each other. Without ``caption_ids``,
    ``Y`` is the identity (Radford et al. 2021, figure 3).
    """
    n = image_embeds.shape[0]
    if caption_ids is None:
        caption_ids = torch.arange(n, device=image_embeds.device)
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    logits = scale * image_embeds @ text_embeds.T
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def batch_loss(model, pixels: torch.Tensor, tok: Mapping[str, torch.Tensor], caption_ids: torch.Tensor) -> torch.Tensor:
    """The contrastive loss of one batch: images ``pixels`` (B, 3, H, W), captions ``caption_ids`` (B,) indexing
    the tokenized distinct captions ``tok`` (``input_ids`` and ``attention_mask``, padded to the same length).

    The text tower runs once per distinct caption of the batch (the templates repeat), and each pair takes its
    caption's features: the same loss and gradients as running it on every pair, for a fraction of the FLOPs.
    Captions are padded to the longest one of the batch only.
    """
    uniq, inverse = torch.unique(caption_ids, return_inverse=True)
    mask = tok["attention_mask"][uniq]
    width = int(mask.sum(1).max())
    ids, mask = tok["input_ids"][uniq][:, :width], mask[:, :width]
    img = F.normalize(_feat(model.get_image_features(pixel_values=pixels)), dim=-1)
    txt = F.normalize(_feat(model.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)[inverse]
    return contrastive_loss(img, txt, model.logit_scale.exp().clamp(max=100.0), caption_ids)


def pretrain_clip(images: Sequence[Any], captions: Sequence[str], cfg: CLIPPretrainConfig,
                  progress: Callable[[int, int, float], None] | None = None):
    """Train a CLIP from scratch on (image, caption) pairs.

    Args:
        images: PIL images (RGB, ``cfg.image_size`` square).
        captions: one caption per image.
        cfg: model size and schedule.
        progress: called as ``progress(step, total, loss)`` after every step.
    Returns:
        ``(model, processor, stats)``: the trained ``CLIPModel`` (eval mode), its ``CLIPProcessor``
        and a dict with the final loss and the number of pairs.
    """
    from transformers import CLIPProcessor

    if len(images) != len(captions):
        raise ConfigError(f"pretraining data: {len(images)} images but {len(captions)} captions; give one caption per image.")
    if len(images) < 2:
        raise ConfigError("pretraining data needs at least two image-caption pairs.")
    tokenizer = train_tokenizer(captions, cfg.vocab_size, cfg.max_length)
    image_processor = build_image_processor(cfg.image_size)
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    pixels = preprocess_images(images, image_processor)
    model, stats = pretrain_clip_tensors(pixels, captions, tokenizer, cfg, progress)
    return model, processor, stats


def pretrain_clip_tensors(pixels: torch.Tensor, captions: Sequence[str], tokenizer, cfg: CLIPPretrainConfig,
                          progress: Callable[[int, int, float], None] | None = None):
    """:func:`pretrain_clip` on preprocessed pixel values (N, 3, H, W) with a given tokenizer.

    Returns ``(model, stats)``.
    """
    from transformers import CLIPModel

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    n = len(captions)
    # tokenize each distinct caption once
    uniq = sorted(set(captions))
    index = {c: i for i, c in enumerate(uniq)}
    tok = tokenizer(uniq, padding="max_length", truncation=True, max_length=cfg.max_length, return_tensors="pt")
    cap_ids = torch.tensor([index[c] for c in captions])
    model = CLIPModel(build_clip_config(cfg, tokenizer))
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = shuffled_batches(n, cfg.batch_size, gen)
    loss_v = float("nan")
    for step in range(cfg.steps):
        idx = next(batches)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warmup_cosine(step, cfg.steps, cfg.warmup_steps)
        loss = batch_loss(model, pixels[idx], tok, cap_ids[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100.0))
        loss_v = float(loss.detach())
        if progress is not None:
            progress(step + 1, cfg.steps, loss_v)
    model.eval()
    return model, {"final_loss": round(loss_v, 4), "pairs": n, "steps": cfg.steps, "distinct_captions": len(uniq),
                   "parameters": int(sum(p.numel() for p in model.parameters()))}


def _feat(out) -> torch.Tensor:
    from fusion_bench.models.clip import _as_tensor

    return _as_tensor(out)


def save_clip(model, processor, folder: str | Path) -> Path:
    """Write model, tokenizer and image processor into ``folder`` (caller makes it atomic)."""
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
