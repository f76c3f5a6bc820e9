"""EleutherAI's lm-evaluation-harness, in-process on the merged model.

``taskpool.type=lm_eval`` (needs the optional ``lm-eval`` package: ``pip install "fusion_bench[lm-eval]"``).
The evaluated model object itself is wrapped in lm-eval's ``HFLM`` (``pretrained=<the model instance>``,
backend ``causal``) with the tokenizer of ``taskpool.tokenizer`` (default: the one saved beside the model),
and ``lm_eval.simple_evaluate`` runs the named tasks: lm-eval's own task registry, plus the task YAMLs under
``include_path`` (a task can be defined from local data: ``dataset_path: json`` with ``data_files``, see
docs/llm_evaluation.md). Nothing is reloaded from disk and no lm-eval output folder is needed: every numeric
result lm-eval reports lands in our report, per task (groups included), with lm-eval's metric names; a
metric computed under a filter other than ``none`` is named ``metric[filter]`` (e.g. ``exact_match[strict-match]``).
``*_stderr`` values are kept when lm-eval computed them. The report also records lm-eval's version, the few-shot
counts, task versions, samples per task and the seeds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.errors import CheckpointError, ConfigError, did_you_mean
from fusion_bench.taskpool._lm_common import check_causal_lm, load_tokenizer
from fusion_bench.taskpool.base import TaskPool, TaskPoolConfig, average_metrics, register_taskpool
from fusion_bench.utils import resolve_device

INSTALL_HINT = "pip install 'fusion_bench[lm-eval]' (or: pip install lm-eval)"


def _refuse_task_code(folder: str) -> None:
    """Configs are data: a task YAML whose ``!function`` would import Python from the user's folder is refused
    unless ``taskpool.allow_task_code=true``."""
    from pathlib import Path

    for f in sorted(Path(folder).rglob("*.y*ml")):
        try:
            text = f.read_text(errors="replace")
        except OSError as e:
            raise ConfigError(f"taskpool.include_path: cannot read {f}: {e.strerror or e}.") from None
        if "!function" in text:
            raise ConfigError(f"taskpool.include_path: {f} runs Python code of that folder (`!function`); set "
                              "taskpool.allow_task_code=true if you trust it.")


@dataclass
class LMEvalConfig(TaskPoolConfig):
    """Options of the ``lm_eval`` task pool (lm-evaluation-harness)."""

    tasks: list[str] = option([], help="lm-eval task (or group) names, e.g. [hellaswag, arc_easy], or the names of "
                              "tasks defined in include_path.")
    include_path: list[str] | str | None = option(None, help="Folder(s) of extra lm-eval task YAMLs (e.g. tasks on "
                                                  "local data files).")
    allow_task_code: bool = option(False, help="Let task YAMLs under include_path import Python code of that folder "
                                   "(lm-eval's `!function`); off: such a YAML is refused before anything runs.")
    include_defaults: bool = option(True, help="Also index lm-eval's built-in tasks (false: only include_path; "
                                    "faster start).")
    tokenizer: str | None = option(None, help="Tokenizer folder or Hub id; null: the tokenizer saved in the folder the "
                                   "model was loaded from (a merged model: the pool's base).")
    num_fewshot: int | None = option(None, ge=0, le=10**4, help="Few-shot examples per prompt (null: each task's "
                                     "default).")
    limit: float | None = option(None, gt=0, le=10**9, help="Examples per task: an integer count, or a fraction "
                                 "< 1 (lm-eval's --limit; for quick runs, not for reported numbers).")
    batch_size: int = option(8, ge=1, le=4096, help="Requests per forward pass.")
    max_length: int | None = option(None, ge=1, le=1 << 22, help="Context length lm-eval truncates to (null: the "
                                    "model's max_position_embeddings, else 2048).")
    apply_chat_template: bool = option(False, help="Render prompts with the tokenizer's chat template.")
    gen_kwargs: dict[str, Any] | None = option(None, help="Generation arguments of generative tasks (e.g. "
                                               "{max_gen_toks: 64, do_sample: false}).")
    bootstrap_iters: int = option(100000, ge=0, le=10**7, help="Bootstrap resamples for the stderr of non-mean "
                                  "metrics (lm-eval's default 100000; 0 skips them).")
    seed: int = option(0, **SEED_RANGE, help="lm-eval's random, numpy, torch and few-shot seeds.")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ConfigError(f"taskpool.type=lm_eval needs the lm-eval package ({e}); install it: {INSTALL_HINT}.") from e
    return lm_eval, HFLM, TaskManager


def metric_name(key: str) -> str:
    """lm-eval's ``metric,filter`` key as a report metric name: ``acc`` or ``exact_match[strict-match]``."""
    metric, _, flt = key.partition(",")
    if not flt or flt == "none":
        return metric
    return f"{metric}[{flt}]"


