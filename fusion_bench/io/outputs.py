"""User-facing outputs that never destroy anything: merged models, mergekit folders, run reports.

Rules (checked before any merging work starts, and again just before the final rename):

- An existing destination is refused (:class:`OutputExistsError`) unless the caller passes
  ``overwrite`` (CLI ``overwrite=true``, ``fusion_bench mergekit --overwrite``, Python
  ``overwrite=True``).
- Even with ``overwrite``, only an output that fusion_bench wrote is replaced. fusion_bench marks its
  outputs: a folder holds a ``.fusion_bench_output`` file (JSON: tool, version, time, what); a
  ``.safetensors`` file carries a ``fusion_bench_output`` entry in its ``__metadata__``; a JSON
  report has a top-level ``fusion_bench_version`` key. Anything else is never replaced.
- A destination that is an input of the run, or a folder holding one, is never replaced.
- One run at a time writes a destination: a lock file ``.<name>.fusion_bench.lock`` beside it,
  held with ``flock`` (released by the kernel when the process dies, so a lock left by a killed run
  is taken over) and holding the owner's pid, host and time for the error message. Another run gets
  :class:`OutputLockedError`.

Temporaries, signal cleanup, stale-temporary removal and disk-error messages come from
:mod:`fusion_bench.io.atomic`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fusion_bench.errors import CheckpointError
from fusion_bench.io import atomic as _atomic
from fusion_bench.io.atomic import atomic_dir, atomic_file, atomic_path, os_error_message

#: marker file inside every output folder fusion_bench creates
MARKER = ".fusion_bench_output"
#: ``__metadata__`` key of the safetensors files fusion_bench writes as outputs
SAFETENSORS_MARK = "fusion_bench_output"
#: top-level key of fusion_bench's JSON reports
REPORT_MARK = "fusion_bench_version"
LOCK_SUFFIX = ".fusion_bench.lock"
_LOCK_RE = re.compile(r"^\..+\.fusion_bench\.lock$")


class OutputExistsError(CheckpointError):
    """The destination exists (or is an input of the run) and may not be replaced."""


class OutputLockedError(CheckpointError):
    """Another run is writing the same destination."""


def tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("fusion_bench")
    except Exception:
        return "unknown"


def mark(what: str) -> dict[str, Any]:
    """The marker's content: tool, version, time, what."""
    return {"tool": "fusion_bench", "version": tool_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "what": what}


def write_marker(folder: str | os.PathLike, what: str) -> None:
    (Path(folder) / MARKER).write_text(json.dumps(mark(what)) + "\n")


def safetensors_metadata(what: str = "merged model") -> dict[str, str]:
    """``__metadata__`` for a safetensors output: transformers' ``format`` plus fusion_bench's mark."""
    return {"format": "pt", SAFETENSORS_MARK: json.dumps(mark(what))}


