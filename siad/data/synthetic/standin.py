"""Writing a stand-in: argument checks, the idempotency marker and the atomic build.

A stand-in root is built in a hidden temporary sibling folder and renamed into place only when
complete, with a ``.standin.json`` marker (arguments, generator version, file list) written last.
A later call with the same arguments finds the marker and every listed file and does nothing;
anything else (other arguments, files missing, no marker in an empty folder) is rebuilt. A
non-empty folder *without* a marker is refused rather than replaced: it may hold a real dataset.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from siad.data.synthetic import catalog
from siad.data.synthetic.layouts import WRITERS, Request, expected_counts
from siad.errors import DataError, UnknownNameError

MARKER = ".standin.json"
GENERATOR_VERSION = 1  # bump when the generated content changes, so old stand-ins are rebuilt
MIN_SIZE, MAX_SIZE = 32, 128
MAX_IMAGES = 999  # 3-digit file names


@dataclass(frozen=True)
class StandinSummary:
    """What a stand-in holds, as the converters (default options) must count it.

    Attributes:
        name: dataset name.
        root: the folder written.
        classes: class keys, in the dataset's canonical order.
        train_counts: per class, the number of training images (0 for the medical sets).
        test_counts: per class, (normal, anomalous) test images.
        written: False when an identical stand-in was already there and nothing was written.
    """

    name: str
    root: Path
    classes: tuple[str, ...]
    train_counts: dict[str, int]
    test_counts: dict[str, tuple[int, int]]
    written: bool

    @property
    def total_test(self) -> tuple[int, int]:
        """(normal, anomalous) test images over all classes."""
        return (sum(n for n, _ in self.test_counts.values()), sum(a for _, a in self.test_counts.values()))


def write_standin(name: str, root: Path, *, seed: int = 0, classes: Sequence[str] | None = None, n_train: int = 6,
                  n_test_normal: int = 4, n_test_anomalous: int = 4, size: int = 64) -> StandinSummary:
    """Write a synthetic stand-in of dataset ``name`` in its native on-disk layout under ``root``.

    Args:
        name: one of mvtec, visa, mpdd, dtd, sdd, btad, brainmri, headct, br35h.
        root: the folder to hold the stand-in (what the real archive would extract into).
        seed: non-negative; same seed → byte-identical files.
        classes: real class names of the dataset (default: a small demo subset).
        n_train: normal training images per class (ignored by the medical sets, which have no
            training split; for SDD a target, see :func:`siad.data.synthetic.layouts.ksdd_plan`).
        n_test_normal, n_test_anomalous: test images per class (SDD: see ``ksdd_plan``).
        size: image side in pixels, 32..128 (non-square layouts scale the other side).

    Raises:
        UnknownNameError: unknown dataset or class name.
        ValueError: a count, size or seed out of range.
        DataError: ``root`` is a file, or a non-empty folder that is not a stand-in.
    """
    req = _validated(name, seed, classes, n_train, n_test_normal, n_test_anomalous, size)
    root = Path(root)
    written = not _is_complete(root, req)
    if written:
        _build_atomically(root, req)
    train, test = expected_counts(req)
    return StandinSummary(name=req.name, root=root, classes=tuple(test), train_counts=train, test_counts=test,
                          written=written)


def _validated(name: str, seed: int, classes: Sequence[str] | None, n_train: int, n_test_normal: int,
               n_test_anomalous: int, size: int) -> Request:
    if name not in catalog.DATASET_CLASSES:
        raise UnknownNameError(f"unknown dataset {name!r} for a synthetic stand-in; known: "
                               f"{', '.join(catalog.DATASET_CLASSES)}")
    _check_int("seed", seed, 0, 2**63 - 1)
    _check_int("size", size, MIN_SIZE, MAX_SIZE)
    counts = {"n_train": n_train, "n_test_normal": n_test_normal, "n_test_anomalous": n_test_anomalous}
    for label, value in counts.items():
        _check_int(label, value, 1, MAX_IMAGES)
    return Request(name, seed, _validated_classes(name, classes), n_train, n_test_normal, n_test_anomalous, size)


def _check_int(label: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"write_standin: {label}={value!r} is out of range; pass an integer in [{lo}, {hi}]")


def _validated_classes(name: str, classes: Sequence[str] | None) -> tuple[str, ...]:
    """Requested classes in the dataset's canonical order; unknown names and duplicates are errors."""
    known = catalog.DATASET_CLASSES[name]
    if classes is None:
        return catalog.DEFAULT_CLASSES[name]
    if isinstance(classes, str):
        raise ValueError(f"write_standin: classes={classes!r} must be a list of class names, e.g. [{classes!r}]")
    unknown = [c for c in classes if c not in known]
    if unknown:
        raise UnknownNameError(f"unknown {name} class(es) {unknown}; known: {', '.join(known)}")
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"write_standin: classes={list(classes)!r} must be a non-empty list without duplicates")
    return tuple(c for c in known if c in classes)


def _marker_args(req: Request) -> dict:
    return {"generator_version": GENERATOR_VERSION, **asdict(req), "classes": list(req.classes)}


def _is_complete(root: Path, req: Request) -> bool:
    """True if ``root`` holds a finished stand-in written with the same arguments (and no file is missing)."""
    try:
        marker = json.loads((root / MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return False
    if not isinstance(marker, dict) or marker.get("args") != _marker_args(req):
        return False
    files = marker.get("files")
    if not isinstance(files, list) or not files or not all(isinstance(rel, str) for rel in files):
        return False
    return all((root / rel).is_file() for rel in files)


def _check_replaceable(root: Path) -> None:
    """Refuse to replace a file, or a non-empty folder that no stand-in writer made."""
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: is a file, not a folder; pass a folder path for the synthetic stand-in")
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise DataError(f"{root}: non-empty folder without a {MARKER} marker (a real dataset?); refusing to replace "
                        "it with a synthetic stand-in — choose an empty or new folder, or delete this one")


def _build_atomically(root: Path, req: Request) -> None:
    """Write the stand-in into a temporary sibling, then swap it into place."""
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        WRITERS[req.name](tmp, req)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        (tmp / MARKER).write_text(json.dumps({"args": _marker_args(req), "files": files}, indent=1))
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            root.rename(old / root.name)
            tmp.rename(root)
            shutil.rmtree(old)
        else:
            tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
