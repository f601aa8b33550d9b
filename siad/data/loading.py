"""Reading images and masks of a dataset index, and the torch ``Dataset`` every method consumes.

Conventions (fixed here so every method sees the same data):

* Images are always RGB. Grayscale (MVTec grid/screw/zipper), palette, RGBA (HeadCT: alpha is dropped,
  as ``PIL.Image.convert('RGB')`` does in the community loaders) and 16-bit images are converted.
  16-bit values are mapped to 8 bits by dividing by 257 (65535 -> 255).
* Masks are boolean: any non-zero pixel is anomalous (VisA masks hold defect ids 1, 2, ..., not 255).
  Multi-channel masks are anomalous where any colour channel (alpha excluded) is non-zero.
* Sizes are ``(height, width)``, like the arrays and tensors they describe.
* The loader never resizes the image (the method's transform does); the mask is resized to
  ``mask_size`` with nearest-neighbour interpolation of the *binarised* mask, so it stays binary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from siad.data.imageio import open_checked, read_image, read_mask, resize_mask
from siad.data.records import SPLITS, Meta, Record
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
    """

    def __init__(self, root: Path, meta: Meta, split: str = "test", classes: Sequence[str] | None = None,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None,
                 mask_size: tuple[int, int] | None = None, name: str = "") -> None:
        self.root = Path(root)
        self.name = name  # registry name of the dataset (e.g. "mvtec"); methods may key per-dataset settings on it
        self.split = split
        self.transform = transform
        self.mask_size = tuple(mask_size) if mask_size is not None else None
        self.classes = self._select_classes(meta, split, classes)
        by_class = meta[split]
        self.records: list[Record] = [rec for cls in self.classes for rec in by_class[cls]]
        self.dataset_has_masks = any(rec["mask_path"] for recs in by_class.values() for rec in recs)

    def _select_classes(self, meta: Meta, split: str, classes: Sequence[str] | None) -> list[str]:
        if split not in SPLITS:
            raise UnknownNameError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        by_class = meta.get(split) or {}
        if not by_class:
            raise DataError(f"{self.root}: the {split!r} split of this dataset is empty; choose another split "
                            "or another medical_protocol")
        chosen = sorted(by_class) if classes is None else list(classes)
        for cls in chosen:
            if cls not in by_class:
                raise UnknownNameError(f"unknown class {cls!r} in {self.root} ({split}); known: "
                                       f"{', '.join(sorted(by_class))}")
            if not by_class[cls]:
                raise DataError(f"{self.root}: class {cls!r} has no {split} images; fix the dataset index")
        return chosen

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        image = read_image(self.root / rec["img_path"])
        native = (image.height, image.width)
        size = self.mask_size or native
        if rec["mask_path"]:
            mask = resize_mask(read_mask(self.root / rec["mask_path"], native), size)
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
