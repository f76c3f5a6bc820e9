"""Atomic outputs: write under a temporary name in the destination's folder, rename at the end.

A crash or an exception leaves nothing under the final name (and removes the temporary).

Temporaries are named ``.<name>.fusion_bench-tmp-<pid>-<8 hex>`` beside the destination. While one
exists, SIGTERM and SIGINT handlers (installed from the main thread only, chained to the previous
handler and removed again afterwards) delete it before the process exits the usual way. A process
killed with SIGKILL cannot clean up: the first atomic write of a later run into the same folder
removes temporaries (and unlocked lock files, see :mod:`fusion_bench.io.outputs`) whose process is
gone. Operating-system errors while writing (disk full, read-only filesystem, no permission, a parent
that is a file) become one-line :class:`~fusion_bench.errors.CheckpointError` messages naming the
path and the fix.

These primitives replace an existing destination (``overwrite=True``): they serve tool-owned caches.
User-facing outputs go through :mod:`fusion_bench.io.outputs`, which refuses to replace what fusion_bench
did not write.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fusion_bench.errors import CheckpointError

#: infix of every temporary name (``.<name>.fusion_bench-tmp-<pid>-<hex>``)
TMP_INFIX = ".fusion_bench-tmp-"
_TMP_RE = re.compile(r"^\..+\.fusion_bench-tmp-(\d+)-[0-9a-f]{8}$")
_LEGACY_TMP_RE = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}$")  # temporaries of fusion_bench before 0.3

_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR,
                 errno.EFBIG, errno.EIO, errno.ENAMETOOLONG, errno.EDQUOT, errno.EXDEV, errno.ELOOP}


def tmp_name(dest: Path) -> Path:
    """A fresh temporary name beside ``dest``."""
    return dest.with_name(f".{dest.name}{TMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")


_tmp_name = tmp_name  # old private name


# ----------------------------------------------------------------------------------------------
# error messages
# ----------------------------------------------------------------------------------------------
def os_error_message(e: OSError, dest: str | os.PathLike, what: str = "output") -> str:
    """One line naming ``dest`` (the final path, not the temporary), the cause and the fix."""
    code = e.errno
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free disk space (or quota) on that filesystem, or choose a path on another disk"
    elif code == errno.EROFS:
        fix = "the filesystem is read-only; choose a writable path"
    elif code in (errno.EACCES, errno.EPERM):
        fix = f"check the write permission of {Path(dest).parent}, or choose another path"
    elif code in (errno.ENOTDIR, errno.EEXIST):
        fix = "a parent of that path is a file, not a folder; choose another path"
    elif code == errno.ENAMETOOLONG:
        fix = "choose a shorter path"
    else:
        fix = "check the path and the disk, or choose another path"
    reason = e.strerror or str(e)
    return f"Cannot write the {what} {dest}: {reason} (errno {errno.errorcode.get(code, code)}); {fix}."


def is_write_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _WRITE_ERRNOS


# ----------------------------------------------------------------------------------------------
# signal cleanup
# ----------------------------------------------------------------------------------------------
_LOCK = threading.RLock()
_ACTIVE: dict[int, Callable[[], None]] = {}
_IDS = itertools.count()
_PREV: dict[int, object] = {}
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_OWNER = os.getpid()


def _run_cleanups() -> None:
    with _LOCK:
        fns = list(_ACTIVE.values())
        _ACTIVE.clear()
    for fn in reversed(fns):
        try:
            fn()
        except Exception:  # pragma: no cover - best effort while dying
            pass


def _on_signal(signum: int, frame) -> None:
    prev = _PREV.get(signum, signal.SIG_DFL)
    if os.getpid() != _OWNER:  # a forked child that inherited the handler: not our temporaries
        prev_handler = prev if callable(prev) else None
        if prev_handler is not None:
            prev_handler(signum, frame)
            return
    elif prev == signal.SIG_IGN:
        return
    else:
        default_like = prev in (None, signal.SIG_DFL) or prev is signal.default_int_handler
        if default_like:
            _run_cleanups()
        if callable(prev):
            prev(signum, frame)  # e.g. KeyboardInterrupt: the writers' own cleanup runs as it unwinds
            return
    # default action: restore it and deliver the signal again, so the exit status is the usual one
    _restore_handlers()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    if _PREV or threading.current_thread() is not threading.main_thread():
        return
    for s in _SIGNALS:
        try:
            _PREV[s] = signal.getsignal(s)
            signal.signal(s, _on_signal)
        except (ValueError, OSError):  # pragma: no cover - not the main interpreter
            _PREV.pop(s, None)


def _restore_handlers() -> None:
    if not _PREV or threading.current_thread() is not threading.main_thread():
        return
    for s, prev in list(_PREV.items()):
        try:
            if signal.getsignal(s) is _on_signal:
                signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        except (ValueError, OSError):  # pragma: no cover
            pass
    _PREV.clear()


def register_cleanup(fn: Callable[[], None]) -> int:
    """Run ``fn`` if SIGTERM/SIGINT stops the process before :func:`unregister_cleanup`; returns a token."""
    with _LOCK:
        token = next(_IDS)
        _ACTIVE[token] = fn
        _install_handlers()
    return token


def unregister_cleanup(token: int) -> None:
    with _LOCK:
        _ACTIVE.pop(token, None)
        if not _ACTIVE:
            _restore_handlers()


def _after_fork_in_child() -> None:
    global _OWNER
    _OWNER = os.getpid()
    _ACTIVE.clear()
    _PREV.clear()
    _CLEANED.clear()


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------
# stale temporaries
# ----------------------------------------------------------------------------------------------
_CLEANED: dict[str, float] = {}  # folder -> time of its last clean (each folder at most every 30 s)
_CLEAN_EVERY_S = 30.0


def pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists on this machine (``os.kill(pid, 0)``)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Temporaries in ``folder`` left by processes that no longer exist (killed with SIGKILL, power loss)."""
    out = []
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for n in names:
        m = _TMP_RE.match(n) or _LEGACY_TMP_RE.match(n)
        if m and not pid_alive(int(m.group(1))):
            out.append(Path(folder) / n)
    return out


