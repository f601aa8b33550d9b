"""Shared helpers of the synthetic stand-ins: seeded generators, image arrays and image files.

Every random draw of the stand-ins comes from a generator derived from ``(seed, *keys)`` with a
stable hash (CRC-32) of the string keys, so one image depends only on the seed and on *which* image
it is (dataset, class, split, index) — never on how many other classes were requested or on the
order images are written in. Same seed → byte-identical files.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Image file formats the native layouts use, keyed by file extension (case-insensitive).
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}
JPEG_QUALITY = 95


def derive_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``keys`` (strings hashed with CRC-32, not ``hash``)."""
    entropy = [int(seed)] + [k if isinstance(k, int) else zlib.crc32(k.encode("utf-8")) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def to_uint8(field: np.ndarray) -> np.ndarray:
    """Round and clip a float image to ``uint8``."""
    return np.clip(np.rint(field), 0, 255).astype(np.uint8)


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an ``HxWx3`` image as ``HxWx1`` (the channel axis is kept for the defect code)."""
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return to_uint8(luma)[..., None]


def add_sensor_noise(img: np.ndarray, rng: np.random.Generator, sigma: float = 2.0) -> np.ndarray:
    """Add faint Gaussian noise, as every camera image has (keeps images of one class distinct)."""
    return to_uint8(img.astype(np.float32) + rng.normal(0.0, sigma, img.shape).astype(np.float32))


def save_image(arr: np.ndarray, path: Path, mode: str | None = None) -> None:
    """Write ``arr`` (``HxW``, ``HxWx1`` or ``HxWx3`` uint8) to ``path``; the format follows the extension.

    ``mode`` converts before saving (``L``, ``RGB``, ``RGBA``, ``P``); ``None`` keeps the array's mode.
    """
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    img = Image.fromarray(arr)
    if mode is not None and img.mode != mode:
        img = img.convert(mode) if mode != "P" else img.convert("RGB").quantize(colors=64, dither=Image.Dither.NONE)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"save_image: unsupported extension {path.suffix!r} in {path}; use one of {sorted(_FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": JPEG_QUALITY} if fmt == "JPEG" else {}
    img.save(path, format=fmt, **options)


def binary_mask(mask: np.ndarray, value: int = 255) -> np.ndarray:
    """A boolean mask as a ``uint8`` image holding 0 and ``value`` (255 for MVTec, a class id for VisA)."""
    return (mask.astype(bool) * value).astype(np.uint8)
