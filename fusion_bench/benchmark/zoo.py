"""The offline CLIP model zoo: task data, a CLIP pretrained from scratch, eight fine-tuned encoders.

    fusion_bench zoo build [--scale tiny|full] [--root DIR] [--force] [--threads N] [--workers N]
    fusion_bench zoo verify [--scale ...] [--root DIR]      # check every entry's content hashes
    fusion_bench zoo path [--scale ...] [--root DIR]        # print the cache folder
    fusion_bench zoo build|verify|path --track text ...     # the MiniLM text zoo (fusion_bench.benchmark.text_zoo)

The zoo reproduces FusionBench's CLIP-ViT experiment (one pretrained CLIP, eight image
classification tasks, one fine-tuned vision encoder per task) at a size that builds on a laptop
CPU. The cache root is ``--root``, else ``$FUSION_BENCH_ZOO``, else
``~/.cache/fusion_bench/zoo-<scale>``. Its entries:

- ``data/<task>``: the task's DatasetDict (train / validation / test and one ``test_<corruption>``
  split per corruption, for robustness evaluation), saved with ``save_to_disk``;
- ``pretrained``: the full ``CLIPModel`` with its tokenizer and image processor;
- ``finetuned/<task>``: the ``CLIPVisionModel`` fine-tuned on the task by the ``clip_finetune``
  method, with the processor.

Each entry is written atomically (temporary folder, then rename) and holds ``ENTRY.json``: the
sha256 of every file, the build key (scale settings, code version and the content hashes of the
entries it was built from) and the build time. A build skips entries whose files match their
hashes and key, and rebuilds the others, so a killed build resumes where it stopped and a damaged
entry is detected and rebuilt. ``manifest.json`` at the root summarises the entries.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fusion_bench.benchmark.clip_pretrain import CLIPPretrainConfig
from fusion_bench.errors import CheckpointError, ConfigError, FusionBenchError, did_you_mean
from fusion_bench.io.atomic import atomic_dir, atomic_file

ZOO_VERSION = 2  # 2: domain shift of the task splits, no hidden classes, fine-tuning 1000 steps
ENTRY_FILE = "ENTRY.json"
MANIFEST = "manifest.json"


def remove_stale_in(*folders: Path) -> None:
    """Remove the temporaries of dead fusion_bench processes in ``folders`` (see io.atomic.clean_stale)."""
    from fusion_bench.io.atomic import clean_stale

    for folder in folders:
        if folder.is_dir():
            clean_stale(folder, force=True)


@dataclass
class ZooScale:
    """Everything that decides a zoo's content (part of every entry's build key)."""

    data_scale: str = field(metadata={"help": "scale passed to the task builders (full or tiny)"})
    pretrain: CLIPPretrainConfig = field(metadata={"help": "the from-scratch CLIP"})
    pretrain_pairs: int = field(metadata={"help": "image-caption pairs drawn from the train splits"})
    finetune: dict[str, Any] = field(metadata={"help": "clip_finetune options"})
    pair_options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "options of tasks.pretraining_pairs (generic_prob, label_noise, synonym_prob, task_generic_prob, "
                "hidden_class_fraction, web_images_per_task)"})
    seed: int = field(default=0, metadata={"help": "seed of data, pretraining and fine-tuning"})
    corruptions: int | list[str] | None = field(default=None, metadata={
        "help": "corrupted test splits: these names of tasks.CORRUPTIONS, or the first N of them (None: all, 0: none)"})
    domain_shift: str | None = field(default=None, metadata={
        "help": "a shift of fusion_bench.benchmark.shifts applied to every image of the tasks' splits (train, "
                "validation, test) but never to a pretraining image: the domain fine-tuning adapts to"})


#: the default run's coefficient, chosen at the end of a build on the validation split (``default_run.json``)
DEFAULT_RUN = "default_run.json"
DEFAULT_LAMBDA_GRID: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)

#: torch threads of the CLIP zoo's pretraining. The trained weights depend on the thread count (reductions
#: split differently), so it is fixed: a build gives the same bytes whatever torch's default on the machine,
#: the user's OMP/torch setting or the machine load (measured: the tiny zoo built with 1 and 2 threads differs
#: in every trained entry). Two threads keep the build time of a 2-core machine.
BUILD_THREADS = 2
#: torch threads of each fine-tuning, fixed for the same reason. The eight fine-tunings are independent and
#: their models small, so they run one thread each in parallel processes (:data:`BUILD_WORKERS`), which is
#: faster on two cores than one after another on two threads; the bytes do not depend on the worker count.
FINETUNE_THREADS = 1
#: processes that build the data and fine-tuned entries at once (at most the machine's cores)
BUILD_WORKERS = 2


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch.set_num_threads(n) for the block (None: unchanged)."""
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


