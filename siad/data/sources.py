"""Where each real dataset comes from: direct URLs with checksums, Kaggle, or a manual step.

These are plain descriptions; :mod:`siad.data.download` acts on them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UrlSource:
    """An archive fetched over http(s). URLs are tried in order (mirrors rotate, the hash does not)."""

    urls: tuple[str, ...]
    filename: str
    sha256: str | None = None


@dataclass(frozen=True)
class KaggleSource:
    """A Kaggle dataset (needs an API token in ``~/.kaggle/kaggle.json`` or KAGGLE_USERNAME/KAGGLE_KEY)."""

    slug: str
    filename: str
    sha256: str | None = None


@dataclass(frozen=True)
class ManualSource:
    """No scriptable download: the user fetches ``filename`` from ``page`` and drops it in place."""

    page: str
    filename: str
    instructions: str
    sha256: str | None = None


Source = UrlSource | KaggleSource | ManualSource
