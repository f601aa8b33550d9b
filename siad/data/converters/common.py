"""Shared pieces of the dataset converters (native layout -> ``meta.json`` index).

Every converter turns a dataset exactly as it lies after extracting the official archive into the
community index of :mod:`siad.data.records`. The helpers here cover what several layouts share:
finding the folder level that holds the class directories (archives are extracted flat or nested),
listing image files case-insensitively (VisA's ``.JPG``, BrainMRI's ``.jpeg``), pairing anomalous
images with their masks *by file stem* (never by sorted index, the community scripts' fragile habit)
and the two medical protocols.

Files that are neither images nor hidden are not silently dropped: they are reported through the
``siad.data`` logger, so a user sees what was left out of the index.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path

from siad.data.hashing import sha256sum
from siad.data.records import Meta, Record, build_meta, make_record
from siad.errors import DataError

log = logging.getLogger("siad.data")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
MEDICAL_PROTOCOLS = ("all_test", "dra_75_25")
SPLIT_SEED = 42  # random_state of the community's sklearn splits (AdaCLIP SDD, DRA medical)


class LayoutNotFound(DataError):
    """The root does not hold the dataset's native layout at all (nothing extracted there yet).

    Raised only when the top-level landmark is absent, so :func:`siad.data.prepare.prepare_dataset`
    can offer a download; a layout that is present but broken raises a plain :class:`DataError`.
    """


def is_hidden(path: Path) -> bool:
    """Dot-files and dot-folders (``.DS_Store``, ``.ipynb_checkpoints``, our own markers)."""
    return path.name.startswith(".")


def is_image(path: Path) -> bool:
    """A regular file with an image suffix (case-insensitive)."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def subdirs(folder: Path) -> list[Path]:
    """Non-hidden sub-directories of ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p))


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; other visible entries are logged, not indexed."""
    images, others = [], []
    for entry in sorted(folder.iterdir()):
        if is_hidden(entry):
            continue
        (images if is_image(entry) else others).append(entry)
    for entry in others:
        log.warning("%s: not an image file, left out of the index (move it elsewhere to silence this)", entry)
    return images


def rel(root: Path, path: Path) -> str:
    """``path`` relative to the dataset root, in POSIX form (the meta.json convention)."""
    return path.relative_to(root).as_posix()


def require_dir(path: Path, what: str, fix: str) -> Path:
    """Return ``path`` if it is a directory, else fail naming it and ``fix``."""
    if not path.is_dir():
        raise DataError(f"{path}: missing {what}; {fix}")
    return path