SCALES: dict[str, ZooScale] = {
    "full": ZooScale(
        data_scale="full",
        # 6000 steps on 96k distinct images (the train splits plus 9000 web images per task, each seen 8 times):
        # an encoder whose features generalise (linear probe 74-96 % in the lab run), so fine-tuning stays a
        # small move and merges land between pretrained and fine-tuned; the text tower has one layer (the
        # captions are short templates) to pay for the vision steps. docs/benchmark.md has the lab notes.
        pretrain=CLIPPretrainConfig(image_size=32, patch_size=8, vision_hidden=128, vision_layers=4, vision_heads=4,
                                    text_hidden=128, text_layers=1, text_heads=4, projection_dim=128, vocab_size=1536,
                                    max_length=32, steps=6000, batch_size=128, lr=1e-3, warmup_steps=100),
        pretrain_pairs=96000,
        # web captions of satellite tiles and product photos rarely name the dataset's class
        pair_options={"generic_prob": 0.15, "task_generic_prob": {"fashion": 0.8, "aerial": 0.9},
                      "web_images_per_task": 9000},
        # every task's images carry a line grid the pretraining never saw: zero-shot fails softly (the features
        # fit the images poorly, as real CLIP's do on SVHN or GTSRB) and each task vector holds an adaptation
        # to the shifted look that the others share (docs/benchmark.md, lab notes: probe E5, then this zoo)
        domain_shift="grid",
        finetune=dict(mode="full", steps=1000, batch_size=64, lr=5e-4, warmup_steps=100, augment_shift=3),
        # the six the benchmark issue names (CIFAR-10-C families: noise, blur, digital): ~40 % less build time than all ten
        corruptions=["gaussian_noise", "impulse_noise", "motion_blur", "pixelate", "contrast", "jpeg_compression"],
    ),
    "tiny": ZooScale(
        data_scale="tiny",
        pretrain=CLIPPretrainConfig(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2,
                                    text_hidden=32, text_layers=1, text_heads=2, projection_dim=32, vocab_size=700,
                                    max_length=24, steps=30, batch_size=32, lr=2e-3, warmup_steps=5),
        pretrain_pairs=400,
        pair_options={"web_images_per_task": 4},  # exercises the web-image path
        domain_shift="grid",
        finetune=dict(mode="full", steps=12, batch_size=32, lr=1e-3, warmup_steps=2),
        corruptions=5,
    ),
}


def scale_spec(scale: str) -> ZooScale:
    if scale not in SCALES:
        raise ConfigError(f"Unknown zoo scale '{scale}'.{did_you_mean(scale, SCALES)}")
    return SCALES[scale]


def default_root(scale: str) -> Path:
    """``$FUSION_BENCH_ZOO`` (the folder of this scale's zoo) or ``~/.cache/fusion_bench/zoo-<scale>``."""
    env = os.environ.get("FUSION_BENCH_ZOO")
    if env:
        return Path(os.path.expanduser(env))
    return Path.home() / ".cache" / "fusion_bench" / f"zoo-{scale}"


# ----------------------------------------------------------------------------------------------
# entries: hashes, keys, verification
# ----------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    from fusion_bench.utils import sha256_file

    return sha256_file(path)


def hash_folder(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative POSIX paths), ``ENTRY.json`` excluded."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != ENTRY_FILE:
            out[p.relative_to(folder).as_posix()] = _sha256(p)
    return out


def content_hash(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for k in sorted(files):
        h.update(f"{k}\0{files[k]}\n".encode())
    return h.hexdigest()


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def read_entry(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / ENTRY_FILE).read_text())
    except (OSError, ValueError):
        return None


