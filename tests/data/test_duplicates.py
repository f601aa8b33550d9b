"""Content hashes per record, duplicate groups, train/test overlap, near-duplicates, duplicate-aware splits."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siad.data.converters.common import split_normals
from siad.data.duplicates import dhash, duplicate_groups, exact_overlap, near_duplicates, require_hashes
from siad.data.imageio import read_image
from siad.data.prepare import prepare_dataset
from siad.data.records import iter_records, validate_meta
from siad.data.registry import get_dataset
from siad.errors import DataError


def _smooth(seed: int, size: int = 64) -> Image.Image:
    """A smooth random RGB picture (perceptual hashes are meant for natural-looking images)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def _reference_dhash(image: Image.Image) -> str:
    """The imagehash library's dhash written out bit by bit (binary string, first bit most significant)."""
    pixels = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS))
    bits = "".join("1" if pixels[r, c + 1] > pixels[r, c] else "0" for r in range(8) for c in range(8))
    return f"{int(bits, 2):016x}"


def _rec(path: str, sha: str | None = None, dh: str | None = None) -> dict:
    rec = {"img_path": path, "mask_path": "", "cls_name": "c", "specie_name": "good", "anomaly": 0}
    if sha is not None:
        rec["sha256"] = sha
    if dh is not None:
        rec["dhash"] = dh
    return rec


# ---- dhash ----------------------------------------------------------------------------------------

def test_dhash_bits_and_format() -> None:
    for seed in range(5):
        value = dhash(_smooth(seed))
        assert len(value) == 16 and value == _reference_dhash(_smooth(seed))
    ramp = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1)))  # brighter to the right
    assert dhash(ramp) == "f" * 16 and dhash(ramp.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) == "0" * 16


def test_dhash_survives_reencoding_but_separates_other_images() -> None:
    original = _smooth(1, 256)
    buffer = io.BytesIO()
    original.save(buffer, "JPEG", quality=80)
    recoded = Image.open(buffer).resize((200, 200))
    a, b, other = (int(dhash(x), 16) for x in (original, recoded, _smooth(2, 256)))
    assert bin(a ^ b).count("1") <= 4 < bin(a ^ other).count("1")


# ---- groups, overlap, near-duplicates -------------------------------------------------------------

def test_duplicate_groups_span_splits_and_classes() -> None:
    meta = {"train": {"a": [_rec("a/1", "1" * 64), _rec("a/2", "2" * 64)]},
            "test": {"a": [_rec("a/3", "1" * 64)], "b": [_rec("b/1", "2" * 64), _rec("b/2", "1" * 64),
                                                        _rec("b/3", "3" * 64)]}}
    assert duplicate_groups(meta) == [["a/1", "a/3", "b/2"], ["a/2", "b/1"]]


def test_exact_overlap_pairs() -> None:
    train = [_rec("t1", "1" * 64), _rec("t2", "2" * 64), _rec("t3", "1" * 64)]
    test = [_rec("x1", "1" * 64), _rec("x2", "4" * 64)]
    assert exact_overlap(train, test) == [("t1", "x1"), ("t3", "x1")]
    assert exact_overlap([], test) == [] and exact_overlap(train, []) == []


def test_near_duplicates_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 40, dtype=np.int64).astype(np.uint64)
    flips = [np.uint64(1) << np.uint64(b) for b in rng.integers(0, 64, 40)]
    a_words = list(base[:30])
    b_words = [base[i] ^ flips[i] ^ (flips[i + 1] if i % 2 else np.uint64(0)) for i in range(20)] + list(base[30:])
    a = [_rec(f"a{i}", dh=f"{int(w):016x}") for i, w in enumerate(a_words)]
    b = [_rec(f"b{j}", dh=f"{int(w):016x}") for j, w in enumerate(b_words)]
    for limit in (0, 1, 2, 4, 64):
        expected = sorted(((x["img_path"], y["img_path"], bin(int(x["dhash"], 16) ^ int(y["dhash"], 16)).count("1"))
                           for x, y in itertools.product(a, b)
                           if bin(int(x["dhash"], 16) ^ int(y["dhash"], 16)).count("1") <= limit),
                          key=lambda p: (p[2], p[0], p[1]))
        assert near_duplicates(a, b, limit) == expected
    assert len(near_duplicates(a, b, 2)) >= 20 and near_duplicates([], b) == []
    with pytest.raises(ValueError, match="max_distance"):
        near_duplicates(a, b, 65)


def test_near_duplicates_is_fast_at_dataset_scale() -> None:
    rng = np.random.default_rng(1)
    a = [_rec(f"a{i}", dh=f"{int(w):016x}") for i, w in enumerate(rng.integers(0, 2**63, 10_000, dtype=np.int64))]
    b = [_rec(f"b{i}", dh=f"{int(w):016x}") for i, w in enumerate(rng.integers(0, 2**63, 5_000, dtype=np.int64))]
    b[123]["dhash"] = a[4567]["dhash"]
    start = time.perf_counter()
    found = near_duplicates(a, b)
    assert time.perf_counter() - start < 10  # ~0.2 s on one core; generous for shared CI machines
    assert ("a4567", "b123", 0) in found


def test_records_without_hashes_say_how_to_regenerate() -> None:
    meta = {"test": {"c": [_rec("c/1")]}}
    for call in (lambda: duplicate_groups(meta), lambda: exact_overlap([_rec("t", "1" * 64)], [_rec("c/1")]),
                 lambda: near_duplicates([_rec("c/1")], [])):
        with pytest.raises(DataError, match=r"'c/1'.*older version.*--forcerun prepare_dataset"):
            call()
    with pytest.raises(DataError, match="'dhash'"):
        require_hashes([_rec("x", "1" * 64)], "dhash")


