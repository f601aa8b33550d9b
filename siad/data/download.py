"""Fetching dataset archives: resumable SHA-256-checked downloads, Kaggle, manual drops, safe extraction.

Reliability rules (DESIGN.md): known URLs tried in order (mirrors rotate, hashes do not), SHA-256
verified before an archive is accepted, downloads resumable, archives extracted into a temporary
folder and moved into place atomically, and every dataset that needs a licence click or a Kaggle
token ends in a :class:`~siad.errors.ManualDownloadRequired` that says exactly what to fetch and
where to put it. Archives are kept (unlike anomalib) so a later run can re-verify them.

An archive already present in the archive folder is always preferred over a download. When its
source publishes no hash, the archive's SHA-256 is recorded beside it in ``<filename>.sha256``
(``sha256sum`` format) and logged, so it can be pinned in the config; a later run whose archive no
longer matches that record fails with :class:`~siad.errors.ChecksumError`. The record is written only
once the archive has proved good: extracted without error *and* accepted by the caller's check (the
preparation step converts and verifies the data first). A wrong or broken archive dropped by hand is
therefore never recorded as the reference, and an archive that fails a pinned or recorded hash never
replaces it.
"""

from __future__ import annotations

import http.client
import logging
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from tqdm import tqdm

from siad.data.hashing import sha256sum
from siad.data.records import path_problem
from siad.data.sources import KaggleSource, ManualSource, Source, UrlSource
from siad.errors import ChecksumError, DataError, ManualDownloadRequired

log = logging.getLogger(__name__)

_TIMEOUT_S = 60
_CORRUPT_ARCHIVE_ERRORS = (
    zipfile.BadZipFile, tarfile.ReadError, tarfile.CompressionError, EOFError, zlib.error, lzma.LZMAError,
)
_KAGGLE_TOKEN_HELP = (
    "create a Kaggle API token (kaggle.com → Settings → API → 'Create New Token'), save the downloaded "
    "kaggle.json as ~/.kaggle/kaggle.json (chmod 600) or set KAGGLE_USERNAME and KAGGLE_KEY, "
    "and install the client (pip install kaggle)"
)


# --------------------------------------------------------------------------- URL downloads


def download_url(urls: Sequence[str], dest: Path, *, sha256: str | None, progress: bool = True) -> Path:
    """Download the first of ``urls`` that answers into ``dest`` and return ``dest``.

    Data goes to ``dest + ".part"``; an existing ``.part`` is resumed with an HTTP Range request
    (a server that ignores Range restarts it). The SHA-256 is checked before ``.part`` is renamed
    to ``dest``; a mismatch raises :class:`ChecksumError` and leaves ``.part`` for inspection. An
    existing ``dest`` is verified and returned without downloading. Only http(s) URLs are allowed.
    """
    dest = Path(dest)
    if not urls:
        raise ValueError(f"no URL given for {dest.name}; add at least one http(s) URL to the dataset source")
    for url in urls:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"refusing to download {url!r} for {dest.name}: only http(s) URLs are supported")
    if dest.exists():
        verify_sha256(dest, sha256)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures: list[str] = []
    for url in urls:
        try:
            _fetch(url, part, progress=progress)
        except (OSError, http.client.HTTPException) as error:  # URLError/HTTPError are OSErrors
            failures.append(f"  {url}: {error}")
            continue
        verify_sha256(part, sha256, shown_as=dest)
        os.replace(part, dest)
        return dest
    raise DataError(
        f"could not download {dest.name}; every URL failed:\n" + "\n".join(failures) + "\n"
        f"Fix: check the network, or fetch the archive by other means and put it at {dest}"
    )


