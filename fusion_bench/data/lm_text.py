"""Text for language models: calibration batches and evaluation text from offline sources.

:func:`load_texts` reads a list of texts from one of

- ``"builtin"``: a small English text shipped inside the package (:mod:`fusion_bench.data.builtin_text`,
  about 24 KB, written for this project, CC0 1.0); ``split`` ``"train"`` / ``"test"`` give a fixed
  disjoint partition of its 64 paragraphs (every fifth is test), ``None`` or ``"all"`` all of them;
- a local ``.txt`` file: its paragraphs (blocks separated by blank lines);
- a local ``.jsonl`` file (one object per line, text in ``field``, or one JSON string per line) or
  ``.json`` file (a list of such objects or strings);
- a folder written by ``datasets`` ``save_to_disk`` (a ``DatasetDict`` needs ``split``), or another
  local data file or folder ``datasets`` reads (``.parquet``, ``.csv``, ``.arrow``);
- a Hugging Face Hub dataset, ``"wikitext:wikitext-2-raw-v1"`` (``id:config``) or ``"id"``, read with
  ``datasets.load_dataset`` (where the Hub or its cache is reachable; offline it is one error line).

Empty texts (only whitespace) are dropped, so WikiText's blank lines do not count.

:func:`calibration_batches` draws ``n_samples`` windows of ``seq_len`` tokens at seeded random
offsets of the concatenated tokenized text, the way Wanda (Sun et al. 2023) and SparseGPT (Frantar &
Alistarh 2023) sample their calibration sequences (their ``get_wikitext2`` joins the texts and takes
random windows; their ``get_c4`` takes one random window per random document).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from fusion_bench.errors import CheckpointError, ConfigError

BUILTIN = "builtin"
BUILTIN_SPLITS = ("train", "test", "all")
JOIN = "\n\n"


def builtin_paragraphs(split: str | None = None) -> list[str]:
    """The paragraphs of the shipped CC0 text: all, or the ``train`` / ``test`` part (every fifth is test)."""
    from fusion_bench.data.builtin_text import TEXT

    paras = [p.strip() for p in TEXT.split("\n\n") if p.strip()]
    if split in (None, "all"):
        return paras
    if split == "test":
        return [p for i, p in enumerate(paras) if i % 5 == 4]
    if split == "train":
        return [p for i, p in enumerate(paras) if i % 5 != 4]
    raise ConfigError(f"The builtin text has no split '{split}'; use one of {', '.join(BUILTIN_SPLITS)} (or null).")


def _text_of(item: Any, field: str, where: str, i: int) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        if field not in item:
            raise ConfigError(f"Text source {where}: record {i} has no field '{field}' (it has {sorted(item)[:10]}); "
                              "set field=<the text key>.")
        val = item[field]
        if not isinstance(val, str):
            raise ConfigError(f"Text source {where}: field '{field}' of record {i} is {type(val).__name__}, not text.")
        return val
    raise ConfigError(f"Text source {where}: record {i} is {type(item).__name__}; expected a string or an object "
                      f"with a '{field}' field.")


def _read_json_records(p: Path, field: str) -> list[str]:
    where = f"'{p}'"
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"Text source {where} cannot be read ({e}).") from e
    try:
        if p.suffix.lower() == ".jsonl":
            items = [json.loads(line) for line in raw.splitlines() if line.strip()]
        else:
            items = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"Text source {where} is not valid JSON ({e}); fix the file.") from e
    if isinstance(items, dict) and isinstance(items.get(field), list):
        items = items[field]  # {"text": ["...", "..."]}
    if not isinstance(items, list):
        raise ConfigError(f"Text source {where}: expected a JSON list of strings or objects with '{field}', got "
                          f"{type(items).__name__}.")
    return [_text_of(it, field, where, i) for i, it in enumerate(items)]


def _read_dataset(source: str, split: str | None, field: str) -> list[str]:
    import datasets

    from fusion_bench.data.loading import load_dataset_ref

    p = Path(os.path.expanduser(source))
    spec: Any = source
    if not p.exists() and ":" in source and not source.startswith((".", "/", "~")):
        path, name = source.split(":", 1)
        spec = {"path": path, "name": name}
    ds = load_dataset_ref(spec, split=split)
    if isinstance(ds, datasets.DatasetDict):
        raise ConfigError(f"Text source '{source}' has splits {list(ds)}; choose one with split=<name>.")
    if field not in ds.column_names:
        raise ConfigError(f"Text source '{source}' has no column '{field}' (columns: {ds.column_names}); "
                          "set field=<the text column>.")
    return [_text_of(t, field, f"'{source}'", i) for i, t in enumerate(ds[field])]


def load_texts(source: str, *, split: str | None = None, field: str = "text", max_texts: int | None = None) -> list[str]:
    """Texts from a source (see the module docstring): ``builtin``, a ``.txt`` / ``.jsonl`` / ``.json`` file,
    a ``save_to_disk`` folder, or a Hub id such as ``wikitext:wikitext-2-raw-v1``.

    Args:
        source: where the text comes from.
        split: the split (``builtin``: train / test / all; datasets: e.g. ``test`` or ``train[:1000]``);
            plain text and JSON files have none.
        field: the text column or key (JSON and datasets).
        max_texts: keep at most the first this many (non-empty) texts.
    Returns:
        the non-empty texts, in source order.
    Raises:
        ConfigError: unknown split, missing field, malformed file, no text at all.
        CheckpointError: a file cannot be read, or a Hub dataset cannot be reached.
    """
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"Text source must be 'builtin', a file, a dataset folder or a Hub id; got {source!r}.")
    if max_texts is not None and (isinstance(max_texts, bool) or not isinstance(max_texts, int) or max_texts < 1):
        raise ConfigError(f"max_texts must be a positive integer or null, got {max_texts!r}.")
    source = source.strip()
    p = Path(os.path.expanduser(source))
    suffix = p.suffix.lower()
    if source == BUILTIN:
        texts = builtin_paragraphs(split)
    elif p.is_file() and suffix in (".txt", ".md", ".text"):
        if split not in (None, "all", "train"):
            raise ConfigError(f"Text source '{source}' is a plain text file and has no split '{split}'; leave split "
                              "unset.")
        try:
            raw = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"Text source '{source}' cannot be read as UTF-8 text ({e}).") from e
        texts = raw.replace("\r\n", "\n").split("\n\n")
    elif p.is_file() and suffix in (".jsonl", ".json"):
        if split not in (None, "all", "train"):
            raise ConfigError(f"Text source '{source}' is a JSON file and has no split '{split}'; leave split unset.")
        texts = _read_json_records(p, field)
    else:
        if not p.exists() and source.startswith((".", "/", "~")):
            raise ConfigError(f"Text source '{source}' does not exist; give an existing file or folder, 'builtin', "
                              "or a Hub id like wikitext:wikitext-2-raw-v1.")
        texts = _read_dataset(source, split, field)
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise ConfigError(f"Text source '{source}' (split {split!r}, field '{field}') holds no text.")
    return texts[:max_texts] if max_texts is not None else texts


def texts_sha256(texts: list[str]) -> str:
    """Content hash of a list of texts (recorded in reports as the evaluation/calibration text's identity)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def tokenize_joined(tokenizer: Any, texts: list[str], *, add_special_tokens: bool = False) -> torch.LongTensor:
    """Token ids (1-D) of the texts joined by blank lines, as the Hugging Face perplexity guide tokenizes
    WikiText (``"\\n\\n".join(texts)``); no warning about exceeding the tokenizer's model length."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        ids = tokenizer(JOIN.join(texts), add_special_tokens=add_special_tokens)["input_ids"]
    finally:
        hf_logging.set_verbosity(old)
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(tokenizer: Any, texts: list[str], *, n_samples: int, seq_len: int, seed: int) -> torch.LongTensor:
    """``n_samples`` windows of ``seq_len`` tokens at seeded random offsets of the joined, tokenized texts.

    The texts are joined with blank lines and tokenized once (no special tokens); window ``k`` starts at
    offset ``o_k``, drawn uniformly from ``0 .. N - seq_len`` by ``torch.Generator().manual_seed(seed)``
    (``torch.randint``), as Wanda/SparseGPT draw their calibration windows. Windows may overlap.

    Args:
        tokenizer: a Hugging Face tokenizer (callable returning ``input_ids``).
        texts: the calibration texts (e.g. from :func:`load_texts`).
        n_samples: number of windows.
        seq_len: tokens per window.
        seed: the generator's seed (same seed, same windows).
    Returns:
        a ``LongTensor`` of shape ``(n_samples, seq_len)``.
    Raises:
        ConfigError: the text has fewer than ``seq_len`` tokens, or a size is not positive.
    """
    for name, v in (("n_samples", n_samples), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}.")
    ids = tokenize_joined(tokenizer, texts)
    n = int(ids.numel())
    if n < seq_len:
        raise ConfigError(f"The calibration text has {n} tokens, fewer than seq_len={seq_len}; lower seq_len or give "
                          "more text.")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, n - seq_len + 1, (n_samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


__all__ = ["BUILTIN", "builtin_paragraphs", "calibration_batches", "load_texts", "texts_sha256", "tokenize_joined"]
