"""DTD-Synthetic: MVTec layout with anomaly folder ``bad``, often nested ``DTD-Synthetic/DTD-Synthetic/``.

The converter searches the folder level that holds the ``<Texture_NNN>`` class folders, so the flat
and the doubly nested copies give the same index up to the path prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from siad.data.converters.common import convert_mvtec_style
from siad.data.records import Meta

CLASSES = ("Blotchy_099", "Fibrous_183", "Marbled_078", "Matted_069", "Mesh_114", "Perforated_037",
           "Stratified_154", "Woven_001", "Woven_068", "Woven_104", "Woven_125", "Woven_127")

# Only dataset totals are published (AdaCLIP suppl. Tab. 1): checked as "__total__" plus the class set.
EXPECTED_TEST_COUNTS = {"default": {"__total__": (357, 947)}}


def convert(root: Path, options: Mapping[str, str]) -> Meta:
    """Index an extracted DTD-Synthetic folder (no options)."""
    return convert_mvtec_style(root, CLASSES, "DTD-Synthetic")
