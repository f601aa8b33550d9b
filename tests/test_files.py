"""siad/files.py: atomic writes for name-taking writers, the permissions of what they write, and the download lock."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from siad.files import TEMP_PREFIX, atomic_output, atomic_write, exclusive_lock


def test_atomic_output_moves_the_finished_file_into_place_and_drops_a_failed_one(tmp_path: Path):
    target = tmp_path / "model.pt"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(TEMP_PREFIX)
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing is visible until the block ends
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_atomically_written_files_get_the_usual_permissions_not_mkstemps_private_ones(tmp_path: Path):
    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "metrics.json", lambda handle: handle.write(b"{}"))
        with atomic_output(tmp_path / "model.pt") as tmp:
            tmp.write_bytes(b"w")
    finally:
        os.umask(previous)
    for name in ("metrics.json", "model.pt"):  # readable by the project group on a shared file system
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_exclusive_lock_lets_one_holder_in_at_a_time(tmp_path: Path):
    lock = tmp_path / "cache" / ".siad-download.lock"  # its folder is created
    inside: list[tuple[float, float]] = []

    def hold() -> None:
        with exclusive_lock(lock):  # each thread opens the file itself: flock excludes open files, not processes
            start = time.monotonic()
            time.sleep(0.2)
            inside.append((start, time.monotonic()))

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    spans = sorted(inside)
    assert len(spans) == 3
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans  # never two inside
