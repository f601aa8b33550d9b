"""Defects painted onto clean images: scratches, holes, stains, missing parts and cracks.

The ground-truth mask is computed, not drawn: it is exactly the set of pixels whose value the
defect changed (``defective != clean`` in any channel). So a mask is never larger than the visible
damage, and a defect that happened to change nothing is redrawn elsewhere — every anomalous image
therefore differs from its clean version and has a non-empty mask.

Images are ``uint8`` arrays ``HxWxC`` with ``C`` = 1 (grayscale datasets) or 3, so a grayscale class
gets its defect in gray and its mask stays exact after saving in mode ``L``.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from siad.data.synthetic.common import to_uint8
from siad.data.synthetic.textures import value_noise

_MAX_ATTEMPTS = 8
Drawer = Callable[[np.ndarray, np.random.Generator, tuple[int, int], np.ndarray], np.ndarray]


def _pick_centre(region: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """A random (x, y) inside ``region`` (the object; the whole image for textures)."""
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        h, w = region.shape
        return int(rng.integers(0, w)), int(rng.integers(0, h))
    k = int(rng.integers(0, len(ys)))
    return int(xs[k]), int(ys[k])


def _local_mean(img: np.ndarray, centre: tuple[int, int], radius: int) -> np.ndarray:
    x, y = centre
    patch = img[max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1]
    return patch.reshape(-1, img.shape[2]).mean(axis=0)


def _contrasting(img: np.ndarray, centre: tuple[int, int], rng: np.random.Generator, side: int) -> np.ndarray:
    """A near-black or near-white value, whichever stands out from the surroundings."""
    level = 25.0 if _local_mean(img, centre, max(2, side // 16)).mean() >= 110 else 230.0
    return np.full(img.shape[2], level + rng.uniform(-10, 10), np.float32)


def _paint(img: np.ndarray, stamp: np.ndarray, colour: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Blend ``colour`` into ``img`` where ``stamp`` is set."""
    out = img.copy()
    where = stamp.astype(bool)
    out[where] = to_uint8(img[where] * (1 - alpha) + colour[None, :] * alpha)
    return out


def _random_walk(start: tuple[int, int], rng: np.random.Generator, steps: int, step_len: float,
                 wiggle: float) -> np.ndarray:
    """Polyline points of a walk whose heading drifts by up to ``wiggle`` radians per step."""
    heading = rng.uniform(0, 2 * np.pi)
    pts = [np.array(start, np.float64)]
    for _ in range(steps):
        heading += rng.uniform(-wiggle, wiggle)
        pts.append(pts[-1] + step_len * np.array([np.cos(heading), np.sin(heading)]))
    return np.round(np.array(pts)).astype(np.int32)


def scratch(img: np.ndarray, rng: np.random.Generator, centre: tuple[int, int], background: np.ndarray) -> np.ndarray:
    """A thin bright or dark polyline of 2–3 gently bending segments."""
    side = min(img.shape[:2])
    stamp = np.zeros(img.shape[:2], np.uint8)
    pts = _random_walk(centre, rng, int(rng.integers(2, 4)), side * rng.uniform(0.08, 0.18), 0.5)
    cv2.polylines(stamp, [pts], False, 1, 1 if side < 96 else 2)
    return _paint(img, stamp, _contrasting(img, centre, rng, side))


def hole(img: np.ndarray, rng: np.random.Generator, centre: tuple[int, int], background: np.ndarray) -> np.ndarray:
    """A dark (or, on dark material, bright-rimmed) elliptical hole."""
    side = min(img.shape[:2])
    stamp = np.zeros(img.shape[:2], np.uint8)
    axes = (max(2, int(side * rng.uniform(0.04, 0.08))), max(2, int(side * rng.uniform(0.04, 0.08))))
    cv2.ellipse(stamp, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return _paint(img, stamp, _contrasting(img, centre, rng, side))


def stain(img: np.ndarray, rng: np.random.Generator, centre: tuple[int, int], background: np.ndarray) -> np.ndarray:
    """A translucent blob of a foreign colour with an irregular outline."""
    h, w = img.shape[:2]
    side = min(h, w)
    radius = side * rng.uniform(0.06, 0.12)
    y, x = np.mgrid[0:h, 0:w]
    dist = np.hypot(x - centre[0], y - centre[1]) / radius
    stamp = dist + 0.6 * (value_noise(h, w, rng, max(2.0, radius / 2)) - 0.5) < 1.0
    stamp[centre[1], centre[0]] = True
    base = _local_mean(img, centre, int(radius))
    colour = rng.uniform(0, 255, img.shape[2]).astype(np.float32)
    if np.abs(colour - base).max() < 80:  # too close to the surface colour to be seen: take its complement
        colour = 255.0 - base
    return _paint(img, stamp, colour, alpha=float(rng.uniform(0.6, 0.85)))


def missing(img: np.ndarray, rng: np.random.Generator, centre: tuple[int, int], background: np.ndarray) -> np.ndarray:
    """A broken-off piece: an irregular polygon erased to what lies behind (background or a gap)."""
    side = min(img.shape[:2])
    n = int(rng.integers(5, 8))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = side * rng.uniform(0.07, 0.14, n)
    pts = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], axis=1)
    stamp = np.zeros(img.shape[:2], np.uint8)
    cv2.fillPoly(stamp, [np.round(pts).astype(np.int32)], 1)
    out = img.copy()
    where = stamp.astype(bool)
    out[where] = background[where]
    return out


def crack(img: np.ndarray, rng: np.random.Generator, centre: tuple[int, int], background: np.ndarray) -> np.ndarray:
    """A jagged dark fracture with one side branch."""
    side = min(img.shape[:2])
    stamp = np.zeros(img.shape[:2], np.uint8)
    trunk = _random_walk(centre, rng, int(rng.integers(6, 10)), side * 0.035, 0.9)
    branch = _random_walk(tuple(trunk[len(trunk) // 2]), rng, 4, side * 0.03, 0.9)
    cv2.polylines(stamp, [trunk, branch], False, 1, 1)
    darker = _local_mean(img, centre, max(2, side // 16)) * 0.25
    return _paint(img, stamp, darker if darker.mean() < 60 else np.full(img.shape[2], 10.0, np.float32))


DEFECTS: dict[str, Drawer] = {"scratch": scratch, "hole": hole, "stain": stain, "missing": missing, "crack": crack}


def apply_defect(clean: np.ndarray, kind: str, rng: np.random.Generator, *, region: np.ndarray,
                 background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paint a defect of ``kind`` centred inside ``region``.

    Args:
        clean: ``uint8`` ``HxWxC`` image.
        kind: one of :data:`DEFECTS`.
        region: bool ``HxW``; where the defect may be centred (the object, or everything).
        background: ``uint8`` ``HxWxC``; what a missing part reveals.

    Returns:
        (defective image, bool mask of exactly the changed pixels — never empty).
    """
    if kind not in DEFECTS:
        raise ValueError(f"unknown defect kind {kind!r}; known: {sorted(DEFECTS)}")
    for _ in range(_MAX_ATTEMPTS):
        out = DEFECTS[kind](clean, rng, _pick_centre(region, rng), background)
        mask = np.any(out != clean, axis=-1)
        if mask.any():
            return out, mask
    raise RuntimeError(f"{kind} defect changed no pixel in {_MAX_ATTEMPTS} attempts (image too uniform?)")
