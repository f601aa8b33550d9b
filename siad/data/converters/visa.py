"""VisA, indexed from the official ``split_csv/1cls.csv`` exactly as AdaCLIP / AnomalyCLIP read it.

CSV columns ``object,split,label,image,mask``; ``label`` is ``normal`` or ``anomaly``; ``mask`` is empty
for normal images. Paths are kept as written in the CSV (e.g. ``candle/Data/Images/Anomaly/000.JPG``,
upper-case suffix), relative to the folder holding ``split_csv/``; ``specie_name`` is ``""`` as in the
community index. The masks hold defect *ids* (1, 2, ...), not 0/255: the loader binarises with ``> 0``.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

from siad.data.converters.common import find_level
from siad.data.records import Meta, Record, build_meta, make_record
from siad.errors import DataError

CLASSES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
           "pcb3", "pcb4", "pipe_fryum")

_N = {"candle": 100, "macaroni1": 100, "macaroni2": 100, "pcb1": 100, "pcb2": 100, "pcb3": 101, "pcb4": 101,
      "capsules": 60, "cashew": 50, "chewinggum": 50, "fryum": 50, "pipe_fryum": 50}
# 1cls test split per class: 100 anomalies each; normals as above (totals 962, 1200).
EXPECTED_TEST_COUNTS = {"1cls": {c: (_N[c], 100) for c in CLASSES}}

COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": False, "anomaly": True}


def convert(root: Path, options: Mapping[str, str]) -> Meta:
    """Index a VisA folder from ``split_csv/<visa_split>.csv`` (only ``1cls`` is the ZSAD protocol)."""
    split_name = options.get("visa_split", "1cls")
    level = find_level(root, lambda d: (d / "split_csv").is_dir(), "split_csv/ (VisA split files)")
    csv_path = level / "split_csv" / f"{split_name}.csv"
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: VisA split file missing; re-extract VisA_20220922.tar "
                        "(it ships split_csv/1cls.csv)")
    records: dict[str, list[Record]] = {"train": [], "test": []}
    seen: set[str] = set()  # classes the CSV names: one without test rows is reported, not dropped
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = tuple(f.strip() for f in reader.fieldnames or ())
        if fields[: len(COLUMNS)] != COLUMNS:
            raise DataError(f"{csv_path}: header {fields} is not {COLUMNS}; re-extract the archive")
        for line, row in enumerate(reader, start=2):
            split, rec = _row_record(root, level, csv_path, line, _clean(row))
            records[split].append(rec)
            seen.add(rec["cls_name"])
    return build_meta(records["train"], records["test"], test_classes=sorted(seen))


def _clean(row: Mapping[str | None, str | None]) -> dict[str, str]:
    """Strip whitespace from keys and values (extra unnamed cells, key None, are dropped)."""
    return {k.strip(): (v or "").strip() for k, v in row.items() if k is not None and isinstance(v, (str, type(None)))}


def _row_record(root: Path, level: Path, csv_path: Path, line: int, row: Mapping[str, str]) -> tuple[str, Record]:
    where = f"{csv_path}:{line}"
    cls, split, label = row["object"], row["split"], row["label"]
    if cls not in CLASSES:
        raise DataError(f"{where}: unknown VisA object {cls!r}; the CSV is not the official one, re-extract it")
    if split not in ("train", "test"):
        raise DataError(f"{where}: split {split!r} is neither 'train' nor 'test'; re-extract the CSV")
    if label not in LABELS:
        raise DataError(f"{where}: label {label!r} is neither 'normal' nor 'anomaly'; re-extract the CSV")
    anomalous = LABELS[label]
    if anomalous and not row["mask"]:
        raise DataError(f"{where}: anomalous image {row['image']} has no mask; re-extract the CSV")
    image = _existing(level / row["image"], where)
    mask = _existing(level / row["mask"], where) if anomalous else None
    mask_rel = mask.relative_to(root).as_posix() if mask else ""
    return split, make_record(image.relative_to(root).as_posix(), cls, "", anomalous, mask_rel)


def _existing(path: Path, where: str) -> Path:
    if not path.is_file():
        raise DataError(f"{where}: refers to {path}, which does not exist; re-extract VisA_20220922.tar")
    return path
