"""Synthetic stand-ins of the nine datasets, written in each real dataset's native on-disk layout.

The offline demo profile runs the real converters on these folders, so every path, name, extension,
image mode and pitfall of the real archives (spec ``datasets.md`` B/D) is reproduced; the pixels are
procedural (textures, drawn objects, painted defects, synthetic head scans) and deterministic per seed.
"""

from __future__ import annotations

from siad.data.synthetic.catalog import DATASET_CLASSES, DEFAULT_CLASSES
from siad.data.synthetic.standin import MARKER, StandinSummary, write_standin

DATASETS: tuple[str, ...] = tuple(DATASET_CLASSES)

__all__ = ["DATASETS", "DATASET_CLASSES", "DEFAULT_CLASSES", "MARKER", "StandinSummary", "write_standin"]