def check_entry(folder: Path, key: str | None = None) -> str | None:
    """None when ``folder`` is a complete entry (hashes match, and ``key`` when given); else why not."""
    if not folder.is_dir():
        return "missing"
    meta = read_entry(folder)
    if meta is None or "files" not in meta:
        return f"{ENTRY_FILE} missing or unreadable"
    if key is not None and meta.get("key") != key:
        return "built with other settings or from other inputs (build key changed)"
    files = hash_folder(folder)
    expected = meta["files"]
    for name, digest in expected.items():
        if name not in files:
            return f"file {name} missing"
        if files[name] != digest:
            return f"file {name} damaged (sha256 mismatch)"
    extra = sorted(set(files) - set(expected))
    if extra:
        return f"unexpected file {extra[0]}"
    return None


def entry_to_build(name: str, path: Path, key: str, force: bool, times: dict[str, Any],
                   log: Callable[[str], None], label: str) -> str | None:
    """Why entry ``name`` must be built (logged unless it is simply missing), or None when it is current: then
    ``times[name]`` records it as cached with its stats."""
    why = "forced" if force else check_entry(path, key)
    if why is None:
        times[name] = {"status": "cached", **(read_entry(path) or {}).get("stats", {})}
    elif why != "missing":
        log(f"{label}: rebuilding {name}: {why}")
    return why


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """An exclusive lock on the zoo folder so two builds never write the same entries."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, atomic entries still keep the cache valid
        yield
        return
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# the zoo
# ----------------------------------------------------------------------------------------------
class ZooFolder:
    """What the CLIP and text zoos share: a scale, its spec and a cache folder with ``data/<task>`` and
    ``pretrained`` entries. Subclasses name their own ``scale_spec`` and ``default_root`` functions.

    Args:
        scale: ``full`` or ``tiny``.
        root: the cache folder (default: the subclass's ``default_root(scale)``).
    """

    _scale_spec: Callable[[str], Any]
    _default_root: Callable[[str], Path]

    def __init__(self, scale: str = "full", root: str | os.PathLike | None = None):
        self.scale = scale
        self.spec = type(self)._scale_spec(scale)
        self.root = Path(os.path.expanduser(str(root))) if root is not None else type(self)._default_root(scale)

    def data_path(self, task: str) -> Path:
        return self.root / "data" / task

    @property
    def pretrained_path(self) -> Path:
        return self.root / "pretrained"


class Zoo(ZooFolder):
    """A built (or to be built) CLIP zoo folder.

    ``scale`` and ``root`` as :class:`ZooFolder` (root default: :func:`default_root`).
    """

    _scale_spec = staticmethod(scale_spec)
    _default_root = staticmethod(default_root)

    # paths ------------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        from fusion_bench.benchmark.tasks import TASK_NAMES

        return list(TASK_NAMES)

    def finetuned_path(self, task: str) -> Path:
        return self.root / "finetuned" / task

    def task_spec(self, task: str):
        from fusion_bench.benchmark.tasks import get_task_spec

        return get_task_spec(task)

    def corruptions(self) -> list[str]:
        """Names of the corruptions with a ``test_<name>`` split in every task's data entry."""
        from fusion_bench.benchmark.tasks import CORRUPTIONS

        n = self.spec.corruptions
        if isinstance(n, (list, tuple)):
            unknown = [c for c in n if c not in CORRUPTIONS]
            if unknown:
                raise ConfigError(f"Zoo scale '{self.scale}' names unknown corruption '{unknown[0]}'."
                                  f"{did_you_mean(unknown[0], CORRUPTIONS)}")
            return list(n)
        return list(CORRUPTIONS) if n is None else list(CORRUPTIONS)[:n]

    def entries(self) -> list[tuple[str, Path]]:
        out = [(f"data/{t}", self.data_path(t)) for t in self.tasks]
        out.append(("pretrained", self.pretrained_path))
        out += [(f"finetuned/{t}", self.finetuned_path(t)) for t in self.tasks]
        return out

    # keys -------------------------------------------------------------------------------------
    def _spec_dict(self) -> dict[str, Any]:
        return {"version": ZOO_VERSION, "scale": self.scale, **asdict(self.spec)}

    def _content(self, folder: Path) -> str:
        meta = read_entry(folder)
        return content_hash(meta["files"]) if meta else "missing"

    def entry_key(self, name: str) -> str:
        s = self._spec_dict()
        if name.startswith("data/"):
            return _key(name, s["version"], s["data_scale"], s["seed"], self.corruptions(), s["domain_shift"])
        if name == "pretrained":
            return _key(name, s["version"], s["pretrain"], s["pretrain_pairs"], s["pair_options"], s["data_scale"],
                        s["seed"])
        task = name.split("/", 1)[1]
        return _key(name, s["version"], s["finetune"], s["seed"], self._content(self.pretrained_path),
                    self._content(self.data_path(task)))

    def status(self) -> dict[str, str | None]:
        """Entry name -> None when valid, else the reason it must be (re)built."""
        return {name: check_entry(path, self.entry_key(name)) for name, path in self.entries()}

    def is_built(self) -> bool:
        return all(v is None for v in self.status().values())

    # build ------------------------------------------------------------------------------------
    def build(self, force: bool = False, log: Callable[[str], None] | None = None,
              progress: bool | None = None, threads: int | None = BUILD_THREADS,
              workers: int | None = None) -> dict[str, Any]:
        """Build every missing, damaged or outdated entry; return per-entry build times.

        Args:
            force: rebuild every entry.
            log: a function printing one line (default: print to stderr).
            progress: show rich progress bars (default: when stderr is a terminal).
            threads: torch CPU threads of the pretraining (default :data:`BUILD_THREADS`, fixed: the weights
                depend on the thread count; None leaves torch's setting). Fine-tuning always uses
                :data:`FINETUNE_THREADS`.
            workers: processes building the data and fine-tuned entries at once (default :data:`BUILD_WORKERS`,
                at most the cores; 1 builds them here). The entries' bytes do not depend on it.
        """
        log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        show = sys.stderr.isatty() if progress is None else progress
        if workers is None:
            workers = min(BUILD_WORKERS, os.cpu_count() or 1)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"zoo build: workers must be a positive integer, got {workers!r}.")
        with _threads(threads), _Heartbeat(log, enabled=not show, label="zoo") as beat:
            return self._build(force, beat, show, workers)

    def _phases(self) -> list[list[tuple[str, Path]]]:
        """The entries in build order: the data, then the pretrained model, then the fine-tuned models (whose
        keys depend on the entries of the phases before); entries of one phase are independent."""
        entries = self.entries()
        return [[e for e in entries if e[0].startswith("data/")], [e for e in entries if e[0] == "pretrained"],
                [e for e in entries if e[0].startswith("finetuned/")]]

    def _build(self, force: bool, beat: _Heartbeat, show: bool, workers: int = 1) -> dict[str, Any]:
        log = beat.log
        times: dict[str, Any] = {}
        t_all = time.perf_counter()
        with _lock(self.root), _quiet_transformers(), _Bars(show, log) as bars:
            self._remove_stale_temporaries()
            overall = bars.add("zoo " + self.scale, len(self.entries()))
            for phase in self._phases():
                todo = []
                for name, path in phase:
                    key = self.entry_key(name)
                    if entry_to_build(name, path, key, force, times, log, "zoo") is None:
                        bars.advance(overall)
                        continue
                    todo.append((name, path, key))
                for name, dt, stats in self._build_entries(todo, workers, beat, bars):
                    times[name] = {"status": "built", "build_time_s": round(dt, 2), **stats}
                    log(f"zoo: built {name} in {dt:.1f}s")
                    bars.advance(overall)
            beat.current = "default λ"
            times[DEFAULT_RUN] = self._select_default_lambda(log)
            total = time.perf_counter() - t_all
            self._write_manifest(times, total)
        return {"root": str(self.root), "entries": times, "total_time_s": round(total, 2)}

    # the default run's coefficient ---------------------------------------------------------------
    def default_run(self) -> dict[str, Any] | None:
        """The recorded choice of task arithmetic's scaling factor for this zoo (``default_run.json``), or None."""
        try:
            return json.loads((self.root / DEFAULT_RUN).read_text())
        except (OSError, ValueError):
            return None

    def _default_run_key(self) -> str:
        """Changes when any entry's content changes (the choice is then made again)."""
        return _key("default_run", ZOO_VERSION, DEFAULT_LAMBDA_GRID,
                    *[content_hash((read_entry(p) or {}).get("files", {})) for _, p in self.entries()])

    def _select_default_lambda(self, log: Callable[[str], None]) -> dict[str, Any]:
        """Choose task arithmetic's scaling factor for the default run on the validation split (best average
        accuracy over :data:`DEFAULT_LAMBDA_GRID`, ties to the smaller), and record it in ``default_run.json``."""
        key = self._default_run_key()
        old = self.default_run()
        if old is not None and old.get("key") == key:
            return {"status": "cached", "scaling_factor": old["scaling_factor"]}
        from fusion_bench.benchmark.leaderboard import select_scaling_factor
        from fusion_bench.methods import get_method_class
        from fusion_bench.modelpool import build_modelpool
        from fusion_bench.taskpool.base import build_taskpool

        t0 = time.perf_counter()
        pool = build_modelpool({"type": "clip_zoo", "scale": self.scale, "root": str(self.root), "build": False})
        val = build_taskpool({"type": "clip_zoo", "scale": self.scale, "root": str(self.root), "build": False,
                              "split": "validation"})
        sel = select_scaling_factor(get_method_class("task_arithmetic"), pool, val, DEFAULT_LAMBDA_GRID)
        doc = {"method": "task_arithmetic", "scaling_factor": sel["scaling_factor"], "split": "validation",
               "grid": sel["grid"], "validation_average": {str(k): v for k, v in sel["validation_average"].items()},
               "key": key}
        with atomic_file(self.root / DEFAULT_RUN, "w") as f:
            json.dump(doc, f, indent=2)
        dt = time.perf_counter() - t0
        log(f"zoo: default run's task-arithmetic scaling factor on validation: {sel['scaling_factor']:g} "
            f"(grid {', '.join(f'{v:g}' for v in sel['grid'])}; {dt:.1f}s)")
        return {"status": "built", "build_time_s": round(dt, 2), "scaling_factor": sel["scaling_factor"]}

    def _remove_stale_temporaries(self) -> None:
        """Delete half-written entries a killed build left: only fusion_bench temporaries of processes
        that no longer exist (never a user's file that merely looks like one)."""
        remove_stale_in(self.root, self.root / "data", self.root / "finetuned")

    def _write_manifest(self, times: dict[str, Any], total: float) -> None:
        entries = {}
        for name, path in self.entries():
            meta = read_entry(path) or {}
            entries[name] = {"content_hash": content_hash(meta.get("files", {})), "key": meta.get("key"),
                             "build_time_s": meta.get("build_time_s"), "stats": meta.get("stats", {})}
        run = self.default_run() or {}
        doc = {"zoo_version": ZOO_VERSION, "scale": self.scale, "settings": self._spec_dict(), "entries": entries,
               "default_run": {k: run.get(k) for k in ("method", "scaling_factor", "split", "grid")} if run else None,
               "last_build": {"total_time_s": round(total, 2),
                              "entries": {k: v.get("status") for k, v in times.items()}}}
        with atomic_file(self.root / MANIFEST, "w") as f:
            json.dump(doc, f, indent=2, default=str)

    def _build_entries(self, todo: list[tuple[str, Path, str]], workers: int, beat: _Heartbeat,
                       bars: _Bars) -> Iterator[tuple[str, float, dict[str, Any]]]:
        """Build ``todo`` (entries of one phase): (name, seconds, stats) as each finishes. The pretrained entry is
        built here; data and fine-tuned entries in ``workers`` spawned processes when there are several."""
        if workers <= 1 or len(todo) <= 1 or todo[0][0] == "pretrained":
            for name, path, key in todo:
                beat.current = name
                t0 = time.perf_counter()
                stats = self._build_entry(name, path, key, bars)
                yield name, time.perf_counter() - t0, stats
            return
        beat.current = ", ".join(name for name, _, _ in todo)
        calls = [(name, self.scale, str(self.root), key, not bars.show) for name, _, key in todo]
        for name, (dt, stats) in _imap(_build_entry_job, calls, workers):
            yield name, dt, stats

    def _build_entry(self, name: str, path: Path, key: str, bars: _Bars) -> dict[str, Any]:
        if name.startswith("finetuned/"):
            with _threads(FINETUNE_THREADS):
                return self._write_entry(name, path, key, bars)
        return self._write_entry(name, path, key, bars)

    def _write_entry(self, name: str, path: Path, key: str, bars: _Bars) -> dict[str, Any]:
        t0 = time.perf_counter()
        with atomic_dir(path) as tmp:
            if name.startswith("data/"):
                stats = self._build_data(name.split("/", 1)[1], tmp)
            elif name == "pretrained":
                stats = self._build_pretrained(tmp, bars)
            else:
                stats = self._build_finetuned(name.split("/", 1)[1], tmp, bars)
            meta = {"entry": name, "key": key, "zoo_version": ZOO_VERSION, "scale": self.scale,
                    "build_time_s": round(time.perf_counter() - t0, 2), "stats": stats, "files": hash_folder(tmp)}
            (tmp / ENTRY_FILE).write_text(json.dumps(meta, indent=2, default=str))
        return stats

    def _build_data(self, task: str, out: Path) -> dict[str, Any]:
        from datasets import DatasetDict

        from fusion_bench.benchmark import tasks as T

        dd = T.build_task_dataset(task, scale=self.spec.data_scale, seed=self.spec.seed, shift=self.spec.domain_shift)
        splits = dict(dd)
        for c in self.corruptions():
            splits[f"test_{c}"] = T.build_corrupted_test(dd["test"], c, seed=self.spec.seed)
        DatasetDict(splits).save_to_disk(str(out))
        return {"splits": {k: len(v) for k, v in splits.items()}}

    def _build_pretrained(self, out: Path, bars: _Bars) -> dict[str, Any]:
        from datasets import load_from_disk

        from fusion_bench.benchmark import tasks as T
        from fusion_bench.benchmark.clip_pretrain import pretrain_clip, save_clip

        train, held_out = {}, {}
        web = bool(self.spec.pair_options.get("web_images_per_task"))
        workers = min(2, os.cpu_count() or 1)
        generated = {}
        if self.spec.domain_shift is not None:  # the saved splits are shifted; pretraining sees the images as
            generated = dict(_imap(T.task_arrays, [(t, self.spec.data_scale, self.spec.seed) for t in self.tasks],
                                   workers))  # generated, never the shift
        for task in self.tasks:
            if self.spec.domain_shift is None:  # the saved splits (PNG, lossless): not generated again
                dd = load_from_disk(str(self.data_path(task)))
                splits = {s: ([im.convert("RGB") for im in dd[s]["image"]], [int(v) for v in dd[s]["label"]])
                          for s in ("train", "validation", "test")}
            else:
                splits = generated[task]
            train[task] = splits["train"]
            if web:  # the web images are checked against these
                held_out[task] = [*splits["validation"][0], *splits["test"][0]]
        drawing = bars.add("pre-training images" + (" (train + web)" if web else ""), len(self.tasks))
        pairs = T.pretraining_pairs(self.spec.data_scale, self.spec.seed, self.spec.pretrain_pairs,
                                    tasks=self.tasks, train=train, held_out=held_out or None,
                                    progress=lambda task: bars.update(drawing, self.tasks.index(task) + 1, task),
                                    workers=workers,
                                    **self.spec.pair_options)
        images = [p[0] for p in pairs]
        captions = [p[1] for p in pairs]
        bar = bars.add("pretraining CLIP", self.spec.pretrain.steps)
        model, processor, stats = pretrain_clip(images, captions, self.spec.pretrain,
                                                progress=lambda s, n, loss: bars.update(bar, s, f"loss {loss:.3f}"))
        save_clip(model, processor, out)
        return stats

    def _build_finetuned(self, task: str, out: Path, bars: _Bars) -> dict[str, Any]:
        from fusion_bench.methods.training.clip_finetune import CLIPFinetune
        from fusion_bench.modelpool.base import ModelPool

        pool = ModelPool(models={"_pretrained_": str(self.pretrained_path)}, model_class="clip_vision",
                         processor=str(self.pretrained_path),
                         datasets={task: {"train": str(self.data_path(task))}})
        pool.task_info = lambda t: _spec_info(self.task_spec(t))  # type: ignore[attr-defined]
        method = CLIPFinetune(dict(self.spec.finetune), tasks=[task], seed=self.spec.seed, device="cpu")
        bar = bars.add(f"fine-tuning {task}", method.config.steps)
        method.on_step = lambda s, n, loss: bars.update(bar, s, f"loss {loss:.3f}")
        result = method.run(pool)
        from transformers import CLIPProcessor

        processor = CLIPProcessor.from_pretrained(self.pretrained_path)
        result.models[task].save_pretrained(out)  # inside the entry's atomic folder
        processor.save_pretrained(out)
        return dict(result.metadata.get("training", {}).get(task, {}))


