"""SHA-256 of files, shared by the downloader (archives) and the converters (content-aware splits)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256sum(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of the file at ``path``, read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