def _fetch(url: str, part: Path, *, progress: bool) -> None:
    """Download ``url`` into ``part``, resuming from its current size when the server allows."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # nothing left to fetch: .part is already complete
            return
        raise
    with response:
        resumed = offset > 0 and response.status == 206
        if not resumed:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with part.open("ab" if resumed else "wb") as sink, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=part.name, disable=not progress
        ) as bar:
            _copy(response, sink, bar)


def _copy(response: BinaryIO, sink: BinaryIO, bar: Any, chunk: int = 1 << 16) -> None:
    while block := response.read(chunk):
        sink.write(block)
        bar.update(len(block))


def verify_sha256(path: Path, expected: str | None, *, shown_as: Path | None = None) -> str:
    """Return the SHA-256 of ``path``; raise :class:`ChecksumError` if it differs from ``expected``."""
    actual = sha256sum(path)
    if expected is not None and actual.lower() != expected.lower():
        name = shown_as or path
        raise ChecksumError(
            f"checksum mismatch for {path} (archive {Path(name).name}): expected sha256 {expected.lower()}, "
            f"got {actual}. Fix: delete {path} and retry (the download may be corrupt or truncated), "
            "or get the archive manually from the dataset's page and put it there"
        )
    return actual


# --------------------------------------------------------------------------- extraction


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract a zip / tar / tar.gz / tar.xz / tar.bz2 archive into ``dest`` and return ``dest``.

    Members with absolute paths, ``..`` components, links pointing outside the archive, or device
    files are refused with :class:`DataError` before anything is written. The archive is unpacked
    into a temporary folder next to ``dest``, which is then renamed into place, so a failure leaves
    no partial ``dest``. ``dest`` must not exist or be empty. The archive is kept.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DataError(f"archive {archive} does not exist; download it first (or fix the path)")
    _require_empty(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extracting-", dir=dest.parent))
    try:
        _extract_into(archive, staging)
        staging.chmod(0o755)  # mkdtemp makes it private
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def is_vacant(path: Path) -> bool:
    """True when ``path`` does not exist or is an empty directory (somewhere an archive may be extracted)."""
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def _require_empty(dest: Path) -> None:
    if not is_vacant(dest):
        raise DataError(
            f"cannot extract into {dest}: it already exists and is not empty. Fix: if it is a complete "
            "copy of the dataset point the config at it; if it is a broken extraction delete it and rerun"
        )


def _extract_into(archive: Path, target: Path) -> None:
    try:
        _unpack_checked(archive, target)
    except _CORRUPT_ARCHIVE_ERRORS as error:
        raise DataError(
            f"archive {archive} is corrupt or truncated ({error}). Fix: delete it and download it again"
        ) from error


def _unpack_checked(archive: Path, target: Path) -> None:
    """Check every member, then unpack; zip and tar (any compression tarfile reads)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            for info in bundle.infolist():
                _member_parts(archive, info.filename)
                if _zip_is_symlink(info):
                    _check_link(archive, info.filename, bundle.read(info).decode("utf-8", "replace"))
            bundle.extractall(target)
        return
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as bundle:
            for member in bundle.getmembers():
                _check_tar_member(archive, member)
            bundle.extractall(target, filter="data")
        return
    raise DataError(
        f"{archive} is neither a zip nor a tar archive (supported: .zip, .tar, .tar.gz, .tar.xz, .tar.bz2). "
        "Fix: delete it and download it again, or supply the original archive"
    )


def _zip_is_symlink(info: zipfile.ZipInfo) -> bool:
    return (info.external_attr >> 16) & 0o170000 == 0o120000


def _member_parts(archive: Path, name: str) -> tuple[str, ...]:
    """Path components of an archive member; refuses absolute names and ``..``."""
    problem = path_problem(name)
    if problem is not None:
        raise DataError(f"unsafe archive {archive}: member {name!r} {problem}. Fix: use a trusted copy")
    return PurePosixPath(name.replace("\\", "/")).parts


def _check_link(archive: Path, name: str, target: str) -> None:
    """A symlink ``name`` → ``target`` must resolve inside the extraction folder."""
    if PurePosixPath(target.replace("\\", "/")).is_absolute():
        raise DataError(
            f"unsafe archive {archive}: link {name!r} points to absolute {target!r}. Fix: use a trusted copy"
        )
    depth = 0
    for part in [*_member_parts(archive, name)[:-1], *PurePosixPath(target.replace("\\", "/")).parts]:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            raise DataError(
                f"unsafe archive {archive}: link {name!r} points outside the target folder ({target!r}). "
                "Fix: use a trusted copy"
            )


def _check_tar_member(archive: Path, member: tarfile.TarInfo) -> None:
    _member_parts(archive, member.name)
    if member.issym():
        _check_link(archive, member.name, member.linkname)
    elif member.islnk():
        _member_parts(archive, member.linkname)  # hard links are relative to the archive root
    elif not (member.isfile() or member.isdir()):
        raise DataError(
            f"unsafe archive {archive}: member {member.name!r} is a device or fifo. Fix: use a trusted copy"
        )


