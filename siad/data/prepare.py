"""Prepare one dataset: find (or fetch) its native layout, index it, check it and write ``meta.json``.

Order: convert -> ``validate_meta`` (every referenced file exists) -> published-count check ->
``meta.json`` plus a small ``dataset.json`` beside it recording what was indexed (name, absolute
root, options, per-class counts) so later rules and reports can state the data they used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from siad.data.converters.common import LayoutNotFound
from siad.data.records import SPLITS, Meta, count, save_meta, validate_meta
from siad.data.registry import DatasetSpec, get_dataset
from siad.data.sources import KaggleSource, ManualSource, Source, UrlSource
from siad.errors import DataError, ManualDownloadRequired

INFO_NAME = "dataset.json"


def prepare_dataset(name: str, root: Path, meta_out: Path, *, options: Mapping[str, Any] | None = None,
                    download: bool = False, archive_dir: Path | None = None,
                    verify_counts: bool = True) -> Meta:
    """Index dataset ``name`` found under ``root`` and write ``meta_out`` (+ ``dataset.json`` beside it).

    If ``root`` lacks the native layout: with ``download`` the spec's sources are tried via
    :func:`siad.data.download.acquire`; without it a DataError says where the data should be and how to
    get it. ``verify_counts`` compares the test split with the published per-class counts (disable it
    for synthetic stand-ins and deliberate subsets).
    """
    spec = get_dataset(name)
    opts = spec.options_with_defaults(options)
    root = Path(root)
    try:
        meta = spec.convert(root, opts)
    except LayoutNotFound as err:
        if not download:
            raise _missing_error(spec)(f"{err}.\n{how_to_get(spec, root, archive_dir)}") from None
        from siad.data.download import acquire  # lazy: optional network machinery

        root = Path(acquire(spec, data_root=root, archive_dir=archive_dir))
        meta = spec.convert(root, opts)
    validate_meta(meta, source=f"{name} index of {root}", root=root)
    if not any(meta.get("test", {}).values()):
        raise DataError(f"{root}: no test images found for {spec.display_name}; check the folder layout")
    if verify_counts:
        spec.check_counts(meta, opts)
    meta_out = Path(meta_out)
    save_meta(meta, meta_out)
    write_info(spec, root, opts, meta, meta_out.parent / INFO_NAME)
    return meta


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


def write_info(spec: DatasetSpec, root: Path, options: Mapping[str, str], meta: Meta, path: Path) -> None:
    """Write ``dataset.json`` (name, absolute root, options, per-split per-class counts) atomically."""
    info = {
        "name": spec.name,
        "display_name": spec.display_name,
        "root": str(Path(root).resolve()),
        "options": dict(options),
        "protocol": spec.protocol(options),
        "counts": {split: {cls: list(nc) for cls, nc in count(meta, split).items()} for split in SPLITS},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    tmp.replace(path)