def is_fusion_bench_output(path: str | os.PathLike) -> bool:
    """True when ``path`` is an output that fusion_bench wrote (see the module docstring)."""
    p = Path(path)
    try:
        if p.is_symlink():
            return False
        if p.is_dir():
            return json.loads((p / MARKER).read_text()).get("tool") == "fusion_bench"
        if not p.is_file():
            return False
        if p.suffix == ".safetensors":
            with open(p, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if not 0 < n < 100 * 2**20:
                    return False
                meta = json.loads(fh.read(n)).get("__metadata__") or {}
            return SAFETENSORS_MARK in meta
        if p.suffix == ".json" and p.stat().st_size < 256 * 2**20:
            doc = json.loads(p.read_text())
            return isinstance(doc, dict) and REPORT_MARK in doc
    except (OSError, ValueError, AttributeError):
        return False
    return False


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------
Inputs = Mapping[str, "str | os.PathLike"] | Iterable["str | os.PathLike"] | None


def _inputs(inputs: Inputs) -> list[tuple[str, Path]]:
    if inputs is None:
        return []
    items = inputs.items() if isinstance(inputs, Mapping) else ((str(p), p) for p in inputs)
    out = []
    for name, p in items:
        if p is None:
            continue
        try:
            out.append((str(name), Path(os.path.realpath(os.path.expanduser(str(p))))))
        except (OSError, ValueError):
            continue
    return out


def input_conflict(dest: str | os.PathLike, inputs: Inputs) -> str | None:
    """Why ``dest`` may never be replaced because of the run's inputs (None if it may)."""
    d = Path(os.path.realpath(os.path.expanduser(str(dest))))
    for name, p in _inputs(inputs):
        label = f"input '{name}' ({p})" if name != str(p) else f"input {p}"
        if d == p:
            return f"it is the {label} of this run"
        if d in p.parents:
            return f"it holds the {label} of this run"
    return None


def check_output(dest: str | os.PathLike, *, overwrite: bool = False, inputs: Inputs = None,
                 what: str = "output", kind: str | None = None, hint: str = "overwrite=True") -> Path:
    """Raise :class:`OutputExistsError` unless ``dest`` may be written (see the module docstring).

    Args:
        dest: the final path.
        overwrite: the user asked to replace an existing output that fusion_bench wrote.
        inputs: the run's inputs (name -> path, or paths): never replaced.
        what: the output's name in messages ('merged model', 'report', ...).
        kind: 'dir' or 'file' (what will be written), or None (either).
        hint: how the user passes ``overwrite`` in this interface (for the message).
    """
    dest = Path(os.path.expanduser(str(dest)))
    if not os.path.lexists(dest):
        return dest
    why = input_conflict(dest, inputs)
    if why is not None:
        raise OutputExistsError(f"Refusing to write the {what} to {dest}: {why}; choose another path "
                                f"({hint} never replaces inputs).")
    if not overwrite:
        raise OutputExistsError(f"The {what} {dest} already exists; choose another path, or pass {hint} to "
                                "replace an output that fusion_bench wrote.")
    is_dir = dest.is_dir() and not dest.is_symlink()
    if kind == "dir" and not is_dir:
        raise OutputExistsError(f"Refusing to replace {dest} with the {what}: it is a file, not a folder; choose "
                                "another path.")
    if kind == "file" and is_dir:
        raise OutputExistsError(f"Refusing to replace the folder {dest} with the {what} (a file); choose another "
                                "path.")
    if not is_fusion_bench_output(dest):
        sign = (f"no {MARKER} file inside" if is_dir else
                f"no '{SAFETENSORS_MARK}' metadata" if dest.suffix == ".safetensors" else
                f"no '{REPORT_MARK}' key" if dest.suffix == ".json" else "not a fusion_bench output")
        raise OutputExistsError(f"Refusing to replace {dest} with the {what}: fusion_bench did not write it ({sign}), "
                                f"so {hint} does not apply; choose another path, or move it away yourself.")
    return dest


# ----------------------------------------------------------------------------------------------
# locks
# ----------------------------------------------------------------------------------------------
_HELD: dict[str, list[Any]] = {}  # lock path -> [fd, count, cleanup token]


os.register_at_fork(after_in_child=_HELD.clear)  # a forked child holds none of its parent's locks


def lock_path(dest: str | os.PathLike) -> Path:
    dest = Path(os.path.expanduser(str(dest)))
    return dest.with_name(f".{dest.name}{LOCK_SUFFIX}")


def _key(lp: Path) -> str:
    return os.path.join(os.path.realpath(lp.parent), lp.name)


def _same_file(fd: int, lp: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(lp)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _owner(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info.get('pid')} on {info.get('host')} since {info.get('time')}"
    except (OSError, ValueError):
        return "another process"


def acquire_lock(dest: str | os.PathLike, what: str = "output") -> Path:
    """Take the lock of ``dest`` (re-entrant within this process); raise :class:`OutputLockedError` when
    another process holds it. Returns the lock file's path."""
    dest = Path(os.path.expanduser(str(dest)))
    lp = lock_path(dest)
    key = _key(lp)
    with _atomic._LOCK:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
            return lp
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(os_error_message(e, dest, what)) from e
    _atomic.clean_stale(dest.parent)
    for _ in range(20):
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise CheckpointError(os_error_message(e, dest, what)) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _owner(fd)
            os.close(fd)
            raise OutputLockedError(f"The {what} {dest} is being written by another fusion_bench run ({who}; lock "
                                    f"{lp}); wait for it to finish or choose another path.") from None
        except OSError:  # no flock on this filesystem: the lock file's existence is all we have
            pass
        if not _same_file(fd, lp):  # removed by its previous owner meanwhile: lock the new file
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dest": str(dest)}).encode(), 0)
        except OSError as e:
            _unlock(fd, lp)
            raise CheckpointError(os_error_message(e, dest, what)) from e
        with _atomic._LOCK:
            token = _atomic.register_cleanup(lambda fd=fd: _unlock(fd, lp))
            _HELD[key] = [fd, 1, token]
        return lp
    raise OutputLockedError(f"Could not lock {lp} for the {what} {dest}: it keeps changing; another run is "
                            "writing there; choose another path.")


def _unlock(fd: int, lp: Path) -> None:
    if _same_file(fd, lp):
        with contextlib.suppress(OSError):
            os.unlink(lp)  # before closing: a process waiting on this file sees it is gone and retries
    with contextlib.suppress(OSError):
        os.close(fd)


def release_lock(dest: str | os.PathLike) -> None:
    """Release one :func:`acquire_lock` of ``dest``; the last release removes the lock file."""
    lp = lock_path(dest)
    key = _key(lp)
    with _atomic._LOCK:
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
    _unlock(held[0], lp)
    _atomic.unregister_cleanup(held[2])


@contextmanager
def output_lock(dest: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    lp = acquire_lock(dest, what)
    try:
        yield lp
    finally:
        release_lock(dest)


def clean_stale_locks(folder: str | os.PathLike) -> list[Path]:
    """Remove lock files in ``folder`` that no process holds (their run was killed); returns them."""
    removed = []
    try:
        names = [n for n in os.listdir(folder) if _LOCK_RE.match(n)]
    except OSError:
        return []
    for n in names:
        lp = Path(folder) / n
        if _key(lp) in _HELD:
            continue
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        if _same_file(fd, lp):
            removed.append(lp)
        _unlock(fd, lp)
    return removed


# ----------------------------------------------------------------------------------------------
# guarded writers
# ----------------------------------------------------------------------------------------------
@contextmanager
def _guarded(dest: str | os.PathLike, kind: str, overwrite: bool, inputs: Inputs, what: str, hint: str,
             writer: Any) -> Iterator[Any]:
    """Check ``dest`` (before, under its lock, and again at the rename), then run the atomic ``writer``."""
    dest = Path(os.path.expanduser(str(dest)))

    def check() -> None:
        check_output(dest, overwrite=overwrite, inputs=inputs, what=what, kind=kind, hint=hint)

    check()
    with output_lock(dest, what):
        check()
        with writer(dest, check) as handle:
            yield handle


@contextmanager
def output_dir(dest: str | os.PathLike, *, overwrite: bool = False, inputs: Inputs = None,
               what: str = "output folder", hint: str = "overwrite=True") -> Iterator[Path]:
    """Yield a temporary folder that becomes ``dest`` (with a :data:`MARKER` file) on success.

    Refuses an existing ``dest`` as :func:`check_output` says (before and again at the rename), holds
    ``dest``'s lock meanwhile; leaves nothing behind on failure or SIGTERM/SIGINT.
    """
    def writer(d: Path, check: Any):
        return atomic_dir(d, overwrite=True, before_commit=check, what=what)

    with _guarded(dest, "dir", overwrite, inputs, what, hint, writer) as tmp:
        yield tmp
        write_marker(tmp, what)


@contextmanager
def output_path(dest: str | os.PathLike, *, overwrite: bool = False, inputs: Inputs = None,
                what: str = "output file", hint: str = "overwrite=True") -> Iterator[Path]:
    """Yield a temporary path that becomes the file ``dest`` on success (the writer adds our mark:
    :func:`safetensors_metadata` for safetensors, :data:`REPORT_MARK` for JSON reports)."""
    def writer(d: Path, check: Any):
        return atomic_path(d, before_commit=check, what=what)

    with _guarded(dest, "file", overwrite, inputs, what, hint, writer) as tmp:
        yield tmp


@contextmanager
def output_file(dest: str | os.PathLike, mode: str = "w", *, overwrite: bool = False, inputs: Inputs = None,
                what: str = "output file", hint: str = "overwrite=True") -> Iterator[Any]:
    """:func:`output_path`, opened for writing."""
    def writer(d: Path, check: Any):
        return atomic_file(d, mode, before_commit=check, what=what)

    with _guarded(dest, "file", overwrite, inputs, what, hint, writer) as f:
        yield f


def os_error_from(e: BaseException) -> OSError | None:
    """The OSError behind ``e``: itself, its cause, or an ``(os error N)`` in a library's message
    (safetensors' Rust writer reports I/O errors that way)."""
    if isinstance(e, OSError):
        return e
    if isinstance(e.__cause__, OSError):
        return e.__cause__
    m = re.search(r"os error (\d+)", str(e))
    if m:
        n = int(m.group(1))
        return OSError(n, os.strerror(n))
    return None


__all__ = ["MARKER", "SAFETENSORS_MARK", "REPORT_MARK", "OutputExistsError", "OutputLockedError", "acquire_lock",
           "release_lock", "output_lock", "check_output", "input_conflict", "is_fusion_bench_output", "lock_path",
           "output_dir", "output_file", "output_path", "safetensors_metadata", "write_marker", "clean_stale_locks",
           "os_error_from", "mark", "tool_version"]
