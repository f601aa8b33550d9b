"""Reading images and masks of a dataset index, and the torch ``Dataset`` every method consumes.

The image and mask conventions (RGB, EXIF orientation, 16-bit scaling, any non-zero mask pixel is
anomalous, sizes as ``(height, width)``) are those of :mod:`siad.data.imageio`. The loader never resizes
the image (the method's transform does); the mask is resized to ``mask_size`` with nearest-neighbour
interpolation of the *binarised* mask, so it stays binary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from siad.data.imageio import open_checked, read_image, read_mask, resize_mask
from siad.data.records import REGENERATE, SPLITS, Meta, Record, anomalies_without_masks, listed
from siad.data.registry import DATASETS
from siad.errors import DataError, UnknownNameError

__all__ = ["AnomalyDataset", "open_checked", "read_image", "read_mask", "resize_mask"]


class AnomalyDataset(torch.utils.data.Dataset):
    """Images of one split of a dataset index, with labels and pixel masks.

    Each item is ``{"image", "label", "mask", "has_mask", "cls_name", "img_path"}``: ``image`` is
    ``transform(rgb_image)`` (the PIL image when ``transform`` is None), ``mask`` a ``torch.bool``
    ``[H, W]`` tensor at ``mask_size`` (native image size when None), all-False for normal images and
    for datasets without masks. ``name`` is the dataset's registry name ("" when unknown). ``has_mask`` says
    whether the mask is pixel ground truth: true for every
    image of a dataset with masks (normal images included, whose truth is all-False), false otherwise.

    Refused with a DataError naming the dataset: a requested class without images in ``split`` (an
    empty test split must not vanish from the class mean), and, in a dataset with masks (the registry's
    ``has_masks`` when ``name`` is a registered dataset, else: some record has a mask), an anomalous
    image without a mask (it would count as defect-free in the pixel metrics).
    """

    def __init__(self, root: Path, meta: Meta, split: str = "test", classes: Sequence[str] | None = None,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None,
                 mask_size: tuple[int, int] | None = None, name: str = "", mask_resize: str = "nearest") -> None:
        self.root = Path(root)
        self.mask_resize = mask_resize  # how masks reach ``mask_size`` (siad.data.imageio.resize_mask)
        self.name = name  # registry name of the dataset (e.g. "mvtec"); methods may key per-dataset settings on it
        self.split = split
        self.transform = transform
        self.mask_size = tuple(mask_size) if mask_size is not None else None
        self.classes = self._select_classes(meta, split, classes)
        by_class = meta[split]
        self.records: list[Record] = [rec for cls in self.classes for rec in by_class[cls]]
        self.dataset_has_masks = any(rec["mask_path"] for recs in by_class.values() for rec in recs)
        if name in DATASETS:
            self.dataset_has_masks = DATASETS.get(name).has_masks
        self._check_masks({split: {c: by_class[c] for c in self.classes}})

    @property
    def _where(self) -> str:
        return f"dataset {self.name!r} at {self.root}" if self.name else f"the dataset at {self.root}"

    def _select_classes(self, meta: Meta, split: str, classes: Sequence[str] | None) -> list[str]:
        if split not in SPLITS:
            raise UnknownNameError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        by_class = meta.get(split) or {}
        if not by_class:
            raise DataError(f"{self.root}: the {split!r} split of this dataset is empty; choose another split "
                            "or another medical_protocol")
        chosen = sorted(by_class) if classes is None else list(classes)
        known = DATASETS.get(self.name).classes if self.name in DATASETS else None
        for cls in chosen:
            if known is not None and cls not in known:
                raise UnknownNameError(f"unknown class {cls!r} of {self._where}; known: {', '.join(known)}")
            if not by_class.get(cls):
                raise DataError(
                    f"class {cls!r} of {self._where} has no {split} images in its index (classes with {split} "
                    f"images: {', '.join(sorted(c for c, rs in by_class.items() if rs))}). A class without images "
                    "cannot be evaluated. Fix: check the class name; re-extract the class's files and "
                    f"{REGENERATE}; or leave the class out of datasets.{self.name or '<name>'}.classes")
        return chosen

    def _check_masks(self, selected: Meta) -> None:
        """In a dataset with masks, refuse anomalous images without one (they would count as defect-free)."""
        missing = anomalies_without_masks(selected) if self.dataset_has_masks else []
        if missing:
            raise DataError(
                f"{self._where} has pixel masks, but {len(missing)} anomalous image(s) of its {self.split} split "
                f"have none: {listed(missing)}. Pixel metrics would count them as defect-free. Fix: give every "
                f"anomalous image its mask in the dataset and {REGENERATE}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        image = read_image(self.root / rec["img_path"], rec.get("sha256"))  # the index's content, or an error
        native = (image.height, image.width)
        size = self.mask_size or native
        if rec["mask_path"]:
            mask = resize_mask(read_mask(self.root / rec["mask_path"], native, rec.get("mask_sha256")), size,
                               self.mask_resize)
        else:
            mask = np.zeros(size, dtype=bool)
        return {
            "image": self.transform(image) if self.transform is not None else image,
            "label": int(rec["anomaly"]),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)),
            "has_mask": bool(rec["mask_path"]) or (self.dataset_has_masks and not rec["anomaly"]),
            "cls_name": rec["cls_name"],
            "img_path": rec["img_path"],
        }