def test_malformed_hashes_are_refused_by_the_schema() -> None:
    with pytest.raises(DataError, match="sha256"):
        validate_meta({"test": {"c": [_rec("c/1", "xyz")]}})
    with pytest.raises(DataError, match="dhash"):
        validate_meta({"test": {"c": [_rec("c/1", "a" * 64, "ABC")]}})
    validate_meta({"test": {"c": [_rec("c/1", "a" * 64, "0123456789abcdef")]}})


# ---- prepare records the hashes and reports duplicates --------------------------------------------

def test_prepare_records_sha256_and_dhash(mvtec_root: Path, tmp_path: Path) -> None:
    meta = prepare_dataset("mvtec", mvtec_root, tmp_path / "meta.json", verify_counts=False)
    for rec in iter_records(meta):
        assert rec["sha256"] == hashlib.sha256((mvtec_root / rec["img_path"]).read_bytes()).hexdigest()
        assert rec["dhash"] == dhash(read_image(mvtec_root / rec["img_path"]))
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info["duplicates"] == {"exact_groups": [], "train_test_overlap": []}


def test_prepare_reports_duplicates(mvtec_root: Path, tmp_path: Path, caplog) -> None:
    shutil.copyfile(mvtec_root / "bottle/test/good/000.png", mvtec_root / "bottle/train/good/000.png")
    shutil.copyfile(mvtec_root / "bottle/test/good/000.png", mvtec_root / "bottle/train/good/copy.png")
    with caplog.at_level(logging.WARNING, logger="siad.data"):
        prepare_dataset("mvtec", mvtec_root, tmp_path / "meta.json", verify_counts=False)
    info = json.loads((tmp_path / "dataset.json").read_text())
    group = ["bottle/test/good/000.png", "bottle/train/good/000.png", "bottle/train/good/copy.png"]
    assert info["duplicates"]["exact_groups"] == [group]
    assert info["duplicates"]["train_test_overlap"] == [[group[1], group[0]], [group[2], group[0]]]
    assert "1 groups of byte-identical images (3 files; 2 identical train/test pairs)" in caplog.text


# ---- splits the suite makes keep copies together --------------------------------------------------

def test_split_normals_keeps_groups_and_is_unchanged_without_duplicates() -> None:
    names = [f"n{i:02d}" for i in range(20)]
    plain = split_normals(names)
    assert split_normals(names, content={n: n for n in names}) == plain
    train, test = plain
    content = {n: n for n in names}
    content[train[0]] = content[test[0]] = "same"
    content[train[1]] = "anomaly"
    grouped_train, grouped_test = split_normals(names, content=content, test_content={"anomaly"})
    assert sorted(grouped_train + grouped_test) == names
    assert (train[0] in grouped_train) == (test[0] in grouped_train)
    assert train[1] in grouped_test


def test_medical_dra_split_keeps_identical_images_on_one_side(headct_root: Path) -> None:
    spec = get_dataset("headct")
    plain = spec.convert(headct_root, {"medical_protocol": "dra_75_25"})
    train_path = plain["train"]["head"][0]["img_path"]
    test_path = next(r["img_path"] for r in plain["test"]["head"] if not r["anomaly"])
    shutil.copyfile(headct_root / test_path, headct_root / train_path)  # a normal copied under another id
    meta = spec.convert(headct_root, {"medical_protocol": "dra_75_25"})
    sides = {r["img_path"]: split for split in ("train", "test") for r in iter_records(meta, (split,))}
    assert sides[train_path] == sides[test_path]
    anomaly = next(r["img_path"] for r in meta["test"]["head"] if r["anomaly"])
    normal_in_train = meta["train"]["head"][0]["img_path"]
    shutil.copyfile(headct_root / anomaly, headct_root / normal_in_train)  # a normal identical to an anomaly
    meta = spec.convert(headct_root, {"medical_protocol": "dra_75_25"})
    assert normal_in_train in {r["img_path"] for r in meta["test"]["head"]}


def test_sdd_thirds_keep_identical_pieces_on_one_side(ksdd_root: Path, layouts) -> None:
    defective = {f"{k}_{p}" for k, p in layouts.KSDD_DEFECTS}
    every = [f"kos{k:02d}_Part{p}" for k in range(1, 4) for p in range(3)]
    anomalous = ("kos01_Part1_1", "kos02_Part2_2")
    normals = [f"{part}_{t}" for part in every for t in range(3) if f"{part}_{t}" not in anomalous]
    in_train = set(split_normals(normals)[0])  # the plain split, as before the fix
    parts = [part for part in every if part not in defective]
    # two normal parts whose pieces the plain split puts on different sides
    first, second = next((a, b) for a, b in itertools.combinations(parts, 2)
                         if any((f"{a}_{t}" in in_train) != (f"{b}_{t}" in in_train) for t in range(3)))
    raw = ksdd_root / "KolektorSDD"
    kos_a, part_a = first.split("_")
    kos_b, part_b = second.split("_")
    shutil.copyfile(raw / kos_a / f"{part_a}.jpg", raw / kos_b / f"{part_b}.jpg")
    meta = get_dataset("sdd").convert(ksdd_root)
    sides = {Path(r["img_path"]).stem: split for split in ("train", "test") for r in iter_records(meta, (split,))}
    for t in range(3):
        assert sides[f"{first}_{t}"] == sides[f"{second}_{t}"]