def scores_from_results(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Numeric entries of lm-eval's ``results`` per task (``alias``, ``name``, 'N/A' stderr dropped)."""
    out: dict[str, dict[str, float]] = {}
    for task, entries in results.items():
        row = {}
        for k, v in entries.items():
            if k in ("alias", "name", "sample_len", "samples") or isinstance(v, bool):
                continue
            if isinstance(v, (int, float)):
                row[metric_name(k)] = float(v)
        out[task] = row
    return out


@register_taskpool("lm_eval")
class LMEvalTaskPool(TaskPool):
    """lm-evaluation-harness tasks on the model in memory (see the module docstring).

    Args:
        config: :class:`LMEvalConfig` or a mapping; keywords override.
        tokenizer: (Python API) a tokenizer object to use instead of ``config.tokenizer``.
    """

    config_class = LMEvalConfig

    def __init__(self, config: Any = None, *, tokenizer: Any = None, **kwargs: Any):
        if isinstance(tokenizer, str):
            kwargs["tokenizer"] = tokenizer
            tokenizer = None
        super().__init__(config, **kwargs)
        if not self.config.tasks:
            raise ConfigError("taskpool.tasks is empty; name lm-eval tasks, e.g. taskpool.tasks=[arc_easy].")
        if self.config.limit is not None and self.config.limit >= 1 and self.config.limit != int(self.config.limit):
            raise ConfigError(f"taskpool.limit={self.config.limit}: give an integer count or a fraction below 1.")
        paths = self.config.include_path
        self._include = [paths] if isinstance(paths, str) else list(paths or [])
        for p in self._include:
            if not os.path.isdir(os.path.expanduser(p)):
                raise ConfigError(f"taskpool.include_path: {p} is not a folder of lm-eval task YAMLs.")
            if not self.config.allow_task_code:
                _refuse_task_code(os.path.expanduser(p))
        if not self.config.include_defaults and not self._include:
            raise ConfigError("taskpool.include_defaults=false needs taskpool.include_path (no task would be known).")
        self._tokenizer = tokenizer
        self._extras: dict[str, Any] = {}

    @property
    def tasks(self) -> list[str]:
        return list(self.config.tasks)

    def task_manager(self):
        _, _, TaskManager = _import_lm_eval()
        return TaskManager(include_path=[os.path.expanduser(p) for p in self._include] or None,
                           include_defaults=self.config.include_defaults)

    def evaluate(self, model: nn.Module, tasks: list[str] | None = None) -> dict[str, Any]:
        """lm-eval's metrics per task (and group), and their averages over the requested tasks."""
        lm_eval, HFLM, _ = _import_lm_eval()
        check_causal_lm(model, "lm_eval")
        names = list(tasks) if tasks is not None else self.tasks
        for t in names:
            if t not in self.config.tasks:
                raise ConfigError(f"taskpool.tasks has no task '{t}'.{did_you_mean(t, self.config.tasks)}")
        tm = self.task_manager()
        known = set(tm.all_tasks)
        for t in names:
            if t not in known:
                raise ConfigError(f"lm-eval knows no task '{t}' (taskpool.tasks).{did_you_mean(t, known)} Define it in "
                                  "a YAML under taskpool.include_path, or check the name with `lm-eval ls tasks`.")
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.tokenizer, model, "lm_eval")
        device = resolve_device(self.config.device)
        model.to(device)
        was_training = model.training
        model.eval()
        limit = self.config.limit
        if limit is not None and limit >= 1:
            limit = int(limit)
        try:
            lm = HFLM(pretrained=model, tokenizer=self._tokenizer, backend="causal", batch_size=self.config.batch_size,
                      max_length=self.config.max_length)
            try:
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=names, task_manager=tm, num_fewshot=self.config.num_fewshot, limit=limit,
                    bootstrap_iters=self.config.bootstrap_iters, log_samples=False,
                    apply_chat_template=self.config.apply_chat_template,
                    gen_kwargs=dict(self.config.gen_kwargs) if self.config.gen_kwargs else None,
                    random_seed=self.config.seed, numpy_random_seed=self.config.seed,
                    torch_random_seed=self.config.seed, fewshot_random_seed=self.config.seed)
            except (ConnectionError, TimeoutError, FileNotFoundError) as e:
                raise CheckpointError(f"lm-eval could not load the data of tasks {names} ({type(e).__name__}: {e}); "
                                      "check the network/Hub access or define the tasks on local files "
                                      "(taskpool.include_path).") from e
            except Exception as e:
                mod = type(e).__module__ or ""
                if mod.startswith(("datasets", "huggingface_hub", "requests", "urllib3", "fsspec")):
                    raise CheckpointError(f"lm-eval could not load the data of tasks {names} ({type(e).__name__}: "
                                          f"{e}); check the network/Hub access or define the tasks on local files "
                                          "(taskpool.include_path).") from e
                raise
        finally:
            model.train(was_training)
        if out is None:  # only on non-zero ranks of a distributed run
            return {"tasks": {}, "average": {}}
        per_task = scores_from_results(out.get("results", {}))
        leaves = {t: per_task[t] for t in names if t in per_task}
        self._extras = {
            "lm_eval_version": out.get("lm_eval_version"),
            "n-shot": out.get("n-shot"), "versions": out.get("versions"), "n-samples": out.get("n-samples"),
            "higher_is_better": out.get("higher_is_better"), "group_subtasks": out.get("group_subtasks"),
            "limit": limit, "seed": self.config.seed, "max_length": getattr(lm, "max_length", None),
        }
        return {"tasks": per_task, "average": average_metrics(leaves)}

    def report_extras(self) -> dict[str, Any]:
        return {"taskpool_info": {"type": "lm_eval", "tasks": list(self.config.tasks),
                                  "include_path": self._include, "tokenizer": self.config.tokenizer
                                  or "(the model's folder)", "num_fewshot": self.config.num_fewshot,
                                  "batch_size": self.config.batch_size, **self._extras}}
