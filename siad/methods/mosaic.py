"""April-GAN's 2×2 training mosaic (``combine_img``), which AdaCLIP and FiLo inherit for MVTec.

With probability ``mosaic_rate`` a drawn training item of a dataset in ``mosaic_datasets`` is replaced by a mosaic of
four random images of its class (drawn without replacement; a class of fewer than four images never gets one). The
releases keep the replaced item's label (``mosaic_label: replaced``; ``content`` labels the mosaic by its mask).
The parameters (:data:`MOSAIC_DEFAULTS`, :data:`MOSAIC_RULES`) and the draw (:class:`MosaicDraw`) are shared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from siad.data.imageio import resize_mask
from siad.methods.base import Choice, Number, ParamRule

__all__ = ["MOSAIC_DEFAULTS", "MOSAIC_LABELS", "MOSAIC_RULES", "DatasetList", "MosaicDraw", "mosaic"]

MOSAIC_LABELS: tuple[str, ...] = ("replaced", "content")


class DatasetList(ParamRule):
    """A list of registered dataset names (``siad.data.registry.DATASETS``), possibly empty."""

    def problem(self, value: Any) -> str | None:
        from siad.data.registry import DATASETS

        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            return "use a list of dataset names, e.g. [mvtec] (or [] for none)"
        unknown = [v for v in value if v not in DATASETS]
        return f"unknown dataset(s) {unknown}; known: {sorted(DATASETS)}" if unknown else None


MOSAIC_DEFAULTS: dict[str, Any] = {
    "mosaic_rate": 0.2,  # MVTec's aug_rate in the releases
    "mosaic_datasets": ["mvtec"],
    "mosaic_label": "replaced",  # as released: the mosaic keeps the replaced item's label | "content"
}
MOSAIC_RULES: dict[str, ParamRule] = {
    "mosaic_rate": Number(0.0, 1.0),
    "mosaic_datasets": DatasetList(),
    "mosaic_label": Choice(MOSAIC_LABELS),
}


def mosaic(images: Sequence[Tensor], masks: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The 2×2 mosaic of four images [3, S, S] and masks [S, S]: image i at row i // 2, column i % 2 of a 2S × 2S
    canvas, resized back to S (image bicubic with antialias; mask PIL bilinear then > 0.5, as the releases' mask
    transform). Built from the method-size images, where the releases tile the originals before their resize (see
    the method notes)."""
    size = images[0].shape[-1]
    canvas = torch.cat([torch.cat(list(images[:2]), dim=2), torch.cat(list(images[2:4]), dim=2)], dim=1)
    image = F.interpolate(canvas[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
    mask_canvas = torch.cat([torch.cat(list(masks[:2]), dim=1), torch.cat(list(masks[2:4]), dim=1)], dim=0)
    mask = resize_mask(mask_canvas.bool().numpy(), (size, size), "bilinear")
    return image, torch.from_numpy(np.ascontiguousarray(mask))


class MosaicDraw:
    """Draws training items with the mosaic of ``params`` (:data:`MOSAIC_DEFAULTS` keys) from a seeded generator."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.rate = float(params["mosaic_rate"])
        self.datasets = tuple(params["mosaic_datasets"])
        self.label = params["mosaic_label"]

    def applies_to(self, dataset: str) -> bool:
        return dataset in self.datasets and self.rate > 0

    def __call__(self, data: torch.utils.data.Dataset, index: int, by_class: Mapping[str, list[int]],
                 mosaic_on: bool, generator: torch.Generator) -> dict[str, Any]:
        """Item ``index``, or (probability ``rate`` when ``mosaic_on``) a mosaic of four random images of its class."""
        item = data[index]
        if not mosaic_on or self.rate <= 0 or float(torch.rand((), generator=generator)) >= self.rate:
            return item
        members = by_class[item["cls_name"]]
        if len(members) < 4:
            return item
        chosen = [data[members[int(j)]] for j in torch.randperm(len(members), generator=generator)[:4]]
        image, mask = mosaic([c["image"] for c in chosen], [torch.as_tensor(c["mask"]) for c in chosen])
        label = int(item["label"]) if self.label == "replaced" else int(mask.any())
        return {**item, "image": image, "mask": mask, "label": label, "image_sha256": "",
                "mask_valid": all(bool(c.get("mask_valid", True)) for c in chosen), "mosaic": True}


def items_by_class(data: torch.utils.data.Dataset) -> dict[str, list[int]]:
    """Class key → indices of the items of ``data`` (from its ``records`` when it has them, without loading images)."""
    records = getattr(data, "records", None)
    if records is not None and len(records) == len(data):
        classes = [r["cls_name"] for r in records]
    else:
        classes = [data[i]["cls_name"] for i in range(len(data))]
    by_class: dict[str, list[int]] = {}
    for i, cls in enumerate(classes):
        by_class.setdefault(cls, []).append(i)
    return by_class
