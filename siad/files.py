"""File writing and file identity shared by every layer: atomic writes and size/mtime or content fingerprints.

Light on purpose (standard library only), so the data layer, the engine, the caches and the report use the
same pieces.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from siad.data.hashing import sha256sum
from siad.errors import DataError

#: Prefix of the temporary files :func:`atomic_write` leaves only when the process is killed mid-write.
TEMP_PREFIX = ".tmp-"


def _new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file (0o666 less the umask): ``mkstemp`` makes files 0o600,
    which would hide results and caches from the other members of a project group on a shared file system."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _temp_file(path: Path) -> tuple[int, Path]:
    """A new, uniquely named temporary file beside ``path`` (``mkstemp``: no two processes, on any host of a shared
    file system, get the same name), with the usual permissions; returns its open descriptor and path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}-", suffix=f".{os.getpid()}")
    os.fchmod(fd, _new_file_mode())
    return fd, Path(tmp)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through a uniquely named temporary file in its folder and ``os.replace`` it into place, so a
    reader sees the old file or the whole new one, never half of it."""
    path = Path(path)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """:func:`atomic_write` for writers that want a file name (``torch.save`` in a method's ``save``, a copy): yields
    a uniquely named temporary path beside ``path``, moved onto ``path`` when the block ends without an error and
    deleted when it raises. The block may read the finished temporary file (e.g. hash it) before it is moved."""
    path = Path(path)
    fd, tmp = _temp_file(path)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as handle:  # the writer closed its own handle: flush the bytes to disk before the rename
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block: one process at a time, also across
    the hosts of an NFS share. For writers that cannot write atomically themselves (open_clip's downloader writes the
    file in place), so concurrent jobs wait for the first one instead of reading or rewriting a half-written file.
    Where the lock cannot be taken (a read-only folder, Lustre without ``-o flock``) it warns and goes on without."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+b")  # closed in the finally below (that releases the lock)
    except OSError as err:
        warnings.warn(f"cannot create the lock file {path} ({err}); concurrent jobs are not kept apart", stacklevel=3)
        yield
        return
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError as err:
            warnings.warn(f"cannot lock {path} ({err}); concurrent jobs are not kept apart", stacklevel=3)
        yield
    finally:
        handle.close()


def write_text_atomic(path: Path, text: str) -> Path:
    """:func:`atomic_write` of UTF-8 ``text``."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def file_fingerprint(path: str | os.PathLike, *, content: bool = False) -> str:
    """Identity of a file: size + modification time (one ``stat``), or a SHA-256 of the bytes (``content``)."""
    path = Path(path)
    try:
        if content:
            return "sha256=" + sha256sum(path)
        stat = path.stat()
    except OSError as err:
        raise DataError(f"cannot fingerprint {path} ({err}); check that the file exists and is readable") from err
    return f"size={stat.st_size};mtime_ns={stat.st_mtime_ns}"
