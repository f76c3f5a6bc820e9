"""Perplexity of a causal language model on text sets, by strided sliding windows.

``taskpool.type=causal_lm_perplexity``. Each task is a text set (:func:`fusion_bench.data.lm_text.load_texts`:
the shipped ``builtin`` text, a local file, a ``save_to_disk`` folder or a Hub dataset). Its texts are
joined with blank lines and tokenized once (with the tokenizer's special tokens, e.g. a leading BOS), as
in the Hugging Face perplexity guide ("Perplexity of fixed-length models"). Windows of ``max_length``
tokens start every ``stride`` tokens; in each window only the tokens not scored by an earlier window are
scored, each conditioned on every token before it inside the window (at least ``max_length - stride``
tokens of context once the first window is past). With ``stride < max_length`` each token of the text
except the first is scored exactly once; in every case

    perplexity = exp( (1/T) * sum_t -log p(x_t | window context) ),   T = tokens scored.

``stride = max_length`` gives disjoint windows (the first token of each window is then not scored, the
guide's corrected count). Reported per task: ``perplexity``, ``nll`` (mean negative log-likelihood per
token, nats), ``tokens`` (T), ``forward_tokens`` (tokens fed to the model, overlap included),
``wall_time_s`` and ``tokens_per_s`` (T / wall time). The report also records the text's hash, the
window settings and the tokenizer.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fusion_bench.config_schema import build_config, option
from fusion_bench.data.lm_text import load_texts, texts_sha256, tokenize_joined
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.taskpool._lm_common import check_causal_lm, load_tokenizer
from fusion_bench.taskpool.base import PerTaskPool, TaskPoolConfig, average_metrics, register_taskpool
from fusion_bench.utils import resolve_device


@dataclass
class TextSetSpec:
    """One text set of a language-model task pool (``taskpool.tasks.<name>``)."""

    source: str = option("builtin", help="'builtin' (the shipped CC0 text), a .txt/.jsonl/.json file, a save_to_disk "
                         "folder, or a Hub dataset id 'path:config' (e.g. wikitext:wikitext-2-raw-v1).")
    split: str | None = option(None, help="Split: builtin train/test/all; datasets e.g. test or test[:100]; files: unset.")
    field: str = option("text", help="Text column (datasets) or key (JSON records).")
    max_texts: int | None = option(None, ge=1, le=10**9, help="Keep at most the first this many non-empty texts.")


@dataclass
class CausalLMPerplexityConfig(TaskPoolConfig):
    """Options of the ``causal_lm_perplexity`` task pool."""

    tasks: dict[str, Any] = option({"builtin": {"source": "builtin", "split": "test"}},
                                   help="Task name -> text set {source, split, field, max_texts}; default: the "
                                   "test part of the shipped builtin text.")
    tokenizer: str | None = option(None, help="Tokenizer folder or Hub id; null: the tokenizer saved in the folder "
                                   "the model was loaded from (a merged model: the pool's base).")
    max_length: int | None = option(1024, ge=2, le=1 << 20, help="Window length in tokens (clipped to the model's "
                                    "max_position_embeddings, the stride scaled by the same ratio); null: the "
                                    "model's maximum.")
    stride: int = option(512, ge=1, le=1 << 20, help="Tokens between window starts (<= max_length); each window "
                         "scores only the tokens no earlier window scored.")
    batch_size: int = option(1, ge=1, le=4096, help="Full-length windows per forward pass.")
    add_special_tokens: bool = option(True, help="Tokenize with the tokenizer's special tokens (a leading BOS).")
    max_tokens: int | None = option(None, ge=2, le=10**12, help="Score only the first this many tokens of each "
                                    "text set (null: all); for quick runs.")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")


def window_plan(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows ``(begin, end, first_scored)`` covering ``n_tokens`` tokens: window ``k`` spans
    ``[k*stride, min(k*stride + max_length, n))`` and scores the positions ``[first_scored, end)`` that no
    earlier window scored (never the window's first position, which has no context in it)."""
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _progress(total: int):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeRemainingColumn(), transient=True, disable=not sys.stderr.isatty() or total < 8)


@torch.no_grad()
def strided_nll(model: nn.Module, ids: torch.Tensor, *, max_length: int, stride: int, batch_size: int = 1,
                device: torch.device | None = None, desc: str = "perplexity") -> tuple[float, int, int]:
    """Sum of ``-log p(x_t | context)`` over the scored tokens of ``ids`` (1-D), tokens scored, tokens fed.

    See :func:`window_plan` for the windows; log-probabilities are computed in float32.
    """
    device = device or next(model.parameters()).device
    plan = window_plan(int(ids.numel()), max_length, stride)
    total, scored, fed = 0.0, 0, 0
    # batches of windows with the same length (all but possibly the last)
    groups: list[list[tuple[int, int, int]]] = []
    for w in plan:
        if groups and len(groups[-1]) < batch_size and (groups[-1][0][1] - groups[-1][0][0]) == (w[1] - w[0]):
            groups[-1].append(w)
        else:
            groups.append([w])
    with _progress(len(plan)) as prog:
        bar = prog.add_task(desc, total=len(plan))
        for group in groups:
            x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
            logits = model(input_ids=x, use_cache=False).logits
            for i, (b, e, first) in enumerate(group):
                pos = torch.arange(first - b, e - b, device=logits.device)  # positions scored, in the window
                lp = torch.log_softmax(logits[i, pos - 1].float(), dim=-1)
                tgt = x[i, pos].to(lp.device)
                total -= float(lp.gather(1, tgt[:, None]).sum())
                scored += int(pos.numel())
            fed += int(x.numel())
            prog.advance(bar, len(group))
    return total, scored, fed


