"""Feature cache: read equals recomputation, keying, fingerprints, interruption and concurrency safety."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import Tensor

from siad.backbones import get_backbone_spec
from siad.backbones.cache import (
    NAMESPACE_FILE,
    TEMP_PREFIX,
    FeatureCache,
    atomic_write,
    backbone_namespace,
    file_fingerprint,
    image_key,
    namespace_digest,
)
from siad.errors import ConfigError, DataError, SiadError

NAMESPACE = {"backbone": "tiny-vit-demo", "arch": "tiny-ViT-demo", "weights": {"seed": 0}, "image_size": 64,
             "taps": [1, 2], "options": {"ln_post": False}}
KEYS = [image_key("mvtec", "test", f"bottle/{i:03d}.png") for i in range(6)]


class FakeBackbone:
    """Deterministic per-image features (a function of the key only) that counts its calls."""

    def __init__(self, keys: Sequence[str], dtype: torch.dtype = torch.float32, salt: int = 0) -> None:
        self.keys, self.dtype, self.salt = list(keys), dtype, salt
        self.calls: list[list[int]] = []

    def features(self, key: str) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(int.from_bytes(key.encode(), "little") % 2**31 + self.salt)
        return {"tokens": torch.randn(2, 5, 4, generator=gen).to(self.dtype),
                "cls": torch.randn(3, generator=gen).to(self.dtype)}

    def __call__(self, indices: Sequence[int]) -> Mapping[str, Tensor]:
        self.calls.append(list(indices))
        per_image = [self.features(self.keys[i]) for i in indices]
        return {name: torch.stack([f[name] for f in per_image]) for name in per_image[0]}

    def expected(self, keys: Sequence[str]) -> dict[str, Tensor]:
        per_image = [self.features(k) for k in keys]
        return {name: torch.stack([f[name] for f in per_image]) for name in per_image[0]}


def assert_same(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def test_read_equals_recomputation_and_second_call_computes_nothing(tmp_path):
    backbone = FakeBackbone(KEYS)
    first = FeatureCache(tmp_path, NAMESPACE).get_or_compute(KEYS, backbone)
    assert backbone.calls == [list(range(6))]
    assert_same(first, backbone.expected(KEYS))

    again = FeatureCache(tmp_path, NAMESPACE)  # a new process/epoch: same folder, nothing recomputed
    second = again.get_or_compute(KEYS, backbone)
    assert len(backbone.calls) == 1
    assert_same(second, backbone.expected(KEYS))  # bit-exact float32
    assert (again.cache_stats.hits, again.cache_stats.misses, again.cache_stats.written) == (6, 0, 0)
    assert "6 hits, 0 misses" in str(again.cache_stats)


def test_only_missing_images_are_computed_in_key_order(tmp_path):
    backbone = FakeBackbone(KEYS)
    cache = FeatureCache(tmp_path, NAMESPACE)
    cache.get_or_compute(KEYS[1:4], FakeBackbone(KEYS[1:4]))
    out = cache.get_or_compute(KEYS[::-1], FakeBackbone(KEYS[::-1]))
    assert_same(out, backbone.expected(KEYS[::-1]))
    backbone_reversed = FakeBackbone(KEYS[::-1])
    cache.get_or_compute(KEYS[::-1], backbone_reversed)
    assert backbone_reversed.calls == []
    assert cache.cache_stats.as_dict() == {"hits": 3 + 6, "misses": 3 + 3, "stale": 0, "corrupt": 0, "written": 6}


def test_batch_size_limits_compute_calls(tmp_path):
    backbone = FakeBackbone(KEYS)
    out = FeatureCache(tmp_path, NAMESPACE).get_or_compute(KEYS, backbone, batch_size=4)
    assert backbone.calls == [[0, 1, 2, 3], [4, 5]]
    assert_same(out, backbone.expected(KEYS))


@pytest.mark.parametrize(
    "change",
    [{"taps": [1, 3]}, {"image_size": 96}, {"backbone": "other-vit"}, {"weights": {"seed": 1}},
     {"options": {"ln_post": True}}],
)
def test_a_changed_namespace_misses(tmp_path, change):
    FeatureCache(tmp_path, NAMESPACE).get_or_compute(KEYS, FakeBackbone(KEYS))
    changed = {**NAMESPACE, **change}
    backbone = FakeBackbone(KEYS, salt=1)
    cache = FeatureCache(tmp_path, changed)
    out = cache.get_or_compute(KEYS, backbone)
    assert backbone.calls == [list(range(6))]
    assert_same(out, backbone.expected(KEYS))
    assert cache.folder != FeatureCache(tmp_path, NAMESPACE).folder
    assert json.loads((cache.folder / NAMESPACE_FILE).read_text())["namespace"] == changed


def test_namespace_is_canonical_and_validated():
    reordered = dict(reversed(list(NAMESPACE.items())))
    assert namespace_digest(reordered) == namespace_digest({**NAMESPACE, "taps": (1, 2)})
    assert namespace_digest(NAMESPACE) != namespace_digest({**NAMESPACE, "taps": [2, 1]})
    with pytest.raises(ConfigError, match=r"namespace\.options\.fn"):
        namespace_digest({**NAMESPACE, "options": {"fn": object()}})
    with pytest.raises(ConfigError, match="non-empty"):
        namespace_digest({})


def test_a_changed_image_fingerprint_misses(tmp_path):
    images = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(bytes([i]) * 10)
        images.append(path)
    cache = FeatureCache(tmp_path / "cache", NAMESPACE)
    cache.get_or_compute(KEYS[:3], FakeBackbone(KEYS[:3]), fingerprints=[file_fingerprint(p) for p in images])
    images[1].write_bytes(b"replaced image, other size")
    backbone = FakeBackbone(KEYS[:3], salt=5)  # the "new image" has other features
    out = cache.get_or_compute(KEYS[:3], backbone, fingerprints=[file_fingerprint(p) for p in images])
    assert backbone.calls == [[1]]
    assert cache.cache_stats.stale == 1
    assert torch.equal(out["cls"][1], backbone.expected([KEYS[1]])["cls"][0])
    assert not torch.equal(out["cls"][0], backbone.expected([KEYS[0]])["cls"][0])  # image 0 kept from before


def test_file_fingerprint_modes(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"abc")
    before = file_fingerprint(path, content=True)
    os.utime(path, ns=(0, 0))
    assert file_fingerprint(path, content=True) == before  # content hash ignores the timestamp
    stamp = file_fingerprint(path)
    os.utime(path, ns=(10**9, 10**9))
    assert file_fingerprint(path) != stamp
    with pytest.raises(DataError, match="missing.png"):
        file_fingerprint(tmp_path / "missing.png")


def test_leftover_temp_file_is_ignored_and_cleaned(tmp_path):
    cache = FeatureCache(tmp_path, NAMESPACE)
    entry = cache.entry_path(KEYS[0])
    entry.parent.mkdir(parents=True)
    leftover = entry.parent / f"{TEMP_PREFIX}{entry.name}-abc.123"
    leftover.write_bytes(b"half a tensor")  # what a killed writer leaves behind
    backbone = FakeBackbone(KEYS[:1])
    out = cache.get_or_compute(KEYS[:1], backbone)
    assert backbone.calls == [[0]]
    assert_same(out, backbone.expected(KEYS[:1]))
    assert cache.remove_temp_files(older_than_s=3600) == 0  # too young: may belong to a live writer
    os.utime(leftover, (0, 0))
    assert cache.remove_temp_files(older_than_s=3600) == 1
    assert not leftover.exists() and entry.is_file()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_key"])
def test_corrupt_entry_is_recomputed_with_a_warning(tmp_path, damage):
    cache = FeatureCache(tmp_path, NAMESPACE)
    cache.get_or_compute(KEYS[:2], FakeBackbone(KEYS[:2]))
    entry = cache.entry_path(KEYS[0])
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    elif damage == "garbage":
        entry.write_bytes(b"\x00" * 64)
    else:  # a valid entry of another image in this slot (collision or a copied file)
        entry.write_bytes(cache.entry_path(KEYS[1]).read_bytes())
    backbone = FakeBackbone(KEYS[:2])
    with pytest.warns(UserWarning, match="unusable entry"):
        out = cache.get_or_compute(KEYS[:2], backbone)
    assert backbone.calls == [[0]]
    assert cache.cache_stats.corrupt == 1
    assert_same(out, backbone.expected(KEYS[:2]))
    reader = FakeBackbone(KEYS[:2])
    assert_same(cache.get_or_compute(KEYS[:2], reader), backbone.expected(KEYS[:2]))
    assert reader.calls == []  # repaired on disk


def test_failed_write_leaves_no_entry_and_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "entry.pt"

    def crash(handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert list(target.parent.iterdir()) == []


def test_concurrent_writers_of_the_same_entries(tmp_path):
    barrier = threading.Barrier(4)

    def worker(_: int) -> dict[str, Tensor]:
        barrier.wait()
        return FeatureCache(tmp_path, NAMESPACE).get_or_compute(KEYS, FakeBackbone(KEYS))

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(worker, range(4)))
    expected = FakeBackbone(KEYS).expected(KEYS)
    for result in results:
        assert_same(result, expected)
    folder = FeatureCache(tmp_path, NAMESPACE).folder
    assert not [p for p in folder.rglob("*") if p.name.startswith(TEMP_PREFIX)]
    reader = FakeBackbone(KEYS)
    assert_same(FeatureCache(tmp_path, NAMESPACE).get_or_compute(KEYS, reader), expected)
    assert reader.calls == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.bfloat16])
def test_dtype_is_preserved(tmp_path, dtype):
    keys = KEYS[:2]
    FeatureCache(tmp_path, NAMESPACE).get_or_compute(keys, FakeBackbone(keys, dtype=dtype))
    out = FeatureCache(tmp_path, NAMESPACE).get_or_compute(keys, FakeBackbone(keys, dtype=dtype))
    assert_same(out, FakeBackbone(keys, dtype=dtype).expected(keys))


def test_float16_storage_is_consistent_between_first_and_later_reads(tmp_path):
    backbone = FakeBackbone(KEYS)
    first = FeatureCache(tmp_path, NAMESPACE, store_dtype=torch.float16).get_or_compute(KEYS, backbone)
    second = FeatureCache(tmp_path, NAMESPACE, store_dtype=torch.float16).get_or_compute(KEYS, backbone)
    assert len(backbone.calls) == 1
    assert_same(first, second)
    exact = backbone.expected(KEYS)
    assert first["tokens"].dtype == torch.float32
    assert torch.equal(first["tokens"], exact["tokens"].half().float())
    assert not torch.equal(first["tokens"], exact["tokens"])
    with pytest.raises(ConfigError, match="int8"):
        FeatureCache(tmp_path, NAMESPACE, store_dtype=torch.int8)


def test_entries_do_not_store_the_whole_batch(tmp_path):
    keys = [f"ds/train/{i}.png" for i in range(32)]

    def compute(indices):
        return {"big": torch.randn(len(indices), 1000)}

    cache = FeatureCache(tmp_path, NAMESPACE)
    cache.get_or_compute(keys, compute)
    assert cache.entry_path(keys[0]).stat().st_size < 1000 * 4 * 2  # one row, not the 32-row batch


def test_bad_input_gives_clear_errors(tmp_path):
    cache = FeatureCache(tmp_path, NAMESPACE)
    with pytest.raises(SiadError, match="duplicate"):
        cache.get_or_compute([KEYS[0], KEYS[0]], FakeBackbone(KEYS))
    with pytest.raises(SiadError, match="fingerprints"):
        cache.get_or_compute(KEYS[:2], FakeBackbone(KEYS), fingerprints=["a"])
    with pytest.raises(SiadError, match="dim 0"):
        cache.get_or_compute(KEYS[:2], lambda idx: {"x": torch.zeros(5, 3)})
    cache.get_or_compute(KEYS[:1], lambda idx: {"x": torch.zeros(len(idx), 3)})
    with pytest.raises(SiadError, match="namespace misses a setting"):
        cache.get_or_compute(KEYS[:2], lambda idx: {"x": torch.zeros(len(idx), 4)})
    assert cache.get_or_compute([], FakeBackbone(KEYS)) == {}


def test_edited_namespace_file_is_refused(tmp_path):
    cache = FeatureCache(tmp_path, NAMESPACE)
    path = cache.folder / NAMESPACE_FILE
    data = json.loads(path.read_text())
    data["namespace"]["image_size"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(SiadError, match="different namespace"):
        FeatureCache(tmp_path, NAMESPACE)


def test_backbone_namespace_tracks_spec_taps_weights_and_options(tmp_path):
    spec = get_backbone_spec("tiny-vit-demo")
    base = namespace_digest(backbone_namespace(spec, taps=[1, 2], seed=0))
    assert base == namespace_digest(backbone_namespace(spec, taps=(1, 2), seed=0))
    variants = [
        backbone_namespace(spec, taps=[1, 3], seed=0),
        backbone_namespace(get_backbone_spec("tiny-vit-demo", {"image_size": 96}), taps=[1, 2], seed=0),
        backbone_namespace(spec, taps=[1, 2], seed=1),  # random weights: the seed is the weights
        backbone_namespace(spec, taps=[1, 2], seed=0, ln_post=True),
    ]
    assert len({base, *(namespace_digest(v) for v in variants)}) == 5
    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"v1")
    with_ckpt = get_backbone_spec("tiny-vit-demo", {"checkpoint": str(checkpoint)})
    first = namespace_digest(backbone_namespace(with_ckpt, taps=[1]))
    checkpoint.write_bytes(b"version 2")
    assert namespace_digest(backbone_namespace(with_ckpt, taps=[1])) != first
    tapped = get_backbone_spec("tiny-vit-demo", {"taps": [1, 2]})
    assert backbone_namespace(tapped)["taps"] == [1, 2]  # the spec's taps by default
    pretrained = get_backbone_spec("tiny-vit-demo", {"pretrained": "some-tag"})
    assert backbone_namespace(pretrained, seed=0) == backbone_namespace(pretrained, seed=1)  # seed is irrelevant
    cache = FeatureCache(tmp_path, backbone_namespace(spec, taps=[1, 2]))
    assert cache.folder.name.startswith("tiny-vit-demo-")
    assert Path(cache.folder / NAMESPACE_FILE).is_file()


def test_backbone_namespace_tracks_the_feature_code_and_the_callers_module(monkeypatch):
    from siad import code_hash

    spec = get_backbone_spec("tiny-vit-demo")
    base = namespace_digest(backbone_namespace(spec, seed=0, code_modules=("baselines.anovl",)))
    assert base != namespace_digest(backbone_namespace(spec, seed=0))  # the caller's module counts
    real = code_hash.module_fingerprint
    for edited in ("siad.backbones.features", "siad.data.imageio", "baselines.anovl"):
        monkeypatch.setattr(code_hash, "module_fingerprint", lambda name, e=edited: real(name) + ("x" if name == e
                                                                                                  else ""))
        assert namespace_digest(backbone_namespace(spec, seed=0, code_modules=("baselines.anovl",))) != base, edited


def test_the_storage_dtype_is_part_of_the_namespace(tmp_path):
    namespace = {"backbone": "tiny", "taps": [1]}
    half = FeatureCache(tmp_path, namespace, store_dtype=torch.float16)
    full = FeatureCache(tmp_path, namespace)
    assert half.folder != full.folder  # a float32 run never reads float16-rounded entries
    assert FeatureCache(tmp_path, namespace, store_dtype=torch.float16).folder == half.folder
