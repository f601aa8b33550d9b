"""Two processes sharing one feature cache, as two SLURM jobs on the same backbone do: both miss the same entries,
compute and write them at the same moment, and read what the other wrote. Every read must give the whole, correct
entry (a torn file would be counted as corrupt and recomputed), and no temporary file may be left behind.

The workers are this file run as a script (``python test_cache_concurrency.py <folder> <worker>``): two real
processes with their own interpreter, as two jobs are.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import zlib
from pathlib import Path

import torch

from siad.backbones.cache import FeatureCache
from siad.files import TEMP_PREFIX

_spec = importlib.util.spec_from_file_location("two_processes",
                                               Path(__file__).resolve().parents[1] / "two_processes.py")
two_processes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(two_processes)

ROUNDS, KEYS = 6, 40  # each round a fresh namespace: every entry is missed by both processes again
ENTRY_FLOATS = 32_768  # 128 KiB per entry: a write takes long enough for the other process to read mid-way


def expected(key: str) -> dict[str, torch.Tensor]:
    """The entry of ``key``, the same in every process (seeded by the key)."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return {"tokens": torch.randn(ENTRY_FLOATS, generator=generator),
            "index": torch.tensor([zlib.crc32(key.encode())], dtype=torch.int64)}


def namespace(round_: int) -> dict[str, object]:
    return {"backbone": "toy-concurrency", "round": round_}


def keys() -> list[str]:
    return [f"toy/test/{i:03d}.png" for i in range(KEYS)]


def must_not_compute(positions: list[int]) -> dict[str, torch.Tensor]:
    raise AssertionError(f"entries {positions} are missing or unusable after both processes wrote them")


def worker(folder: Path, worker_id: int) -> None:
    """Wait for the go signal, then fill and read every round's cache one key at a time; write counters to JSON."""
    two_processes.wait_for_go(folder, worker_id)
    mismatches = 0
    totals = {"hits": 0, "misses": 0, "corrupt": 0, "stale": 0, "written": 0}
    for round_ in range(ROUNDS):
        cache = FeatureCache(folder / "cache", namespace(round_))
        order = keys() if (worker_id + round_) % 2 == 0 else keys()[::-1]  # same order (races) or crossing (reads)
        for key in order + keys():  # a write pass, then a read pass of what both wrote
            got = cache.get_or_compute([key], lambda _positions, key=key: {n: t[None] for n, t in
                                                                           expected(key).items()})
            mismatches += any(not torch.equal(got[n][0], t) for n, t in expected(key).items())
        for name, value in cache.cache_stats.as_dict().items():
            totals[name] += value
    (folder / f"result-{worker_id}.json").write_text(json.dumps({"mismatches": mismatches, **totals}))


def test_two_processes_filling_the_same_cache_entries_never_see_a_torn_entry(tmp_path):
    codes = two_processes.run_two_workers(__file__, tmp_path)
    assert codes == [0, 0]
    results = [json.loads((tmp_path / f"result-{i}.json").read_text()) for i in range(2)]
    for result in results:
        assert result["mismatches"] == 0 and result["corrupt"] == 0, result
        assert result["hits"] + result["misses"] == 2 * ROUNDS * KEYS, result
    # both processes wrote entries (each missed some of what the other had not written yet), and between them all
    assert all(r["written"] > 0 for r in results) and sum(r["written"] for r in results) >= ROUNDS * KEYS, results
    assert sorted(p.name for p in (tmp_path / "cache").rglob(f"{TEMP_PREFIX}*")) == []
    for round_ in range(ROUNDS):  # what is left on disk is every entry, whole
        cache = FeatureCache(tmp_path / "cache", namespace(round_))
        stored = cache.get_or_compute(keys(), must_not_compute)
        for i, key in enumerate(keys()):
            assert all(torch.equal(stored[n][i], t) for n, t in expected(key).items()), key


if __name__ == "__main__":
    worker(Path(sys.argv[1]), int(sys.argv[2]))
