"""Reading images and masks (numpy + Pillow only, so data preparation never imports torch).

Conventions (fixed here so every method sees the same data):

* Images are always RGB. Grayscale (MVTec grid/screw/zipper), palette, RGBA (HeadCT: alpha is dropped,
  as ``PIL.Image.convert('RGB')`` does in the community loaders) and 16-bit images are converted.
  16-bit values are mapped to 8 bits by dividing by 257 (65535 -> 255).
* Masks are boolean: any non-zero pixel is anomalous (VisA masks hold defect ids 1, 2, ..., not 255).
  Multi-channel masks are anomalous where any colour channel (alpha excluded) is non-zero.
* Sizes are ``(height, width)``, like the arrays and tensors they describe.
* The loader never resizes the image (the method's transform does); the mask is resized to
  ``mask_size`` with nearest-neighbour interpolation of the *binarised* mask, so it stays binary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from siad.errors import DataError

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}


def open_checked(path: Path) -> Image.Image:
    """Open and fully decode ``path`` (truncated files fail here, not later), or raise DataError."""
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found; re-run the dataset preparation") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: unreadable or corrupt image ({err}); re-download the dataset or delete "
                        "this file and re-run the preparation") from None
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """Integer / float single-channel images to 8-bit L (16-bit range divided by 257)."""
    arr = np.asarray(image).astype(np.float64)
    if image.mode in _SIXTEEN_BIT or arr.max(initial=0) > 255:
        arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def read_image(path: Path) -> Image.Image:
    """The image at ``path`` as 8-bit RGB (see the module docstring for the conversions)."""
    with open_checked(Path(path)) as image:
        if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
            return _to_8bit(image).convert("RGB")
        return image.convert("RGB")


def read_mask(path: Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Boolean ``H x W`` mask (any non-zero value is anomalous).

    Args:
        expected_size: ``(height, width)`` of the image the mask belongs to; a different size raises.
    """
    path = Path(path)
    with open_checked(path) as mask:
        arr = np.asarray(mask)
        colour = [i for i, band in enumerate(mask.getbands()) if band != "A"]  # alpha is not a label
    binary = arr != 0 if arr.ndim == 2 else (arr[..., colour] != 0).any(axis=-1)
    if expected_size is not None and binary.shape != tuple(expected_size):
        raise DataError(f"{path}: mask size {binary.shape} (height, width) differs from its image's "
                        f"{tuple(expected_size)}; the mask does not belong to the image: re-extract the dataset")
    return binary


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a boolean mask to ``(height, width)``."""
    if mask.shape == tuple(size):
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.NEAREST)) > 0
