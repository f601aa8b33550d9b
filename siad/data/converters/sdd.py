"""SDD = KolektorSDD (KSDD1), electrical commutators, under two protocols (option ``sdd_protocol``).

``adaclip_thirds`` (default; AdaCLIP ``sdd-pre.py`` = DRA ``convert_SDD.py``): every raw
``kosNN/PartK.jpg`` and its ``PartK_label.bmp`` are cut along the height into three pieces
``[:h//3]``, ``[h//3:2*h//3]``, ``[2*h//3:]``; a piece is anomalous iff ``max(label piece) > 0``. Pieces are
written as PNG to ``<root>/SDD_anomaly_detection/SDD/{train/good, test/{good,defect}, ground_truth/defect}``
named ``kosNN_PartK_{0,1,2}.png`` (masks ``..._mask.png``, binarised to 0/255); the normal pieces are split
with ``train_test_split(test_size=0.25, random_state=42)`` applied to their *sorted* names (the original
splits ``os.listdir`` order, which is file-system dependent, so only the sizes are reproducible:
857 train / 286 + 54 test). Image pieces keep the source mode. The folder is built in a hidden temporary
sibling and renamed into place; a marker with a fingerprint of the raw files makes re-runs no-ops.
Stray files directly under ``KolektorSDD/`` are ignored. A root that holds only a prepared
``SDD_anomaly_detection/SDD`` (AdaCLIP's output, no raw data) is indexed as it is.

``anomalyclip_drive``: an already prepared MVTec-style folder (``<dir>/test/{good,<defect>}``, optional
``train/good`` and ``ground_truth/<defect>``) such as AnomalyCLIP's Google-Drive copy, whose test split is
the (181, 74) of the papers. Its exact layout is not verified; the converter takes the one folder within
three levels that has ``test/``, and pairs masks as ``<stem>_mask.*`` or else ``<stem>.*``.

Class key: ``electrical_commutators`` (the object AnomalyCLIP names in its prompts, "electrical
commutators", in the underscore convention of the other class keys such as ``metal_nut``).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from siad.data.converters.common import LayoutNotFound, find_level, log, mvtec_style_class, rel, split_normals, subdirs
from siad.data.imageio import open_checked
from siad.data.records import Meta, build_meta
from siad.errors import DataError

CLASS = "electrical_commutators"
CLASSES = (CLASS,)
PROTOCOLS = ("adaclip_thirds", "anomalyclip_drive")
EXPECTED_TEST_COUNTS = {"adaclip_thirds": {CLASS: (286, 54)}, "anomalyclip_drive": {CLASS: (181, 74)}}

RAW_DIR = "KolektorSDD"
THIRDS_DIR = "SDD_anomaly_detection"
MARKER = ".siad_thirds.json"
THIRDS_VERSION = 2  # 2: identical pieces kept on one side of the split
DRIVE_URL = "https://drive.google.com/drive/folders/1oqaxUZYi44jlLT4WtT6D5T6onPTNZXsu"
_KOS = re.compile(r"kos\d+")
_PART = re.compile(r"(Part\d+)\.jpg", re.IGNORECASE)


@dataclass(frozen=True)
class Part:
    """One raw KSDD1 image with its pixel label."""

    kos: str
    stem: str
    image: Path
    label: Path

    def piece_name(self, third: int) -> str:
        return f"{self.kos}_{self.stem}_{third}"


def convert(root: Path, options: Mapping[str, str]) -> Meta:
    """Index SDD under ``options['sdd_protocol']`` (see the module docstring)."""
    protocol = options.get("sdd_protocol", PROTOCOLS[0])
    if protocol == "adaclip_thirds":
        class_dir, suffixes = build_thirds(root) / "SDD", ("_mask",)
    elif protocol == "anomalyclip_drive":
        class_dir, suffixes = find_drive_folder(root), ("_mask", "")
    else:
        raise DataError(f"sdd_protocol {protocol!r} unknown; use one of {PROTOCOLS}")
    train, test = mvtec_style_class(root, class_dir, CLASS, normal="good", mask_suffixes=suffixes)
    return build_meta(train, test, test_classes=CLASSES)


def thirds(height: int) -> list[slice]:
    """Row ranges of the three pieces, exactly as the community script cuts them."""
    return [slice(0, height // 3), slice(height // 3, 2 * height // 3), slice(2 * height // 3, height)]


def find_raw(root: Path) -> Path | None:
    """The folder holding the ``kosNN`` folders (``<root>/KolektorSDD``, ``<root>`` itself, or a wrapper)."""
    try:
        return find_level(root, lambda d: any(_KOS.fullmatch(s.name) for s in subdirs(d)), "kosNN folders", 2)
    except LayoutNotFound:
        return None


def list_parts(raw: Path) -> list[Part]:
    """Every ``kosNN/PartK.jpg`` with its ``PartK_label.bmp``; non-folders under ``raw`` are ignored."""
    parts = []
    for kos in subdirs(raw):
        if not _KOS.fullmatch(kos.name):
            log.warning("%s: not a kosNN folder of KolektorSDD, ignored", kos)
            continue
        files = {f.name.lower(): f for f in kos.iterdir() if f.is_file()}
        for name in sorted(files):
            match = _PART.fullmatch(files[name].name)
            if not match:
                continue
            stem = match.group(1)
            label = files.get(f"{stem}_label.bmp".lower())
            if label is None:
                raise DataError(f"{files[name]}: no {stem}_label.bmp beside it; re-extract KolektorSDD.zip")
            parts.append(Part(kos.name, stem, files[name], label))
    if not parts:
        raise DataError(f"{raw}: no kosNN/PartK.jpg images; re-extract KolektorSDD.zip")
    return parts


def fingerprint(raw: Path, parts: list[Part]) -> str:
    """Hash of the raw file names and sizes (and the cutting version), to detect a stale thirds folder."""
    items = [[rel(raw, p), p.stat().st_size] for part in parts for p in (part.image, part.label)]
    blob = json.dumps({"version": THIRDS_VERSION, "files": items}).encode()
    return hashlib.sha256(blob).hexdigest()


def build_thirds(root: Path) -> Path:
    """Create (or reuse) ``<root>/SDD_anomaly_detection`` from the raw KSDD1 images; return it."""
    out = root / THIRDS_DIR
    raw = find_raw(root)
    if raw is None:
        if (out / "SDD").is_dir():
            return out
        raise LayoutNotFound(f"{root}: neither raw KolektorSDD (KolektorSDD/kosNN/PartK.jpg) nor a prepared "
                             f"{THIRDS_DIR}/SDD folder")
    parts = list_parts(raw)
    stamp = fingerprint(raw, parts)
    if _marker(out).get("fingerprint") == stamp:
        return out
    tmp = root / f".{THIRDS_DIR}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    counts = _write_thirds(parts, tmp / "SDD")
    (tmp / MARKER).write_text(json.dumps({"fingerprint": stamp, "counts": counts}, indent=1))
    _replace_dir(tmp, out)
    return out


def _marker(out: Path) -> dict:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def _load(part: Part) -> tuple[np.ndarray, list[np.ndarray]]:
    """The image as an array (source mode) and its binarised label cut into thirds (sizes checked to match)."""
    with open_checked(part.image) as image:
        arr = np.asarray(image)
        size = image.size
    with open_checked(part.label) as label:
        if label.size != size:
            raise DataError(f"{part.label}: label size {label.size} differs from image size {size} "
                            f"of {part.image.name}; re-extract KolektorSDD.zip")
        lab = np.asarray(label)
    binary = lab > 0 if lab.ndim == 2 else (lab > 0).any(axis=-1)
    return arr, [binary[s] for s in thirds(binary.shape[0])]


def _piece_hash(piece: np.ndarray) -> str:
    """Hash of a piece's pixels (shape, dtype and values): equal pieces are equal images."""
    header = repr((piece.shape, piece.dtype.str)).encode()
    return hashlib.sha256(header + np.ascontiguousarray(piece).tobytes()).hexdigest()


