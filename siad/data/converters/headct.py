"""HeadCT (Kaggle felipekitamura): ``labels.csv`` + ``head_ct/head_ct/NNN.png``, classification only.

The CSV header is ``id, hemorrhage`` with a leading space (both are stripped); ``hemorrhage = 1`` is
anomalous. Images are ``<id:03d>.png`` in ``head_ct/head_ct/`` (Kaggle nesting, as DRA reads it) or
``head_ct/`` (as AdaCLIP reads it). Some PNGs are RGBA: :func:`siad.data.loading.read_image` drops
alpha. Class key ``head``; species ``normal`` / ``hemorrhage``.
Option ``medical_protocol``: ``all_test`` (100 / 100 in test) or ``dra_75_25`` (25 / 100 in test).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

from siad.data.converters.common import find_level, list_images, log, medical_meta, rel
from siad.data.records import Meta
from siad.errors import DataError

CLASS = "head"
CLASSES = (CLASS,)
EXPECTED_TEST_COUNTS = {"all_test": {CLASS: (100, 100)}, "dra_75_25": {CLASS: (25, 100)}}
HEADER = ["id", "hemorrhage"]


def image_folder(level: Path) -> Path:
    """``head_ct/head_ct`` if present, else ``head_ct``."""
    for candidate in (level / "head_ct" / "head_ct", level / "head_ct"):
        if candidate.is_dir():
            return candidate
    raise DataError(f"{level / 'head_ct'}: image folder missing beside labels.csv; re-extract the Kaggle zip")


def read_labels(csv_path: Path) -> dict[int, bool]:
    """``{id: hemorrhage}`` from ``labels.csv`` (header whitespace tolerated; values must be 0 or 1)."""
    with csv_path.open(newline="") as handle:
        rows = [[cell.strip() for cell in row] for row in csv.reader(handle) if row]
    if not rows or rows[0][:2] != HEADER:
        raise DataError(f"{csv_path}: header {rows[0] if rows else []} is not 'id, hemorrhage'; re-extract the zip")
    labels: dict[int, bool] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) < 2 or not row[0].isdigit() or row[1] not in ("0", "1"):
            raise DataError(f"{csv_path}:{line}: expected '<id>, <0|1>', got {row}; re-extract the zip")
        labels[int(row[0])] = row[1] == "1"
    return labels


def convert(root: Path, options: Mapping[str, str]) -> Meta:
    """Index HeadCT under ``options['medical_protocol']``."""
    level = find_level(root, lambda d: (d / "labels.csv").is_file(), "labels.csv")
    folder = image_folder(level)
    labels = read_labels(level / "labels.csv")
    normals: dict[str, Path] = {}
    anomalies: dict[str, Path] = {}
    for image_id, hemorrhage in sorted(labels.items()):
        path = folder / f"{image_id:03d}.png"
        if not path.is_file():
            raise DataError(f"{path}: listed in labels.csv (id {image_id}) but missing; re-extract the zip")
        (anomalies if hemorrhage else normals)[rel(root, path)] = path
    listed = {p.name for p in (*normals.values(), *anomalies.values())}
    for extra in (p for p in list_images(folder) if p.name not in listed):
        log.warning("%s: not listed in labels.csv, left out of the index", extra)
    protocol = options.get("medical_protocol", "all_test")
    return medical_meta(root, CLASS, normals, anomalies, protocol, ("normal", "hemorrhage"))