@register_taskpool("causal_lm_perplexity")
class CausalLMPerplexityTaskPool(PerTaskPool):
    """Perplexity on text sets by strided sliding windows (see the module docstring).

    Args:
        config: :class:`CausalLMPerplexityConfig` or a mapping; keywords override.
        tokenizer: (Python API) a tokenizer object to use instead of ``config.tokenizer``.
    """

    config_class = CausalLMPerplexityConfig

    def __init__(self, config: Any = None, *, tokenizer: Any = None, **kwargs: Any):
        if isinstance(tokenizer, str):
            kwargs["tokenizer"] = tokenizer
            tokenizer = None
        super().__init__(config, **kwargs)
        if self.config.max_length is not None and self.config.stride > self.config.max_length:
            raise ConfigError(f"taskpool.stride={self.config.stride} is larger than taskpool.max_length="
                              f"{self.config.max_length}; tokens between windows would never be scored. Use "
                              "stride <= max_length.")
        if not self.config.tasks:
            raise ConfigError("taskpool.tasks is empty; give at least one text set, e.g. {builtin: {source: builtin, "
                              "split: test}}.")
        self._specs: dict[str, TextSetSpec] = {
            t: build_config(TextSetSpec, raw, prefix=f"taskpool.tasks.{t}") for t, raw in self.config.tasks.items()}
        self._tokenizer = tokenizer
        self._texts: dict[str, list[str]] = {}
        self._info: dict[str, dict[str, Any]] = {}

    def texts(self, task: str) -> list[str]:
        if task not in self._texts:
            s = self._specs[task]
            self._texts[task] = load_texts(s.source, split=s.split, field=s.field, max_texts=s.max_texts)
        return self._texts[task]

    def window_length(self, model: nn.Module) -> tuple[int, int]:
        """(window length, stride) for ``model``: max_length clipped to its max_position_embeddings; a clipped
        window scales the stride by the same ratio (1024/512 on a 256-position model: 256/128)."""
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        ml = self.config.max_length
        if ml is None:
            if not limit:
                raise ConfigError("taskpool.max_length=null needs the model's config.max_position_embeddings; set "
                                  "taskpool.max_length.")
            ml = int(limit)
        elif limit:
            ml = min(ml, int(limit))
        stride = self.config.stride
        if self.config.max_length is not None and ml < self.config.max_length:  # clipped: keep the overlap ratio
            stride = max(1, round(stride * ml / self.config.max_length))
        return ml, min(stride, ml)

    def evaluate(self, model: nn.Module, tasks: list[str] | None = None) -> dict[str, Any]:
        """``perplexity``, ``nll``, ``tokens``, ``forward_tokens``, ``wall_time_s``, ``tokens_per_s`` per task."""
        tasks = self._check_tasks(tasks)
        check_causal_lm(model, "causal_lm_perplexity")
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.tokenizer, model, "causal_lm_perplexity")
        tok = self._tokenizer
        device = resolve_device(self.config.device)
        model.to(device)
        ml, stride = self.window_length(model)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        was_training = model.training
        model.eval()
        results: dict[str, dict[str, float]] = {}
        try:
            for task in tasks:
                texts = self.texts(task)
                ids = tokenize_joined(tok, texts, add_special_tokens=self.config.add_special_tokens)
                if self.config.max_tokens is not None:
                    ids = ids[: self.config.max_tokens]
                if ids.numel() < 2:
                    raise ConfigError(f"taskpool.tasks.{task}: the text has {ids.numel()} token(s); perplexity needs "
                                      "at least 2.")
                if vocab and int(ids.max()) >= int(vocab):
                    raise ModelMismatchError(f"taskpool.tasks.{task}: the tokenizer produces id {int(ids.max())} but "
                                             f"the model's vocabulary has {vocab} entries; use the model's tokenizer "
                                             "(taskpool.tokenizer).")
                t0 = time.perf_counter()
                nll_sum, scored, fed = strided_nll(model, ids, max_length=ml, stride=stride,
                                                   batch_size=self.config.batch_size, device=device,
                                                   desc=f"perplexity {task}")
                wall = time.perf_counter() - t0
                nll = nll_sum / scored
                results[task] = {"perplexity": math.exp(nll), "nll": nll, "tokens": scored, "forward_tokens": fed,
                                 "wall_time_s": round(wall, 4), "tokens_per_s": scored / wall if wall > 0 else 0.0}
                s = self._specs[task]
                self._info[task] = {"source": s.source, "split": s.split, "field": s.field, "texts": len(texts),
                                    "text_sha256": texts_sha256(texts), "tokens_in_text": int(ids.numel()),
                                    "max_length": ml, "stride": stride}
        finally:
            model.train(was_training)
        return {"tasks": results, "average": average_metrics(results)}

    def report_extras(self) -> dict[str, Any]:
        return {"evaluation_splits": dict(self._info),
                "taskpool_info": {"type": "causal_lm_perplexity",
                                  "tokenizer": self.config.tokenizer or "(the model's folder)",
                                  "max_length": self.config.max_length, "stride": self.config.stride,
                                  "add_special_tokens": self.config.add_special_tokens,
                                  "max_tokens": self.config.max_tokens}}
