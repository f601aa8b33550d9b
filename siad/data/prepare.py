"""Prepare one dataset: find (or fetch) its native layout, index it, check it and write ``meta.json``.

Order (cheap checks first; each error names the files and the fix):

1. convert the native layout (:meth:`DatasetSpec.convert`); when the layout is not there, fetch it only
   if the dataset folder is absent or empty, download is enabled and the sources can provide the
   chosen protocol; otherwise the converter's own "layout not found" message is shown;
2. keep only the requested ``classes`` (None: all);
3. :func:`~siad.data.records.validate_meta`: every path relative, inside the root, existing;
4. every kept class has test images; in a dataset with masks every anomalous image has a mask;
5. the published per-class counts of the kept classes (config ``data.verify_counts``);
6. every image and mask decoded once (optionally by several threads): *all* unusable files are listed
   in one error; each record gets ``sha256`` (of the file's bytes) and ``dhash`` (of the decoded image);
7. byte-identical images (groups, and train/test pairs) are logged and written to ``dataset.json``.

Then ``meta.json`` and a small ``dataset.json`` beside it (name, absolute root, options, classes, per-class
counts, duplicates) are written atomically, so later rules and reports can state the data they used.
A freshly fetched archive without a pinned hash has its hash recorded only once steps 1-7 pass on its
content (:func:`siad.data.download.acquire` with ``check``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from siad.data import download as downloader
from siad.data.converters.common import LayoutNotFound
from siad.data.duplicates import dhash, duplicate_groups, exact_overlap
from siad.data.imageio import ImageFileError, check_mask_size, mask_array, open_checked, to_rgb
from siad.data.records import (
    SPLITS,
    Meta,
    Record,
    anomalies_without_masks,
    count,
    empty_test_classes,
    iter_records,
    listed,
    save_meta,
    select_classes,
    validate_meta,
)
from siad.data.registry import DatasetSpec, get_dataset
from siad.data.sources import KaggleSource, ManualSource, Source, UrlSource
from siad.errors import DataError, ManualDownloadRequired

log = logging.getLogger("siad.data")

INFO_NAME = "dataset.json"
RERUN = "snakemake ... --forcerun prepare_dataset"  # the rule of workflow/rules/data.smk that runs this step


def prepare_dataset(name: str, root: Path, meta_out: Path, *, options: Mapping[str, Any] | None = None,
                    download: bool = False, archive_dir: Path | None = None, verify_counts: bool = True,
                    classes: Sequence[str] | None = None, workers: int = 1) -> Meta:
    """Index dataset ``name`` found under ``root`` and write ``meta_out`` (+ ``dataset.json`` beside it).

    Args:
        options: protocol options (``sdd_protocol``, ``medical_protocol``, ``visa_split``); defaults filled in.
        download: fetch the data when ``root`` is absent or empty (:func:`siad.data.download.acquire`);
            without it a DataError says where the data should be and how to get it.
        archive_dir: where archives are kept (default ``root.parent / "archives"``).
        verify_counts: compare the test split with the published per-class counts (config
            ``data.verify_counts``; disable it for synthetic stand-ins and deliberate subsets).
        classes: the classes to index and check (config ``datasets.<name>.classes``); None = all. The
            index holds only these classes, and only their counts are compared.
        workers: threads decoding the images (Pillow decodes outside the GIL); 1 = no pool.

    Returns:
        The index written to ``meta_out`` (records with ``sha256`` and ``dhash``).
    """
    spec = get_dataset(name)
    opts = spec.options_with_defaults(options)
    chosen = spec.check_classes(classes) if classes is not None else None
    root = Path(root)
    index = partial(build_index, spec, options=opts, classes=chosen, verify_counts=verify_counts, workers=workers)
    try:
        meta = index(root)
    except LayoutNotFound as err:
        meta = _fetch_and_index(spec, root, opts, err, fetch=download, archive_dir=archive_dir, index=index)
    meta_out = Path(meta_out)
    save_meta(meta, meta_out)
    write_info(spec, root, opts, meta, meta_out.parent / INFO_NAME, classes=chosen,
               duplicates=report_duplicates(spec, meta))
    return meta


def _fetch_and_index(spec: DatasetSpec, root: Path, options: Mapping[str, str], err: LayoutNotFound, *,
                     fetch: bool, archive_dir: Path | None, index: Callable[[Path], Meta]) -> Meta:
    """Fetch and index the dataset when allowed and sensible, else explain why the layout was not found.

    Nothing is fetched into a folder that already holds something (a user-given copy in another layout:
    the converter's message says what it looked for), nor for a protocol the sources cannot provide.
    """
    if not spec.downloadable(options):
        raise ManualDownloadRequired(
            f"{err}.\n{spec.display_name} under {spec.protocol_option}={spec.protocol(options)} cannot be fetched "
            f"by the suite (its sources provide only {', '.join(spec.download_protocols or ())}); get the data as "
            "said above" + (f". Note: {spec.notes}" if spec.notes else ""))
    if not downloader.is_vacant(root):
        raise DataError(
            f"{err}.\n{root} exists but does not hold the {spec.display_name} layout, so nothing was downloaded "
            f"into it. Fix: point datasets.{spec.name}.root at the folder that holds the extracted dataset (or "
            f"extract the archive into {root}); or delete {root} and rerun to let the suite get it")
    if not fetch:
        raise _missing_error(spec)(f"{err}.\n{how_to_get(spec, root, archive_dir)}")
    indexed: list[Meta] = []
    downloader.acquire(spec, data_root=root, archive_dir=archive_dir, check=lambda at: indexed.append(index(at)))
    return indexed[0]


def build_index(spec: DatasetSpec, root: Path, *, options: Mapping[str, str], classes: Sequence[str] | None = None,
                verify_counts: bool = True, workers: int = 1) -> Meta:
    """Convert the layout under ``root``, run checks 2-6 of the module docstring and return the index.

    Raises:
        LayoutNotFound: nothing of the native layout under ``root``.
        DataError: any failed check (files and fix named).
    """
    meta = spec.convert(root, options)
    if classes is not None:
        meta = select_classes(meta, classes)
    validate_meta(meta, source=f"{spec.name} index of {root}", root=root)
    check_test_classes(spec, meta, root, classes)
    if spec.has_masks:
        check_masks(spec, meta, root)
    if verify_counts:
        spec.check_counts(meta, options, classes)
    fingerprint_records(spec, meta, root, options=options, workers=workers)
    return meta


def check_test_classes(spec: DatasetSpec, meta: Meta, root: Path, classes: Iterable[str] | None = None) -> None:
    """Every class of the index (and every requested class) has test images, else DataError naming them."""
    if not any(meta.get("test", {}).values()):
        raise DataError(f"{root}: no test images found for {spec.display_name} ({spec.name}); check the folder layout")
    empty = empty_test_classes(meta) + [c for c in classes or () if c not in meta["test"]]
    if empty:
        raise DataError(
            f"{spec.display_name} ({spec.name}) at {root}: class(es) {', '.join(sorted(set(empty)))} have no test "
            "images (the class's test folder is missing or empty, or the dataset's list names none), so they cannot "
            f"be evaluated. Fix: re-extract the dataset, or leave the class(es) out with datasets.{spec.name}.classes "
            "in the config")


def check_masks(spec: DatasetSpec, meta: Meta, root: Path) -> None:
    """In a dataset with pixel masks every anomalous image has one, else DataError naming the images.

    An anomalous image without a mask would enter the pixel metrics as defect-free.
    """
    missing = anomalies_without_masks(meta)
    if missing:
        raise DataError(
            f"{spec.display_name} ({spec.name}) has pixel masks, but {len(missing)} anomalous image(s) under {root} "
            f"have none: {listed(missing)}. Pixel metrics would count them as defect-free. Fix: re-extract the "
            "dataset so that every anomalous image has its mask")


def fingerprint_records(spec: DatasetSpec, meta: Meta, root: Path, *, options: Mapping[str, str] | None = None,
                        workers: int = 1) -> None:
    """Decode every image and mask of ``meta`` once; add ``sha256`` and ``dhash`` to each record, and
    ``mask_sha256`` to each record with a mask (in place), so an edited mask changes the index's content.

    Raises:
        DataError: listing *every* unusable file (unreadable, unsupported mode, mask of the wrong size).
    """
    records = list(iter_records(meta))
    inspect = partial(_inspect, root)
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(inspect, records))
    else:
        results = [inspect(rec) for rec in records]
    problems = sorted(p for _, found in results for p in found)
    if problems:
        raise DataError(_unusable_message(spec, root, problems, options))
    for rec, (fields, _) in zip(records, results):
        rec.update(fields)  # type: ignore[typeddict-item]


def _inspect(root: Path, rec: Record) -> tuple[dict[str, str], list[str]]:
    """(``sha256`` and ``dhash`` of the record's image, problems as ``"<relative path>: <reason>"``)."""
    fields: dict[str, str] = {}
    problems: list[str] = []
    size = None
    image_path = root / rec["img_path"]
    try:
        data = image_path.read_bytes()
        with open_checked(image_path, data) as image:
            rgb = to_rgb(image, image_path)
        fields = {"sha256": hashlib.sha256(data).hexdigest(), "dhash": dhash(rgb)}
        size = (rgb.height, rgb.width)
    except ImageFileError as err:
        problems.append(f"{rec['img_path']}: {err.reason}")
    except OSError as err:
        problems.append(f"{rec['img_path']}: cannot be read ({err.strerror or err})")
    if rec["mask_path"]:
        mask_path = root / rec["mask_path"]
        try:
            mask_data = mask_path.read_bytes()
            with open_checked(mask_path, mask_data) as mask:
                shape = mask_array(mask).shape
            check_mask_size(shape, size, mask_path)
            fields["mask_sha256"] = hashlib.sha256(mask_data).hexdigest()
        except ImageFileError as err:
            problems.append(f"{rec['mask_path']}: {err.reason} (mask of {rec['img_path']})")
        except OSError as err:
            problems.append(f"{rec['mask_path']}: cannot be read ({err.strerror or err}) (mask of {rec['img_path']})")
    return fields, problems


def _unusable_message(spec: DatasetSpec, root: Path, problems: list[str], options: Mapping[str, str] | None) -> str:
    """All unusable files and a fix that works for this dataset's layout."""
    listing = f" and its row in {spec.listing.format(**spec.options_with_defaults(options))}" if spec.listing else ""
    return (
        f"{spec.display_name} ({spec.name}): {len(problems)} file(s) under {root} cannot be used:\n  "
        + "\n  ".join(problems)
        + "\nFix: replace each file with a good copy (re-extract it from the original archive), or delete it: "
        f"an image together with its mask{listing}; for a mask of the wrong size, replace the mask or delete it "
        "with its image. Deleting images changes the per-class counts, so the published-count check then fails "
        "unless `data.verify_counts: false` is set in the config. Then rerun this step with "
        f"`{RERUN}`.")


def report_duplicates(spec: DatasetSpec, meta: Meta) -> dict[str, Any]:
    """Byte-identical images of the index: groups over all splits and identical train/test pairs (logged)."""
    groups = duplicate_groups(meta)
    overlap = exact_overlap(list(iter_records(meta, ("train",))), list(iter_records(meta, ("test",))))
    if groups:
        log.warning("%s: %d groups of byte-identical images (%d files; %d identical train/test pairs); "
                    "listed under 'duplicates' in %s", spec.display_name, len(groups), sum(map(len, groups)),
                    len(overlap), INFO_NAME)
    return {"exact_groups": groups, "train_test_overlap": [list(pair) for pair in overlap]}


def _missing_error(spec: DatasetSpec) -> type[DataError]:
    """ManualDownloadRequired when no source can be fetched without the user, else DataError."""
    automatic = any(isinstance(s, UrlSource) for s in spec.sources)
    return DataError if automatic else ManualDownloadRequired


def how_to_get(spec: DatasetSpec, root: Path, archive_dir: Path | None = None) -> str:
    """Instructions naming every source of ``spec``, the archive location and the target folder."""
    archives = Path(archive_dir) if archive_dir is not None else root.parent / "archives"
    lines = [f"{spec.display_name} ({spec.name}, licence: {spec.licence}) should be extracted into {root.resolve()}. "
             "Get it in one of these ways, or point the config at an existing copy:"]
    lines += [f"  - {_source_hint(s, root, archives)}" for s in spec.sources]
    if any(not isinstance(s, ManualSource) for s in spec.sources):
        lines.append("  - or re-run with download enabled to fetch and extract it automatically")
    if spec.notes:
        lines.append(f"  note: {spec.notes}")
    return "\n".join(lines)


def _source_hint(source: Source, root: Path, archives: Path) -> str:
    target = archives / source.filename
    checksum = f" (sha256 {source.sha256})" if source.sha256 else ""
    if isinstance(source, UrlSource):
        return f"download {' or '.join(source.urls)}{checksum} to {target} and extract it into {root}"
    if isinstance(source, KaggleSource):
        return (f"Kaggle dataset {source.slug}: `kaggle datasets download -d {source.slug}` needs an API token "
                "(kaggle.com > Settings > API > Create New Token, saved as ~/.kaggle/kaggle.json with mode 600, "
                f"or KAGGLE_USERNAME/KAGGLE_KEY); put the zip at {target} or unzip it into {root}")
    return (f"manual download from {source.page}: {source.instructions}; put {source.filename}{checksum} at "
            f"{target} (download enabled then extracts it) or extract it into {root}")


def write_info(spec: DatasetSpec, root: Path, options: Mapping[str, str], meta: Meta, path: Path, *,
               classes: Sequence[str] | None = None, duplicates: Mapping[str, Any] | None = None) -> None:
    """Write ``dataset.json`` atomically: name, absolute root, options, protocol, the requested ``classes``
    (None: all), per-split per-class counts and the ``duplicates`` report of :func:`report_duplicates`."""
    info = {
        "name": spec.name,
        "display_name": spec.display_name,
        "root": str(Path(root).resolve()),
        "options": dict(options),
        "protocol": spec.protocol(options),
        "classes": list(classes) if classes is not None else None,
        "counts": {split: {cls: list(nc) for cls, nc in count(meta, split).items()} for split in SPLITS},
        "duplicates": dict(duplicates or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    tmp.replace(path)