def _imap(fn: Callable[..., Any], calls: list[tuple[Any, ...]], workers: int) -> Iterator[tuple[Any, Any]]:
    """(call[0], fn(*call)) for each call as it finishes, in ``workers`` spawned processes (not forked: the caller
    may hold torch's thread pools) when there are several calls and workers, else here in order."""
    if workers <= 1 or len(calls) <= 1:
        for c in calls:
            yield c[0], fn(*c)
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(min(workers, len(calls)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(fn, *c): c[0] for c in calls}
        try:
            while futures:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield futures.pop(fut), fut.result()
        finally:
            for fut in futures:
                fut.cancel()


def _build_entry_job(name: str, scale: str, root: str, key: str, log_lines: bool) -> tuple[float, dict[str, Any]]:
    """One data or fine-tuned entry, in a worker process of :meth:`Zoo.build` (progress lines on stderr)."""
    import torch

    torch.set_num_threads(FINETUNE_THREADS)
    zoo = Zoo(scale, root)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if log_lines else None
    t0 = time.perf_counter()
    with _quiet_transformers(), _Bars(False, log) as bars:
        stats = zoo._build_entry(name, zoo.root / name, key, bars)
    return time.perf_counter() - t0, stats


def _spec_info(spec: Any) -> dict[str, Any]:
    return {"classnames": list(spec.classnames), "templates": list(spec.templates)}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No transformers download/loading bars or load reports inside the zoo's own progress display."""
    import datasets
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    enabled = hf_logging.is_progress_bar_enabled()
    ds_enabled = datasets.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        if enabled:
            hf_logging.enable_progress_bar()
        if ds_enabled:
            datasets.enable_progress_bars()


class _Heartbeat:
    """Progress lines without a terminal: whatever the build does, a line at least every ``every`` seconds
    (pretraining and fine-tuning report steps only now and then; a log must never go quiet for minutes)."""

    def __init__(self, log: Callable[[str], None], enabled: bool = True, every: float = 20.0, label: str = "zoo"):
        self._log = log
        self.enabled = enabled
        self.every = every
        self.label = label
        self.current = ""
        self._last = time.monotonic()
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def log(self, line: str) -> None:
        with self._mutex:
            self._last = time.monotonic()
            self._log(line)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            if time.monotonic() - self._last >= self.every:
                self.log(f"{self.label}: still building {self.current or '...'} "
                         f"({time.monotonic() - self._t0:.0f}s since start)")

    def __enter__(self) -> _Heartbeat:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name=f"{self.label}-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class _Bars:
    """rich progress bars, or nothing when not shown."""

    def __init__(self, show: bool, log: Callable[[str], None] | None = None):
        self.show = show
        self._p = None
        self._log = log
        self._tasks: dict[int, tuple[str, int]] = {}
        self._last_line = time.monotonic()

    def __enter__(self) -> _Bars:
        if self.show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), transient=False)
            self._p.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)

    def add(self, desc: str, total: int) -> int:
        if self._p is not None:
            return self._p.add_task(desc, total=total, info="")
        key = len(self._tasks)
        self._tasks[key] = (desc, total)
        return key

    def update(self, task: int, completed: int, info: str = "") -> None:
        if self._p is not None:
            self._p.update(task, completed=completed, info=info)
        elif self._log is not None and task in self._tasks:  # no terminal: a line every 10 % or 15 s
            desc, total = self._tasks[task]
            if completed % max(1, total // 10) == 0 or time.monotonic() - self._last_line >= 15.0:
                self._last_line = time.monotonic()
                self._log(f"zoo: {desc} {completed}/{total} {info}")

    def advance(self, task: int) -> None:
        if self._p is not None:
            self._p.advance(task)


#: content hashes of the reference build behind the documented tables (docs/benchmark.md), per scale
REFERENCE_FILE = Path(__file__).with_name("zoo_reference.json")


def reference_build(scale: str) -> dict[str, Any] | None:
    """The reference build of ``scale``: {"entries": {name: content hash}, "default_run": {...}} or None."""
    try:
        return json.loads(REFERENCE_FILE.read_text()).get(scale)
    except (OSError, ValueError):
        return None


def shipped_default_lambda() -> float | None:
    """The scaling factor of the default run's method config (config/method/zoo_task_arithmetic.yaml)."""
    import yaml

    path = Path(__file__).resolve().parent.parent / "config" / "method" / "zoo_task_arithmetic.yaml"
    try:
        return float(yaml.safe_load(path.read_text())["scaling_factor"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def verify(zoo: Zoo, out: Callable[[str], None]) -> int:
    """``fusion_bench zoo verify``: every entry's own hashes, then its content against the reference build
    behind the documented tables, and the recorded default coefficient against the shipped default run.
    Returns 1 when an entry is damaged or missing, else 0 (differences from the reference are reported)."""
    ref = reference_build(zoo.scale) or {}
    ref_entries = ref.get("entries", {})
    bad = differ = 0
    for name, why in zoo.status().items():
        line = f"{name:28s} {'ok' if why is None else why}"
        if why is None and name in ref_entries:
            mine = content_hash((read_entry(zoo.root / name) or {}).get("files", {}))
            same = mine == ref_entries[name]
            differ += not same
            line += ("  (same as the reference build)" if same else
                     f"  (DIFFERS from the reference build: {mine[:12]} vs {ref_entries[name][:12]})")
        out(line)
        bad += why is not None
    if ref_entries:
        out(f"reference build ({zoo.scale}): " + ("every entry matches" if not differ and not bad else
                                                  f"{differ} entries differ, {bad} damaged or missing"))
    else:
        out(f"no reference hashes are recorded for scale '{zoo.scale}' ({REFERENCE_FILE.name})")
    run = zoo.default_run()
    shipped = shipped_default_lambda()
    if run is not None and zoo.scale == "full" and shipped is not None:
        lam = float(run["scaling_factor"])
        out(f"default run: this zoo's validated scaling factor {lam:g}, the shipped default run uses {shipped:g}"
            + ("" if lam == shipped else f" (they differ: run `fusion_bench method.scaling_factor={lam:g}`)"))
    return 1 if bad else 0


def ensure_zoo(scale: str = "full", root: str | os.PathLike | None = None, build: bool = True,
               log: Callable[[str], None] | None = None) -> Zoo:
    """The zoo of ``scale`` at ``root``, built first when incomplete (unless ``build=False``, which raises)."""
    zoo = Zoo(scale, root)
    bad = {k: v for k, v in zoo.status().items() if v is not None}
    if bad:
        if not build:
            name, why = next(iter(bad.items()))
            raise CheckpointError(f"The {scale} zoo at {zoo.root} is incomplete ({name}: {why}); run "
                                  f"`fusion_bench zoo build --scale {scale} --root {zoo.root}`.")
        zoo.build(log=log)
    return zoo


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``fusion_bench zoo build|verify|path [--track clip|text]``; returns the exit code."""
    ap = argparse.ArgumentParser(prog="fusion_bench zoo",
                                 description="Build or check an offline model zoo: the CLIP zoo (default) or the MiniLM "
                                 "text zoo (--track text).")
    ap.add_argument("action", choices=("build", "verify", "path"))
    ap.add_argument("--track", default="clip", choices=("clip", "text"),
                    help="clip: the CLIP zoo (default); text: MiniLM fine-tuned on eight text tasks, full and LoRA")
    ap.add_argument("--scale", default="full", choices=sorted(SCALES), help="zoo size (tiny: seconds, for tests)")
    ap.add_argument("--root", default=None, help="cache folder (default $FUSION_BENCH_ZOO or ~/.cache/fusion_bench/zoo-<scale>; "
                    "text: $FUSION_BENCH_CACHE/text-zoo-<scale> or ~/.cache/fusion_bench/text-zoo-<scale>)")
    ap.add_argument("--force", action="store_true", help="rebuild every entry")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads of the build, fixed for determinism (default: 2 for the CLIP zoo's "
                    "pretraining, 1 for text); another value builds different bytes, which `zoo verify` then reports")
    ap.add_argument("--workers", type=int, default=None,
                    help="CLIP zoo: processes building the data and fine-tuned entries at once (default: 2, at most "
                    "the cores; each fine-tuning uses one torch thread, so the bytes do not depend on this)")
    args = ap.parse_args(argv)
    if args.track == "text":
        from fusion_bench.benchmark.text_zoo import main as text_main

        return text_main(args)
    zoo = Zoo(args.scale, args.root)
    if args.action == "path":
        print(zoo.root)
        return 0
    if args.action == "verify":
        return verify(zoo, print)
    try:
        rep = zoo.build(force=args.force, threads=args.threads or BUILD_THREADS, workers=args.workers)
    except FusionBenchError:
        raise
    for name, st in rep["entries"].items():
        t = st.get("build_time_s")
        print(f"{name:28s} {st['status']:7s} {'' if t is None else f'{t:8.1f}s'}")
    print(f"zoo ({args.scale}) ready at {zoo.root} in {rep['total_time_s']:.1f}s")
    return 0