def find_level(root: Path, holds: Callable[[Path], bool], what: str, max_depth: int = 3) -> Path:
    """The shallowest directory at or below ``root`` (depth <= ``max_depth``) for which ``holds`` is true.

    Archives are extracted either flat or inside one or two wrapper folders (``DTD-Synthetic/DTD-Synthetic``,
    ``BTech_Dataset_transformed``); searching level by level finds the class directories either way.

    Raises:
        LayoutNotFound: when no directory qualifies (root missing or nothing extracted yet).
        DataError: when several directories at the same depth qualify (ambiguous root).
    """
    if not root.is_dir():
        raise LayoutNotFound(f"{root}: dataset folder does not exist (expected {what})")
    level = [root]
    for _ in range(max_depth + 1):
        hits = [d for d in level if holds(d)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            listed = ", ".join(str(h) for h in hits)
            raise DataError(f"{root}: several folders hold {what} ({listed}); keep one copy or point the root at one")
        level = [s for d in level for s in subdirs(d)]
    raise LayoutNotFound(f"{root}: no folder within {max_depth} levels holds {what}")


def find_class_level(root: Path, classes: Sequence[str], dataset: str) -> Path:
    """The directory whose sub-directories are the dataset's class folders (at least one known class)."""
    known = set(classes)

    def holds(folder: Path) -> bool:
        return any(d.name in known for d in subdirs(folder))

    return find_level(root, holds, f"{dataset} class folders ({', '.join(classes)})")


def present_classes(level: Path, classes: Sequence[str], dataset: str) -> list[str]:
    """Known classes found under ``level`` in canonical order; unknown folders are logged."""
    names = {d.name for d in subdirs(level)}
    for extra in sorted(names - set(classes)):
        log.warning("%s: not a %s class folder, ignored", level / extra, dataset)
    return [c for c in classes if c in names]


def mask_index(gt_dir: Path) -> dict[str, list[Path]]:
    """Mask files of a ground-truth folder keyed by stem."""
    index: dict[str, list[Path]] = {}
    for mask in list_images(gt_dir):
        index.setdefault(mask.stem, []).append(mask)
    return index


def pair_mask(image: Path, index: Mapping[str, list[Path]], gt_dir: Path, suffixes: Sequence[str]) -> Path:
    """The mask of ``image``: the file in ``gt_dir`` named ``<image stem><suffix>.<any ext>``.

    ``suffixes`` are tried in order (``"_mask"`` for MVTec-style sets, ``""`` for BTAD, whose masks carry
    the image stem with a possibly different extension).
    """
    for suffix in suffixes:
        found = index.get(image.stem + suffix, [])
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DataError(f"{gt_dir}: several masks for {image.name} ({names}); keep exactly one")
        if found:
            return found[0]
    expected = " or ".join(f"{image.stem}{s}.<ext>" for s in suffixes)
    raise DataError(f"{image}: anomalous image without a mask (expected {gt_dir / expected}); "
                    "the download is incomplete: re-extract the archive")


def mvtec_style_class(root: Path, class_dir: Path, cls_name: str, *, normal: str = "good",
                      mask_suffixes: Sequence[str] = ("_mask",)) -> tuple[list[Record], list[Record]]:
    """Records of one class laid out as ``{train/<normal>, test/{<normal>,<defect>}, ground_truth/<defect>}``.

    ``specie_name`` is the folder name; ``anomaly = specie != normal``. Training folders may hold only
    normal images (zero-shot auxiliary training never sees real training anomalies); a missing ``train``
    folder gives an empty training split (some prepared copies ship ``test`` only).
    """
    test_dir = require_dir(class_dir / "test", "test folder", "the class is incomplete: re-extract the archive")
    train: list[Record] = []
    train_dir = class_dir / "train"
    if train_dir.is_dir():
        for specie in subdirs(train_dir):
            if specie.name != normal:
                raise DataError(f"{specie}: training folders must hold only normal images ({normal!r}); "
                                "move it out of train/")
            train += [make_record(rel(root, p), cls_name, normal, False) for p in list_images(specie)]
    test: list[Record] = []
    for specie in subdirs(test_dir):
        test += _test_records(root, class_dir, specie, cls_name, normal, mask_suffixes)
    return train, test


def _test_records(root: Path, class_dir: Path, specie: Path, cls_name: str, normal: str,
                  mask_suffixes: Sequence[str]) -> list[Record]:
    images = list_images(specie)
    if specie.name == normal:
        return [make_record(rel(root, p), cls_name, normal, False) for p in images]
    gt_dir = class_dir / "ground_truth" / specie.name
    if images:
        require_dir(gt_dir, f"ground-truth folder for {specie}", "re-extract the archive (masks are missing)")
    index = mask_index(gt_dir) if images else {}
    return [make_record(rel(root, p), cls_name, specie.name, True,
                        rel(root, pair_mask(p, index, gt_dir, mask_suffixes))) for p in images]


def convert_mvtec_style(root: Path, classes: Sequence[str], dataset: str, *, normal: str = "good",
                        mask_suffixes: Sequence[str] = ("_mask",)) -> Meta:
    """Index a dataset whose class folders (found at any wrapper depth) follow the MVTec layout."""
    level = find_class_level(root, classes, dataset)
    present = present_classes(level, classes, dataset)
    train: list[Record] = []
    test: list[Record] = []
    for cls in present:
        tr, te = mvtec_style_class(root, level / cls, cls, normal=normal, mask_suffixes=mask_suffixes)
        train += tr
        test += te
    return build_meta(train, test, test_classes=present)


def split_normals(names: Iterable[str], test_size: float = 0.25, *, content: Mapping[str, str] | None = None,
                  test_content: Collection[str] = ()) -> tuple[list[str], list[str]]:
    """Split sorted ``names`` into (train, test) with ``train_test_split(test_size, random_state=42)``.

    The community scripts split ``os.listdir`` order, which differs between file systems; sorting first
    makes the split reproducible everywhere (the sizes are the same: ``ceil(test_size * n)`` in test).

    ``content`` (name -> content hash) keeps identical images on one side: names sharing a hash form a
    group, the groups are split (each represented by its first name in sorted order) and expanded, so
    a copy of a test image never lands in train. Groups whose hash is in ``test_content`` (e.g. the
    hashes of the anomalies, which are all in test) go to test whole. Without duplicates the result
    equals the plain split; with them the sizes follow the groups and differ slightly from the rule.
    """
    ordered = sorted(names)
    if content is None:
        return _sklearn_split(ordered, test_size)
    groups: dict[str, list[str]] = {}
    for name in ordered:
        groups.setdefault(content[name], []).append(name)
    forced = [g for h, g in groups.items() if h in test_content]
    free = {g[0]: g for h, g in groups.items() if h not in test_content}
    shared = sorted(n for h, g in groups.items() if len(g) > 1 or h in test_content for n in g)
    if shared:
        log.warning("%d images have an identical copy among the images being split or among the test images "
                    "(e.g. %s); all copies of one content are kept on the same side of the train/test split",
                    len(shared), ", ".join(shared[:3]))
    train_keys, test_keys = _sklearn_split(sorted(free), test_size)
    train = sorted(n for k in train_keys for n in free[k])
    test = sorted([n for k in test_keys for n in free[k]] + [n for g in forced for n in g])
    return train, test


def _sklearn_split(ordered: list[str], test_size: float) -> tuple[list[str], list[str]]:
    """``train_test_split(ordered, test_size, random_state=42)``, both parts sorted (fewer than 2: all train)."""
    from sklearn.model_selection import train_test_split  # heavy import, only needed for splits

    if len(ordered) < 2:
        return ordered, []
    train, test = train_test_split(ordered, test_size=test_size, random_state=SPLIT_SEED)
    return sorted(train), sorted(test)


def medical_meta(root: Path, cls_name: str, normals: Mapping[str, Path], anomalies: Mapping[str, Path],
                 protocol: str, species: tuple[str, str]) -> Meta:
    """Index of a classification-only medical set under ``medical_protocol``.

    ``all_test`` (default; AdaCLIP / AnomalyCLIP zero-shot): every image in ``test``, ``train`` empty.
    ``dra_75_25`` (DRA / InCTRL): normals split 75/25 with ``train_test_split(random_state=42)`` on the
    sorted relative paths; the 25 % and all anomalies form ``test``, the 75 % normals form ``train``.
    Byte-identical files stay on one side (:func:`split_normals` with the files' SHA-256): a normal
    image identical to another normal goes where its group goes, one identical to an anomaly goes to test.
    ``normals`` / ``anomalies`` map a sort key (relative path) to the image; ``species`` = (normal, anomalous)
    specie names. Masks are absent (``mask_path = ""``).
    """
    if protocol not in MEDICAL_PROTOCOLS:
        raise DataError(f"medical_protocol {protocol!r} unknown; use one of {MEDICAL_PROTOCOLS}")
    normal_sp, anomal_sp = species
    if protocol == "all_test":
        train_keys, test_keys = [], sorted(normals)
    else:
        content = {k: sha256sum(p) for k, p in normals.items()}
        train_keys, test_keys = split_normals(normals, content=content,
                                              test_content={sha256sum(p) for p in anomalies.values()})
    train = [make_record(rel(root, normals[k]), cls_name, normal_sp, False) for k in train_keys]
    test = [make_record(rel(root, normals[k]), cls_name, normal_sp, False) for k in test_keys]
    test += [make_record(rel(root, p), cls_name, anomal_sp, True) for p in anomalies.values()]
    return build_meta(train, test, test_classes=(cls_name,))


def images_by_relpath(root: Path, folder: Path) -> dict[str, Path]:
    """Images of ``folder`` keyed by their path relative to ``root`` (the sort key of the medical splits)."""
    return {rel(root, p): p for p in list_images(folder)}
