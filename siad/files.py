"""File writing and file identity shared by every layer: atomic writes and size/mtime or content fingerprints.

Light on purpose (standard library only), so the data layer, the engine, the caches and the report use the
same pieces.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from siad.data.hashing import sha256sum
from siad.errors import DataError

#: Prefix of the temporary files :func:`atomic_write` leaves only when the process is killed mid-write.
TEMP_PREFIX = ".tmp-"


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through a uniquely named temporary file in its folder and ``os.replace`` it into place, so a
    reader sees the old file or the whole new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}-", suffix=f".{os.getpid()}")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
