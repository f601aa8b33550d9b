"""MPDD: the MVTec layout (``<cls>/{train/good, test/{good,<defect>}, ground_truth/<defect>/<stem>_mask.png}``).

There is no scriptable download (SharePoint folder), so the archive is a manual drop; users have
reported incomplete class sets (AnomalyCLIP#5), which the per-class count check reveals.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from siad.data.converters.common import convert_mvtec_style
from siad.data.records import Meta

CLASSES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")

# Test split per class (normal, anomalous): AA-CLIP full-shot lists; totals (176, 282).
EXPECTED_TEST_COUNTS = {"default": {
    "bracket_black": (32, 47), "bracket_brown": (26, 51), "bracket_white": (30, 30),
    "connector": (30, 14), "metal_plate": (26, 71), "tubes": (32, 69),
}}


def convert(root: Path, options: Mapping[str, str]) -> Meta:
    """Index an extracted MPDD folder (no options)."""
    return convert_mvtec_style(root, CLASSES, "MPDD")
