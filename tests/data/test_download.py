"""Tests of siad.data.download; no network: a loopback HTTP server in a thread serves the files."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from siad.data import download
from siad.data.download import acquire, download_url, kaggle_download, safe_extract, sha256sum
from siad.data.sources import KaggleSource, ManualSource, UrlSource
from siad.errors import ChecksumError, DataError, ManualDownloadRequired


def make_zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in files.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


ARCHIVE_FILES = {"ds/a.txt": b"alpha" * 1000, "ds/sub/b.txt": bytes(range(256)) * 40}
ARCHIVE = make_zip(ARCHIVE_FILES)
ARCHIVE_SHA = hashlib.sha256(ARCHIVE).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.files`` with HTTP Range support (unless ``server.honour_range`` is False)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))  # type: ignore[attr-defined]
        data = server.files.get(self.path)  # type: ignore[attr-defined]
        if data is None:
            self.send_error(404)
            return
        start = 0
        ranged = self.headers.get("Range")
        if ranged and server.honour_range:  # type: ignore[attr-defined]
            start = int(ranged.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass


@dataclass
class Server:
    http: ThreadingHTTPServer

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}{path}"

    @property
    def requests(self) -> list[tuple[str, str | None]]:
        return self.http.requests  # type: ignore[attr-defined]


@pytest.fixture
def server() -> Iterator[Server]:
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    http.files = {"/data.zip": ARCHIVE}  # type: ignore[attr-defined]
    http.requests = []  # type: ignore[attr-defined]
    http.honour_range = True  # type: ignore[attr-defined]
    thread = threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    guard = threading.Timer(60, http.shutdown)  # stops itself even if a test hangs
    guard.start()
    try:
        yield Server(http)
    finally:
        guard.cancel()
        http.shutdown()
        http.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------- download_url


def test_sha256sum_matches_hashlib_for_small_chunks(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(ARCHIVE)
    assert sha256sum(path, chunk=7) == ARCHIVE_SHA


def test_download_verifies_and_renames(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "arch" / "data.zip"
    assert download_url([server.url("/data.zip")], dest, sha256=ARCHIVE_SHA, progress=False) == dest
    assert dest.read_bytes() == ARCHIVE
    assert not dest.with_name("data.zip.part").exists()


def test_download_resumes_a_partial_file_with_a_range_request(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "data.zip"
    half = len(ARCHIVE) // 2
    dest.with_name("data.zip.part").write_bytes(ARCHIVE[:half])
    download_url([server.url("/data.zip")], dest, sha256=ARCHIVE_SHA, progress=False)
    assert server.requests == [("/data.zip", f"bytes={half}-")]
    assert dest.read_bytes() == ARCHIVE


def test_download_restarts_when_the_server_ignores_range(server: Server, tmp_path: Path) -> None:
    server.http.honour_range = False  # type: ignore[attr-defined]
    dest = tmp_path / "data.zip"
    dest.with_name("data.zip.part").write_bytes(b"garbage-prefix")
    download_url([server.url("/data.zip")], dest, sha256=ARCHIVE_SHA, progress=False)
    assert dest.read_bytes() == ARCHIVE


def test_download_of_an_already_complete_part_is_accepted(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "data.zip"
    dest.with_name("data.zip.part").write_bytes(ARCHIVE)  # server answers 416
    download_url([server.url("/data.zip")], dest, sha256=ARCHIVE_SHA, progress=False)
    assert dest.read_bytes() == ARCHIVE


def test_checksum_mismatch_names_file_hashes_and_fix(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "data.zip"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as caught:
        download_url([server.url("/data.zip")], dest, sha256=wrong, progress=False)
    message = str(caught.value)
    assert wrong in message and ARCHIVE_SHA in message and "data.zip.part" in message and "delete" in message
    assert not dest.exists()


def test_falls_back_to_the_second_url_when_the_first_404s(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "data.zip"
    download_url([server.url("/gone.zip"), server.url("/data.zip")], dest, sha256=ARCHIVE_SHA, progress=False)
    assert [path for path, _ in server.requests] == ["/gone.zip", "/data.zip"]
    assert dest.read_bytes() == ARCHIVE


def test_every_url_failing_lists_them_all(server: Server, tmp_path: Path) -> None:
    urls = [server.url("/a.zip"), server.url("/b.zip")]
    with pytest.raises(DataError) as caught:
        download_url(urls, tmp_path / "x.zip", sha256=None, progress=False)
    assert all(url in str(caught.value) for url in urls) and str(tmp_path / "x.zip") in str(caught.value)


@pytest.mark.parametrize("url", ["ftp://example.org/x.zip", "file:///outside/x.zip"])
def test_only_http_urls_are_allowed(url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only http"):
        download_url([url], tmp_path / "x.zip", sha256=None, progress=False)


# --------------------------------------------------------------------------- safe_extract


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as bundle:
        for info, data in members:
            bundle.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_info(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def link_info(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


def test_extracts_a_zip_and_keeps_the_archive(tmp_path: Path) -> None:
    archive = tmp_path / "data.zip"
    archive.write_bytes(ARCHIVE)
    dest = safe_extract(archive, tmp_path / "root")
    for name, data in ARCHIVE_FILES.items():
        assert (dest / name).read_bytes() == data
    assert archive.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_extracts_a_tar_xz_with_internal_links(tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "data.tar.xz",
        [file_info("ds/img.png", b"png-bytes"), link_info("ds/alias.png", "img.png")],
        mode="w:xz",
    )
    dest = safe_extract(archive, tmp_path / "root")
    assert (dest / "ds/img.png").read_bytes() == b"png-bytes"
    assert (dest / "ds/alias.png").read_bytes() == b"png-bytes"


@pytest.mark.parametrize(
    "member",
    [
        file_info("../evil.txt", b"x"),
        file_info("ds/../../evil.txt", b"x"),
        file_info("/evil.txt", b"x"),  # an absolute member name
        link_info("ds/escape", "../../outside"),
        link_info("ds/abs", "/outside"),  # an absolute link target
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-out", "symlink-absolute"],
)
def test_tar_members_escaping_the_target_are_refused(
    tmp_path: Path, member: tuple[tarfile.TarInfo, bytes | None]
) -> None:
    archive = make_tar(tmp_path / "bad.tar", [file_info("ds/ok.txt", b"ok"), member])
    with pytest.raises(DataError, match="unsafe archive"):
        safe_extract(archive, tmp_path / "root")
    assert not (tmp_path / "root").exists()
    assert not (tmp_path / "evil.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar"]


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "ds\\..\\..\\evil.txt"])
def test_zip_members_escaping_the_target_are_refused(tmp_path: Path, name: str) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("ds/ok.txt", b"ok")
        bundle.writestr(zipfile.ZipInfo(name), b"evil")  # ZipInfo keeps the raw name
    archive = tmp_path / "bad.zip"
    archive.write_bytes(buffer.getvalue())
    with pytest.raises(DataError, match="unsafe archive"):
        safe_extract(archive, tmp_path / "root")
    assert not (tmp_path / "root").exists()


def test_failing_extraction_leaves_no_partial_destination(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as bundle:
        bundle.writestr("ds/first.txt", b"first" * 100)
        bundle.writestr("ds/second.txt", b"second" * 100)
    data = bytearray(buffer.getvalue())
    data[data.index(b"second" * 100) + 10] ^= 0xFF  # corrupt the second member: CRC error mid-way
    archive = tmp_path / "data.zip"
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt or truncated"):
        safe_extract(archive, tmp_path / "root")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.zip"]  # no dest, no staging folder


def test_truncated_or_foreign_archives_give_data_errors(tmp_path: Path) -> None:
    archive = tmp_path / "data.zip"
    archive.write_bytes(ARCHIVE[: len(ARCHIVE) - 30])  # central directory lost
    with pytest.raises(DataError, match="neither a zip nor a tar"):
        safe_extract(archive, tmp_path / "root")
    good = make_tar(tmp_path / "t.tar", [file_info("a.txt", b"a" * 5000), file_info("b.txt", b"b" * 5000)])
    truncated = tmp_path / "t2.tar"
    truncated.write_bytes(good.read_bytes()[:7000])  # second member cut short
    with pytest.raises(DataError, match="corrupt or truncated"):
        safe_extract(truncated, tmp_path / "root")
    assert not (tmp_path / "root").exists()
    assert not any(p.name.startswith(".root") for p in tmp_path.iterdir())


def test_refuses_to_extract_over_a_non_empty_folder(tmp_path: Path) -> None:
    archive = tmp_path / "data.zip"
    archive.write_bytes(ARCHIVE)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        safe_extract(archive, tmp_path / "root")
    assert (tmp_path / "root" / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------- Kaggle and acquire


@dataclass(frozen=True)
class Spec:
    name: str
    sources: tuple
    folder: str = "ds"


@pytest.fixture
def no_kaggle_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)


def test_kaggle_without_credentials_explains_token_and_manual_path(no_kaggle_credentials: None, tmp_path: Path) -> None:
    with pytest.raises(ManualDownloadRequired) as caught:
        kaggle_download("navoneel/brain-mri-images-for-brain-tumor-detection", tmp_path / "archives")
    message = str(caught.value)
    assert "kaggle.json" in message and "KAGGLE_USERNAME" in message
    assert str(tmp_path / "archives" / "brain-mri-images-for-brain-tumor-detection.zip") in message


def test_kaggle_credentials_are_found_in_env_or_file(
    no_kaggle_credentials: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not download.kaggle_credentials_present()
    token = Path.home() / ".kaggle" / "kaggle.json"
    token.parent.mkdir()
    token.write_text('{"username": "u", "key": "k"}')
    assert download.kaggle_credentials_present()
    token.unlink()
    monkeypatch.setenv("KAGGLE_USERNAME", "u")
    monkeypatch.setenv("KAGGLE_KEY", "k")
    assert download.kaggle_credentials_present()


MANUAL = ManualSource(page="https://example.org/ds", filename="ds.zip", instructions="fill the form")


def test_acquire_manual_without_archive_names_the_expected_path(tmp_path: Path) -> None:
    with pytest.raises(ManualDownloadRequired) as caught:
        acquire(Spec("mpdd", (MANUAL,)), tmp_path / "data" / "mpdd")
    message = str(caught.value)
    assert str(tmp_path / "data" / "archives" / "ds.zip") in message and "https://example.org/ds" in message


def test_acquire_uses_a_dropped_archive_and_records_its_hash(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    archive_dir = tmp_path / "archives"
    archive_dir.mkdir()
    (archive_dir / "ds.zip").write_bytes(ARCHIVE)
    root = acquire(Spec("mpdd", (MANUAL,)), tmp_path / "data" / "mpdd", archive_dir=archive_dir)
    assert root == tmp_path / "data" / "mpdd"
    assert (root / "ds" / "a.txt").read_bytes() == ARCHIVE_FILES["ds/a.txt"]
    assert (archive_dir / "ds.zip.sha256").read_text().split() == [ARCHIVE_SHA, "ds.zip"]
    assert ARCHIVE_SHA in caplog.text


def test_acquire_rejects_an_archive_that_no_longer_matches_its_record(tmp_path: Path) -> None:
    archive_dir = tmp_path / "archives"
    archive_dir.mkdir()
    (archive_dir / "ds.zip").write_bytes(ARCHIVE)
    (archive_dir / "ds.zip.sha256").write_text(f"{'1' * 64}  ds.zip\n")
    with pytest.raises(ChecksumError, match="ds.zip.sha256"):
        acquire(Spec("mpdd", (MANUAL,)), tmp_path / "data" / "mpdd", archive_dir=archive_dir)
    assert not (tmp_path / "data" / "mpdd").exists()


def test_acquire_downloads_from_a_url_source(server: Server, tmp_path: Path) -> None:
    spec = Spec("sdd", (UrlSource(urls=(server.url("/data.zip"),), filename="KolektorSDD.zip", sha256=ARCHIVE_SHA),))
    root = acquire(spec, tmp_path / "data" / "sdd")
    assert (root / "ds" / "sub" / "b.txt").read_bytes() == ARCHIVE_FILES["ds/sub/b.txt"]
    assert (tmp_path / "data" / "archives" / "KolektorSDD.zip").read_bytes() == ARCHIVE


def test_acquire_lists_every_option_when_all_sources_fail(
    server: Server, tmp_path: Path, no_kaggle_credentials: None
) -> None:
    spec = Spec(
        "brainmri",
        (
            UrlSource(urls=(server.url("/missing.zip"),), filename="mirror.zip"),
            KaggleSource(slug="owner/brain", filename="brain.zip"),
            MANUAL,
        ),
    )
    with pytest.raises(ManualDownloadRequired) as caught:
        acquire(spec, tmp_path / "data" / "brainmri")
    message = str(caught.value)
    archives = tmp_path / "data" / "archives"
    for name in ("mirror.zip", "brain.zip", "ds.zip"):
        assert str(archives / name) in message
    assert server.url("/missing.zip") in message and "kaggle.json" in message


# --------------------------------------------------------------------------- a wrong archive is never the reference


def _dropped(tmp_path: Path, data: bytes, name: str = "ds.zip") -> Path:
    archive_dir = tmp_path / "archives"
    archive_dir.mkdir(exist_ok=True)
    (archive_dir / name).write_bytes(data)
    return archive_dir


def test_a_corrupt_dropped_archive_is_not_recorded(tmp_path: Path) -> None:
    archive_dir = _dropped(tmp_path, ARCHIVE[: len(ARCHIVE) // 2])
    with pytest.raises(DataError):
        acquire(Spec("mpdd", (MANUAL,)), tmp_path / "data" / "mpdd", archive_dir=archive_dir)
    assert not (archive_dir / "ds.zip.sha256").exists()


def test_an_archive_failing_the_check_is_not_recorded(tmp_path: Path) -> None:
    archive_dir = _dropped(tmp_path, ARCHIVE)

    def check(root: Path) -> None:
        raise DataError(f"{root}: not the dataset we expected")

    with pytest.raises(DataError) as caught:
        acquire(Spec("mpdd", (MANUAL,)), tmp_path / "data" / "mpdd", archive_dir=archive_dir, check=check)
    message = str(caught.value)
    assert "not the dataset we expected" in message and "NOT recorded" in message and ARCHIVE_SHA in message
    assert not (archive_dir / "ds.zip.sha256").exists()
    assert (tmp_path / "data" / "mpdd" / "ds" / "a.txt").is_file()  # kept, so the files named can be inspected


def test_the_hash_is_recorded_only_after_the_check_passed(tmp_path: Path) -> None:
    archive_dir = _dropped(tmp_path, ARCHIVE)
    seen = []

    def check(root: Path) -> None:
        seen.append((archive_dir / "ds.zip.sha256").exists())

    acquire(Spec("mpdd", (MANUAL,)), tmp_path / "data" / "mpdd", archive_dir=archive_dir, check=check)
    assert seen == [False] and (archive_dir / "ds.zip.sha256").read_text().split() == [ARCHIVE_SHA, "ds.zip"]


def test_an_archive_failing_a_pinned_or_recorded_hash_is_not_recorded(tmp_path: Path) -> None:
    archive_dir = _dropped(tmp_path, ARCHIVE)
    pinned = ManualSource(page="https://example.org/ds", filename="ds.zip", instructions="x", sha256="0" * 64)
    with pytest.raises(ChecksumError):
        acquire(Spec("mpdd", (pinned,)), tmp_path / "data" / "mpdd", archive_dir=archive_dir)
    assert not (archive_dir / "ds.zip.sha256").exists()
    (archive_dir / "ds.zip.sha256").write_text(f"{'1' * 64}  ds.zip\n")
    with pytest.raises(ChecksumError):
        acquire(Spec("mpdd", (MANUAL,)), tmp_path / "data" / "mpdd", archive_dir=archive_dir)
    assert (archive_dir / "ds.zip.sha256").read_text() == f"{'1' * 64}  ds.zip\n"


def _zip_folder(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as bundle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                bundle.write(path, path.relative_to(folder.parent).as_posix())
    return dest


def test_prepare_records_a_manual_archive_only_when_its_content_passes(
        mpdd_root: Path, btad_root: Path, tmp_path: Path) -> None:
    from siad.data.prepare import prepare_dataset

    archives = tmp_path / "archives"
    archives.mkdir()
    _zip_folder(btad_root, archives / "MPDD.zip")  # the wrong dataset under MPDD's name
    with pytest.raises(DataError, match="(?s)MPDD class folders.*NOT recorded"):
        prepare_dataset("mpdd", tmp_path / "data" / "mpdd", tmp_path / "meta.json", download=True,
                        archive_dir=archives, verify_counts=False)
    assert not (archives / "MPDD.zip.sha256").exists()
    _zip_folder(mpdd_root, archives / "MPDD.zip")  # the right one
    prepare_dataset("mpdd", tmp_path / "data" / "mpdd2", tmp_path / "meta.json", download=True,
                    archive_dir=archives, verify_counts=False)
    assert (archives / "MPDD.zip.sha256").read_text().split()[0] == sha256sum(archives / "MPDD.zip")
