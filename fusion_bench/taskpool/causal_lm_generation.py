"""Generation from fixed prompts: the outputs, their length, the time and tokens per second.

``taskpool.type=causal_lm_generation``. The prompts come from ``prompts`` (a list in the config) and/or
``prompts_file`` (a ``.txt`` file, one prompt per non-empty line, or a ``.jsonl`` / ``.json`` file with the
prompt in ``prompt_field``). Each prompt is tokenized (special tokens added, or the tokenizer's chat template
with ``chat_template=true``) and continued by ``model.generate`` with ``max_new_tokens``: greedy by default,
sampled with ``do_sample=true`` (``temperature``, ``top_p``, ``top_k``) from ``torch.manual_seed(seed)`` set
once before the first prompt, so a run is repeatable on the same device. Prompts are generated one at a time
(``batch_size: 1``, no padding: the outputs do not depend on the batch) or in left-padded batches.

Reported as one task ``generation``: ``prompts``, ``new_tokens`` (total generated, EOS included),
``mean_new_tokens``, ``wall_time_s`` (generation only) and ``tokens_per_s``; the report's ``generations``
lists each prompt, its output text (special tokens skipped) and its token count.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.data.lm_text import load_texts
from fusion_bench.errors import CheckpointError, ConfigError, ModelMismatchError
from fusion_bench.taskpool._lm_common import check_causal_lm, load_tokenizer
from fusion_bench.taskpool.base import TaskPool, TaskPoolConfig, register_taskpool
from fusion_bench.utils import resolve_device

DEFAULT_PROMPTS = ["The harbour town at the mouth of the river", "To bake a loaf of bread, you need",
                   "The tide rises twice a day because"]


@dataclass
class GenerationConfig(TaskPoolConfig):
    """Options of the ``causal_lm_generation`` task pool."""

    prompts: list[str] = option(list(DEFAULT_PROMPTS), help="Prompts to continue (with prompts_file: these come "
                                "first; set [] to use only the file).")
    prompts_file: str | None = option(None, help="A .txt file (one prompt per non-empty line) or .jsonl/.json file "
                                      "(prompt in prompt_field).")
    prompt_field: str = option("prompt", help="Key of the prompt in JSON records.")
    tokenizer: str | None = option(None, help="Tokenizer folder or Hub id; null: the tokenizer saved in the folder the "
                                   "model was loaded from (a merged model: the pool's base).")
    max_new_tokens: int = option(64, ge=1, le=1 << 20, help="Tokens generated per prompt at most.")
    do_sample: bool = option(False, help="false: greedy decoding; true: sampling (temperature, top_p, top_k, seed).")
    temperature: float = option(1.0, gt=0.0, le=100.0, help="Sampling temperature (do_sample=true).")
    top_p: float = option(1.0, gt=0.0, le=1.0, help="Nucleus sampling mass (do_sample=true; 1: off).")
    top_k: int = option(0, ge=0, le=1 << 20, help="Sample from the k most likely tokens (do_sample=true; 0: off).")
    seed: int = option(0, **SEED_RANGE, help="torch.manual_seed set before the first prompt (sampling).")
    batch_size: int = option(1, ge=1, le=4096, help="Prompts per generate call (more than 1: left padding).")
    chat_template: bool = option(False, help="Render each prompt as one user message with the tokenizer's chat "
                                 "template.")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")


def read_prompts(path: str, field: str) -> list[str]:
    """Prompts of a file: ``.txt`` one per non-empty line; ``.jsonl`` / ``.json`` records' ``field``."""
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise ConfigError(f"taskpool.prompts_file: {path} is not a file.")
    if p.suffix.lower() in (".jsonl", ".json"):
        return load_texts(str(p), field=field)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"taskpool.prompts_file: cannot read {path} as UTF-8 text ({e}).") from e
    return [ln.strip() for ln in lines if ln.strip()]


