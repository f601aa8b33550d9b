"""Procedural textures: noise, stripes, weaves, grids, lattices, veins and layers.

A texture is a scalar *pattern field* in [0, 1] (which carries the structure) mapped onto a
per-class two-colour palette. Patterns are stationary, so every image of a class looks like a
different crop of the same material — which is what MVTec/DTD texture images are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

Color = tuple[int, int, int]
Pattern = Callable[..., np.ndarray]


def value_noise(h: int, w: int, rng: np.random.Generator, cell_y: float, cell_x: float | None = None) -> np.ndarray:
    """Smooth noise in [0, 1]: random values on a grid of ``cell`` px, bicubically interpolated.

    Different ``cell_y``/``cell_x`` give anisotropic (fibre-like) noise.
    """
    cell_x = cell_y if cell_x is None else cell_x
    gh, gw = int(np.ceil(h / cell_y)) + 3, int(np.ceil(w / cell_x)) + 3
    grid = rng.random((gh, gw), dtype=np.float32)
    up = cv2.resize(grid, (int(gw * cell_x), int(gh * cell_y)), interpolation=cv2.INTER_CUBIC)
    oy, ox = int(rng.integers(0, max(1, int(cell_y)))), int(rng.integers(0, max(1, int(cell_x))))
    return np.clip(up[oy : oy + h, ox : ox + w], 0.0, 1.0)


def fbm(h: int, w: int, rng: np.random.Generator, cell: float, octaves: int = 3) -> np.ndarray:
    """Fractal noise (octaves of value noise, halving cell and amplitude), rescaled to [0, 1]."""
    out = np.zeros((h, w), np.float32)
    for octave in range(octaves):
        out += 0.5**octave * value_noise(h, w, rng, max(1.0, cell / 2**octave))
    return _rescale(out)


def _rescale(f: np.ndarray) -> np.ndarray:
    lo, hi = float(f.min()), float(f.max())
    return (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)


def _rotated_coords(h: int, w: int, rng: np.random.Generator, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates rotated by ``angle_deg`` (+ a small random jitter) and randomly shifted."""
    theta = np.deg2rad(angle_deg + rng.uniform(-4.0, 4.0))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = x + rng.uniform(0, 1000), y + rng.uniform(0, 1000)
    return x * np.cos(theta) + y * np.sin(theta), -x * np.sin(theta) + y * np.cos(theta)


def stripes(h: int, w: int, rng: np.random.Generator, period: float, angle: float = 0.0,
            warp: float = 0.0) -> np.ndarray:
    """Parallel bands, optionally warped by noise (wood grain, brushed metal, lamellas)."""
    u, _ = _rotated_coords(h, w, rng, angle)
    phase = 2 * np.pi * warp * fbm(h, w, rng, cell=max(4.0, 2 * period))
    return 0.5 + 0.5 * np.sin(2 * np.pi * u / period + phase)


def weave(h: int, w: int, rng: np.random.Generator, period: float, angle: float = 0.0) -> np.ndarray:
    """Plain weave: threads alternately pass over and under, each shaded across its width."""
    u, v = _rotated_coords(h, w, rng, angle)
    over = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    across_u = np.sin(np.pi * np.mod(u, period) / period)
    across_v = np.sin(np.pi * np.mod(v, period) / period)
    base = np.where(over, across_v, across_u)
    return 0.8 * base + 0.2 * value_noise(h, w, rng, max(2.0, period / 2))


def grid_lines(h: int, w: int, rng: np.random.Generator, period: float, width: float, angle: float = 0.0) -> np.ndarray:
    """A lattice of lines (wire mesh): 1 on the wires, 0 in the openings."""
    u, v = _rotated_coords(h, w, rng, angle)
    du = np.abs(np.mod(u, period) - period / 2)
    dv = np.abs(np.mod(v, period) - period / 2)
    wire = np.maximum(np.clip(width / 2 - du + 0.5, 0, 1), np.clip(width / 2 - dv + 0.5, 0, 1))
    return 0.85 * wire + 0.15 * value_noise(h, w, rng, 3.0)