def clean_stale(folder: str | os.PathLike, force: bool = False) -> list[Path]:
    """Remove stale temporaries and unlocked lock files in ``folder`` (at most every 30 s per folder and
    process unless ``force``: caches write many entries into one folder); returns what was removed."""
    key = os.path.realpath(folder)
    now = time.monotonic()
    with _LOCK:
        if not force and now - _CLEANED.get(key, -1e9) < _CLEAN_EVERY_S:
            return []
        _CLEANED[key] = now
    removed = stale_temporaries(folder)
    for p in removed:
        _remove(p)
    # same layer; imported late (it imports this module)
    from fusion_bench.io.outputs import clean_stale_locks

    removed += clean_stale_locks(folder)
    return removed


os.register_at_fork(after_in_child=_after_fork_in_child)


# ----------------------------------------------------------------------------------------------
# atomic writers
# ----------------------------------------------------------------------------------------------
def _mkparent(dest: Path, what: str) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(os_error_message(e, dest, what)) from e
    if not dest.parent.is_dir():
        raise CheckpointError(os_error_message(OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)), dest, what))
    clean_stale(dest.parent)


def _translate(e: BaseException, dest: Path, what: str, tmp: Path) -> BaseException:
    """A write error on the output (not, say, a permission error reading an input) as a CheckpointError."""
    if is_write_error(e):
        fn = getattr(e, "filename", None)
        if fn is not None and not str(fn).startswith((str(tmp), str(dest))):
            return e
        err = CheckpointError(os_error_message(e, dest, what))  # type: ignore[arg-type]
        err.__cause__ = e
        return err
    return e


def _abandon(e: BaseException, tmp: Path, dest: Path, what: str) -> None:
    """Remove the temporary of a failed write and re-raise (write errors as one-line CheckpointErrors)."""
    _remove(tmp)
    err = _translate(e, dest, what, tmp)
    if err is e:
        raise e
    raise err from e


@contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = True, *, before_commit: Callable[[], None] | None = None,
               what: str = "output folder") -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``dest`` (a folder) in one rename.

    Args:
        dest: the final folder.
        overwrite: replace an existing ``dest`` (refuse otherwise).
        before_commit: called just before the rename (a last check; raise to abandon the output).
        what: the output's name in error messages.
    """
    dest = Path(dest)
    if os.path.lexists(dest) and not overwrite:
        raise CheckpointError(f"Output folder {dest} already exists; pass overwrite=True or choose another path.")
    _mkparent(dest, what)
    tmp = tmp_name(dest)
    token = register_cleanup(lambda: _remove(tmp))
    try:
        try:
            tmp.mkdir()
        except OSError as e:
            raise CheckpointError(os_error_message(e, dest, what)) from e
        try:
            yield tmp
            if before_commit is not None:
                before_commit()
            _commit(tmp, dest, overwrite, what)
        except BaseException as e:
            _abandon(e, tmp, dest, what)
    finally:
        unregister_cleanup(token)


def _commit(tmp: Path, dest: Path, overwrite: bool, what: str) -> None:
    """Rename ``tmp`` onto ``dest``; an existing ``dest`` is moved aside first and deleted after."""
    if not os.path.lexists(dest):
        os.rename(tmp, dest)  # a folder created meanwhile makes this fail (ENOTEMPTY/EEXIST) instead of merging
        return
    if not overwrite:
        raise CheckpointError(f"Output {dest} appeared while it was being written; choose another path.")
    if tmp.is_file() or dest.is_symlink() or dest.is_file():
        os.replace(tmp, dest)
        return
    old = tmp_name(dest)

    def restore() -> None:  # killed between the two renames: put the old output back
        if not os.path.lexists(dest) and os.path.lexists(old):
            os.rename(old, dest)

    token = register_cleanup(restore)
    try:
        os.rename(dest, old)
        try:
            os.rename(tmp, dest)
        except BaseException:
            restore()
            raise
    finally:
        unregister_cleanup(token)
    _remove(old)


@contextmanager
def atomic_path(dest: str | os.PathLike, *, before_commit: Callable[[], None] | None = None,
                what: str = "output file") -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` for a writer that takes a path; rename on success."""
    dest = Path(dest)
    _mkparent(dest, what)
    tmp = tmp_name(dest)
    token = register_cleanup(lambda: _remove(tmp))
    try:
        try:
            yield tmp
            if not os.path.lexists(tmp):
                raise CheckpointError(f"Nothing was written for {dest}.")
            if before_commit is not None:
                before_commit()
            if os.path.isdir(dest) and not os.path.islink(dest):
                raise CheckpointError(f"Cannot write the {what} {dest}: a folder of that name exists; "
                                      "choose another path.")
            os.replace(tmp, dest)
        except BaseException as e:
            _abandon(e, tmp, dest, what)
    finally:
        unregister_cleanup(token)


@contextmanager
def atomic_file(dest: str | os.PathLike, mode: str = "wb", *, before_commit: Callable[[], None] | None = None,
                what: str = "output file") -> Iterator:
    """Open a temporary file for writing; on success rename it onto ``dest``."""
    with atomic_path(dest, before_commit=before_commit, what=what) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
