"""BTAD: ``BTech_Dataset_transformed/{01,02,03}/{train/ok, test/{ok,ko}, ground_truth/ko}``.

Normal folder ``ok``. Extensions are mixed (01: BMP images with PNG masks, 02: PNG/PNG, 03: BMP/BMP) and
masks carry the image stem, so pairing is by stem whatever the extension. Paths are kept as in the
archive (anomalib converts BMP to PNG in place, which changes the community's paths; we do not).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from siad.data.converters.common import convert_mvtec_style
from siad.data.records import Meta

CLASSES = ("01", "02", "03")

# Spec B: test normals 21/30/400, anomalies 49/200/41 (totals 451, 290).
EXPECTED_TEST_COUNTS = {"default": {"01": (21, 49), "02": (30, 200), "03": (400, 41)}}


def convert(root: Path, options: Mapping[str, str]) -> Meta:
    """Index an extracted BTAD folder (no options)."""
    return convert_mvtec_style(root, CLASSES, "BTAD", normal="ok", mask_suffixes=("",))
