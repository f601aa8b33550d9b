"""Br35H (Kaggle ahmedhamada0): ``yes/`` (tumour) and ``no/`` (normal), classification only.

Only ``yes/`` and ``no/`` are read: the unlabelled ``pred/`` folder and any other entry (a
``meta.json`` left by an earlier run) are ignored, unlike AnomalyCLIP's script, which indexes every
sub-folder and so mislabels ``pred/`` as anomalous. Class key ``brain``; species ``no`` / ``yes``.
Option ``medical_protocol``: ``all_test`` (1500 / 1500 in test) or ``dra_75_25`` (375 / 1500 in test,
derived from the 75/25 rule: ``ceil(0.25 * 1500)`` normals).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from siad.data.converters.brainmri import has_yes_no
from siad.data.converters.common import find_level, images_by_relpath, log, medical_meta, subdirs
from siad.data.records import Meta

CLASS = "brain"
CLASSES = (CLASS,)
EXPECTED_TEST_COUNTS = {"all_test": {CLASS: (1500, 1500)}, "dra_75_25": {CLASS: (375, 1500)}}
UNLABELLED = "pred"


def convert(root: Path, options: Mapping[str, str]) -> Meta:
    """Index Br35H under ``options['medical_protocol']``."""
    base = find_level(root, has_yes_no, "yes/ and no/ folders")
    for other in subdirs(base):
        if other.name not in ("yes", "no", UNLABELLED):
            log.warning("%s: not a Br35H label folder (yes/no), ignored", other)
    normals = images_by_relpath(root, base / "no")
    anomalies = images_by_relpath(root, base / "yes")
    return medical_meta(root, CLASS, normals, anomalies, options.get("medical_protocol", "all_test"), ("no", "yes"))
