"""Each setting's training set, as the engine builds it for every method: counts, masks, labels, seeds, leakage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from siad.backbones.registry import OPENAI_MEAN, OPENAI_STD
from siad.engine.settings import (
    DEFAULT_ANOMALOUS_FRACTION,
    PseudoAnomalySet,
    TrainingSetRequest,
    build_training_set,
    label_counts,
    setting_options,
)
from siad.errors import ConfigError, DataError
from siad.methods.backbone_method import image_transform

SIZE = 48


def request(mvtec_standin, setting: str, *, seed: int = 0, fraction: float = 0.5, classes=None) -> TrainingSetRequest:
    root, meta = mvtec_standin
    return TrainingSetRequest(setting=setting, name="mvtec", root=root, meta=meta, classes=classes,
                              normal_images="train", transform=image_transform(SIZE, OPENAI_MEAN, OPENAI_STD),
                              input_size=SIZE, seed=seed, options={"anomalous_fraction": fraction})


def items(dataset) -> list[dict]:
    return [dataset[i] for i in range(len(dataset))]


def test_uzad_holds_the_normal_train_images_with_empty_masks(mvtec_standin):
    _, meta = mvtec_standin
    data = build_training_set(request(mvtec_standin, "uzad"))
    expected = sum(1 for records in meta["train"].values() for r in records if not r["anomaly"])
    assert len(data) == expected == 12
    got = items(data)
    assert all(item["label"] == 0 and not item["mask"].any() for item in got)
    assert all(item["mask"].shape == (SIZE, SIZE) and item["image"].shape == (3, SIZE, SIZE) for item in got)
    assert label_counts(data) == {"images": 12, "anomalous": 0}
    assert {item["image_sha256"] for item in got} == {r["sha256"] for rs in meta["train"].values() for r in rs}


def test_zad_holds_the_source_test_split_with_its_real_masks_and_labels(mvtec_standin):
    _, meta = mvtec_standin
    data = build_training_set(request(mvtec_standin, "zad"))
    tests = [r for records in meta["test"].values() for r in records]
    assert len(data) == len(tests) == 16
    got = items(data)
    assert [item["label"] for item in got] == [int(r["anomaly"]) for r in data.records]
    assert all(bool(item["mask"].any()) == bool(item["label"]) for item in got)  # the stand-in's masks are non-empty
    assert label_counts(data) == {"images": 16, "anomalous": 8}
    assert {r["img_path"] for r in data.records} == {r["img_path"] for r in tests}


def test_pseudo_replaces_the_configured_share_with_labelled_pseudo_anomalies(mvtec_standin):
    data = build_training_set(request(mvtec_standin, "pseudo", fraction=0.5))
    assert isinstance(data, PseudoAnomalySet)
    assert len(data) == 12 and len(data.anomalous) == 6
    got = items(data)
    for index, item in enumerate(got):
        anomalous = index in data.anomalous
        assert item["label"] == int(anomalous) == int(bool(item["mask"].any()))
        assert item["cls_name"] == data.records[index]["cls_name"]  # the source class name is kept
        assert item["mask"].shape == (SIZE, SIZE)
        assert item["img_path"].endswith("#pseudo0") == anomalous
    donors = data.donors
    assert all(data.records[d]["cls_name"] == data.records[i]["cls_name"] and d != i for i, d in donors.items())
    assert label_counts(data) == {"images": 12, "anomalous": 6}


def test_a_pseudo_anomaly_changes_pixels_inside_its_mask_only(mvtec_standin):
    data = build_training_set(request(mvtec_standin, "pseudo"))
    index = min(data.anomalous)
    image, mask = data.pseudo_anomaly(index)
    original = data._raw(index)
    changed = np.abs(image.astype(int) - original.astype(int)).sum(axis=-1) > 0
    assert changed.any() and not (changed & ~mask).any()


def test_the_pseudo_set_depends_on_the_seed_only(mvtec_standin):
    first = items(build_training_set(request(mvtec_standin, "pseudo", seed=3)))
    again = build_training_set(request(mvtec_standin, "pseudo", seed=3))
    backwards = [again[i] for i in reversed(range(len(again)))][::-1]  # read order does not matter
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
               for a, b in zip(first, backwards))
    other = build_training_set(request(mvtec_standin, "pseudo", seed=4))
    assert other.anomalous != again.anomalous or any(
        not torch.equal(a["image"], other[i]["image"]) for i, a in enumerate(first))


def test_the_class_selection_is_kept(mvtec_standin):
    data = build_training_set(request(mvtec_standin, "pseudo", classes=["carpet"]))
    assert {r["cls_name"] for r in data.records} == {"carpet"} and len(data) == 6


def test_an_empty_training_set_and_bad_options_are_refused(mvtec_standin):
    root, meta = mvtec_standin
    empty = {"train": {}, "test": meta["test"]}
    bad = TrainingSetRequest(**{**request(mvtec_standin, "uzad").__dict__, "meta": empty})
    with pytest.raises(DataError, match="no uzad training images in 'mvtec'"):
        build_training_set(bad)
    with pytest.raises(ConfigError, match="anomalous_fraction"):
        build_training_set(request(mvtec_standin, "pseudo", fraction=1.0))
    with pytest.raises(ConfigError, match="unknown setting"):
        build_training_set(request(mvtec_standin, "fewshot"))


def test_setting_options_carry_their_defaults():
    assert setting_options({}, "pseudo") == {"anomalous_fraction": DEFAULT_ANOMALOUS_FRACTION}
    assert setting_options({"training": {"pseudo": {"anomalous_fraction": 0.6}}}, "pseudo") == {
        "anomalous_fraction": 0.6}
    assert setting_options({}, "uzad") == setting_options({}, "zad") == {}


def test_zad_on_a_dataset_without_masks_marks_anomalous_masks_as_unknown(tmp_path, request_for_mvtec_pseudo):
    from siad.data.prepare import prepare_dataset
    from siad.data.records import load_meta
    from siad.data.synthetic import write_standin

    write_standin("br35h", tmp_path / "br35h", seed=0, size=32)
    prepare_dataset("br35h", tmp_path / "br35h", tmp_path / "meta.json", verify_counts=False)
    meta = load_meta(tmp_path / "meta.json", tmp_path / "br35h")
    data = build_training_set(TrainingSetRequest(
        setting="zad", name="br35h", root=tmp_path / "br35h", meta=meta, classes=None, normal_images="train",
        transform=image_transform(SIZE, OPENAI_MEAN, OPENAI_STD), input_size=SIZE, seed=0, options={}))
    got = items(data)
    assert {item["label"] for item in got} == {0, 1}
    # a normal image's mask is all-False by definition; an anomalous one of a mask-less dataset has no pixel truth
    assert all(item["mask_valid"] == (item["label"] == 0) for item in got)
    assert all(item["mask_valid"] for item in items(build_training_set(request_for_mvtec_pseudo())))


@pytest.fixture
def request_for_mvtec_pseudo(mvtec_standin):
    return lambda: request(mvtec_standin, "pseudo")


def test_the_configured_class_order_does_not_change_the_set(mvtec_standin):
    one = build_training_set(request(mvtec_standin, "pseudo", classes=["carpet", "bottle"]))
    other = build_training_set(request(mvtec_standin, "pseudo", classes=["bottle", "carpet"]))
    assert [r["img_path"] for r in one.records] == [r["img_path"] for r in other.records]
    assert one.anomalous == other.anomalous and one.donors == other.donors


def test_a_selected_class_without_training_images_is_refused_naming_it(mvtec_standin):
    root, meta = mvtec_standin
    no_carpet = {"train": {"bottle": meta["train"]["bottle"]}, "test": meta["test"]}
    bad = TrainingSetRequest(**{**request(mvtec_standin, "uzad", classes=["bottle", "carpet"]).__dict__,
                                "meta": no_carpet})
    with pytest.raises(DataError, match=r"class\(es\) \['carpet'\] of 'mvtec' have no uzad training images"):
        build_training_set(bad)


def test_the_method_decides_how_real_masks_reach_its_input_size(mvtec_standin):
    nearest = build_training_set(request(mvtec_standin, "zad"))
    bilinear = build_training_set(TrainingSetRequest(**{**request(mvtec_standin, "zad").__dict__,
                                                        "mask_resize": "bilinear"}))
    assert bilinear.mask_resize == "bilinear" and nearest.mask_resize == "nearest"
    index = next(i for i, r in enumerate(nearest.records) if r["anomaly"])
    assert bilinear[index]["mask"].any() and bilinear[index]["mask"].shape == nearest[index]["mask"].shape


@pytest.mark.parametrize("fraction", [0.01, 0.99, "0.5", True])
def test_a_share_leaving_no_pseudo_anomaly_or_no_normal_image_is_refused(mvtec_standin, fraction):
    with pytest.raises(ConfigError, match="training.pseudo.anomalous_fraction"):
        build_training_set(request(mvtec_standin, "pseudo", fraction=fraction))


def test_zad_on_a_source_without_anomalies_is_refused(mvtec_standin):
    root, meta = mvtec_standin
    normal_only = {"train": meta["train"], "test": {c: [r for r in rs if not r["anomaly"]]
                                                    for c, rs in meta["test"].items()}}
    bad = TrainingSetRequest(**{**request(mvtec_standin, "zad").__dict__, "meta": normal_only})
    with pytest.raises(DataError, match="trains on the source's real anomalies"):
        build_training_set(bad)
