"""Synthetic axial head scans (brain MRI and head CT) with and without a lesion.

A scan is a dark field with an elliptical skull (a bright ring), brain tissue with gyral texture,
two dark ventricles and noise. The anomaly is a bright blob inside the brain: a tumour on MRI, a
(hyperdense, hence also bright) haemorrhage on CT. The medical datasets carry image labels only,
so no mask is produced.
"""

from __future__ import annotations

import numpy as np

from siad.data.synthetic.common import to_uint8
from siad.data.synthetic.textures import fbm, value_noise

# Grey levels per modality: (skull, brain, ventricles, lesion boost).
_LEVELS = {"mri": (170.0, 120.0, 45.0, 95.0), "ct": (250.0, 95.0, 35.0, 75.0)}


def _ellipse_distance(h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Normalised elliptical radius: < 1 inside the ellipse."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.hypot((x - cx) / rx, (y - cy) / ry)


def render_scan(h: int, w: int, rng: np.random.Generator, modality: str, lesion: bool) -> np.ndarray:
    """A ``uint8`` ``HxW`` head scan; ``lesion=True`` adds a bright blob inside the brain."""
    if modality not in _LEVELS:
        raise ValueError(f"unknown modality {modality!r}; known: {sorted(_LEVELS)}")
    skull_level, brain_level, csf_level, boost = _LEVELS[modality]
    cx, cy = w / 2 + rng.uniform(-0.04, 0.04) * w, h / 2 + rng.uniform(-0.04, 0.04) * h
    rx, ry = w * rng.uniform(0.36, 0.42), h * rng.uniform(0.40, 0.46)
    head = _ellipse_distance(h, w, cx, cy, rx, ry)
    thickness = rng.uniform(0.07, 0.1)
    scan = np.where(head < 1.0, skull_level, 4.0).astype(np.float32)
    brain = head < 1.0 - thickness
    gyri = fbm(h, w, rng, cell=min(h, w) / 10)
    scan[brain] = brain_level * (0.85 + 0.3 * gyri[brain])
    for side in (-1, 1):  # lateral ventricles
        ventricle = _ellipse_distance(h, w, cx + side * rx * 0.12, cy, rx * 0.08, ry * 0.2) < 1.0
        scan[ventricle] = csf_level
    if lesion:
        scan += boost * _lesion_blob(brain, rng, min(h, w))
    scan += rng.normal(0.0, 4.0, scan.shape).astype(np.float32)
    return to_uint8(scan)


def _lesion_blob(brain: np.ndarray, rng: np.random.Generator, side: int) -> np.ndarray:
    """A soft irregular blob in [0, 1], centred at a random point well inside ``brain``."""
    h, w = brain.shape
    ys, xs = np.nonzero(brain)
    inner = (np.abs(ys - ys.mean()) < 0.75 * ys.std()) & (np.abs(xs - xs.mean()) < 0.75 * xs.std())  # central part
    k = int(rng.choice(np.nonzero(inner)[0]))
    radius = side * rng.uniform(0.07, 0.12)
    d = _ellipse_distance(h, w, float(xs[k]), float(ys[k]), radius, radius * rng.uniform(0.7, 1.3))
    d = d + 0.5 * (value_noise(h, w, rng, max(2.0, radius / 2)) - 0.5)
    return np.clip(1.2 - d, 0.0, 1.0) * brain
