"""The ``clip_zoo`` task pool: zero-shot evaluation on the offline CLIP zoo's eight tasks.

A :class:`~fusion_bench.taskpool.clip_zeroshot.CLIPZeroShotTaskPool` whose ``clip_model``,
``processor`` and ``tasks`` (dataset folder, split, class names, caption templates) are filled in
from the zoo (built first when missing, see :mod:`fusion_bench.benchmark.zoo`). ``split`` picks the
test split (default) or the validation split (for choosing hyperparameters); ``corruption`` picks a
corrupted copy of the test split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusion_bench.config_schema import build_config, option
from fusion_bench.errors import ConfigError, did_you_mean
from fusion_bench.taskpool.base import TaskPoolConfig, devices_option, precision_option, register_taskpool
from fusion_bench.taskpool.clip_zeroshot import CLIPZeroShotTaskPool, CLIPZeroShotTaskPoolConfig


@dataclass
class CLIPZooTaskPoolConfig(TaskPoolConfig):
    """Options of the ``clip_zoo`` task pool."""

    scale: str = option("full", choices=("full", "tiny"), help="Zoo size: full (the benchmark) or tiny (tests).")
    root: str | None = option(None, help="Zoo folder (default $FUSION_BENCH_ZOO or ~/.cache/fusion_bench/zoo-<scale>).")
    build: bool = option(True, help="Build the zoo when it is missing or damaged (false: raise instead).")
    select: list[str] | None = option(None, help="Evaluate only these tasks (null: all eight).")
    split: str = option("test", choices=("test", "validation"),
                        help="The split evaluated: test (results) or validation (labelled held-out images for "
                        "choosing hyperparameters, e.g. the leaderboard's --tune).")
    corruption: str | None = option(None, help="Evaluate on the test split under this corruption (robustness), "
                                    "e.g. gaussian_noise; null: the clean test split. Needs split=test.")
    batch_size: int = option(512, ge=1, le=2**20, help="Images per forward pass.")
    device: str = option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda:0, ...")
    devices: list[str] | str | None = devices_option()
    precision: str = precision_option("the image encoders", extra=("float32", "bf16"))
    cache_dir: str | None = option(None, help="Cache of heads and preprocessed images (null: $FUSION_BENCH_CACHE or "
                                   "~/.cache/fusion_bench).")
    use_cache: bool = option(True, help="Read and write the head and image caches.")
    max_samples: int | None = option(None, ge=1, le=10**9, help="At most this many evenly spaced images per task of the evaluated "
                                     "split (null: all).")


@register_taskpool("clip_zoo")
class CLIPZooTaskPool(CLIPZeroShotTaskPool):
    """Zero-shot accuracy on the zoo's tasks (``taskpool=clip_zoo``); see CLIPZeroShotTaskPool.

    Args:
        config: :class:`CLIPZooTaskPoolConfig` mapping (scale, root, select, corruption, ...).
    """

    config_class = CLIPZooTaskPoolConfig

    def __init__(self, config: Any = None, **kwargs: Any):
        from fusion_bench.benchmark.zoo import ensure_zoo

        zc: CLIPZooTaskPoolConfig = build_config(CLIPZooTaskPoolConfig, config, prefix="taskpool", ignore=("type",),
                                                 **kwargs)
        self.zoo_config = zc
        self.zoo = ensure_zoo(zc.scale, zc.root, build=zc.build)
        tasks = self.zoo.tasks
        if zc.select is not None:
            unknown = [t for t in zc.select if t not in tasks]
            if unknown:
                raise ConfigError(f"taskpool.select names unknown task '{unknown[0]}'.{did_you_mean(unknown[0], tasks)}")
            tasks = [t for t in tasks if t in zc.select]
        split = zc.split
        if zc.corruption is not None:
            if split != "test":
                raise ConfigError(f"taskpool.corruption={zc.corruption!r} applies to the test split only, but "
                                  f"taskpool.split={split!r}; drop one of them.")
            known = self.zoo.corruptions()
            if zc.corruption not in known:
                raise ConfigError(f"taskpool.corruption={zc.corruption!r} is not a corruption of this zoo."
                                  f"{did_you_mean(zc.corruption, known)}")
            split = f"test_{zc.corruption}"
        spec_tasks = {}
        for t in tasks:
            s = self.zoo.task_spec(t)
            spec_tasks[t] = {"dataset": str(self.zoo.data_path(t)), "split": split,
                             "classnames": list(s.classnames), "templates": list(s.templates)}
        self.config_class = CLIPZeroShotTaskPoolConfig  # the parent validates the filled-in config
        super().__init__({"name": zc.name, "clip_model": str(self.zoo.pretrained_path), "tasks": spec_tasks,
                          "batch_size": zc.batch_size, "device": zc.device, "devices": zc.devices,
                          "precision": zc.precision, "cache_dir": zc.cache_dir,
                          "use_cache": zc.use_cache, "max_samples": zc.max_samples})