@register_taskpool("causal_lm_generation")
class CausalLMGenerationTaskPool(TaskPool):
    """Continue fixed prompts; report outputs, tokens and speed (see the module docstring).

    Args:
        config: :class:`GenerationConfig` or a mapping; keywords override.
        tokenizer: (Python API) a tokenizer object to use instead of ``config.tokenizer``.
    """

    config_class = GenerationConfig

    def __init__(self, config: Any = None, *, tokenizer: Any = None, **kwargs: Any):
        if isinstance(tokenizer, str):
            kwargs["tokenizer"] = tokenizer
            tokenizer = None
        super().__init__(config, **kwargs)
        self._prompts = [str(p) for p in self.config.prompts]
        if self.config.prompts_file:
            self._prompts += read_prompts(self.config.prompts_file, self.config.prompt_field)
        if not self._prompts:
            raise ConfigError("The generation task pool has no prompt: set taskpool.prompts or taskpool.prompts_file.")
        self._tokenizer = tokenizer
        self._generations: list[dict[str, Any]] = []

    @property
    def tasks(self) -> list[str]:
        return ["generation"]

    @property
    def prompts(self) -> list[str]:
        return list(self._prompts)

    def _gen_kwargs(self, tok) -> dict[str, Any]:
        c = self.config
        kw: dict[str, Any] = {"max_new_tokens": c.max_new_tokens, "do_sample": c.do_sample, "num_beams": 1,
                              "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
        if c.do_sample:
            kw.update(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k)
        else:  # greedy: neutral sampling settings, whatever the model's generation_config says
            kw.update(temperature=None, top_p=None, top_k=None)
        return kw

    def _encode(self, tok, prompts: list[str], device) -> dict[str, torch.Tensor]:
        if self.config.chat_template:
            if not getattr(tok, "chat_template", None):
                raise ConfigError("taskpool.chat_template=true but the tokenizer has no chat template.")
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
            enc = tok(prompts, return_tensors="pt", padding=len(prompts) > 1, add_special_tokens=False)
        else:
            enc = tok(prompts, return_tensors="pt", padding=len(prompts) > 1)
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, tasks: list[str] | None = None) -> dict[str, Any]:
        """``prompts``, ``new_tokens``, ``mean_new_tokens``, ``wall_time_s``, ``tokens_per_s`` of task ``generation``."""
        if tasks is not None and list(tasks) != ["generation"]:
            raise ConfigError(f"The generation task pool has one task, 'generation'; got {list(tasks)}.")
        check_causal_lm(model, "causal_lm_generation")
        if not callable(getattr(model, "generate", None)):
            raise ModelMismatchError(f"The generation task pool needs a model with generate(), got {type(model).__name__}.")
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.tokenizer, model, "causal_lm_generation")
        tok = self._tokenizer
        if tok.pad_token_id is None and self.config.batch_size > 1:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        device = resolve_device(self.config.device)
        model.to(device)
        was_training = model.training
        model.eval()
        kw = self._gen_kwargs(tok)
        eos = tok.eos_token_id
        gens: list[dict[str, Any]] = []
        torch.manual_seed(self.config.seed)
        t0 = time.perf_counter()
        try:
            for s in range(0, len(self._prompts), self.config.batch_size):
                batch = self._prompts[s:s + self.config.batch_size]
                enc = self._encode(tok, batch, device)
                out = model.generate(**enc, **kw)
                new = out[:, enc["input_ids"].shape[1]:]
                for p, row in zip(batch, new):
                    ids = row.tolist()
                    n = len(ids)
                    if eos is not None and eos in ids:  # tokens after the first EOS are padding
                        n = ids.index(eos) + 1
                    gens.append({"prompt": p, "output": tok.decode(ids[:n], skip_special_tokens=True),
                                 "new_tokens": n})
        finally:
            model.train(was_training)
        wall = time.perf_counter() - t0
        total = sum(g["new_tokens"] for g in gens)
        self._generations = gens
        res = {"prompts": len(gens), "new_tokens": total, "mean_new_tokens": total / len(gens),
               "wall_time_s": round(wall, 4), "tokens_per_s": total / wall if wall > 0 else 0.0}
        return {"tasks": {"generation": res}, "average": dict(res)}

    def report_extras(self) -> dict[str, Any]:
        c = self.config
        return {"generations": list(self._generations),
                "taskpool_info": {"type": "causal_lm_generation", "tokenizer": c.tokenizer or "(the model's folder)",
                                  "max_new_tokens": c.max_new_tokens, "do_sample": c.do_sample,
                                  "temperature": c.temperature, "top_p": c.top_p, "top_k": c.top_k, "seed": c.seed,
                                  "batch_size": c.batch_size, "chat_template": c.chat_template}}
