"""The dataset index: the ``meta.json`` format of the zero-shot anomaly-detection community.

``{"train": {cls: [record, ...]}, "test": {cls: [record, ...]}}`` where a record is
``{img_path, mask_path, cls_name, specie_name, anomaly}``; paths are relative to the dataset root
and ``mask_path`` is ``""`` for normal images and for datasets without masks. Files written in this
format load in AnomalyCLIP / AdaCLIP tooling, and folders prepared by that tooling load here.

Records written by :func:`siad.data.prepare.prepare_dataset` carry two more fields, ignored by that
tooling: ``sha256`` (SHA-256 of the image file's bytes) and ``dhash`` (64-bit difference hash of the
decoded image, 16 hex digits), which :mod:`siad.data.duplicates` uses to find duplicates and overlaps.

Every path must be relative and stay inside the dataset root (no absolute paths, no ``..``, and,
when the root is known, no symbolic link leading outside it): an index that reaches into another
dataset's folder would silently mix data sets, so :func:`validate_meta` refuses it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import NotRequired, TypedDict

from siad.errors import DataError

SPLITS = ("train", "test")
RECORD_KEYS = ("img_path", "mask_path", "cls_name", "specie_name", "anomaly")
HASH_FORMATS = {"sha256": re.compile(r"[0-9a-f]{64}"), "dhash": re.compile(r"[0-9a-f]{16}"),
                "mask_sha256": re.compile(r"[0-9a-f]{64}")}
REGENERATE = "regenerate the index: snakemake ... --forcerun prepare_dataset"


class Record(TypedDict):
    """One image of a dataset index (``sha256`` / ``dhash`` are added by the preparation step)."""

    img_path: str
    mask_path: str
    cls_name: str
    specie_name: str
    anomaly: int
    sha256: NotRequired[str]
    mask_sha256: NotRequired[str]
    dhash: NotRequired[str]


Meta = dict[str, dict[str, list[Record]]]


def make_record(img_path: str, cls_name: str, specie_name: str, anomaly: bool, mask_path: str = "") -> Record:
    """Build a record with POSIX relative paths (the on-disk format is OS-independent)."""
    return Record(
        img_path=Path(img_path).as_posix(),
        mask_path=Path(mask_path).as_posix() if mask_path else "",
        cls_name=cls_name,
        specie_name=specie_name,
        anomaly=int(bool(anomaly)),
    )


def build_meta(train: Iterable[Record], test: Iterable[Record], test_classes: Iterable[str] = ()) -> Meta:
    """Group records by class (classes and records sorted, so the index is deterministic).

    ``test_classes`` are classes the converter found: each gets a ``test`` entry even when it holds no
    record, so an empty test split is reported (:func:`empty_test_classes`) instead of vanishing.
    """
    meta: Meta = {}
    for split, records in (("train", train), ("test", test)):
        by_class: dict[str, list[Record]] = {c: [] for c in test_classes} if split == "test" else {}
        for rec in records:
            by_class.setdefault(rec["cls_name"], []).append(rec)
        meta[split] = {c: sorted(rs, key=lambda r: r["img_path"]) for c, rs in sorted(by_class.items())}
    return meta


def validate_meta(meta: object, source: str = "meta.json", root: Path | None = None) -> Meta:
    """Check the schema, that every path is relative and inside the root, and (given ``root``) exists.

    With ``root`` the paths are also resolved, so a symbolic link leading out of the root is refused.

    Raises:
        DataError: naming ``source``, the first offending record and the fix.
    """
    resolved = Path(root).resolve() if root is not None else None
    if not isinstance(meta, dict) or not set(meta) >= {"test"}:
        raise DataError(f"{source}: expected an object with a 'test' (and optional 'train') split")
    for split, classes in meta.items():
        if split not in SPLITS:
            raise DataError(f"{source}: unknown split {split!r}; expected one of {SPLITS}")
        if not isinstance(classes, dict):
            raise DataError(f"{source}: split {split!r} must map class names to record lists")
        for cls, records in classes.items():
            if not isinstance(records, list):
                raise DataError(f"{source}: {split}/{cls} must be a list of records")
            for rec in records:
                _validate_record(rec, f"{source}: {split}/{cls}", root, resolved)
    return meta  # type: ignore[return-value]


def _validate_record(rec: object, where: str, root: Path | None, resolved_root: Path | None) -> None:
    if not isinstance(rec, dict) or any(k not in rec for k in RECORD_KEYS):
        raise DataError(f"{where}: record {rec!r} lacks one of the keys {RECORD_KEYS}")
    if not isinstance(rec["img_path"], str) or not rec["img_path"] or not isinstance(rec["mask_path"], str):
        raise DataError(f"{where}: record {rec!r}: img_path must be a non-empty string and mask_path a string; "
                        f"{REGENERATE}")
    if rec["anomaly"] not in (0, 1, True, False):
        raise DataError(f"{where}: record {rec['img_path']!r} has anomaly={rec['anomaly']!r}; expected 0 or 1")
    for key, pattern in HASH_FORMATS.items():
        if key in rec and not (isinstance(rec[key], str) and pattern.fullmatch(rec[key])):
            raise DataError(f"{where}: record {rec['img_path']!r} has {key}={rec[key]!r}, not {pattern.pattern}; "
                            f"{REGENERATE}")
    for key in ("img_path", "mask_path"):
        if rec[key]:
            _check_inside(rec[key], key, rec["img_path"], where, root, resolved_root)
            if root is not None and not (root / rec[key]).is_file():
                raise DataError(f"{where}: {key} {root / rec[key]} does not exist; re-run the dataset preparation")


def path_problem(path: str) -> str | None:
    """Why ``path`` is not a safe relative path (absolute, drive letter or ``..``), or None when it is.

    Backslashes count as separators, so a Windows-style ``..\\visa`` is caught on every system.
    """
    posix = path.replace("\\", "/")
    if PurePosixPath(posix).is_absolute() or re.match(r"[A-Za-z]:", posix):
        return "is absolute"
    if ".." in PurePosixPath(posix).parts:
        return "climbs out of the root folder through '..'"
    return None


def _check_inside(value: str, key: str, img_path: str, where: str, root: Path | None,
                  resolved_root: Path | None) -> None:
    """Refuse a path that is absolute, uses ``..`` or (root known) resolves outside the root."""
    problem = path_problem(value)
    if problem is None and root is not None and resolved_root is not None:
        if not (root / value).resolve().is_relative_to(resolved_root):
            problem = f"leaves the dataset root {resolved_root} through a symbolic link"
    if problem is not None:
        raise DataError(
            f"{where}: record {img_path!r}: {key} {value!r} {problem}. Every path in meta.json must be relative "
            "to the dataset root and stay inside it (an index reaching into another folder mixes data sets). "
            f"Fix: {REGENERATE}; for a hand-made meta.json write the path relative to the dataset root and copy "
            "(not link) files from elsewhere into the root, or point the dataset root at the folder that holds them")


def iter_records(meta: Meta, splits: Iterable[str] = SPLITS) -> Iterator[Record]:
    """Every record of ``splits``, split by split, class by class."""
    for split in splits:
        for records in meta.get(split, {}).values():
            yield from records


def empty_test_classes(meta: Meta) -> list[str]:
    """Classes listed in the ``test`` split without a single record."""
    return [cls for cls, records in meta.get("test", {}).items() if not records]


def anomalies_without_masks(meta: Meta, splits: Iterable[str] = SPLITS) -> list[str]:
    """``img_path`` of every anomalous record whose ``mask_path`` is empty."""
    return [r["img_path"] for r in iter_records(meta, splits) if r["anomaly"] and not r["mask_path"]]


def listed(paths: Sequence[str], limit: int = 20) -> str:
    """The first ``limit`` paths, comma-separated, and how many more there are (for error messages)."""
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def select_classes(meta: Meta, classes: Iterable[str]) -> Meta:
    """``meta`` restricted to ``classes`` in both splits (a class absent from a split stays absent)."""
    keep = set(classes)
    return {split: {c: rs for c, rs in by_class.items() if c in keep} for split, by_class in meta.items()}


def load_meta(path: str | Path, root: Path | None = None) -> Meta:
    """Read and validate a ``meta.json``."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: dataset index not found; run the data rules (snakemake ... prepare)") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err}); delete it and re-run the preparation") from None
    return validate_meta(meta, str(path), root)


def save_meta(meta: Meta, path: str | Path) -> None:
    """Write ``meta`` atomically (a crash never leaves a half-written index)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    tmp.replace(path)


def count(meta: Meta, split: str = "test") -> dict[str, tuple[int, int]]:
    """Per class: (number of normal, number of anomalous) images of ``split``."""
    out = {}
    for cls, records in meta.get(split, {}).items():
        n_anom = sum(int(r["anomaly"]) for r in records)
        out[cls] = (len(records) - n_anom, n_anom)
    return out
