"""Inputs that cannot silently mislead (issue 8, section 3): paths, unreadable files, masks, empty classes,
class restriction, user-given roots, the count-check message, booleans and image modes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from siad.data import download, prepare
from siad.data.flags import command_line_override, parse_bool
from siad.data.imageio import ImageFileError, read_image, read_mask, to_rgb
from siad.data.loading import AnomalyDataset
from siad.data.prepare import prepare_dataset
from siad.data.records import iter_records, load_meta, save_meta, validate_meta
from siad.data.registry import get_dataset
from siad.errors import ConfigError, DataError, ManualDownloadRequired, UnknownNameError


def _no_acquire(*args, **kwargs):
    raise AssertionError("nothing may be downloaded here")


# ---- 1. meta.json paths stay inside the dataset root ----------------------------------------------

@pytest.mark.parametrize("bad", ["../visa/candle/Data/Images/Normal/0002.JPG", "/etc/passwd",
                                 "bottle/../../visa/x.png", "..\\visa\\x.png", "C:/data/x.png"])
@pytest.mark.parametrize("key", ["img_path", "mask_path"])
def test_meta_paths_must_stay_inside_the_root(mvtec_root: Path, tmp_path: Path, bad: str, key: str) -> None:
    meta = get_dataset("mvtec").convert(mvtec_root)
    record = next(r for r in meta["test"]["bottle"] if r["anomaly"])
    record[key] = bad
    path = tmp_path / "meta.json"
    save_meta(meta, path)
    for root in (None, mvtec_root):  # refused with or without the root
        with pytest.raises(DataError) as caught:
            load_meta(path, root)
        message = str(caught.value)
        assert str(path) in message and "test/bottle" in message and repr(record["img_path"]) in message
        assert repr(bad) in message and "--forcerun prepare_dataset" in message
        assert "relative to the dataset root" in message


def test_meta_path_escaping_through_a_symlink(mvtec_root: Path, tmp_path: Path, layouts) -> None:
    outside = layouts.write_image(tmp_path / "elsewhere" / "stolen.png", seed=7)
    (mvtec_root / "bottle" / "test" / "good" / "link.png").symlink_to(outside)
    meta = get_dataset("mvtec").convert(mvtec_root)
    assert any(r["img_path"].endswith("link.png") for r in meta["test"]["bottle"])
    path = tmp_path / "meta.json"
    save_meta(meta, path)
    load_meta(path)  # without the root only the text of the paths can be checked
    with pytest.raises(DataError, match=rf"{path}.*link\.png.*symbolic link"):
        load_meta(path, mvtec_root)
    with pytest.raises(DataError, match="symbolic link"):
        prepare_dataset("mvtec", mvtec_root, tmp_path / "out" / "meta.json", verify_counts=False)


def test_a_symlinked_dataset_root_is_fine(mvtec_root: Path, tmp_path: Path) -> None:
    link = tmp_path / "linked_mvtec"
    link.symlink_to(mvtec_root)
    prepare_dataset("mvtec", link, tmp_path / "meta.json", verify_counts=False)
    load_meta(tmp_path / "meta.json", link)


# ---- 2. every image decoded once; all unusable files in one error --------------------------------

def test_every_unusable_file_is_listed_with_a_working_fix(mvtec_root: Path, tmp_path: Path, layouts) -> None:
    (mvtec_root / "bottle/test/good/000.png").write_bytes(b"not a png")
    good = (mvtec_root / "grid/train/good/001.png").read_bytes()
    (mvtec_root / "grid/train/good/001.png").write_bytes(good[:-40])  # truncated
    (mvtec_root / "bottle/ground_truth/broken_large/2_mask.png").write_bytes(b"junk")
    layouts.write_mask(mvtec_root / "bottle/ground_truth/contamination/0_mask.png", 3, size=(8, 16))
    meta_out = tmp_path / "meta.json"
    with pytest.raises(DataError) as caught:
        prepare_dataset("mvtec", mvtec_root, meta_out, verify_counts=False)
    message = str(caught.value)
    for name in ("bottle/test/good/000.png", "grid/train/good/001.png", "bottle/ground_truth/broken_large/2_mask.png",
                 "bottle/ground_truth/contamination/0_mask.png"):
        assert name in message
    assert "4 file(s)" in message and "mask size (16, 8)" in message
    assert "delete it" in message and "data.verify_counts: false" in message
    assert "--forcerun prepare_dataset" in message
    assert not meta_out.exists()


@pytest.mark.parametrize("name,broken,listing", [("headct", "head_ct/head_ct/005.png", "labels.csv"),
                                                 ("visa", "pcb1/Data/Images/Normal/0000.JPG", "split_csv/1cls.csv")])
def test_the_fix_names_the_listing_file_where_there_is_one(name: str, broken: str, listing: str, tmp_path: Path,
                                                          request) -> None:
    root = request.getfixturevalue(f"{name}_root")
    (root / broken).write_bytes(b"broken")
    with pytest.raises(DataError, match=rf"(?s){re.escape(broken)}: unreadable.*its row in {re.escape(listing)}"):
        prepare_dataset(name, root, tmp_path / "meta.json", verify_counts=False)


def test_each_file_is_read_and_decoded_once(mvtec_root: Path, tmp_path: Path, monkeypatch) -> None:
    opened: list[Path] = []
    real = prepare.open_checked

    def counting(path, data=None):
        opened.append(Path(path))
        return real(path, data)

    monkeypatch.setattr(prepare, "open_checked", counting)
    meta = prepare_dataset("mvtec", mvtec_root, tmp_path / "meta.json", verify_counts=False)
    files = [mvtec_root / r[k] for r in iter_records(meta) for k in ("img_path", "mask_path") if r[k]]
    assert sorted(opened) == sorted(files)


def test_decoding_with_threads_gives_the_same_index(mvtec_root: Path, tmp_path: Path) -> None:
    one = prepare_dataset("mvtec", mvtec_root, tmp_path / "a" / "meta.json", verify_counts=False)
    four = prepare_dataset("mvtec", mvtec_root, tmp_path / "b" / "meta.json", verify_counts=False, workers=4)
    assert one == four


# ---- 3. anomalous images without masks in a dataset with masks -----------------------------------

def test_anomaly_without_mask_is_an_error_in_prepare(mvtec_root: Path, tmp_path: Path, monkeypatch) -> None:
    spec = get_dataset("mvtec")
    meta = spec.convert(mvtec_root)
    dropped = [r for r in meta["test"]["bottle"] if r["anomaly"]][:2]
    for rec in dropped:
        rec["mask_path"] = ""
    monkeypatch.setattr(type(spec), "convert", lambda self, root, options=None: meta)
    with pytest.raises(DataError) as caught:
        prepare_dataset("mvtec", mvtec_root, tmp_path / "meta.json", verify_counts=False)
    message = str(caught.value)
    assert "2 anomalous image(s)" in message and all(r["img_path"] in message for r in dropped)


def test_anomaly_without_mask_is_an_error_when_loading(mvtec_root: Path) -> None:
    meta = get_dataset("mvtec").convert(mvtec_root)
    rec = next(r for r in meta["test"]["grid"] if r["anomaly"])
    rec["mask_path"] = ""
    with pytest.raises(DataError, match=rf"'mvtec'.*{rec['img_path']}"):  # the registry says MVTec has masks
        AnomalyDataset(mvtec_root, meta, classes=["grid"], name="mvtec")
    with pytest.raises(DataError, match=rec["img_path"]):  # other classes have masks: inferred
        AnomalyDataset(mvtec_root, meta)
    for other in meta["test"]["bottle"]:
        other["mask_path"] = ""
    AnomalyDataset(mvtec_root, meta)  # no masks at all and no registry name: a classification set


# ---- 4. classes with an empty test split --------------------------------------------------------

def test_class_with_empty_test_split_is_an_error_in_prepare(mvtec_root: Path, tmp_path: Path) -> None:
    for image in (mvtec_root / "grid" / "test").rglob("*.png"):
        image.unlink()
    assert "grid" not in get_dataset("mvtec").convert(mvtec_root)["test"] or \
        get_dataset("mvtec").convert(mvtec_root)["test"]["grid"] == []
    with pytest.raises(DataError, match=r"MVTecAD \(mvtec\).*class\(es\) grid have no test images"):
        prepare_dataset("mvtec", mvtec_root, tmp_path / "meta.json", verify_counts=False)


def test_requested_class_absent_from_the_layout(mvtec_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"mvtec.*class\(es\) cable have no test images"):
        prepare_dataset("mvtec", mvtec_root, tmp_path / "meta.json", verify_counts=False, classes=["bottle", "cable"])
    with pytest.raises(UnknownNameError, match="'bottel'"):
        prepare_dataset("mvtec", mvtec_root, tmp_path / "meta.json", verify_counts=False, classes=["bottel"])


def test_class_missing_from_the_index_is_an_error_when_loading(mvtec_root: Path) -> None:
    meta = get_dataset("mvtec").convert(mvtec_root)
    del meta["test"]["grid"]
    with pytest.raises(DataError, match=r"class 'grid' of dataset 'mvtec'.*no test images"):
        AnomalyDataset(mvtec_root, meta, classes=["bottle", "grid"], name="mvtec")


# ---- 5. datasets.<name>.classes narrows the count check ------------------------------------------

@pytest.fixture
def bottle_only_root(tmp_path: Path, layouts) -> Path:
    """MVTec with only ``bottle``, at its published test counts (20 normal, 63 anomalous)."""
    root = tmp_path / "mvtec_bottle"
    layouts.mvtec_class(root / "bottle", {"broken_large": list(range(63))}, n_train=2, n_good=20)
    return root


def test_count_check_is_restricted_to_the_chosen_classes(bottle_only_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="class cable missing"):
        prepare_dataset("mvtec", bottle_only_root, tmp_path / "all" / "meta.json")
    meta = prepare_dataset("mvtec", bottle_only_root, tmp_path / "meta.json", classes=["bottle"])
    assert list(meta["test"]) == ["bottle"]
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info["classes"] == ["bottle"] and info["counts"]["test"] == {"bottle": [20, 63]}


def test_restricted_classes_keep_only_those_classes(mvtec_root: Path, tmp_path: Path) -> None:
    meta = prepare_dataset("mvtec", mvtec_root, tmp_path / "meta.json", verify_counts=False, classes=["grid"])
    assert list(meta["test"]) == ["grid"] and list(meta["train"]) == ["grid"]
    with pytest.raises(DataError, match=r"grid: expected \(21, 57\), found \(1, 1\)"):
        prepare_dataset("mvtec", mvtec_root, tmp_path / "meta.json", classes=["grid"])


# ---- 6. a user-given root in the wrong layout is not "downloaded over" ---------------------------

def test_existing_root_in_another_layout_shows_the_converter_message(tmp_path: Path, monkeypatch, layouts) -> None:
    monkeypatch.setattr(download, "acquire", _no_acquire)
    root = tmp_path / "my_copy_of_mvtec"
    layouts.write_image(root / "some" / "other" / "layout.png")
    with pytest.raises(DataError) as caught:
        prepare_dataset("mvtec", root, tmp_path / "meta.json", download=True)
    message = str(caught.value)
    assert "MVTec AD class folders" in message and "exists but does not hold" in message
    assert "datasets.mvtec.root" in message and "could not download" not in message


def test_a_protocol_the_sources_cannot_provide_is_not_downloaded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(download, "acquire", _no_acquire)
    with pytest.raises(ManualDownloadRequired) as caught:
        prepare_dataset("sdd", tmp_path / "sdd", tmp_path / "meta.json", download=True,
                        options={"sdd_protocol": "anomalyclip_drive"})
    message = str(caught.value)
    assert "drive.google.com" in message and "anomalyclip_drive" in message and "KolektorSDD.zip" not in message


# ---- 7. the count check names the config key; booleans from the command line ---------------------

def test_count_message_names_the_config_key(btad_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        prepare_dataset("btad", btad_root, tmp_path / "meta.json")
    assert "data.verify_counts: false" in str(caught.value) and "verify_counts=False" not in str(caught.value)


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), ("false", False), ("False", False),
                                            ("TRUE", True), (" yes ", True), ("no", False), ("off", False),
                                            ("on", True), ("1", True), ("0", False), (1, True), (0, False)])
def test_parse_bool(value: object, expected: bool) -> None:
    assert parse_bool(value, "data.verify_counts") is expected


@pytest.mark.parametrize("value", ["flase", "", None, 2, 0.5, [], "maybe"])
def test_parse_bool_refuses_other_values(value: object) -> None:
    with pytest.raises(ConfigError, match=r"data\.verify_counts.*--config data='\{verify_counts: false\}'"):
        parse_bool(value, "data.verify_counts")


def test_command_line_override() -> None:
    assert command_line_override("seed", "1") == "--config seed=1"
    assert command_line_override("a.b.c", "false") == "--config a='{b: {c: false}}'"


# ---- 8. EXIF orientation, deep and float images --------------------------------------------------

def _oriented_jpeg(path: Path, orientation: int, size: tuple[int, int] = (20, 12)) -> Image.Image:
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:4, :6] = 255  # a bright top-left corner shows where the image went
    image = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, quality=100)
    return image


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    path = tmp_path / "phone.jpg"
    _oriented_jpeg(path, orientation)
    image = read_image(path)
    expected = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert image.size == expected.size and np.array_equal(np.asarray(image), np.asarray(expected))
    assert image.size == ((12, 20) if orientation in (6, 8) else (20, 12))


def test_exif_orientation_applies_to_masks(tmp_path: Path) -> None:
    path = tmp_path / "mask.jpg"
    _oriented_jpeg(path, 6)
    assert read_mask(path, (20, 12)).shape == (20, 12)


def test_integer_images_scale_by_the_16_bit_range_whatever_their_content(tmp_path: Path) -> None:
    small = Image.fromarray(np.array([[0, 255], [128, 257]], dtype=np.int32))  # mode I, all values <= 257
    assert small.mode == "I"
    assert np.asarray(to_rgb(small, tmp_path / "x.tif"))[..., 0].tolist() == [[0, 1], [0, 1]]
    with pytest.raises(ImageFileError, match=r"x\.tif.*outside the 16-bit range"):
        to_rgb(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)), tmp_path / "x.tif")
    with pytest.raises(ImageFileError, match=r"x\.tif.*outside the 16-bit range"):
        to_rgb(Image.fromarray(np.array([[-5, 7]], dtype=np.int32)), tmp_path / "x.tif")


def test_float_images_are_refused_and_float_masks_binarise(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)).save(path)
    assert Image.open(path).mode == "F"
    with pytest.raises(DataError, match=rf"{path}.*float.*convert it to an 8- or 16-bit PNG"):
        read_image(path)
    assert read_mask(path).tolist() == [[False, True], [True, True]]


def test_prepare_lists_an_unsupported_image_mode(mvtec_root: Path, tmp_path: Path) -> None:
    target = mvtec_root / "bottle/train/good/000.tif"
    (mvtec_root / "bottle/train/good/000.png").unlink()
    Image.fromarray(np.zeros((16, 16), dtype=np.float32)).save(target)
    with pytest.raises(DataError, match=r"(?s)1 file\(s\).*bottle/train/good/000\.tif: 32-bit float image"):
        prepare_dataset("mvtec", mvtec_root, tmp_path / "meta.json", verify_counts=False)


def test_a_link_that_stays_inside_the_root_is_fine(mvtec_root: Path) -> None:
    meta = get_dataset("mvtec").convert(mvtec_root)
    os.symlink("good", mvtec_root / "bottle" / "test" / "alias")
    rec = dict(meta["test"]["bottle"][0])
    rec["img_path"] = rec["img_path"].replace("/good/", "/alias/")
    meta["test"]["bottle"].append(rec)
    validate_meta(meta, root=mvtec_root)


def test_visa_class_without_test_rows_is_reported(visa_root: Path, tmp_path: Path) -> None:
    csv_path = visa_root / "split_csv" / "1cls.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(line for line in lines if not line.startswith("candle,test")) + "\n")
    assert get_dataset("visa").convert(visa_root)["test"]["candle"] == []
    with pytest.raises(DataError, match=r"VisA \(visa\).*class\(es\) candle have no test images"):
        prepare_dataset("visa", visa_root, tmp_path / "meta.json", verify_counts=False)
