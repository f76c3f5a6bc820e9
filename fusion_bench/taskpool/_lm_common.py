"""Shared pieces of the language-model task pools (perplexity, lm_eval, generation): tokenizer resolution
and the check that the evaluated model is one causal LM."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from fusion_bench.errors import CheckpointError, ConfigError, ModelMismatchError
from fusion_bench.models.ensemble import Ensemble


def model_source(model: nn.Module) -> str | None:
    """Where a Hugging Face model was loaded from (``config._name_or_path``), or None."""
    cfg = getattr(model, "config", None)
    src = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(src) if src else None


def load_tokenizer(ref: str | None, model: nn.Module, pool: str) -> Any:
    """The tokenizer named by ``taskpool.tokenizer``, else the one saved beside the evaluated model (the
    folder its ``config._name_or_path`` names: for a merged model, the pool's base)."""
    from transformers import AutoTokenizer

    from fusion_bench.modelpool.base import resolve_hf_path

    where = "taskpool.tokenizer"
    if ref is None:
        src = model_source(model)
        if not src:
            raise ConfigError(f"The {pool} task pool needs a tokenizer: the model does not say where it was loaded "
                              "from; set taskpool.tokenizer=<tokenizer folder or hub id>.")
        p = Path(os.path.expanduser(src))
        if p.is_dir() and not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                             "tokenizer.model", "vocab.json")):
            raise ConfigError(f"The {pool} task pool needs a tokenizer: the model's folder {src} has none; set "
                              "taskpool.tokenizer=<tokenizer folder or hub id>.")
        ref, where = src, f"the tokenizer of the model's folder {src} (taskpool.tokenizer unset)"
    path = resolve_hf_path(ref, where)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise CheckpointError(f"{where}: cannot load a tokenizer from {path} ({type(e).__name__}: {e}); set "
                              "taskpool.tokenizer to a tokenizer folder.") from e


def check_causal_lm(model: nn.Module, pool: str) -> None:
    """Refuse output ensembles and models without a language-model head."""
    if isinstance(model, Ensemble):
        raise ConfigError(f"The {pool} task pool evaluates one causal language model; output ensembles are not "
                          "supported (use a merging method).")
    if not isinstance(model, nn.Module) or not callable(getattr(model, "forward", None)):
        raise ModelMismatchError(f"The {pool} task pool needs a causal LM (nn.Module), got {type(model).__name__}.")


def model_device(model: nn.Module):
    for p in model.parameters():
        return p.device
    import torch

    return torch.device("cpu")
