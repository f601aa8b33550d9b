"""Test helper: two worker processes released at the same moment, for the tests of shared state under parallel jobs.

Not a test file; load it by path (pytest runs in importlib mode), as tests/backbones/test_cache_concurrency.py and
tests/engine/test_concurrent_writes.py do. Each of those files is also the workers' script: ``python <file> <folder>
<worker id>`` calls its ``worker``, which calls :func:`wait_for_go` first.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def wait_for_go(folder: Path, worker_id: int) -> None:
    """Worker side: say ready, then wait until the test releases both workers."""
    (folder / f"ready-{worker_id}").touch()
    while not (folder / "go").exists():
        time.sleep(0.01)


def run_two_workers(script: str | Path, folder: Path, timeout_s: float = 300) -> list[int]:
    """Start ``script`` twice as workers 0 and 1 on ``folder``, release them together once both are ready, and return
    their exit codes (a worker still running when this ends is killed)."""
    workers = [subprocess.Popen([sys.executable, str(script), str(folder), str(i)]) for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not all((folder / f"ready-{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline and all(w.poll() is None for w in workers), "a worker did not start"
            time.sleep(0.05)
        (folder / "go").touch()  # both start hammering at the same moment
        return [w.wait(timeout=timeout_s) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