# --------------------------------------------------------------------------- Kaggle


def kaggle_credentials_present() -> bool:
    """True when the Kaggle client would find a token (env vars or ``kaggle.json``)."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle")
    return (config_dir / "kaggle.json").is_file()


def kaggle_download(slug: str, dest_dir: Path, *, filename: str | None = None, progress: bool = True) -> Path:
    """Download Kaggle dataset ``slug`` as a zip into ``dest_dir`` and return the zip's path.

    Uses the ``kaggle`` package when importable, else the ``kaggle`` command. Without credentials
    (or without either client) raises :class:`ManualDownloadRequired` explaining how to create a
    token, and where to put the zip when fetched by hand. ``filename`` is the zip name Kaggle uses
    (default ``<dataset part of slug>.zip``).
    """
    dest_dir = Path(dest_dir)
    zip_path = dest_dir / (filename or f"{slug.rsplit('/', 1)[-1]}.zip")
    manual = (
        f"or download it by hand from https://www.kaggle.com/datasets/{slug} ('Download' button) "
        f"and put the zip at {zip_path}"
    )
    if not kaggle_credentials_present():
        raise ManualDownloadRequired(
            f"Kaggle dataset {slug!r} needs an API token and none was found (~/.kaggle/kaggle.json or "
            f"KAGGLE_USERNAME/KAGGLE_KEY). Fix: {_KAGGLE_TOKEN_HELP}; {manual}"
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        _kaggle_with_package(slug, dest_dir, progress)
    except ImportError:
        _kaggle_with_cli(slug, dest_dir, manual)
    if not zip_path.is_file():
        raise DataError(
            f"the Kaggle client finished but {zip_path} is missing; files there: "
            f"{sorted(p.name for p in dest_dir.iterdir())}. Fix: set the source's filename to the zip Kaggle wrote"
        )
    return zip_path


def _kaggle_with_package(slug: str, dest_dir: Path, progress: bool) -> None:
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi  # lazy: optional dependency
    except ImportError:
        raise
    except Exception as error:  # importing `kaggle` authenticates and may fail on a bad token
        raise DataError(f"the kaggle package could not load its token: {error}. Fix: {_KAGGLE_TOKEN_HELP}") from error
    api = KaggleApi()
    try:
        api.authenticate()
        api.dataset_download_files(slug, path=str(dest_dir), unzip=False, quiet=not progress)
    except Exception as error:  # the client raises bare Exceptions / HTTP errors
        raise DataError(
            f"Kaggle download of {slug!r} failed: {error}. Fix: check the token and that you accepted the "
            f"dataset's terms on https://www.kaggle.com/datasets/{slug}"
        ) from error


def _kaggle_with_cli(slug: str, dest_dir: Path, manual: str) -> None:
    executable = shutil.which("kaggle")
    if executable is None:
        raise ManualDownloadRequired(
            f"Kaggle dataset {slug!r}: neither the kaggle package nor the kaggle command is installed. "
            f"Fix: pip install kaggle; {manual}"
        )
    result = subprocess.run(
        [executable, "datasets", "download", "-d", slug, "-p", str(dest_dir)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise DataError(
            f"`kaggle datasets download -d {slug}` failed ({result.returncode}): {result.stderr.strip()}. "
            f"Fix: check the token; {manual}"
        )


# --------------------------------------------------------------------------- acquisition


def acquire(spec: Any, data_root: Path, archive_dir: Path | None = None, *,
            check: Callable[[Path], object] | None = None) -> Path:
    """Get ``spec``'s archive from the first source that works and extract it into ``data_root``.

    ``spec`` needs ``.name`` and ``.sources`` (tuple of :mod:`siad.data.sources` objects).
    ``archive_dir`` defaults to ``data_root.parent / "archives"``. For each source in order: an
    archive already in ``archive_dir`` under the source's filename is used (verified against the
    source's hash, or against a recorded ``<filename>.sha256``); otherwise URL sources are downloaded,
    Kaggle sources fetched with the Kaggle client and manual sources fail with instructions. The
    archive is extracted into ``data_root`` (the dataset's native root), which is returned.

    ``check`` (e.g. convert and verify the dataset) runs on the extracted root. An archive without a
    pinned or recorded hash gets its hash recorded only after extraction and ``check`` succeed; when
    either fails nothing is recorded (the extracted folder is kept, so the files an error names can be
    inspected). If every source fails, the error lists every option: :class:`ChecksumError` if an
    archive was corrupt, else :class:`ManualDownloadRequired`.
    """
    data_root = Path(data_root)
    archive_dir = Path(archive_dir) if archive_dir is not None else data_root.parent / "archives"
    failures: list[tuple[Source, Exception]] = []
    for source in spec.sources:
        try:
            archive, unrecorded = _obtain(source, archive_dir)
        except DataError as error:
            failures.append((source, error))
            continue
        root = safe_extract(archive, data_root)
        if check is not None:
            _run_check(check, root, archive, unrecorded)
        if unrecorded is not None:
            record_sha256(archive, unrecorded)
        return root
    raise _all_sources_failed(spec, archive_dir, failures)


def _run_check(check: Callable[[Path], object], root: Path, archive: Path, unrecorded: str | None) -> None:
    """Run ``check(root)``; on a DataError say that an unpinned archive was not recorded, and how to replace it."""
    try:
        check(root)
    except DataError as error:
        if unrecorded is None:
            raise
        raise DataError(
            f"{error}\n{archive} (sha256 {unrecorded}) was NOT recorded as the reference hash, since its content "
            f"failed the check above. If it is the wrong archive, delete it and {root}, put the right one at "
            f"{archive} and rerun") from error


def _obtain(source: Source, archive_dir: Path) -> tuple[Path, str | None]:
    """A verified archive for ``source`` (present, downloaded or fetched from Kaggle) and its hash when
    neither published nor recorded yet (to record once the archive has proved good), else None."""
    path = archive_dir / source.filename
    if path.is_file():
        return _accept_present(path, source.sha256)
    if isinstance(source, UrlSource):
        downloaded = download_url(source.urls, path, sha256=source.sha256)
        return (downloaded, None) if source.sha256 is not None else _accept_present(downloaded, None)
    if isinstance(source, KaggleSource):
        fetched = kaggle_download(source.slug, archive_dir, filename=source.filename)
        return _accept_present(fetched, source.sha256)
    if isinstance(source, ManualSource):
        raise ManualDownloadRequired(_manual_instructions(source, path))
    raise TypeError(f"unknown source type {type(source).__name__}; use UrlSource, KaggleSource or ManualSource")


def _record_path(archive: Path) -> Path:
    return archive.with_name(archive.name + ".sha256")


def _accept_present(path: Path, expected: str | None) -> tuple[Path, str | None]:
    """Verify an archive on disk against the published hash or the record; without either, return its hash."""
    if expected is not None:
        verify_sha256(path, expected)
        return path, None
    record = _record_path(path)
    if record.is_file():
        recorded = record.read_text().split()[0]
        try:
            verify_sha256(path, recorded)
        except ChecksumError as error:
            raise ChecksumError(
                f"{error}. The expected hash was recorded in {record} when the archive was first used; "
                f"if you replaced the archive on purpose, delete {record}"
            ) from None
        return path, None
    return path, sha256sum(path)


def record_sha256(archive: Path, digest: str) -> Path:
    """Write ``<archive>.sha256`` (``sha256sum`` format) atomically and log it; return the record's path."""
    record = _record_path(archive)
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(f"{digest}  {archive.name}\n")
    os.replace(tmp, record)
    log.warning("no published sha256 for %s; recorded %s in %s (pin it in the config)", archive, digest, record)
    return record


def _manual_instructions(source: ManualSource, path: Path) -> str:
    return (
        f"{source.filename} cannot be downloaded automatically. Fix: get it from {source.page} "
        f"({source.instructions}) and put it at {path} (exact name), then rerun"
    )


def _all_sources_failed(spec: Any, archive_dir: Path, failures: list[tuple[Source, Exception]]) -> DataError:
    if not failures:
        return ManualDownloadRequired(f"dataset {spec.name!r} has no sources; add one to its spec")
    lines = [f"could not obtain dataset {spec.name!r}; tried every source:"]
    for number, (source, error) in enumerate(failures, 1):
        lines.append(f"  {number}. {type(source).__name__} {source.filename}: {error}")
    lines.append(f"Fix: follow any one option above (archives go in {archive_dir}), then rerun")
    message = "\n".join(lines)
    if any(isinstance(error, ChecksumError) for _, error in failures):
        return ChecksumError(message)
    return ManualDownloadRequired(message)
