"""Converters: every native layout (and each of its pitfalls) to the meta.json index."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siad.data.converters import sdd
from siad.data.converters.common import LayoutNotFound
from siad.data.loading import read_mask
from siad.data.records import count, validate_meta
from siad.data.registry import DATASETS, get_dataset
from siad.errors import DataError


def _records(meta, split="test"):
    return [r for recs in meta[split].values() for r in recs]


def _check_paths(meta, root: Path) -> None:
    """Every path is relative, POSIX and exists under ``root``."""
    validate_meta(meta, root=root)
    for rec in _records(meta) + _records(meta, "train"):
        assert not Path(rec["img_path"]).is_absolute() and "\\" not in rec["img_path"]


# ---- MVTec / MPDD -------------------------------------------------------------------------------

def test_mvtec_pairs_masks_by_name_not_by_sorted_index(mvtec_root: Path) -> None:
    meta = get_dataset("mvtec").convert(mvtec_root)
    anomalous = [r for r in meta["test"]["bottle"] if r["anomaly"]]
    assert len(anomalous) == 4
    for rec in anomalous:
        stem = Path(rec["img_path"]).stem
        assert rec["mask_path"] == f"bottle/ground_truth/{rec['specie_name']}/{stem}_mask.png"
        # the mask content encodes its image: n + 1 pixels for image n
        assert read_mask(mvtec_root / rec["mask_path"]).sum() == int(stem) + 1


def test_mvtec_counts_species_and_ignored_root_files(mvtec_root: Path) -> None:
    meta = get_dataset("mvtec").convert(mvtec_root)
    _check_paths(meta, mvtec_root)
    assert count(meta, "test") == {"bottle": (2, 4), "grid": (1, 1)}
    assert count(meta, "train") == {"bottle": (3, 0), "grid": (2, 0)}
    normal = next(r for r in meta["test"]["grid"] if "/good/" in r["img_path"])
    assert (normal["specie_name"], normal["mask_path"], normal["anomaly"]) == ("good", "", 0)
    assert {r["specie_name"] for r in meta["test"]["bottle"]} == {"good", "broken_large", "contamination"}


def test_mvtec_missing_mask_names_the_image(mvtec_root: Path) -> None:
    (mvtec_root / "bottle/ground_truth/broken_large/10_mask.png").unlink()
    with pytest.raises(DataError, match=r"broken_large/10\.png.*without a mask"):
        get_dataset("mvtec").convert(mvtec_root)


def test_mvtec_anomalous_image_in_train_is_refused(mvtec_root: Path, layouts) -> None:
    layouts.write_image(mvtec_root / "bottle/train/broken_large/000.png")
    with pytest.raises(DataError, match="train/broken_large"):
        get_dataset("mvtec").convert(mvtec_root)


def test_unknown_folders_and_non_images_are_reported(mvtec_root: Path, caplog) -> None:
    (mvtec_root / "not_a_class" / "test").mkdir(parents=True)
    (mvtec_root / "bottle/test/good/notes.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="siad.data"):
        meta = get_dataset("mvtec").convert(mvtec_root)
    assert "not_a_class" not in meta["test"]
    assert "not_a_class" in caplog.text and "notes.txt" in caplog.text


def test_mpdd_layout(mpdd_root: Path) -> None:
    meta = get_dataset("mpdd").convert(mpdd_root)
    _check_paths(meta, mpdd_root)
    assert count(meta) == {"tubes": (2, 2)}
    assert meta["test"]["tubes"][0]["mask_path"] == "tubes/ground_truth/anomalous/0_mask.png"


# ---- DTD --------------------------------------------------------------------------------------

def test_dtd_nested_and_flat_copies_give_the_same_index(dtd_root: Path, tmp_path: Path) -> None:
    nested = get_dataset("dtd").convert(dtd_root)
    _check_paths(nested, dtd_root)
    prefix = "DTD-Synthetic/DTD-Synthetic/"
    assert all(r["img_path"].startswith(prefix) for r in _records(nested))
    assert count(nested) == {"Blotchy_099": (2, 3), "Woven_001": (1, 1)}
    flat = tmp_path / "flat"
    shutil.copytree(dtd_root / "DTD-Synthetic" / "DTD-Synthetic", flat)
    flat_meta = get_dataset("dtd").convert(flat)
    assert [r["img_path"] for r in _records(flat_meta)] == [r["img_path"][len(prefix):] for r in _records(nested)]
    assert {r["specie_name"] for r in _records(flat_meta) if r["anomaly"]} == {"bad"}


# ---- VisA -------------------------------------------------------------------------------------

def test_visa_follows_the_csv(visa_root: Path, layouts) -> None:
    meta = get_dataset("visa").convert(visa_root)
    _check_paths(meta, visa_root)
    assert count(meta, "train") == {"candle": (2, 0)}
    assert count(meta, "test") == {"candle": (2, 2), "pcb1": (1, 1)}
    rec = next(r for r in meta["test"]["pcb1"] if r["anomaly"])
    assert rec == {"img_path": "pcb1/Data/Images/Anomaly/000.JPG", "mask_path": "pcb1/Data/Masks/Anomaly/000.png",
                   "cls_name": "pcb1", "specie_name": "", "anomaly": 1}
    assert len(layouts.VISA_ROWS) == sum(len(_records(meta, s)) for s in ("train", "test"))


def test_visa_id_valued_masks_binarise(visa_root: Path) -> None:
    meta = get_dataset("visa").convert(visa_root)
    for rec in (r for r in _records(meta) if r["anomaly"]):
        raw = np.asarray(Image.open(visa_root / rec["mask_path"]))
        assert raw.max() in (1, 2)  # ids, not 255
        assert read_mask(visa_root / rec["mask_path"]).sum() == (raw > 0).sum() > 0


def test_visa_missing_csv_says_how_to_fix(visa_root: Path) -> None:
    (visa_root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DataError, match=r"1cls\.csv.*re-extract"):
        get_dataset("visa").convert(visa_root)


def test_visa_row_pointing_to_missing_file(visa_root: Path) -> None:
    (visa_root / "pcb1/Data/Images/Anomaly/000.JPG").unlink()
    with pytest.raises(DataError, match=r"1cls\.csv:9.*pcb1/Data/Images/Anomaly/000\.JPG"):
        get_dataset("visa").convert(visa_root)


# ---- SDD --------------------------------------------------------------------------------------

def _thirds_expected(layouts) -> tuple[int, int]:
    n_pieces = 9 * 3
    n_anom = len(layouts.KSDD_DEFECTS)
    return n_pieces - n_anom, n_anom


def test_sdd_thirds_cuts_labels_and_splits(ksdd_root: Path, layouts) -> None:
    meta = get_dataset("sdd").convert(ksdd_root)
    _check_paths(meta, ksdd_root)
    n_normal, n_anom = _thirds_expected(layouts)
    n_test_normal = math.ceil(0.25 * n_normal)
    assert count(meta, "test") == {"electrical_commutators": (n_test_normal, n_anom)}
    assert count(meta, "train") == {"electrical_commutators": (n_normal - n_test_normal, 0)}
    anomalous = sorted(Path(r["img_path"]).name for r in _records(meta) if r["anomaly"])
    assert anomalous == ["kos01_Part1_1.png", "kos02_Part2_2.png"]  # defect rows 12-15 -> third 1, 25-28 -> third 2
    rec = next(r for r in _records(meta) if r["anomaly"])
    assert rec["img_path"] == "SDD_anomaly_detection/SDD/test/defect/kos01_Part1_1.png"
    assert rec["mask_path"] == "SDD_anomaly_detection/SDD/ground_truth/defect/kos01_Part1_1_mask.png"
    mask = np.asarray(Image.open(ksdd_root / rec["mask_path"]))
    assert set(np.unique(mask)) == {0, 255} and mask[2:5, 2:5].all() and mask.sum() == 3 * 3 * 255


def test_sdd_thirds_match_the_source_rows(ksdd_root: Path, layouts) -> None:
    get_dataset("sdd").convert(ksdd_root)
    source = np.asarray(Image.open(ksdd_root / "KolektorSDD/kos03/Part0.jpg"))
    out = ksdd_root / "SDD_anomaly_detection/SDD"
    pieces = [next(out.rglob(f"kos03_Part0_{t}.png")) for t in range(3)]
    arrays = [np.asarray(Image.open(p)) for p in pieces]
    assert [a.shape[0] for a in arrays] == [10, 10, 11]  # h = 31: [:10], [10:20], [20:]
    assert np.array_equal(np.concatenate(arrays), source)
    assert layouts.KSDD_SIZE == (arrays[0].shape[1], source.shape[0])


def test_sdd_thirds_split_is_sorted_sklearn_and_repeatable(ksdd_root: Path) -> None:
    from sklearn.model_selection import train_test_split

    meta = get_dataset("sdd").convert(ksdd_root)
    normals = sorted(f"kos{k:02d}_Part{p}_{t}" for k in range(1, 4) for p in range(3) for t in range(3))
    normals = [n for n in normals if n not in ("kos01_Part1_1", "kos02_Part2_2")]
    _, expected_test = train_test_split(normals, test_size=0.25, random_state=42)
    got = sorted(Path(r["img_path"]).stem for r in _records(meta) if not r["anomaly"])
    assert got == sorted(expected_test)


def test_sdd_thirds_idempotent(ksdd_root: Path) -> None:
    first = get_dataset("sdd").convert(ksdd_root)
    out = ksdd_root / "SDD_anomaly_detection"
    files = sorted(p for p in out.rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in files]
    second = get_dataset("sdd").convert(ksdd_root)
    assert first == second
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    assert [p.stat().st_mtime_ns for p in files] == stamps  # reused, not rewritten
    assert not any(p.name.startswith(".SDD") for p in ksdd_root.iterdir())  # no temp folders left


def test_sdd_thirds_rebuilt_when_raw_data_change(ksdd_root: Path, layouts) -> None:
    get_dataset("sdd").convert(ksdd_root)
    stale = ksdd_root / "SDD_anomaly_detection/SDD/train/good/stale.png"
    layouts.write_image(stale)
    raw = ksdd_root / "KolektorSDD/kos03"
    layouts.write_image(raw / "Part7.jpg", "L", size=layouts.KSDD_SIZE)
    Image.fromarray(np.zeros(layouts.KSDD_SIZE[::-1], np.uint8)).save(raw / "Part7_label.bmp")
    meta = get_dataset("sdd").convert(ksdd_root)
    n_normal, n_anom = _thirds_expected(layouts)
    total = sum(sum(c) for c in count(meta, "train").values()) + sum(sum(c) for c in count(meta).values())
    assert total == n_normal + n_anom + 3 and not stale.exists()


def test_sdd_part_without_label_is_an_error(ksdd_root: Path) -> None:
    (ksdd_root / "KolektorSDD/kos02/Part0_label.bmp").unlink()
    with pytest.raises(DataError, match=r"kos02/Part0\.jpg.*Part0_label\.bmp"):
        get_dataset("sdd").convert(ksdd_root)


def test_sdd_drive_protocol_reads_a_prepared_folder(tmp_path: Path, layouts) -> None:
    root = tmp_path / "sdd_drive"
    layouts.mvtec_class(root / "SDD" / "electrical commutators", {"defect": [0, 1, 2]}, n_good=3)
    meta = get_dataset("sdd").convert(root, {"sdd_protocol": "anomalyclip_drive"})
    _check_paths(meta, root)
    assert count(meta) == {"electrical_commutators": (3, 3)}
    with pytest.raises(LayoutNotFound, match="1oqaxUZYi44jlLT4WtT6D5T6onPTNZXsu"):
        get_dataset("sdd").convert(tmp_path / "empty", {"sdd_protocol": "anomalyclip_drive"})


def test_sdd_thirds_uses_a_prepared_folder_without_raw_data(ksdd_root: Path) -> None:
    first = get_dataset("sdd").convert(ksdd_root)
    shutil.rmtree(ksdd_root / "KolektorSDD")
    assert get_dataset("sdd").convert(ksdd_root) == first
    assert sdd.find_raw(ksdd_root) is None


# ---- BTAD -------------------------------------------------------------------------------------

def test_btad_pairs_masks_by_stem_across_extensions(btad_root: Path) -> None:
    meta = get_dataset("btad").convert(btad_root)
    _check_paths(meta, btad_root)
    assert count(meta) == {"01": (1, 2), "02": (1, 2), "03": (1, 2)}
    by_class = {c: next(r for r in recs if r["anomaly"]) for c, recs in meta["test"].items()}
    base = "BTech_Dataset_transformed"
    assert by_class["01"]["img_path"] == f"{base}/01/test/ko/0.bmp"
    assert by_class["01"]["mask_path"] == f"{base}/01/ground_truth/ko/0.png"
    assert by_class["03"]["mask_path"] == f"{base}/03/ground_truth/ko/0.bmp"
    normal = next(r for r in meta["test"]["02"] if not r["anomaly"])
    assert normal["specie_name"] == "ok" and normal["mask_path"] == ""


# ---- medical ----------------------------------------------------------------------------------

def test_brainmri_prefers_nested_copy_and_keeps_odd_names(brainmri_root: Path, layouts) -> None:
    meta = get_dataset("brainmri").convert(brainmri_root)
    _check_paths(meta, brainmri_root)
    assert meta["train"] == {}
    assert count(meta) == {"brain": (len(layouts.BRAIN_NO), len(layouts.BRAIN_YES))}
    paths = {r["img_path"] for r in _records(meta)}
    assert "brain_tumor_dataset/no/1 no.jpeg" in paths and "brain_tumor_dataset/yes/Y 2.JPG" in paths
    assert all(p.startswith("brain_tumor_dataset/") for p in paths)
    assert all(r["mask_path"] == "" for r in _records(meta))


def test_brainmri_reports_files_only_in_the_duplicate_copy(brainmri_root: Path, caplog, layouts) -> None:
    layouts.write_image(brainmri_root / "yes" / "extra.jpg")
    with caplog.at_level(logging.WARNING, logger="siad.data"):
        meta = get_dataset("brainmri").convert(brainmri_root)
    assert count(meta) == {"brain": (len(layouts.BRAIN_NO), len(layouts.BRAIN_YES))}
    assert "1 images absent" in caplog.text


def test_brainmri_flat_copy_only(brainmri_root: Path) -> None:
    shutil.rmtree(brainmri_root / "brain_tumor_dataset")
    meta = get_dataset("brainmri").convert(brainmri_root)
    assert count(meta) == {"brain": (2, 2)}


def test_headct_csv_with_leading_space_header(headct_root: Path, layouts) -> None:
    meta = get_dataset("headct").convert(headct_root)
    _check_paths(meta, headct_root)
    n_anom = sum(layouts.HEADCT_LABELS.values())
    assert count(meta) == {"head": (len(layouts.HEADCT_LABELS) - n_anom, n_anom)}
    labels = {int(Path(r["img_path"]).stem): r["anomaly"] for r in _records(meta)}
    assert labels == layouts.HEADCT_LABELS
    assert meta["test"]["head"][0]["img_path"] == "head_ct/head_ct/000.png"


def test_headct_single_level_folder(headct_root: Path) -> None:
    nested = headct_root / "head_ct" / "head_ct"
    for p in nested.iterdir():
        p.rename(headct_root / "head_ct" / p.name)
    nested.rmdir()
    meta = get_dataset("headct").convert(headct_root)
    assert meta["test"]["head"][0]["img_path"] == "head_ct/000.png"


def test_headct_bad_label_names_the_line(headct_root: Path) -> None:
    csv_path = headct_root / "labels.csv"
    csv_path.write_text(csv_path.read_text().replace("5,0", "5,2"))
    with pytest.raises(DataError, match=r"labels\.csv:7"):
        get_dataset("headct").convert(headct_root)


def test_br35h_ignores_pred_and_meta_json(br35h_root: Path) -> None:
    meta = get_dataset("br35h").convert(br35h_root)
    _check_paths(meta, br35h_root)
    assert count(meta) == {"brain": (4, 3)}
    assert not any("pred" in r["img_path"] for r in _records(meta))
    assert {r["specie_name"]: r["anomaly"] for r in _records(meta)} == {"no": 0, "yes": 1}


@pytest.mark.parametrize("name,fixture", [("headct", "headct_root"), ("br35h", "br35h_root"),
                                          ("brainmri", "brainmri_root")])
def test_medical_dra_split(name: str, fixture: str, request) -> None:
    root = request.getfixturevalue(fixture)
    all_test = get_dataset(name).convert(root)
    dra = get_dataset(name).convert(root, {"medical_protocol": "dra_75_25"})
    assert dra == get_dataset(name).convert(root, {"medical_protocol": "dra_75_25"})
    (n, a), = count(all_test).values()
    (n_test, a_test), = count(dra).values()
    (n_train, a_train), = count(dra, "train").values()
    assert (n_test, a_test, n_train, a_train) == (math.ceil(0.25 * n), a, n - math.ceil(0.25 * n), 0)
    test_paths = {r["img_path"] for r in _records(dra)}
    assert test_paths.isdisjoint(r["img_path"] for r in _records(dra, "train"))


# ---- all converters ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", DATASETS.names())
def test_empty_root_is_layout_not_found(name: str, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(LayoutNotFound, match=str(root)):
            get_dataset(name).convert(root)


@pytest.mark.parametrize("name", DATASETS.names())
def test_conversion_is_deterministic(name: str, request) -> None:
    root = request.getfixturevalue("ksdd_root" if name == "sdd" else f"{name}_root")
    first = get_dataset(name).convert(root)
    assert first == get_dataset(name).convert(root)
    for split in ("train", "test"):
        assert list(first[split]) == sorted(first[split])
        for recs in first[split].values():
            assert [r["img_path"] for r in recs] == sorted(r["img_path"] for r in recs)
