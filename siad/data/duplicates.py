"""Duplicate and near-duplicate images: content hashes, groups, train/test overlap.

Two fingerprints are stored per record by :func:`siad.data.prepare.prepare_dataset`:

* ``sha256``: SHA-256 of the image *file's bytes*. Equal hashes mean byte-identical files (an exact
  copy, whatever its name or folder).
* ``dhash``: 64-bit difference hash of the *decoded* image (upright, as the methods see it): the
  grayscale image resized to 9 x 8 pixels with Lanczos filtering, one bit per horizontally adjacent
  pair (set when ``pixel[x + 1] > pixel[x]``), rows top to bottom, first bit most significant, written
  as 16 hex digits. These are the bits of ``imagehash.dhash(image)`` (hash size 8).
  A re-encoded, resized or slightly recompressed copy keeps most bits: a small Hamming distance
  (default <= 4 of 64) marks a likely near-duplicate, to be checked by eye.

The functions here only compare fingerprints; they never read images. Records of an index written
before these fields existed raise a :class:`~siad.errors.DataError` saying how to regenerate it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from siad.data.records import REGENERATE, SPLITS, Meta, iter_records
from siad.errors import DataError

DHASH_SIZE = 8  # 8 rows x 8 differences = 64 bits
_CHUNK_ELEMENTS = 1 << 22  # pairs compared per numpy step (~32 MB of uint64)
_POPCOUNT_TABLE = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def dhash(image: Image.Image) -> str:
    """64-bit difference hash of ``image`` as 16 hex digits (see the module docstring)."""
    small = image.convert("L").resize((DHASH_SIZE + 1, DHASH_SIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(small, dtype=np.int16)
    bits = pixels[:, 1:] > pixels[:, :-1]
    return np.packbits(bits.ravel()).tobytes().hex()


def require_hashes(records: Iterable[Mapping[str, Any]], key: str, where: str = "the dataset index") -> list[str]:
    """The ``key`` field (``sha256`` or ``dhash``) of every record, in order.

    Raises:
        DataError: when a record lacks it (an index written by an older version), naming the record and
            how to regenerate the index.
    """
    values = []
    for rec in records:
        value = rec.get(key)
        if not value:
            raise DataError(
                f"{where}: record {rec.get('img_path')!r} (class {rec.get('cls_name')!r}) has no {key!r} field; "
                f"the meta.json was written by an older version of the suite. Fix: {REGENERATE}")
        values.append(value)
    return values


def duplicate_groups(meta: Meta) -> list[list[str]]:
    """Groups (two or more) of ``img_path`` with the same ``sha256``, over every split of one index.

    Each group is sorted; groups are sorted by their first path. Raises DataError without ``sha256``.
    """
    records = list(iter_records(meta, SPLITS))
    by_hash: dict[str, list[str]] = {}
    for rec, digest in zip(records, require_hashes(records, "sha256")):
        by_hash.setdefault(digest, []).append(rec["img_path"])
    return sorted(sorted(paths) for paths in by_hash.values() if len(paths) > 1)


def exact_overlap(train_records: Sequence[Mapping[str, Any]],
                  test_records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """``(train img_path, test img_path)`` pairs whose files have the same ``sha256``, sorted.

    The records may come from one index (a split the suite made) or from two (auxiliary training data
    of one dataset against the test split of another). Raises DataError without ``sha256``.
    """
    by_hash: dict[str, list[str]] = {}
    for rec, digest in zip(train_records, require_hashes(train_records, "sha256", "training records")):
        by_hash.setdefault(digest, []).append(rec["img_path"])
    pairs = [(train_path, rec["img_path"])
             for rec, digest in zip(test_records, require_hashes(test_records, "sha256", "test records"))
             for train_path in by_hash.get(digest, ())]
    return sorted(pairs)


def near_duplicates(records_a: Sequence[Mapping[str, Any]], records_b: Sequence[Mapping[str, Any]],
                    max_distance: int = 4) -> list[tuple[str, str, int]]:
    """Pairs ``(a img_path, b img_path, distance)`` whose ``dhash`` differ in at most ``max_distance`` bits.

    Every record of ``records_a`` is compared with every record of ``records_b`` (vectorised: XOR of
    64-bit words and a population count, in chunks of about four million pairs, so 10k x 5k records take
    well under a second). Sorted by distance, then paths. Comparing a list with itself reports each
    record with itself (distance 0) and each pair twice; filter those out if that is not wanted.

    Raises:
        ValueError: ``max_distance`` outside 0..64.
        DataError: a record without ``dhash`` (index from an older version).
    """
    if not 0 <= int(max_distance) <= 64:
        raise ValueError(f"max_distance must be between 0 and 64 bits, not {max_distance}")
    a = _hash_words(require_hashes(records_a, "dhash", "records (first set)"))
    b = _hash_words(require_hashes(records_b, "dhash", "records (second set)"))
    pairs: list[tuple[str, str, int]] = []
    rows = max(1, _CHUNK_ELEMENTS // max(1, len(b)))
    for start in range(0, len(a), rows):
        distances = _popcount(a[start:start + rows, None] ^ b[None, :])
        for i, j in zip(*np.nonzero(distances <= max_distance)):
            pairs.append((records_a[start + i]["img_path"], records_b[j]["img_path"], int(distances[i, j])))
    return sorted(pairs, key=lambda p: (p[2], p[0], p[1]))


def _hash_words(hashes: list[str]) -> np.ndarray:
    """16-hex-digit hashes as a ``uint64`` array."""
    bad = next((h for h in hashes if len(h) != 2 * DHASH_SIZE), None)
    try:
        if bad is not None:
            raise ValueError(f"{bad!r} is not 16 hex digits")
        return np.frombuffer(bytes.fromhex("".join(hashes)), dtype=">u8").astype(np.uint64)
    except ValueError as err:
        raise DataError(f"malformed dhash among {len(hashes)} records ({err}); Fix: {REGENERATE}") from None


def _popcount(words: np.ndarray) -> np.ndarray:
    """Number of set bits of each ``uint64``."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(words)
    return _POPCOUNT_TABLE[words.view(np.uint8)].reshape(*words.shape, 8).sum(axis=-1, dtype=np.uint8)
