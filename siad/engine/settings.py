"""The training set of each setting, built by the engine and handed to ``Method.fit``: one place for every method.

- ``uzad``: the auxiliary dataset's normal images (``training.normal_images``), all-zero masks, label 0.
- ``pseudo``: the same normal images, of which a share ``training.pseudo.anomalous_fraction`` (chosen with the run
  seed) is replaced by a pseudo-anomalous copy made with the suite's CutPaste + Poisson generator
  (:class:`siad.data.pseudo.CutPastePoisson`, AnomalyGPT's per-class NSA settings, binary masks); the patch comes
  from another normal image of the same class. A copy is labelled 1 only when its mask is non-empty at the method's
  input size (the image is resized to it before pasting, so the mask is made at that size); the source class name
  is kept.
- ``zad``: the auxiliary dataset's *test* split with its real anomalies, masks and labels (the CLIP-family papers'
  protocol).

A method receives the set and never re-derives it. Every item has the fields of
:class:`siad.data.loading.AnomalyDataset` (``image`` transformed, ``mask`` bool at ``mask_size``, ``label``,
``has_mask``, ``cls_name``, ``img_path``) plus ``image_sha256``, the content identity of the image the method sees
(feature caches key on it) and ``mask_valid``: whether ``mask`` is the image's pixel truth (a normal image's is
all-False by definition; an anomalous image of a dataset without masks, such as the medical sets under ``zad``,
has none, and pixel losses must skip it); the set's ``records`` are the index records it was built from (the
content leakage guard and methods that read raw files, such as the LLM detectors under ``uzad``, use them).

A pseudo-anomaly depends only on (run seed, item index), never on the order items are read in: every epoch, worker
and rerun sees the same set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from siad.data.imageio import read_image
from siad.data.loading import AnomalyDataset
from siad.data.pseudo import CutPastePoisson, anomalygpt_params
from siad.data.records import Meta, Record
from siad.engine.protocol import SETTINGS, training_meta
from siad.errors import ConfigError, DataError
from siad.registry import Registry

#: Default share of pseudo-anomalous images in the pseudo setting (the real test splits hold about 50-60 %).
DEFAULT_ANOMALOUS_FRACTION = 0.55


@dataclass(frozen=True)
class TrainingSetRequest:
    """What the engine knows when it builds a training set: the source's index and the method's input."""

    setting: str
    name: str  # registry name of the source dataset
    root: Path
    meta: Meta  # the source's whole index
    classes: Sequence[str] | None  # class selection of the source (None: all)
    normal_images: str  # ``train`` or ``all``
    transform: Callable[[Image.Image], torch.Tensor]
    input_size: int
    seed: int
    options: Mapping[str, Any]  # the setting's options (``training.pseudo`` for pseudo)
    mask_resize: str = "nearest"  # how real masks reach the input size: the method's ``training_mask_resize``


TrainingSetBuilder = Callable[[TrainingSetRequest], torch.utils.data.Dataset]
TRAINING_SETS: Registry[TrainingSetBuilder] = Registry("setting")


def build_training_set(request: TrainingSetRequest) -> torch.utils.data.Dataset:
    """The training set of ``request.setting`` (see the module docstring); DataError when it would be empty."""
    if request.setting not in SETTINGS:
        raise ConfigError(f"unknown setting {request.setting!r}; known: {SETTINGS}")
    meta = training_meta(request.meta, request.setting, request.normal_images)
    if not meta["train"]:
        raise DataError(
            f"{request.root}: no {request.setting} training images in {request.name!r} (normal_images="
            f"{request.normal_images!r}); with the all_test medical protocol set "
            f"training.normal_images_per_dataset: {{{request.name}: all}}")
    return TRAINING_SETS.get(request.setting)(request)


def setting_options(config: Mapping[str, Any], setting: str) -> dict[str, Any]:
    """The options of ``setting``'s training set with their defaults (part of the run specification)."""
    if setting != "pseudo":
        return {}
    pseudo = config.get("training", {}).get("pseudo", {})
    return {"anomalous_fraction": float(pseudo.get("anomalous_fraction", DEFAULT_ANOMALOUS_FRACTION))}


