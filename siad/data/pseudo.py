"""Pseudo-anomalies: CutPaste with Poisson blending (the NSA recipe, as AnomalyGPT uses it).

SIAD-LLM trains on normal images only; its abnormal examples are made by cutting a randomly sized
patch out of one normal image, rescaling it, and pasting it at a random place of another normal
image (possibly the same one), with Poisson image editing (``cv2.seamlessClone``, NORMAL_CLONE)
hiding the seam. The pasted region is the ground-truth mask. The same generator serves the
"pseudo-anomaly" setting of the baselines.

Sampling follows NSA's ``patch_ex`` as configured by AnomalyGPT (spec
``baselines_llm_filo_anovl.md`` §1 "Anomaly simulation"):

1. Half-widths ``(offset + Gamma(shape, scale))·side`` clipped to the half-width bounds
   ``round(lo·side)..round(hi·side)`` per axis; a source centre is drawn uniformly and the source
   box is ``centre ± half-width`` clipped to the image. With a background model
   (``skip_background``) the box is redrawn until more than ``min_object_pct`` of it is object.
2. The patch is rescaled by ``clip(N(1, 0.5), *scale_bounds)`` keeping its aspect ratio; as in NSA
   the resulting *full* side is clipped to the *half-width* bounds, so pasted patches are between
   ``round(lo·side)`` and ``round(hi·side)`` pixels per axis.
3. A destination centre is drawn uniformly (patch fully inside the image); with a background model
   it is redrawn until the patch holds enough object and overlaps the destination object by more
   than ``min_overlap_pct``. The pasted region is then restricted to pixels that are object in the
   source or the destination, while the Poisson mask still covers the whole rectangle (NSA adds
   the background-on-background pixels back "to avoid artefacts").
4. The mask handed to ``seamlessClone`` has a one-pixel zero frame (as NSA). The first patch is
   always added, each further patch with probability 0.5.

Choices and guarantees beyond NSA (documented because they change behaviour in edge cases):

* All randomness comes from the ``numpy.random.Generator`` passed in; ``seamlessClone`` is
  deterministic, so the output depends only on the inputs and the generator state.
* ``seamlessClone`` alters pixels only inside the bounding box of its mask's 255-valued pixels, but
  for a non-rectangular mask it also alters pixels *outside* the mask inside that box (the Poisson
  solve covers the whole box). The cloned result is therefore composited back onto the image
  inside the pasted region only, so the output differs from the input exactly within the returned
  mask. For the rectangular patches used without a background model this compositing changes
  nothing (checked in the tests).
* A patch placement fails when no placement meets the object criteria within ``max_tries``
  draws, when the Poisson mask has fewer than 50 pixels (NSA's guard), when the Poisson mask is
  thinner than 3 px on either axis (a patch of 3 or 4 px on a side: ``cv2.seamlessClone`` cannot
  solve such a mask and raises ``!fixedSize() in function 'release'``; see :func:`poisson_clone`),
  or when the blend changed no pixel at all (OpenCV erodes the mask by 3 px, so thin patches can
  vanish; NSA would keep such an invisible "anomaly"). A failed *further* patch is skipped (as
  NSA). A failed *first* patch is replaced by one deterministic fallback draw that
  ignores the background model and raises both patch sides to at least 10 pixels, which always
  succeeds (it is kept even if invisible, which happens only when the source patch equals the
  destination content); so every pseudo-anomaly has a non-empty mask (NSA/AnomalyGPT would instead return an
  unchanged image, which AnomalyGPT then trains on as "anomalous" with an empty mask).
* Half-width lower bounds are at least one pixel (matters only for images under ~17 px).
* Grey-scale inputs (HxW or HxWx1) are replicated to three channels; outputs are always HxWx3.

Pasted patches: :meth:`CutPastePoisson.generate` also returns the rectangle of every pasted patch in paste
order (:class:`PseudoAnomaly`), as NSA's ``patch_ex`` returns its label centres: AnomalyGPT counts and places
the anomalies of its target answer by pasted patch, not by the regions of the binarised label (a patch whose
label splits at the 0.3 threshold is still one anomaly there).

Labels: ``label="binary"`` (default, SIAD spec) returns the pasted region as a 0/1 mask.
``label="logistic"`` returns AnomalyGPT's soft label ``m·σ(k(d−x0))``: ``m`` = pixels of the
pasted region whose channel-mean absolute change exceeds 1 grey level (5×5 median-filtered), ``d`` =
that change, median-filtered with a radius-5 disk; AnomalyGPT's loss binarises it at > 0.3 (that is
the consumer's job). If nothing visibly changed (``m`` empty) the binary region is returned instead,
so the mask stays non-empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from scipy import ndimage

from siad.errors import ConfigError, UnknownNameError

MIN_IMAGE_SIDE = 16
"""Smallest image side accepted: the fallback patch (10 px) plus room to place it."""

_FALLBACK_MIN_SIDE = 10  # 8x8 interior after the zero frame = 64 >= _MIN_CLONE_AREA
_MIN_CLONE_AREA = 50  # NSA: seamlessClone misbehaves on tiny masks
_MIN_CLONE_SIDE = 3  # seamlessClone raises on a mask whose 255-box is thinner than this (poisson_clone)
_CHANGE_TOL = 1.0  # NSA `tol`: mean absolute change (grey levels) that counts as "changed"

Bounds = tuple[float, float]
Box = tuple[int, int, int, int]  # (row0, row1, col0, col1), half-open


@dataclass(frozen=True)
class PatchParams:
    """Per-class knobs of the NSA recipe (defaults: AnomalyGPT's generic MVTec/VisA values).

    ``width_bounds_pct`` are half-width bounds per axis (rows, columns) as fractions of the image
    side; ``gamma_params`` = (shape, scale, offset) of the half-width distribution.
    ``skip_background`` = (background brightness, threshold) or ``None`` for no background model.
    ``intensity_logistic`` = (k, x0) of the optional soft label. ``max_tries`` bounds each
    placement search (NSA: 200).
    """

    width_bounds_pct: tuple[Bounds, Bounds] = ((0.03, 0.4), (0.03, 0.4))
    num_patches: int = 2
    min_object_pct: float = 0.25
    min_overlap_pct: float = 0.25
    scale_bounds: Bounds = (0.7, 1.3)
    skip_background: tuple[float, float] | None = None
    intensity_logistic: tuple[float, float] = (1 / 12, 24)
    gamma_params: tuple[float, float, float] = (2.0, 0.05, 0.03)
    max_tries: int = 200

    def __post_init__(self) -> None:
        for lo, hi in self.width_bounds_pct:
            if not 0 < lo <= hi <= 0.45:
                raise ConfigError(
                    f"PatchParams.width_bounds_pct {self.width_bounds_pct} invalid: each axis needs "
                    "0 < lo <= hi <= 0.45 (half-widths as fractions of the image side); fix the bounds"
                )
        if self.num_patches < 1 or self.max_tries < 1:
            raise ConfigError("PatchParams.num_patches and max_tries must be >= 1; fix the config")
        if not 0 < self.scale_bounds[0] <= self.scale_bounds[1]:
            raise ConfigError(f"PatchParams.scale_bounds {self.scale_bounds} must satisfy 0 < lo <= hi")


# AnomalyGPT code/datasets/mvtec.py (the spec lists the non-default bounds; cable and hazelnut
# also differ in the code and are taken from it).
_MVTEC_WIDTH_BOUNDS: dict[str, tuple[Bounds, Bounds]] = {
    "bottle": ((0.03, 0.4), (0.03, 0.4)),
    "cable": ((0.05, 0.4), (0.05, 0.4)),
    "capsule": ((0.03, 0.15), (0.03, 0.4)),
    "hazelnut": ((0.03, 0.35), (0.03, 0.35)),
    "metal_nut": ((0.03, 0.4), (0.03, 0.4)),
    "pill": ((0.03, 0.2), (0.03, 0.4)),
    "screw": ((0.03, 0.12), (0.03, 0.12)),
    "toothbrush": ((0.03, 0.4), (0.03, 0.2)),
    "transistor": ((0.03, 0.4), (0.03, 0.4)),
    "zipper": ((0.03, 0.4), (0.03, 0.2)),
    "carpet": ((0.03, 0.4), (0.03, 0.4)),
    "grid": ((0.03, 0.4), (0.03, 0.4)),
    "leather": ((0.03, 0.4), (0.03, 0.4)),
    "tile": ((0.03, 0.4), (0.03, 0.4)),
    "wood": ((0.03, 0.4), (0.03, 0.4)),
}
_MVTEC_LOGISTIC: dict[str, tuple[float, float]] = {
    "bottle": (1 / 12, 24), "cable": (1 / 12, 24), "capsule": (1 / 2, 4), "hazelnut": (1 / 12, 24),
    "metal_nut": (1 / 3, 7), "pill": (1 / 3, 7), "screw": (1, 3), "toothbrush": (1 / 6, 15),
    "transistor": (1 / 6, 15), "zipper": (1 / 6, 15), "carpet": (1 / 3, 7), "grid": (1 / 3, 7),
    "leather": (1 / 3, 7), "tile": (1 / 3, 7), "wood": (1 / 6, 15),
}
_MVTEC_BACKGROUND: dict[str, tuple[float, float]] = {
    "bottle": (200, 60), "screw": (200, 60), "capsule": (200, 60), "zipper": (200, 60),
    "hazelnut": (20, 20), "pill": (20, 20), "toothbrush": (20, 20), "metal_nut": (20, 20),
}
_MVTEC_TEXTURES = frozenset({"carpet", "grid", "leather", "tile", "wood"})
_TEXTURE_SCALE: Bounds = (0.5, 2.0)

_VISA_PARAMS = PatchParams(min_object_pct=0.0, scale_bounds=_TEXTURE_SCALE)


def anomalygpt_params(dataset: str, cls_name: str) -> PatchParams:
    """AnomalyGPT's per-class NSA settings for ``dataset`` / ``cls_name``.

    MVTec: per-class width bounds, background model and logistic (k, x0); textures rescale in
    (0.5, 2). VisA: fixed bounds (0.03, 0.4), (k, x0) = (1/12, 24), no background model, scale
    (0.5, 2). Both use 2 patches, ``min_object_pct`` 0 and ``min_overlap_pct`` 0.25 (AnomalyGPT's
    ``self_sup_args``). Any other dataset gets the generic :class:`PatchParams` defaults.
    """
    key = dataset.lower().replace("_", "").replace("-", "")
    if key == "visa":
        return _VISA_PARAMS
    if key not in {"mvtec", "mvtecad"}:
        return PatchParams()
    if cls_name not in _MVTEC_WIDTH_BOUNDS:
        known = ", ".join(sorted(_MVTEC_WIDTH_BOUNDS))
        raise UnknownNameError(f"unknown MVTec AD class {cls_name!r} for pseudo-anomalies; known: {known}")
    return PatchParams(
        width_bounds_pct=_MVTEC_WIDTH_BOUNDS[cls_name],
        min_object_pct=0.0,
        scale_bounds=_TEXTURE_SCALE if cls_name in _MVTEC_TEXTURES else (0.7, 1.3),
        skip_background=_MVTEC_BACKGROUND.get(cls_name),
        intensity_logistic=_MVTEC_LOGISTIC[cls_name],
    )


def as_rgb_uint8(image: np.ndarray, what: str = "image") -> np.ndarray:
    """Return ``image`` as HxWx3 uint8 (grey HxW / HxWx1 are replicated); ValueError otherwise."""
    if image.dtype != np.uint8:
        raise ValueError(
            f"{what} has dtype {image.dtype}; pseudo-anomalies need uint8 pixels "
            "(fix: np.clip(x, 0, 255).astype(np.uint8), or 255*x for images in [0, 1])"
        )
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(
            f"{what} has shape {image.shape}; expected HxW, HxWx1 or HxWx3 (fix: drop alpha/extra channels)"
        )
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"{what} is {image.shape[0]}x{image.shape[1]}; pseudo-anomalies need sides >= {MIN_IMAGE_SIDE} px "
            "(fix: resize images to the model input size, e.g. 224, before generating)"
        )
    return np.ascontiguousarray(image)


def object_mask(image: np.ndarray, skip_background: tuple[float, float]) -> np.ndarray:
    """NSA background model: True where the channel mean differs from the background brightness
    by more than the threshold, cleaned with a 7x7 median filter."""
    brightness, threshold = skip_background
    obj = np.abs(image.mean(axis=-1) - brightness) > threshold
    return cv2.medianBlur(obj.astype(np.uint8), 7).astype(bool)


def poisson_clone(canvas: np.ndarray, dest: np.ndarray, clone_mask: np.ndarray) -> np.ndarray:
    """Raw ``cv2.seamlessClone`` (NORMAL_CLONE) of ``canvas`` into a copy of ``dest``.

    ``canvas`` is ``dest`` with the patch already written at its final position and
    ``clone_mask`` (HxW uint8, 0/255) marks the pasted pixels in the same frame. OpenCV centres its
    region of interest, the bounding box of the 255-valued pixels, on ``p``; ``p`` is computed so
    that the box lands exactly where it is in ``clone_mask`` (OpenCV's start = p − extent//2 with
    extent = max − min). OpenCV erodes the mask in place, hence the copy.

    OpenCV zeroes the mask's outer one-pixel border and needs the bounding box of the remaining
    255-valued pixels to span at least ``_MIN_CLONE_SIDE`` (3) pixels on both axes: a thinner box
    (extent max − min < 2) makes ``cv2.seamlessClone`` fail with ``(-215:Assertion failed)
    !fixedSize() in function 'release'`` (OpenCV 5.1; checked exhaustively on random masks). Such a
    mask is refused here with a ValueError naming the box; the generator never passes one (its
    ``_blend`` counts such a patch as a failed placement).
    """
    inner_rows, inner_cols = np.nonzero(clone_mask[1:-1, 1:-1] == 255)
    if inner_rows.size and min(np.ptp(inner_rows), np.ptp(inner_cols)) + 1 < _MIN_CLONE_SIDE:
        raise ValueError(
            f"Poisson mask box rows {inner_rows.min() + 1}..{inner_rows.max() + 1}, cols {inner_cols.min() + 1}.."
            f"{inner_cols.max() + 1} is thinner than {_MIN_CLONE_SIDE} px; cv2.seamlessClone cannot blend it "
            "(fix: skip such a patch, as CutPastePoisson does)"
        )
    rows, cols = np.nonzero(clone_mask == 255)
    centre = (
        int(cols.min() + (cols.max() - cols.min()) // 2),
        int(rows.min() + (rows.max() - rows.min()) // 2),
    )
    return cv2.seamlessClone(canvas, dest, clone_mask.copy(), centre, cv2.NORMAL_CLONE)


@dataclass(frozen=True)
class _Limits:
    """Pixel bounds of patch sides for one image size: half-width bounds per axis."""

    lo: tuple[int, int]
    hi: tuple[int, int]

    @classmethod
    def of(cls, params: PatchParams, shape: tuple[int, int]) -> _Limits:
        lo = tuple(max(1, int(np.round(b[0] * n))) for b, n in zip(params.width_bounds_pct, shape))
        hi = tuple(max(low, int(np.round(b[1] * n))) for b, n, low in zip(params.width_bounds_pct, shape, lo))
        return cls(lo=lo, hi=hi)  # type: ignore[arg-type]


def _uniform_int(rng: np.random.Generator, low: int, high: int) -> int:
    """Integer in [low, high), degenerating to ``low`` when the range is empty."""
    return int(rng.integers(low, max(high, low + 1)))


@dataclass(frozen=True)
class PseudoAnomaly:
    """One pseudo-anomalous image: ``image`` uint8 [H, W, 3], ``mask`` float32 [H, W] (binary or soft label) and
    ``boxes``, the rectangle (row0, row1, col0, col1; half-open, in ``image``'s pixels) of every pasted patch in
    paste order (NSA's ``patch_ex`` coordinates: the whole pasted rectangle, its one-pixel frame included)."""

    image: np.ndarray
    mask: np.ndarray
    boxes: tuple[Box, ...]


class CutPastePoisson:
    """CutPaste + Poisson blending pseudo-anomaly generator (see the module docstring).

    ``label="binary"`` (default; SIAD spec): mask = pasted region, 0/1. ``label="logistic"``:
    AnomalyGPT's soft intensity label in [0, 1] (to be binarised at > 0.3 by the consumer).
    Call it for ``(image, mask)``; :meth:`generate` also gives the pasted patches' boxes.
    """

    def __init__(self, params: PatchParams = PatchParams(), *, label: Literal["binary", "logistic"] = "binary") -> None:
        if label not in ("binary", "logistic"):
            raise ConfigError(f"unknown pseudo-anomaly label mode {label!r}; use 'binary' or 'logistic'")
        self.params = params
        self.label = label

    def __call__(
        self, image: np.ndarray, source: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Paste patches of ``source`` into ``image``; return (uint8 HxWx3 image, float32 HxW mask)."""
        result = self.generate(image, source, rng)
        return result.image, result.mask

    def generate(self, image: np.ndarray, source: np.ndarray, rng: np.random.Generator) -> PseudoAnomaly:
        """Paste patches of ``source`` into ``image``: the image, its mask and the pasted boxes in paste order."""
        image = as_rgb_uint8(image, "image")
        source = as_rgb_uint8(source, "source")
        if image.shape != source.shape:
            raise ValueError(
                f"image {image.shape} and source {source.shape} differ in size; resize both to the "
                "model input size first"
            )
        out, region, boxes = self._paste_patches(image, source, rng)
        return PseudoAnomaly(out, self._make_label(image, out, region), boxes)

    def _paste_patches(
        self, image: np.ndarray, source: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, tuple[Box, ...]]:
        skip = self.params.skip_background
        objects = (object_mask(image, skip), object_mask(source, skip)) if skip is not None else None
        out, region, boxes = image, np.zeros(image.shape[:2], dtype=bool), []
        for index in range(self.params.num_patches):
            if index > 0 and rng.integers(2) == 0:
                continue
            pasted = self._paste_one(out, source, objects, rng, fallback=False)
            if pasted is None and index == 0:
                pasted = self._paste_one(out, source, None, rng, fallback=True)
            if pasted is not None:
                out, patch_region, box = pasted
                region |= patch_region
                boxes.append(box)
        return out, region, tuple(boxes)

    def _paste_one(
        self,
        dest: np.ndarray,
        source: np.ndarray,
        objects: tuple[np.ndarray, np.ndarray] | None,
        rng: np.random.Generator,
        *,
        fallback: bool,
    ) -> tuple[np.ndarray, np.ndarray, Box] | None:
        """One NSA patch: (image, pasted region, box); ``None`` when placement fails. ``fallback`` floors the
        sides at 10 px."""
        shape = dest.shape[:2]
        limits = _Limits.of(self.params, shape)
        src_obj = objects[1] if objects is not None else None
        src_box = self._sample_source_box(rng, shape, limits, src_obj)
        if src_box is None:
            return None
        patch, patch_obj = self._rescale(source, src_obj, src_box, rng, limits, fallback)
        dest_obj = objects[0] if objects is not None else None
        origin = self._sample_destination(rng, shape, patch.shape[:2], dest_obj, patch_obj)
        if origin is None:
            return None
        blended = self._blend(dest, patch, origin, dest_obj, patch_obj)
        if blended is None or (not fallback and np.array_equal(blended[0], dest)):
            return None  # an invisible paste (e.g. a thin patch eroded away by OpenCV) counts as failed
        return blended

    def _sample_source_box(
        self, rng: np.random.Generator, shape: tuple[int, int], limits: _Limits, src_obj: np.ndarray | None
    ) -> Box | None:
        shape_k, scale_k, offset = self.params.gamma_params
        half = [
            int(np.clip((offset + rng.gamma(shape_k, scale_k)) * n, lo, hi))
            for n, lo, hi in zip(shape, limits.lo, limits.hi)
        ]
        for _ in range(self.params.max_tries):
            centre = [_uniform_int(rng, lo, n - lo) for n, lo in zip(shape, limits.lo)]
            r0, r1 = max(centre[0] - half[0], 0), min(centre[0] + half[0], shape[0])
            c0, c1 = max(centre[1] - half[1], 0), min(centre[1] + half[1], shape[1])
            if src_obj is None or src_obj[r0:r1, c0:c1].mean() > self.params.min_object_pct:
                return r0, r1, c0, c1
        return None

    def _rescale(
        self,
        source: np.ndarray,
        src_obj: np.ndarray | None,
        box: Box,
        rng: np.random.Generator,
        limits: _Limits,
        fallback: bool,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Rescale the source patch keeping its aspect ratio; sides clipped to the (half-width)
        pixel bounds exactly as NSA does, floored at 10 px in the fallback draw."""
        r0, r1, c0, c1 = box
        height, width = r1 - r0, c1 - c0
        scale = float(np.clip(rng.normal(1.0, 0.5), *self.params.scale_bounds))
        new_h = float(np.clip(scale * height, limits.lo[0], limits.hi[0]))
        new_w = int(np.clip(int(new_h / height * width), limits.lo[1], limits.hi[1]))
        new_h = int(np.clip(int(new_w / width * height), limits.lo[0], limits.hi[0]))
        if fallback:
            new_h = max(new_h, _FALLBACK_MIN_SIDE)
            new_w = max(new_w, _FALLBACK_MIN_SIDE)
        patch = cv2.resize(source[r0:r1, c0:c1], (new_w, new_h))
        if src_obj is None:
            return patch, None
        patch_obj = cv2.resize(src_obj[r0:r1, c0:c1].astype(np.uint8), (new_w, new_h)).astype(bool)
        return patch, patch_obj

    def _sample_destination(
        self,
        rng: np.random.Generator,
        shape: tuple[int, int],
        size: tuple[int, int],
        dest_obj: np.ndarray | None,
        patch_obj: np.ndarray | None,
    ) -> tuple[int, int] | None:
        """Top-left corner of the pasted patch (NSA: centre in [side//2+1, n−side//2−1))."""
        h, w = size
        for _ in range(self.params.max_tries):
            row = _uniform_int(rng, h // 2 + 1, shape[0] - h // 2 - 1) - h // 2
            col = _uniform_int(rng, w // 2 + 1, shape[1] - w // 2 - 1) - w // 2
            if dest_obj is None or patch_obj is None:
                return row, col
            if self._object_criteria_met(dest_obj[row : row + h, col : col + w], patch_obj):
                return row, col
        return None

    def _object_criteria_met(self, dest_obj: np.ndarray, patch_obj: np.ndarray) -> bool:
        """NSA: the patch holds enough object, and its object overlaps the destination's object."""
        object_area = patch_obj.sum()
        if object_area / patch_obj.size <= self.params.min_object_pct or object_area == 0:
            return False
        return bool((dest_obj & patch_obj).sum() / object_area > self.params.min_overlap_pct)

    @staticmethod
    def _blend(
        dest: np.ndarray,
        patch: np.ndarray,
        origin: tuple[int, int],
        dest_obj: np.ndarray | None,
        patch_obj: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, Box] | None:
        """Poisson-paste ``patch`` at ``origin``; return (image, pasted region, the patch's rectangle) or
        ``None`` if the Poisson mask is too small or too thin for ``cv2.seamlessClone``."""
        h, w = patch.shape[:2]
        row, col = origin
        window = (slice(row, row + h), slice(col, col + w))
        # NSA clones the whole rectangle (with a background model it adds background-on-background
        # pixels to the object pixels "to avoid artefacts", which again gives the full rectangle)
        # but only the object pixels of source or destination count as pasted.
        clone = np.ones((h, w), dtype=bool)
        pasted = clone.copy() if dest_obj is None or patch_obj is None else patch_obj | dest_obj[window]
        for piece in (pasted, clone):  # zero frame (NSA)
            piece[0, :] = piece[-1, :] = piece[:, 0] = piece[:, -1] = False
        # a patch of 3 or 4 px on a side leaves a Poisson mask of 1 or 2 px after the frame: cv2.seamlessClone
        # cannot solve it (it raises; see poisson_clone), so it fails like a too small mask
        if clone.sum() < _MIN_CLONE_AREA or min(h, w) - 2 < _MIN_CLONE_SIDE or not pasted.any():
            return None
        canvas = dest.copy()
        canvas[window] = patch
        clone_mask = np.zeros(dest.shape[:2], dtype=np.uint8)
        clone_mask[window] = clone * np.uint8(255)
        region = np.zeros(dest.shape[:2], dtype=bool)
        region[window] = pasted
        cloned = poisson_clone(canvas, dest, clone_mask)
        return np.where(region[..., None], cloned, dest), region, (row, row + h, col, col + w)

    def _make_label(self, image: np.ndarray, out: np.ndarray, region: np.ndarray) -> np.ndarray:
        if self.label == "binary":
            return region.astype(np.float32)
        change = np.abs(out.astype(np.float32) - image.astype(np.float32)).mean(axis=-1)
        changed = (change > _CHANGE_TOL) & region
        changed = cv2.medianBlur(changed.astype(np.uint8), 5).astype(bool) & region
        if not changed.any():
            return region.astype(np.float32)
        smoothed = ndimage.median_filter(change * changed, footprint=_disk(5), mode="nearest")
        k, x0 = self.params.intensity_logistic
        soft = changed / (1.0 + np.exp(-k * (smoothed - x0)))
        return soft.astype(np.float32)


def _disk(radius: int) -> np.ndarray:
    """Boolean disk footprint (x² + y² <= r²), as skimage.morphology.disk."""
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def make_pseudo_batch(
    images: np.ndarray,
    rng: np.random.Generator,
    generator: CutPastePoisson,
    sources: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SIAD's training batch ``[normal || pseudo-anomalous]``.

    ``images``: B×H×W×3 (or B×H×W grey) uint8. Each image's patch comes from ``sources[i]``;
    by default from the previous image of the batch (``np.roll`` by one; the first takes the last),
    as AnomalyGPT takes the previously fetched image. Returns images [2B,H,W,3] uint8, masks
    [2B,H,W] float32 (zeros for the normal half) and labels [2B] int64 (B zeros, then B ones).
    """
    if images.ndim not in (3, 4) or len(images) == 0:
        raise ValueError(f"images has shape {images.shape}; expected a non-empty BxHxWx3 (or BxHxW) uint8 batch")
    normal = np.stack([as_rgb_uint8(img, f"images[{i}]") for i, img in enumerate(images)])
    if sources is None:
        donors = np.roll(normal, 1, axis=0)
    else:
        if len(sources) != len(images):
            raise ValueError(f"sources has {len(sources)} images for a batch of {len(images)}; pass one per image")
        donors = np.stack([as_rgb_uint8(src, f"sources[{i}]") for i, src in enumerate(sources)])
    results = [generator(img, src, rng) for img, src in zip(normal, donors)]
    pseudo = np.stack([res[0] for res in results])
    masks = np.stack([res[1] for res in results])
    batch = np.concatenate([normal, pseudo])
    all_masks = np.concatenate([np.zeros_like(masks), masks])
    labels = np.repeat(np.array([0, 1], dtype=np.int64), len(images))
    return batch, all_masks, labels