def _write_thirds(parts: list[Part], sdd: Path) -> dict[str, int]:
    """Write every piece to its folder (two passes: labels and contents decide the split, then pieces are cut).

    Only the per-piece anomaly flags and content hashes are kept between the passes (full-size images
    of 399 parts would take hundreds of MB). Identical pieces stay on one side of the split
    (:func:`~siad.data.converters.common.split_normals` with the piece hashes; a normal piece identical
    to an anomalous one goes to test).
    """
    flags: dict[Part, list[bool]] = {}
    content: dict[str, str] = {}
    anomalous_content: set[str] = set()
    for part in parts:
        arr, labels = _load(part)
        flags[part] = [bool(m.any()) for m in labels]
        for t, (rows, bad) in enumerate(zip(thirds(arr.shape[0]), flags[part])):
            digest = _piece_hash(arr[rows])
            if bad:
                anomalous_content.add(digest)
            else:
                content[part.piece_name(t)] = digest
    in_train = set(split_normals(content, content=content, test_content=anomalous_content)[0])
    dirs = {k: sdd / k for k in ("train/good", "test/good", "test/defect", "ground_truth/defect")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(dirs, 0)
    for part, fl in flags.items():
        arr, masks = _load(part)
        for t, (rows, bad, mask) in enumerate(zip(thirds(arr.shape[0]), fl, masks)):
            name = part.piece_name(t)
            key = "test/defect" if bad else ("train/good" if name in in_train else "test/good")
            Image.fromarray(arr[rows]).save(dirs[key] / f"{name}.png")
            counts[key] += 1
            if bad:
                Image.fromarray(mask.astype(np.uint8) * 255).save(dirs["ground_truth/defect"] / f"{name}_mask.png")
    return counts


def _replace_dir(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``, removing a previous ``out`` only once ``new`` is complete."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    new.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def find_drive_folder(root: Path) -> Path:
    """The prepared MVTec-style SDD folder (the one folder with ``test/``, outside our thirds output)."""

    def holds(folder: Path) -> bool:
        inside = folder.relative_to(root).parts
        return (folder / "test").is_dir() and THIRDS_DIR not in inside and RAW_DIR not in inside

    try:
        return find_level(root, holds, "a prepared SDD folder with test/{good,<defect>}")
    except LayoutNotFound as err:
        raise LayoutNotFound(f"{err}; for sdd_protocol=anomalyclip_drive download AnomalyCLIP's SDD folder "
                             f"({DRIVE_URL}) and extract it into {root}") from None
