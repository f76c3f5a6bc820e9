"""CLIP zero-shot classification pieces shared by the CLIP task pool and CLIP fine-tuning.

- :func:`zeroshot_head`: one unit-norm text embedding per class, the mean of the (normalised)
  embeddings of every caption template filled with the class name, renormalised (CLIP's prompt
  ensembling, Radford et al. 2021, section 3.1.4).
- :func:`image_features`: unit-norm projected image embeddings from a ``CLIPVisionModel``, a
  ``CLIPModel`` or a bare vision transformer, with the visual projection of the full CLIP model.
- :class:`CLIPZeroShotClassifier`: vision encoder + fixed projection + fixed text head;
  ``logits = logit_scale * normalize(P f(x)) @ head.T``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _as_tensor(out) -> torch.Tensor:
    """transformers 5 returns model outputs from get_*_features; older versions a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("pooler_output", "image_embeds", "text_embeds"):
        v = getattr(out, attr, None)
        if v is not None:
            return v
    raise TypeError(f"cannot get features from {type(out).__name__}")


@torch.no_grad()
def zeroshot_head(clip_model: nn.Module, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                  device: torch.device | str = "cpu", batch_size: int = 512) -> torch.Tensor:
    """Text-encoder classification head of shape (num_classes, projection_dim), rows unit-norm.

    Args:
        clip_model: a transformers ``CLIPModel`` (text tower and text projection are used).
        tokenizer: its tokenizer.
        classnames: one name per class, in label order.
        templates: caption templates containing ``{}`` (e.g. ``"a photo of a {}."``).
    """
    clip_model = clip_model.to(device).eval()
    texts = [t.format(c) for c in classnames for t in templates]
    embs = []
    for i in range(0, len(texts), batch_size):
        tok = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, return_tensors="pt").to(device)
        e = _as_tensor(clip_model.get_text_features(input_ids=tok["input_ids"],
                                                    attention_mask=tok.get("attention_mask")))
        embs.append(F.normalize(e.float(), dim=-1))
    e = torch.cat(embs).view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(e, dim=-1).cpu()


def vision_tower(model: nn.Module) -> nn.Module:
    """The module that maps pixel values to a pooled output (CLIPModel -> its vision_model)."""
    if hasattr(model, "get_image_features") and hasattr(model, "vision_model") and hasattr(model, "text_model"):
        return model.vision_model
    return model


def image_features(vision: nn.Module, projection: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Unit-norm projected image embeddings."""
    out = vision_tower(vision)(pixel_values=pixel_values)
    pooled = out.pooler_output if hasattr(out, "pooler_output") else out[1]
    return F.normalize(projection(pooled).float(), dim=-1)


class CLIPZeroShotClassifier(nn.Module):
    """A CLIP vision encoder turned into a classifier by a fixed text head.

    Args:
        vision: ``CLIPVisionModel`` (or ``CLIPModel``, whose vision tower is used).
        projection: the visual projection of the full CLIP model (kept frozen by fine-tuning).
        head: (num_classes, dim) unit-norm text embeddings from :func:`zeroshot_head`.
        logit_scale: the temperature (CLIP's ``logit_scale.exp()``).
    """

    def __init__(self, vision: nn.Module, projection: nn.Module, head: torch.Tensor, logit_scale: float):
        super().__init__()
        self.vision = vision
        self.projection = projection
        self.register_buffer("head", head.detach().clone(), persistent=False)
        self.logit_scale = float(logit_scale)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = image_features(self.vision, self.projection, pixel_values)
        return self.logit_scale * feats @ self.head.to(feats.device, feats.dtype).T
