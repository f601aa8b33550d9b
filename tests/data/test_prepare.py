"""prepare_dataset: convert, validate, check counts, write meta.json + dataset.json; missing data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from siad.data import download
from siad.data.prepare import prepare_dataset
from siad.data.records import load_meta
from siad.errors import DataError, ManualDownloadRequired, UnknownNameError


def test_prepare_writes_meta_and_dataset_info(btad_root: Path, tmp_path: Path) -> None:
    meta_out = tmp_path / "index" / "btad" / "meta.json"
    meta = prepare_dataset("btad", btad_root, meta_out, verify_counts=False)
    assert load_meta(meta_out, root=btad_root) == meta
    info = json.loads((meta_out.parent / "dataset.json").read_text())
    assert info["name"] == "btad" and info["root"] == str(btad_root.resolve()) and Path(info["root"]).is_absolute()
    assert info["options"] == {} and info["protocol"] == "default"
    assert info["counts"]["test"] == {"01": [1, 2], "02": [1, 2], "03": [1, 2]}
    assert info["counts"]["train"] == {"01": [2, 0], "02": [2, 0], "03": [2, 0]}


def test_prepare_records_the_options(headct_root: Path, tmp_path: Path) -> None:
    meta_out = tmp_path / "meta.json"
    prepare_dataset("headct", headct_root, meta_out, options={"medical_protocol": "dra_75_25"}, verify_counts=False)
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info["options"] == {"medical_protocol": "dra_75_25"}
    assert info["counts"]["train"] == {"head": [3, 0]} and info["counts"]["test"] == {"head": [1, 4]}


def test_prepare_checks_published_counts(btad_root: Path, tmp_path: Path) -> None:
    meta_out = tmp_path / "meta.json"
    with pytest.raises(DataError, match=r"01: expected \(21, 49\), found \(1, 2\).*03: expected"):
        prepare_dataset("btad", btad_root, meta_out)
    assert not meta_out.exists()  # nothing written for a failed check


def test_prepare_refuses_an_index_with_a_missing_file(visa_root: Path, tmp_path: Path, monkeypatch) -> None:
    from siad.data.registry import get_dataset

    spec = get_dataset("visa")
    real = spec.convert(visa_root)
    real["test"]["candle"][0]["img_path"] = "candle/Data/Images/Normal/ghost.JPG"
    monkeypatch.setattr(type(spec), "convert", lambda self, root, options=None: real)
    with pytest.raises(DataError, match="ghost.JPG"):
        prepare_dataset("visa", visa_root, tmp_path / "meta.json", verify_counts=False)


@pytest.mark.parametrize("name,error,needles", [
    ("mpdd", ManualDownloadRequired, ["sharepoint.com", "MPDD.zip", "archives"]),
    ("dtd", ManualDownloadRequired, ["drive.google.com", "DTD-Synthetic.zip"]),
    ("headct", ManualDownloadRequired, ["felipekitamura/head-ct-hemorrhage", "kaggle.json"]),
    ("mvtec", DataError, ["mydrive.ch", "cf4313b1", "download enabled"]),
])
def test_missing_data_says_where_and_how(name: str, error: type, needles: list[str], tmp_path: Path) -> None:
    root = tmp_path / "data" / name
    with pytest.raises(error) as err:
        prepare_dataset(name, root, tmp_path / "meta.json")
    message = str(err.value)
    assert str(root) in message
    for needle in needles:
        assert needle in message


def test_download_calls_acquire(btad_root: Path, tmp_path: Path, monkeypatch) -> None:
    calls = []

    def acquire(spec, data_root: Path, archive_dir: Path | None = None, *, check=None) -> Path:
        calls.append((spec.name, data_root, archive_dir))
        shutil.copytree(btad_root, data_root)
        check(data_root)
        return data_root

    monkeypatch.setattr(download, "acquire", acquire)
    root, archives = tmp_path / "fresh" / "btad", tmp_path / "archives"
    meta = prepare_dataset("btad", root, tmp_path / "meta.json", download=True, archive_dir=archives,
                           verify_counts=False)
    assert calls == [("btad", root, archives)]
    assert sum(len(v) for v in meta["test"].values()) == 9


def test_present_data_is_not_downloaded(btad_root: Path, tmp_path: Path, monkeypatch) -> None:
    def acquire(*args, **kwargs):
        raise AssertionError("acquire must not run when the layout is present")

    monkeypatch.setattr(download, "acquire", acquire)
    prepare_dataset("btad", btad_root, tmp_path / "meta.json", download=True, verify_counts=False)


def test_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="kolektor"):
        prepare_dataset("kolektor", tmp_path, tmp_path / "meta.json")


def test_an_edited_mask_changes_the_index_content(tmp_path):
    import numpy as np
    from PIL import Image

    from siad.data.synthetic import write_standin

    root = tmp_path / "mvtec"
    write_standin("mvtec", root, seed=0, classes=["bottle"], size=32)
    before = prepare_dataset("mvtec", root, tmp_path / "a.json", verify_counts=False, classes=["bottle"])
    record = next(r for r in before["test"]["bottle"] if r["mask_path"])
    assert len(record["mask_sha256"]) == 64
    mask = np.array(Image.open(root / record["mask_path"]))
    mask[0, 0] = 255 - mask[0, 0]
    Image.fromarray(mask).save(root / record["mask_path"])
    after = prepare_dataset("mvtec", root, tmp_path / "b.json", verify_counts=False, classes=["bottle"])
    edited = next(r for r in after["test"]["bottle"] if r["img_path"] == record["img_path"])
    assert edited["mask_sha256"] != record["mask_sha256"] and edited["sha256"] == record["sha256"]
    assert (tmp_path / "a.json").read_bytes() != (tmp_path / "b.json").read_bytes()
