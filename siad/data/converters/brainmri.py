"""BrainMRI (Kaggle navoneel): ``brain_tumor_dataset/{yes,no}`` (tumour / normal), classification only.

The Kaggle zip may also hold a duplicate top-level ``yes/`` and ``no/``; the ``brain_tumor_dataset/``
copy is preferred and the duplicates are left out (logged if they hold files the preferred copy lacks).
File names contain spaces and extensions are mixed (``.jpg``, ``.JPG``, ``.jpeg``, ``.png``); paths are
stored relative to the dataset root (AnomalyCLIP stores them with the root prefix, which breaks
relative roots). Class key ``brain``; species ``no`` / ``yes`` (the folder names); ``mask_path`` is ``""``.
Option ``medical_protocol``: ``all_test`` (98 / 155 in test) or ``dra_75_25`` (25 / 155 in test).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from siad.data.converters.common import LayoutNotFound, find_level, images_by_relpath, list_images, log, medical_meta
from siad.data.records import Meta

CLASS = "brain"
CLASSES = (CLASS,)
NESTED = "brain_tumor_dataset"
EXPECTED_TEST_COUNTS = {"all_test": {CLASS: (98, 155)}, "dra_75_25": {CLASS: (25, 155)}}


def has_yes_no(folder: Path) -> bool:
    """Whether ``folder`` holds both label folders ``yes/`` and ``no/``."""
    return (folder / "yes").is_dir() and (folder / "no").is_dir()


def locate(root: Path) -> Path:
    """The folder holding ``yes/`` and ``no/``, preferring ``brain_tumor_dataset/`` over flat copies."""
    try:
        level = find_level(root, lambda d: has_yes_no(d / NESTED), f"{NESTED}/{{yes,no}}")
    except LayoutNotFound:
        return find_level(root, has_yes_no, "yes/ and no/ folders")
    base = level / NESTED
    if has_yes_no(level):
        _report_duplicates(level, base)
    return base


def _report_duplicates(flat: Path, nested: Path) -> None:
    for label in ("yes", "no"):
        extra = {p.name for p in list_images(flat / label)} - {p.name for p in list_images(nested / label)}
        if extra:
            log.warning("%s: %d images absent from %s are left out (the nested copy is the dataset)",
                        flat / label, len(extra), nested / label)


def convert(root: Path, options: Mapping[str, str]) -> Meta:
    """Index BrainMRI under ``options['medical_protocol']``."""
    base = locate(root)
    normals = images_by_relpath(root, base / "no")
    anomalies = images_by_relpath(root, base / "yes")
    return medical_meta(root, CLASS, normals, anomalies, options.get("medical_protocol", "all_test"), ("no", "yes"))
