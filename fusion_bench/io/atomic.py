"""Atomic outputs: write under a temporary name in the destination's folder, rename at the end.

A crash or an exception leaves nothing under the final name (and removes the temporary).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fusion_bench.errors import CheckpointError


def _tmp_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``dest`` (a folder) in one rename."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise CheckpointError(f"Output folder {dest} already exists; pass overwrite=True or choose another path.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(dest)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = _tmp_name(dest.with_name(dest.name + ".old"))
        os.rename(dest, old)
    os.rename(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


@contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` for a writer that takes a path; rename on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(dest)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not tmp.exists():
        raise CheckpointError(f"Nothing was written for {dest}.")
    os.replace(tmp, dest)


@contextmanager
def atomic_file(dest: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file for writing; on success rename it onto ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(dest)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
