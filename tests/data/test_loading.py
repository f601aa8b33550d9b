"""Image / mask reading and the AnomalyDataset items."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siad.data.loading import AnomalyDataset, read_image, read_mask, resize_mask
from siad.data.registry import get_dataset
from siad.errors import DataError, UnknownNameError


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "RGB"])
def test_read_image_is_always_rgb(mode: str, tmp_path: Path, layouts) -> None:
    path = layouts.write_image(tmp_path / f"x_{mode}.png", mode, seed=3)
    image = read_image(path)
    assert image.mode == "RGB" and image.size == (16, 16)
    if mode == "RGBA":  # alpha dropped, colour kept
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(path))[..., :3])
    if mode == "L":
        arr = np.asarray(image)
        assert np.array_equal(arr[..., 0], np.asarray(Image.open(path))) and np.array_equal(arr[..., 0], arr[..., 2])


def test_read_image_sixteen_bit(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100], [65535, 257 * 7]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    arr = np.asarray(read_image(path))
    assert arr.shape == (2, 2, 3) and arr[..., 1].tolist() == [[0, 100], [255, 7]]


def test_corrupt_image_names_the_file_and_the_fix(tmp_path: Path, layouts) -> None:
    garbage = tmp_path / "bad.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=rf"{garbage}.*re-download"):
        read_image(garbage)
    good = layouts.write_image(tmp_path / "cut.png", seed=1)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(DataError, match=str(truncated)):
        read_image(truncated)
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "absent.png")


def test_read_mask_binarises_ids_and_checks_size(tmp_path: Path, layouts) -> None:
    path = layouts.write_mask(tmp_path / "ids.png", 10, value=2)
    mask = read_mask(path, (16, 16))
    assert mask.dtype == bool and mask.shape == (16, 16) and mask.sum() == 10
    rgb = tmp_path / "rgb.png"
    arr = np.zeros((4, 6, 3), np.uint8)
    arr[1, 2, 2] = 1
    Image.fromarray(arr).save(rgb)
    assert read_mask(rgb).sum() == 1 and read_mask(rgb).shape == (4, 6)
    la = tmp_path / "la.png"
    Image.fromarray(np.stack([np.eye(4, dtype=np.uint8), np.full((4, 4), 255, np.uint8)], -1), "LA").save(la)
    assert read_mask(la).sum() == 4  # the opaque alpha channel is not a label
    with pytest.raises(DataError, match=rf"{rgb}.*differs"):
        read_mask(rgb, (6, 4))  # (height, width) swapped


def test_resize_mask_nearest_stays_binary() -> None:
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    big = resize_mask(mask, (8, 6))
    assert big.shape == (8, 6) and big.dtype == bool
    assert big[:4, :3].all() and not big[4:, :].any() and not big[:, 3:].any()


def test_dataset_items(mvtec_root: Path) -> None:
    meta = get_dataset("mvtec").convert(mvtec_root)
    data = AnomalyDataset(mvtec_root, meta, classes=["bottle"], mask_size=(32, 24))
    assert len(data) == 6
    items = [data[i] for i in range(len(data))]
    assert {tuple(sorted(i)) for i in items} == {("cls_name", "has_mask", "image", "img_path", "label", "mask")}
    for item in items:
        assert isinstance(item["image"], Image.Image) and item["image"].size == (16, 16)  # image not resized
        assert item["mask"].dtype == torch.bool and item["mask"].shape == (32, 24)
        assert item["has_mask"] is True and item["cls_name"] == "bottle"
        assert item["mask"].any().item() == bool(item["label"])
    native = AnomalyDataset(mvtec_root, meta, classes=["bottle"])
    anomalous = next(native[i] for i in range(len(native)) if native[i]["label"])
    stem = int(Path(anomalous["img_path"]).stem)
    assert anomalous["mask"].shape == (16, 16) and anomalous["mask"].sum().item() == stem + 1


def test_dataset_transform_and_batching(mvtec_root: Path) -> None:
    meta = get_dataset("mvtec").convert(mvtec_root)

    def to_tensor(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(image.resize((4, 4)))).permute(2, 0, 1).float()

    data = AnomalyDataset(mvtec_root, meta, transform=to_tensor, mask_size=(4, 4))
    assert [r["cls_name"] for r in data.records][:1] == ["bottle"] and len(data) == 8
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=8)))
    assert batch["image"].shape == (8, 3, 4, 4) and batch["mask"].shape == (8, 4, 4)
    assert batch["label"].tolist() == [r["anomaly"] for r in data.records]


def test_dataset_without_masks(br35h_root: Path) -> None:
    meta = get_dataset("br35h").convert(br35h_root)
    data = AnomalyDataset(br35h_root, meta)
    item = next(data[i] for i in range(len(data)) if data[i]["label"] == 1)
    assert item["has_mask"] is False and not item["mask"].any() and item["mask"].shape == (16, 16)


def test_dataset_bad_selection(br35h_root: Path, mvtec_root: Path) -> None:
    meta = get_dataset("br35h").convert(br35h_root)
    with pytest.raises(DataError, match=rf"{br35h_root}.*'train' split.*empty"):
        AnomalyDataset(br35h_root, meta, split="train")
    with pytest.raises(UnknownNameError, match="'skull'.*'br35h'.*known: brain"):
        AnomalyDataset(br35h_root, meta, classes=["skull"], name="br35h")
    with pytest.raises(DataError, match=rf"'skull' of the dataset at {br35h_root} has no test images.*: brain"):
        AnomalyDataset(br35h_root, meta, classes=["skull"])  # no name: cannot tell a typo from an empty class
    with pytest.raises(UnknownNameError, match="split"):
        AnomalyDataset(br35h_root, meta, split="val")
    meta["test"]["brain"] = []
    with pytest.raises(DataError, match="'brain' of dataset 'br35h'.*no test images"):
        AnomalyDataset(br35h_root, meta, classes=["brain"], name="br35h")


def test_mask_of_wrong_size_is_reported_on_access(mvtec_root: Path, layouts) -> None:
    meta = get_dataset("mvtec").convert(mvtec_root)
    data = AnomalyDataset(mvtec_root, meta, classes=["grid"])
    index = next(i for i, r in enumerate(data.records) if r["anomaly"])
    layouts.write_mask(mvtec_root / data.records[index]["mask_path"], 3, size=(12, 16))
    with pytest.raises(DataError, match=data.records[index]["mask_path"]):
        data[index]


def test_an_image_or_mask_changed_after_preparation_is_refused(tmp_path):
    import os
    import shutil

    from siad.data.loading import AnomalyDataset
    from siad.data.prepare import prepare_dataset
    from siad.data.synthetic import write_standin
    from siad.errors import DataError

    root = tmp_path / "mvtec"
    write_standin("mvtec", root, seed=0, classes=["bottle"], size=32)
    meta = prepare_dataset("mvtec", root, tmp_path / "meta.json", verify_counts=False, classes=["bottle"])
    dataset = AnomalyDataset(root, meta, split="test", name="mvtec")
    records = dataset.records
    with_mask = next(i for i, r in enumerate(records) if r["mask_path"])
    other = next(i for i, r in enumerate(records) if i != with_mask)
    dataset[with_mask]  # unchanged: loads
    stat = (root / records[other]["img_path"]).stat()
    shutil.copyfile(root / records[with_mask]["img_path"], root / records[other]["img_path"])
    os.utime(root / records[other]["img_path"], ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime, new bytes
    with pytest.raises(DataError, match="changed since the dataset was prepared"):
        dataset[other]
    mask = root / records[with_mask]["mask_path"]
    mask.write_bytes(mask.read_bytes() + b"\0")
    with pytest.raises(DataError, match="changed since the dataset was prepared"):
        dataset[with_mask]


def test_bilinear_mask_resize_thresholds_at_half_scale_as_anomalyclip_does():
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True
    assert resize_mask(mask, (2, 2), "bilinear").tolist() == [[True, False], [False, False]]
    lone = np.zeros((4, 4), dtype=bool)
    lone[0, 0] = True  # a quarter of the output pixel: below half scale after the bilinear filter
    assert not resize_mask(lone, (2, 2), "bilinear").any()
    with pytest.raises(ValueError, match="unknown mask resize"):
        resize_mask(mask, (2, 2), "bicubic")