class IndexedTrainingSet(AnomalyDataset):
    """``uzad`` and ``zad``: the selected records of the source as they are (masks at the method's input size)."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        record = self.records[index]
        item["image_sha256"] = record.get("sha256") or ""
        item["mask_valid"] = not record["anomaly"] or bool(record["mask_path"])
        return item


def _indexed_set(request: TrainingSetRequest) -> IndexedTrainingSet:
    """The selected classes' records in sorted class order (the configured order of ``classes`` is not part of the
    run specification, so it must not change the set: pseudo-anomaly choice and batch order depend on item order)."""
    meta = training_meta(request.meta, request.setting, request.normal_images)
    classes = sorted(request.classes) if request.classes else None
    empty = [c for c in classes or [] if c not in meta["train"]]
    if empty:
        raise DataError(
            f"{request.root}: class(es) {empty} of {request.name!r} have no {request.setting} training images "
            f"(normal_images={request.normal_images!r}; classes with some: {sorted(meta['train'])}). Fix: leave them "
            f"out of datasets.{request.name}.classes, or set training.normal_images_per_dataset: "
            f"{{{request.name}: all}} when the train split is empty")
    data = IndexedTrainingSet(request.root, meta, split="train", classes=classes, transform=request.transform,
                              mask_size=(request.input_size, request.input_size), name=request.name,
                              mask_resize=request.mask_resize)
    if request.setting == "zad" and not any(r["anomaly"] for r in data.records):
        raise DataError(f"{request.root}: the zad setting trains on the source's real anomalies, but the test split "
                        f"of {request.name!r} (classes {data.classes}) holds none; choose another source or setting")
    return data


class PseudoAnomalySet(torch.utils.data.Dataset):
    """``pseudo``: normal images, a seeded share of them replaced by CutPaste + Poisson pseudo-anomalies.

    ``anomalous`` lists the indices of the replaced items; ``donors[i]`` the item whose image gives item ``i`` its
    patch (another image of the same class when the class has one).
    """

    def __init__(self, normal: AnomalyDataset, *, input_size: int, seed: int, anomalous_fraction: float) -> None:
        key = "training.pseudo.anomalous_fraction"
        if isinstance(anomalous_fraction, bool) or not isinstance(anomalous_fraction, (int, float)) or not (
                0.0 < anomalous_fraction < 1.0):
            raise ConfigError(f"{key}: {anomalous_fraction!r}; use a number in (0, 1)")
        self.normal = normal
        self.records: list[Record] = normal.records
        self.root, self.name, self.classes = normal.root, normal.name, normal.classes
        self.input_size = input_size
        self.seed = seed
        rng = np.random.default_rng([seed, 0x5E7])
        count = int(round(anomalous_fraction * len(self.records)))
        if not 0 < count < len(self.records):
            raise ConfigError(
                f"{key}: {anomalous_fraction} of {self.name!r}'s {len(self.records)} training images is {count}: the "
                "pseudo set would hold no pseudo-anomaly or no normal image; use a share that leaves both")
        self.anomalous = frozenset(int(i) for i in rng.permutation(len(self.records))[:count])
        self.donors = self._pick_donors(rng)
        self._generators: dict[str, CutPastePoisson] = {}

    def _pick_donors(self, rng: np.random.Generator) -> dict[int, int]:
        by_class: dict[str, list[int]] = {}
        for index, record in enumerate(self.records):
            by_class.setdefault(record["cls_name"], []).append(index)
        donors = {}
        for index in sorted(self.anomalous):
            others = [j for j in by_class[self.records[index]["cls_name"]] if j != index] or [index]
            donors[index] = others[int(rng.integers(len(others)))]
        return donors

    def __len__(self) -> int:
        return len(self.records)

    def _raw(self, index: int) -> np.ndarray:
        """Item ``index``'s image (checked against the index's SHA-256) at the input size, uint8 [S, S, 3]."""
        record = self.records[index]
        image = read_image(self.root / record["img_path"], record.get("sha256"))
        return np.asarray(image.resize((self.input_size, self.input_size), Image.BICUBIC), np.uint8)

    def _generator(self, cls_name: str) -> CutPastePoisson:
        if cls_name not in self._generators:
            self._generators[cls_name] = CutPastePoisson(anomalygpt_params(self.name, cls_name), label="binary")
        return self._generators[cls_name]

    def pseudo_anomaly(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``index``'s pseudo-anomalous image (uint8 [S, S, 3]) and its bool mask [S, S] (S = input size)."""
        record = self.records[index]
        rng = np.random.default_rng([self.seed, 0xA11, index])
        image, mask = self._generator(record["cls_name"])(self._raw(index), self._raw(self.donors[index]), rng)
        return image, mask > 0.5

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        if index not in self.anomalous:
            return self.normal[index]
        image, mask = self.pseudo_anomaly(index)
        return {
            "image": self.normal.transform(Image.fromarray(image)),
            "label": int(mask.any()),  # empty after the paste (never with the suite's generator): stays normal
            "mask": torch.from_numpy(np.ascontiguousarray(mask)),
            "has_mask": True,
            "cls_name": record["cls_name"],
            "img_path": f"{record['img_path']}#pseudo{self.seed}",
            "image_sha256": hashlib.sha256(image.tobytes() + repr(image.shape).encode()).hexdigest(),
            "mask_valid": True,
        }


def _pseudo_set(request: TrainingSetRequest) -> PseudoAnomalySet:
    normal = _indexed_set(request)  # training_meta gives pseudo the same normal images as uzad
    fraction = request.options.get("anomalous_fraction", DEFAULT_ANOMALOUS_FRACTION)
    return PseudoAnomalySet(normal, input_size=request.input_size, seed=request.seed, anomalous_fraction=fraction)


TRAINING_SETS.add("uzad", _indexed_set)
TRAINING_SETS.add("zad", _indexed_set)
TRAINING_SETS.add("pseudo", _pseudo_set)


def label_counts(dataset: torch.utils.data.Dataset) -> dict[str, int]:
    """{"images", "anomalous"} of a training set, without reading images (pseudo: the replaced items, each of
    which has a non-empty mask: the generator guarantees one)."""
    if isinstance(dataset, PseudoAnomalySet):
        return {"images": len(dataset), "anomalous": len(dataset.anomalous)}
    records = getattr(dataset, "records", [])
    return {"images": len(records), "anomalous": sum(int(bool(r["anomaly"])) for r in records)}
