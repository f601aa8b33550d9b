"""The dataset index: the ``meta.json`` format of the zero-shot anomaly-detection community.

``{"train": {cls: [record, ...]}, "test": {cls: [record, ...]}}`` where a record is
``{img_path, mask_path, cls_name, specie_name, anomaly}``; paths are relative to the dataset root
and ``mask_path`` is ``""`` for normal images and for datasets without masks. Files written in this
format load in AnomalyCLIP / AdaCLIP tooling, and folders prepared by that tooling load here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TypedDict

from siad.errors import DataError

SPLITS = ("train", "test")
RECORD_KEYS = ("img_path", "mask_path", "cls_name", "specie_name", "anomaly")


class Record(TypedDict):
    """One image of a dataset index."""

    img_path: str
    mask_path: str
    cls_name: str
    specie_name: str
    anomaly: int


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


def build_meta(train: Iterable[Record], test: Iterable[Record]) -> Meta:
    """Group records by class (classes and records sorted, so the index is deterministic)."""
    meta: Meta = {}
    for split, records in (("train", train), ("test", test)):
        by_class: dict[str, list[Record]] = {}
        for rec in records:
            by_class.setdefault(rec["cls_name"], []).append(rec)
        meta[split] = {c: sorted(rs, key=lambda r: r["img_path"]) for c, rs in sorted(by_class.items())}
    return meta


def validate_meta(meta: object, source: str = "meta.json", root: Path | None = None) -> Meta:
    """Check the schema (and, given ``root``, that every referenced file exists); return ``meta``.

    Raises:
        DataError: naming ``source`` and the first offending entry.
    """
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
                _validate_record(rec, f"{source}: {split}/{cls}", root)
    return meta  # type: ignore[return-value]


def _validate_record(rec: object, where: str, root: Path | None) -> None:
    if not isinstance(rec, dict) or any(k not in rec for k in RECORD_KEYS):
        raise DataError(f"{where}: record {rec!r} lacks one of the keys {RECORD_KEYS}")
    if rec["anomaly"] not in (0, 1, True, False):
        raise DataError(f"{where}: record {rec['img_path']!r} has anomaly={rec['anomaly']!r}; expected 0 or 1")
    if root is not None:
        for key in ("img_path", "mask_path"):
            if rec[key] and not (root / rec[key]).is_file():
                raise DataError(f"{where}: {key} {root / rec[key]} does not exist; re-run the dataset preparation")


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