def dots(h: int, w: int, rng: np.random.Generator, period: float, radius: float) -> np.ndarray:
    """A lattice of round holes (perforated sheet): 0 in the holes, 1 on the sheet."""
    u, v = _rotated_coords(h, w, rng, 0.0)
    du = np.mod(u, period) - period / 2
    dv = np.mod(v, period) - period / 2
    hole = np.clip(radius - np.hypot(du, dv) + 0.5, 0, 1)
    return (1 - hole) * (0.8 + 0.2 * value_noise(h, w, rng, 6.0))


def blobs(h: int, w: int, rng: np.random.Generator, cell: float, threshold: float = 0.55) -> np.ndarray:
    """Soft-edged blotches: low-frequency noise pushed through a steep sigmoid."""
    f = fbm(h, w, rng, cell, octaves=2)
    return 1 / (1 + np.exp(-12 * (f - threshold)))


def marble(h: int, w: int, rng: np.random.Generator, period: float, turbulence: float) -> np.ndarray:
    """Thin dark veins following a turbulent sine (marble)."""
    u, _ = _rotated_coords(h, w, rng, 35.0)
    t = np.abs(np.sin(np.pi * u / period + turbulence * 2 * np.pi * fbm(h, w, rng, period, octaves=4)))
    return t**0.3


def layers(h: int, w: int, rng: np.random.Generator, cell: float) -> np.ndarray:
    """Horizontal strata: noise that varies fast along y and slowly along x."""
    return _rescale(0.75 * value_noise(h, w, rng, cell, cell * 12) + 0.25 * value_noise(h, w, rng, 2.0))


def fibres(h: int, w: int, rng: np.random.Generator, cell: float) -> np.ndarray:
    """Long thin fibres: strongly anisotropic noise, sharpened."""
    f = _rescale(value_noise(h, w, rng, cell * 10, cell) + 0.5 * value_noise(h, w, rng, cell * 6, cell * 0.6))
    return f**1.5


def speckle(h: int, w: int, rng: np.random.Generator, cell: float, density: float = 0.06) -> np.ndarray:
    """Terrazzo-like tile: smooth ground with scattered small dark chips."""
    ground = 0.7 + 0.3 * fbm(h, w, rng, cell)
    chips = value_noise(h, w, rng, 2.5) > 1 - density
    return np.where(chips, 0.15, ground)


def cells(h: int, w: int, rng: np.random.Generator, cell: float) -> np.ndarray:
    """Leather grain: pebbled noise with darker creases along noise ridges."""
    f = fbm(h, w, rng, cell)
    creases = np.clip(1 - np.abs(f - 0.5) * 12, 0, 1)
    return np.clip(0.6 + 0.4 * fbm(h, w, rng, cell / 3, octaves=2) - 0.5 * creases, 0, 1)


PATTERNS: dict[str, Pattern] = {
    "stripes": stripes,
    "weave": weave,
    "grid": grid_lines,
    "dots": dots,
    "blobs": blobs,
    "marble": marble,
    "layers": layers,
    "fibres": fibres,
    "speckle": speckle,
    "cells": cells,
    "fbm": fbm,
}


@dataclass(frozen=True)
class TextureStyle:
    """A material: a pattern with its parameters, mapped from colour ``dark`` (0) to ``light`` (1)."""

    pattern: str
    dark: Color
    light: Color
    params: dict[str, Any] = field(default_factory=dict)


def pattern_field(style: TextureStyle, h: int, w: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """The style's pattern in [0, 1]; lengths in ``params`` are in units of 1/64 image side (``scale``)."""
    params = {k: (v * scale if k in _LENGTH_PARAMS else v) for k, v in style.params.items()}
    return np.clip(PATTERNS[style.pattern](h, w, rng, **params), 0.0, 1.0).astype(np.float32)


_LENGTH_PARAMS = {"period", "width", "radius", "cell", "cell_y", "cell_x"}


def colorize(field_: np.ndarray, dark: Color, light: Color) -> np.ndarray:
    """Map a [0, 1] field linearly onto the palette ``dark`` → ``light`` (float ``HxWx3``)."""
    lo, hi = np.asarray(dark, np.float32), np.asarray(light, np.float32)
    return lo + field_[..., None] * (hi - lo)


def render_texture(style: TextureStyle, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """An ``HxWx3`` float image of the material, with a slight per-image brightness jitter."""
    scale = min(h, w) / 64.0
    img = colorize(pattern_field(style, h, w, rng, scale), style.dark, style.light)
    return img * rng.uniform(0.95, 1.05)
