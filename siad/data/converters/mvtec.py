"""MVTec AD: ``<cls>/{train/good, test/{good,<defect>}, ground_truth/<defect>/<stem>_mask.png}``.

The archive extracts flat (15 class folders beside ``license.txt`` and ``readme.txt``, which are
ignored); a copy inside one wrapper folder (e.g. ``mvtec_anomaly_detection/``) is found as well.
Masks are paired by name (``<stem>_mask.png``), not by sorted index.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from siad.data.converters.common import convert_mvtec_style
from siad.data.records import Meta

CLASSES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
           "screw", "tile", "toothbrush", "transistor", "wood", "zipper")

# Test split per class (normal, anomalous): AA-CLIP full-shot lists; totals (467, 1258) = AdaCLIP suppl. Tab. 1.
EXPECTED_TEST_COUNTS = {"default": {
    "bottle": (20, 63), "cable": (58, 92), "capsule": (23, 109), "carpet": (28, 89), "grid": (21, 57),
    "hazelnut": (40, 70), "leather": (32, 92), "metal_nut": (22, 93), "pill": (26, 141), "screw": (41, 119),
    "tile": (33, 84), "toothbrush": (12, 30), "transistor": (60, 40), "wood": (19, 60), "zipper": (32, 119),
}}


def convert(root: Path, options: Mapping[str, str]) -> Meta:
    """Index an extracted MVTec AD folder (no options)."""
    return convert_mvtec_style(root, CLASSES, "MVTec AD")
