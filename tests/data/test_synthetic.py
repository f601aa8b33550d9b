"""Tests of the synthetic stand-ins: native layouts and their pitfalls, masks, determinism,
idempotency, argument errors and the round trip through the real converters."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siad.data.records import count
from siad.data.synthetic import DATASETS, DEFAULT_CLASSES, MARKER, layouts, standin, write_standin
from siad.data.synthetic.catalog import DEFECTS, render_sample
from siad.data.synthetic.common import derive_rng
from siad.data.synthetic.defects import DEFECTS as DEFECT_KINDS
from siad.data.synthetic.defects import apply_defect
from siad.errors import DataError, UnknownNameError

SMALL = {"n_train": 2, "n_test_normal": 2, "n_test_anomalous": 2, "size": 32}


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """All nine stand-ins with default arguments: name -> (root, summary)."""
    base = tmp_path_factory.mktemp("standins")
    return {name: (base / name, write_standin(name, base / name)) for name in DATASETS}


def _files(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _mask_pairs(name: str, root: Path) -> Iterator[tuple[Path, Path]]:
    """(anomalous image, its mask) for every dataset with masks, following each native naming."""
    if name in ("mvtec", "mpdd", "dtd"):
        base = root / "DTD-Synthetic" if name == "dtd" else root
        for img in sorted(base.glob("*/test/*/*.png")):
            if img.parent.name != "good":
                yield img, img.parents[2] / "ground_truth" / img.parent.name / f"{img.stem}_mask.png"
    elif name == "btad":
        for img in sorted(root.glob("BTech_Dataset_transformed/*/test/ko/*")):
            masks = list((img.parents[2] / "ground_truth" / "ko").glob(f"{img.stem}.*"))
            assert len(masks) == 1, img
            yield img, masks[0]
    elif name == "visa":
        for img in sorted(root.glob("*/Data/Images/Anomaly/*.JPG")):
            yield img, img.parents[2] / "Masks" / "Anomaly" / f"{img.stem}.png"
    elif name == "sdd":
        for label in sorted(root.glob("KolektorSDD/kos*/Part*_label.bmp")):
            if np.asarray(Image.open(label)).max() > 0:
                yield label.with_name(label.name.replace("_label.bmp", ".jpg")), label


# ------------------------------------------------------------------------------------------------
# Native layouts and their pitfalls
# ------------------------------------------------------------------------------------------------
def test_mvtec_layout(standins: dict) -> None:
    root, summary = standins["mvtec"]
    assert summary.classes == ("bottle", "carpet", "screw")
    assert (root / "license.txt").is_file() and (root / "readme.txt").is_file()
    assert sorted(p.name for p in (root / "bottle" / "test").iterdir()) == ["broken_large", "contamination", "good"]
    assert (root / "bottle" / "ground_truth" / "broken_large" / "000_mask.png").is_file()
    assert len(list((root / "bottle" / "train" / "good").glob("*.png"))) == 6
    assert Image.open(root / "screw" / "train" / "good" / "000.png").mode == "L"  # grayscale class
    assert Image.open(root / "bottle" / "train" / "good" / "000.png").mode == "RGB"
    mask = np.asarray(Image.open(root / "bottle" / "ground_truth" / "contamination" / "000_mask.png"))
    assert set(np.unique(mask)) == {0, 255}


def test_visa_layout_csv_and_id_masks(standins: dict) -> None:
    root, _ = standins["visa"]
    with (root / "split_csv" / "1cls.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["object", "split", "label", "image", "mask"]
    assert {r["label"] for r in rows} == {"normal", "anomaly"} and {r["split"] for r in rows} == {"train", "test"}
    assert all(r["mask"] == "" for r in rows if r["label"] == "normal")
    assert all(r["split"] == "test" and r["mask"] for r in rows if r["label"] == "anomaly")
    assert all((root / r["image"]).is_file() and r["image"].endswith(".JPG") for r in rows)
    assert "candle/Data/Images/Anomaly/000.JPG" in {r["image"] for r in rows}
    assert Image.open(root / "candle/Data/Images/Normal/0000.JPG").format == "JPEG"
    assert (root / "candle" / "image_anno.csv").is_file()
    assert (root / "split_csv" / "2cls_highshot.csv").is_file() and (root / "split_csv" / "2cls_fewshot.csv").is_file()
    values = set()
    for _, mask in _mask_pairs("visa", root):
        values |= set(np.unique(np.asarray(Image.open(mask))).tolist())
    assert values == {0, 1, 2}  # class ids, not 0/255


def test_mpdd_and_dtd_layouts(standins: dict) -> None:
    mpdd, _ = standins["mpdd"]
    assert sorted(p.name for p in (mpdd / "bracket_black" / "test").iterdir()) == ["good", "hole", "scratches"]
    assert (mpdd / "tubes" / "ground_truth" / "anomalous" / "003_mask.png").is_file()
    dtd, _ = standins["dtd"]
    texture = dtd / "DTD-Synthetic" / "Woven_001"
    assert sorted(p.name for p in (texture / "test").iterdir()) == ["bad", "good"]
    assert (texture / "ground_truth" / "bad" / "000_mask.png").is_file()
    assert (texture / "train" / "good" / "005.png").is_file()


def test_sdd_raw_layout_defect_inside_one_third(standins: dict) -> None:
    root, summary = standins["sdd"]
    folders = sorted(p.name for p in (root / "KolektorSDD").iterdir())
    assert len(folders) >= 2 and all(f.startswith("kos") for f in folders)
    defective = 0
    for label_path in sorted(root.glob("KolektorSDD/kos*/Part*_label.bmp")):
        image = Image.open(label_path.with_name(label_path.name.replace("_label.bmp", ".jpg")))
        assert image.mode == "L" and image.height > 2 * image.width  # tall grayscale
        label = np.asarray(Image.open(label_path))
        assert label.shape == (image.height, image.width)
        thirds = [label[a:b].max() > 0 for a, b in layouts.ksdd_third_bounds(label.shape[0])]
        assert sum(thirds) <= 1
        defective += sum(thirds)
    assert defective == summary.test_counts["electrical_commutators"][1] == 4
    normal_test, anomalous_test = summary.test_counts["electrical_commutators"]
    assert normal_test >= 2 and anomalous_test >= 2


@pytest.mark.parametrize(("cls", "image_ext", "mask_ext"), [("01", ".bmp", ".png"), ("02", ".png", ".png"),
                                                             ("03", ".bmp", ".bmp")])
def test_btad_mixed_extensions(standins: dict, cls: str, image_ext: str, mask_ext: str) -> None:
    root, _ = standins["btad"]
    base = root / "BTech_Dataset_transformed" / cls
    assert {p.suffix for p in base.glob("*/*/*.*") if "ground_truth" not in p.parts} == {image_ext}
    assert {p.suffix for p in (base / "ground_truth" / "ko").iterdir()} == {mask_ext}
    assert sorted(p.stem for p in (base / "test" / "ko").iterdir()) == sorted(
        p.stem for p in (base / "ground_truth" / "ko").iterdir())
    assert (base / "train" / "ok" / f"0000{image_ext}").is_file()


def test_brainmri_names_modes_and_duplicates(standins: dict) -> None:
    root, _ = standins["brainmri"]
    names = {p.name for p in (root / "brain_tumor_dataset").glob("*/*")}
    assert {"Y1.jpg", "Y2.JPG", "1 no.jpeg", "no 2.png"} <= names
    assert {p.suffix for p in (root / "brain_tumor_dataset").glob("*/*")} == {".jpg", ".JPG", ".png", ".jpeg"}
    assert {Image.open(p).mode for p in (root / "brain_tumor_dataset").glob("*/*")} == {"L", "RGB", "P"}
    duplicates = sorted(p for p in root.glob("*/*") if p.parts[-2] in ("yes", "no") and p.parent.parent == root)
    assert len(duplicates) == 4
    for dup in duplicates:
        assert dup.read_bytes() == (root / "brain_tumor_dataset" / dup.parent.name / dup.name).read_bytes()


def test_headct_labels_header_and_rgba(standins: dict) -> None:
    root, _ = standins["headct"]
    lines = (root / "labels.csv").read_text().splitlines()
    assert lines[0] == "id, hemorrhage"  # the leading space of the real file
    assert lines[1:] == ["0,1", "1,1", "2,1", "3,1", "4,0", "5,0", "6,0", "7,0"]
    images = sorted((root / "head_ct" / "head_ct").glob("*.png"))
    assert [p.name for p in images] == [f"{i:03d}.png" for i in range(8)]
    assert {Image.open(p).mode for p in images} == {"RGB", "RGBA"}
    assert len({Image.open(p).size for p in images}) > 1  # varied sizes


def test_br35h_has_unlabelled_pred(standins: dict) -> None:
    root, _ = standins["br35h"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["no", "pred", "yes"]
    assert (root / "yes" / "y0.jpg").is_file() and (root / "no" / "no3.jpg").is_file()
    assert len(list((root / "pred").glob("pred*.jpg"))) >= 2


# ------------------------------------------------------------------------------------------------
# Masks and defects
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mvtec", "visa", "mpdd", "dtd", "sdd", "btad"])
def test_masks_nonempty_and_image_sized(standins: dict, name: str) -> None:
    root, summary = standins[name]
    pairs = list(_mask_pairs(name, root))
    assert len(pairs) == summary.total_test[1]
    for img, mask in pairs:
        m = np.asarray(Image.open(mask))
        assert m.ndim == 2 and m.any(), mask
        assert Image.open(img).size == (m.shape[1], m.shape[0]), mask


@pytest.mark.parametrize(("dataset", "cls", "gray"), [("mvtec", "bottle", False), ("mvtec", "grid", True),
                                                      ("visa", "pcb1", False), ("dtd", "Mesh_114", False)])
def test_defect_mask_is_exactly_the_changed_pixels(dataset: str, cls: str, gray: bool) -> None:
    for name, kind in DEFECTS[(dataset, cls)]:
        clean = render_sample(dataset, cls, 48, 48, 0, derive_rng(0, "t", name), gray=gray)
        bad = render_sample(dataset, cls, 48, 48, 0, derive_rng(0, "t", name), gray=gray, defect_kind=kind)
        assert clean.mask is None and bad.mask is not None and bad.mask.any()
        np.testing.assert_array_equal(np.any(bad.image != clean.image, axis=-1), bad.mask)


@pytest.mark.parametrize("kind", sorted(DEFECT_KINDS))
def test_every_defect_kind_changes_pixels_inside_region(kind: str) -> None:
    rng = np.random.default_rng(3)
    clean = rng.integers(90, 160, (40, 40, 3), dtype=np.uint8)
    region = np.zeros((40, 40), bool)
    region[15:25, 15:25] = True
    out, mask = apply_defect(clean, kind, rng, region=region, background=np.zeros_like(clean))
    assert mask.any() and not np.array_equal(out, clean)
    assert mask[region].any()  # centred inside the region, so it touches it


def test_unknown_defect_kind() -> None:
    with pytest.raises(ValueError, match="unknown defect kind"):
        apply_defect(np.zeros((8, 8, 3), np.uint8), "dent", np.random.default_rng(0),
                     region=np.ones((8, 8), bool), background=np.zeros((8, 8, 3), np.uint8))


# ------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DATASETS)
def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path, name: str) -> None:
    a = _files(write_standin(name, tmp_path / "a", seed=5, **SMALL).root)
    b = _files(write_standin(name, tmp_path / "b", seed=5, **SMALL).root)
    c = _files(write_standin(name, tmp_path / "c", seed=6, **SMALL).root)
    assert a == b
    images = [k for k in a if k.lower().endswith((".png", ".jpg", ".jpeg", ".bmp")) and "mask" not in k]
    assert images and all(k in c for k in images)
    assert all(a[k] != c[k] for k in images)


def test_class_images_do_not_depend_on_other_classes(tmp_path: Path, standins: dict) -> None:
    alone = write_standin("mvtec", tmp_path / "alone", classes=["bottle"]).root
    assert _files(alone / "bottle") == _files(standins["mvtec"][0] / "bottle")
    assert sorted(p.name for p in alone.iterdir() if p.is_dir()) == ["bottle"]


# ------------------------------------------------------------------------------------------------
# Idempotency and atomic rebuild
# ------------------------------------------------------------------------------------------------
def test_second_call_is_a_no_op(tmp_path: Path) -> None:
    root = tmp_path / "mvtec"
    first = write_standin("mvtec", root, classes=["carpet"], **SMALL)
    assert first.written and (root / MARKER).is_file()
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    second = write_standin("mvtec", root, classes=["carpet"], **SMALL)
    assert not second.written and second.test_counts == first.test_counts
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps


def test_different_arguments_or_missing_file_rebuild(tmp_path: Path) -> None:
    root = tmp_path / "btad"
    write_standin("btad", root, classes=["02"], **SMALL)
    before = _files(root)
    assert write_standin("btad", root, classes=["02"], **{**SMALL, "n_train": 3}).written
    assert (root / "BTech_Dataset_transformed/02/train/ok/0002.png").is_file()
    (root / "BTech_Dataset_transformed/02/train/ok/0000.png").unlink()
    assert write_standin("btad", root, classes=["02"], **{**SMALL, "n_train": 3}).written
    assert (root / "BTech_Dataset_transformed/02/train/ok/0000.png").is_file()
    assert write_standin("btad", root, classes=["02"], **SMALL).written
    assert _files(root) == before
    assert [p.name for p in tmp_path.iterdir()] == ["btad"]  # no temporary siblings left


def test_interrupted_build_leaves_no_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(root: Path, req: layouts.Request) -> None:
        layouts.write_mpdd(root, req)
        raise KeyboardInterrupt

    monkeypatch.setitem(standin.WRITERS, "mpdd", crash)
    with pytest.raises(KeyboardInterrupt):
        write_standin("mpdd", tmp_path / "mpdd", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_foreign_folder_or_file(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "bottle").mkdir(parents=True)
    with pytest.raises(DataError, match=r"real.*marker"):
        write_standin("mvtec", real)
    assert (real / "bottle").is_dir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="afile"):
        write_standin("mvtec", tmp_path / "afile")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_standin("headct", empty, **SMALL).written


# ------------------------------------------------------------------------------------------------
# Argument errors
# ------------------------------------------------------------------------------------------------
def test_unknown_dataset_and_class(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="kolektor2.*mvtec"):
        write_standin("kolektor2", tmp_path / "x")
    with pytest.raises(UnknownNameError, match="bottel.*bottle"):
        write_standin("mvtec", tmp_path / "x", classes=["bottel"])
    with pytest.raises(UnknownNameError, match="bottle"):
        write_standin("visa", tmp_path / "x", classes=["bottle"])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bad", [{"size": 129}, {"size": 31}, {"size": 64.0}, {"n_train": 0},
                                 {"n_test_anomalous": 1000}, {"seed": -1}, {"classes": "bottle"},
                                 {"classes": []}, {"classes": ["bottle", "bottle"]}])
def test_bad_arguments(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError):
        write_standin("mvtec", tmp_path / "x", **bad)
    assert not (tmp_path / "x").exists()


def test_classes_in_canonical_order(tmp_path: Path) -> None:
    summary = write_standin("dtd", tmp_path / "d", classes=["Woven_127", "Blotchy_099"], **SMALL)
    assert summary.classes == ("Blotchy_099", "Woven_127")
    assert DEFAULT_CLASSES["btad"] == ("01", "02", "03")


# ------------------------------------------------------------------------------------------------
# Round trip through the real converters (siad.data.registry)
# ------------------------------------------------------------------------------------------------
def _converted_counts(name: str, root: Path) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    from siad.data.registry import get_dataset

    meta = get_dataset(name).convert(root)
    return {c: len(v) for c, v in meta.get("train", {}).items()}, count(meta, "test")


@pytest.mark.parametrize("name", DATASETS)
def test_converter_round_trip(standins: dict, name: str) -> None:
    root, summary = standins[name]
    train, test = _converted_counts(name, root)
    assert test == summary.test_counts
    assert {c: train.get(c, 0) for c in summary.classes} == summary.train_counts
    assert not write_standin(name, root).written  # converter output in root does not spoil the stand-in


def test_sdd_counts_follow_the_thirds_split(tmp_path: Path) -> None:
    summary = write_standin("sdd", tmp_path / "sdd", n_train=10, n_test_normal=3, n_test_anomalous=5, size=32)
    parts = layouts.ksdd_plan(layouts.Request("sdd", 0, summary.classes, 10, 3, 5, 32))
    normal_thirds = 3 * len(parts) - 5
    assert summary.test_counts["electrical_commutators"] == (int(np.ceil(normal_thirds * 0.25)), 5)
    assert summary.train_counts["electrical_commutators"] == normal_thirds - int(np.ceil(normal_thirds * 0.25))
    train, test = _converted_counts("sdd", tmp_path / "sdd")
    assert (train, test) == (summary.train_counts, summary.test_counts)
