"""Reading images and masks (numpy + Pillow only, so data preparation never imports torch).

Conventions (fixed here so every method sees the same data):

* EXIF orientation is applied first (``PIL.ImageOps.exif_transpose``) to images and masks alike, so
  every file is used the way an image viewer shows it (a phone JPEG tagged "rotate 90" is rotated).
  The community loaders (``Image.open(...).convert('RGB')``) ignore the tag. Whether any file of the
  nine datasets carries a tag other than "upright" is not verified here (BrainMRI's web-collected JPEGs
  are the likeliest); such a file would be turned here and not in the community's runs.
* Images are always RGB. Grayscale (MVTec grid/screw/zipper), palette, RGBA (HeadCT: alpha is dropped,
  as ``PIL.Image.convert('RGB')`` does in the community loaders) and 16-bit images are converted.
* Integer images deeper than 8 bits (modes ``I;16*`` and ``I``) are read as 16-bit data whatever their
  content: ``value / 257`` rounded (0 -> 0, 65535 -> 255). The rule is fixed by the mode, never by the
  pixel values, so two images of one dataset can never be scaled differently. A mode-``I`` image
  with values outside 0..65535 is refused. Float images (mode ``F``) are refused: their value range
  (0..1? 0..255? calibrated units?) is not recorded in the file, and guessing would silently change them.
* Masks are boolean: any non-zero pixel is anomalous (VisA masks hold defect ids 1, 2, ..., not 255),
  whatever the mode (8/16-bit, float, palette indices).
  Multi-channel masks are anomalous where any colour channel (alpha excluded) is non-zero.
* Sizes are ``(height, width)``, like the arrays and tensors they describe.
* The loader never resizes the image (the method's transform does); the mask is resized to
  ``mask_size`` with nearest-neighbour interpolation of the *binarised* mask, so it stays binary.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from siad.errors import DataError

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_SIXTEEN_BIT_MAX = 65535
_CONVERT_FIX = "convert it to an 8- or 16-bit PNG (choosing the scaling yourself) and re-run the preparation"


class ImageFileError(DataError):
    """An image or mask file that cannot be used; ``path`` and ``reason`` let callers list many at once."""

    def __init__(self, path: Path, reason: str, fix: str) -> None:
        super().__init__(f"{path}: {reason}; {fix}")
        self.path = Path(path)
        self.reason = reason


def open_checked(path: Path, data: bytes | None = None) -> Image.Image:
    """Open and fully decode ``path`` (truncated files fail here, not later), or raise ImageFileError.

    ``data``, when given, is the file's content already read (the preparation step hashes and decodes
    each file from one read); ``path`` then only names the file in messages. Any exception Pillow raises
    while decoding counts as "unreadable": its format plugins signal broken files with many exception types
    (``OSError``, ``SyntaxError``, ``struct.error``, ``IndexError``, ...), and the file is the input at fault.
    """
    try:
        image = Image.open(io.BytesIO(data) if data is not None else path)
        image.load()
    except FileNotFoundError:
        raise ImageFileError(path, "image file not found", "re-run the dataset preparation") from None
    except Exception as err:  # noqa: BLE001 (see the docstring)
        raise ImageFileError(path, f"unreadable or corrupt image ({err})",
                             "re-download the dataset or delete this file and re-run the preparation") from None
    return image


def oriented(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation tag says (itself when untagged or already upright)."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) in (0, 1):
        return image
    return ImageOps.exif_transpose(image)


def _sixteen_to_8bit(image: Image.Image, path: Path) -> Image.Image:
    """A 16-bit-range integer image as 8-bit L: ``round(value / 257)`` (65535 -> 255)."""
    arr = np.asarray(image, dtype=np.float64)
    if arr.size and (arr.min() < 0 or arr.max() > _SIXTEEN_BIT_MAX):
        raise ImageFileError(path, f"32-bit integer image with values in [{arr.min():.0f}, {arr.max():.0f}], outside "
                             "the 16-bit range 0..65535 in which the suite reads integer images", _CONVERT_FIX)
    return Image.fromarray(np.rint(arr / 257.0).astype(np.uint8))


def to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """A decoded image as upright 8-bit RGB (module docstring); ``path`` names the file in errors."""
    image = oriented(image)
    if image.mode == "F":
        raise ImageFileError(path, "32-bit float image (mode F), whose value range is not stored in the file, so "
                             "the suite does not guess a scaling", _CONVERT_FIX)
    if image.mode in _SIXTEEN_BIT:
        image = _sixteen_to_8bit(image, path)
    return image.convert("RGB")


def read_image(path: Path, expected_sha256: str | None = None) -> Image.Image:
    """The image at ``path`` as upright 8-bit RGB (see the module docstring for the conversions).

    ``expected_sha256``: the file's SHA-256 recorded in the dataset index; a file that no longer has it was
    changed after preparation (its numbers would not be those of the index the run is stamped with): DataError.
    """
    path = Path(path)
    with open_checked(path, read_verified(path, expected_sha256)) as image:
        return to_rgb(image, path)


def read_verified(path: Path, expected_sha256: str | None) -> bytes | None:
    """The bytes of ``path`` checked against ``expected_sha256`` (None: no check, and nothing read here)."""
    if not expected_sha256:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ImageFileError(path, f"cannot be read ({err.strerror or err})") from None
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise DataError(f"{path}: changed since the dataset was prepared (its SHA-256 is not the one in meta.json); "
                        "prepare the dataset again: snakemake --cores 1 all --forcerun prepare_dataset "
                        "(plus your --configfile)")
    return data


def mask_array(mask: Image.Image) -> np.ndarray:
    """Boolean ``H x W`` array of a decoded mask: upright, any non-zero colour value is anomalous."""
    mask = oriented(mask)
    arr = np.asarray(mask)
    colour = [i for i, band in enumerate(mask.getbands()) if band != "A"]  # alpha is not a label
    return arr != 0 if arr.ndim == 2 else (arr[..., colour] != 0).any(axis=-1)


def read_mask(path: Path, expected_size: tuple[int, int] | None = None,
              expected_sha256: str | None = None) -> np.ndarray:
    """Boolean ``H x W`` mask (any non-zero value is anomalous).

    Args:
        expected_size: ``(height, width)`` of the image the mask belongs to; a different size raises.
        expected_sha256: the mask file's SHA-256 in the dataset index (see :func:`read_image`).
    """
    path = Path(path)
    with open_checked(path, read_verified(path, expected_sha256)) as mask:
        binary = mask_array(mask)
    check_mask_size(binary.shape, expected_size, path)
    return binary


def check_mask_size(shape: tuple[int, ...], expected_size: tuple[int, int] | None, path: Path) -> None:
    """Raise DataError when a mask of ``shape`` (height, width) does not fit its image's ``expected_size``."""
    if expected_size is not None and tuple(shape) != tuple(expected_size):
        raise ImageFileError(path, f"mask size {tuple(shape)} (height, width) differs from its image's "
                             f"{tuple(expected_size)}", "the mask does not belong to the image: re-extract the dataset")


MASK_RESIZES = ("nearest", "bilinear")


def resize_mask(mask: np.ndarray, size: tuple[int, int], mode: str = "nearest") -> np.ndarray:
    """Resize a boolean mask to ``(height, width)``: ``nearest`` (the suite's evaluation masks; AA-CLIP's training
    masks) or ``bilinear`` (PIL bilinear resize of the 0/255 mask, then > 0.5 of full scale: how AnomalyCLIP and
    AdaCLIP make their training masks)."""
    if mode not in MASK_RESIZES:
        raise ValueError(f"unknown mask resize {mode!r}; use one of {MASK_RESIZES}")
    if mask.shape == tuple(size):
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    if mode == "bilinear":
        return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0 > 0.5
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.NEAREST)) > 0
