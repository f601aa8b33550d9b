"""Evaluation metrics of the benchmark: image/pixel AUROC, AP, F1-max, AU-PRO and bootstrap CIs.

All values are fractions in [0, 1]. A metric that is *not defined* for the given input (for
example AUROC of a class without anomalous images) is ``None`` -- never 0 -- and the reason is
reported as a :class:`MetricWarning`, so that a class mean can never silently absorb a
meaningless number.

Conventions shared by every function here:

* ``labels`` are 1-D, 0/1 (or bool), 1 = anomalous; ``scores`` are 1-D, higher = more anomalous.
* ``masks``/``maps`` are either one ``[N, H, W]`` array or a sequence of 2-D arrays whose shapes may
  differ from image to image (evaluation at the original size); mask ``i`` must have the shape of
  map ``i``. Any nonzero mask pixel is anomalous (as in the official MVTec evaluation).
* NaN or Inf in a score or a map raises :class:`siad.errors.NumericalError`; nothing non-finite is
  ever dropped silently.
* Threshold-free curves treat a sample as positive iff ``score >= t``; equal scores form one
  operating point (no arbitrary tie order can change a result).
* AUROC, AP and F1-max all need both normal and anomalous samples; with one kind only they are
  ``None`` (AP/F1 of an all-anomalous set would be a trivial 1, which must not enter a mean).

Two AU-PRO definitions are provided because the literature uses both: :func:`aupro` is the
official MVTec AD definition (exact, invariant to strictly monotone score transforms) and
:func:`aupro_cflow_legacy` is the approximate CFlow-style variant copied by zero-shot AD papers
(not invariant; kept only so that published numbers can be compared like with like).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from sklearn.metrics import auc as _sklearn_auc
from tqdm.auto import tqdm

from siad.errors import NumericalError, SiadError

MapsLike = np.ndarray | Sequence[np.ndarray]  # [N, H, W] array or N 2-D arrays of any shapes

IMAGE_METRICS: tuple[str, ...] = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS: tuple[str, ...] = (
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "aupro",
    "aupro_cflow_legacy",
)
COUNT_KEYS: tuple[str, ...] = ("n_normal", "n_anomalous")
BOOTSTRAP_METRICS: tuple[str, ...] = ("image_auroc", "pixel_auroc")

def metric_labels(aupro_limit: float = 0.3) -> dict[str, str]:
    """Human-readable name of every metric key (written into metrics.json beside the numbers)."""
    return {
        "image_auroc": "image AUROC",
        "image_ap": "image AP (average precision)",
        "image_f1_max": "image F1-max (oracle threshold)",
        "pixel_auroc": "pixel AUROC",
        "pixel_ap": "pixel AP (average precision)",
        "pixel_f1_max": "pixel F1-max (oracle threshold)",
        "aupro": f"AU-PRO (official MVTec, FPR <= {aupro_limit:g})",
        "aupro_cflow_legacy": f"AU-PRO (CFlow-style legacy, FPR < {aupro_limit:g}, as in zero-shot AD papers)",
    }


METRIC_LABELS = metric_labels()

LEGACY_N_THRESHOLDS = 200  # thresholds of the CFlow-style AU-PRO
_CONNECTIVITY = np.ones((3, 3), dtype=bool)  # 8-connected regions, as the official MVTec code


class MetricInputError(SiadError, ValueError):
    """Metric inputs are malformed (wrong shapes, non-binary labels, bad parameters).

    Subclasses ``ValueError`` too, so callers treating shape errors as ``ValueError`` work.
    """


class MetricWarning(UserWarning):
    """A metric is undefined for a class (reported as ``None``) and excluded from a mean, some
    bootstrap replicates are undefined, or image labels and masks disagree."""


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------


def _where(class_name: str | None) -> str:
    return f"class '{class_name}'" if class_name is not None else "metric input"


def _check_finite(values: np.ndarray, what: str, class_name: str | None) -> None:
    """Raise NumericalError when ``values`` hold NaN/Inf (names the class and the fix)."""
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if bad:
        raise NumericalError(
            f"{_where(class_name)}: {bad} of {values.size} {what} are NaN or infinite. "
            "Fix the method (or its input) that produced them; non-finite scores are never "
            "evaluated or dropped silently."
        )


def _as_labels(labels: ArrayLike, class_name: str | None) -> np.ndarray:
    """1-D boolean anomaly labels; only 0/1 (or bool) values are accepted."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise MetricInputError(
            f"{_where(class_name)}: labels must be 1-D, got shape {arr.shape}; pass one 0/1 label per image."
        )
    if arr.dtype != bool and not np.all(np.isin(arr, (0, 1))):
        raise MetricInputError(
            f"{_where(class_name)}: labels must be 0 (normal) or 1 (anomalous), got values "
            f"{np.unique(arr)[:10].tolist()}; convert them to 0/1."
        )
    return arr.astype(bool)


def _as_scores(scores: ArrayLike, n: int, class_name: str | None) -> np.ndarray:
    """1-D finite float scores with exactly ``n`` entries."""
    arr = np.asarray(scores)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise MetricInputError(
            f"{_where(class_name)}: scores have shape {arr.shape} but labels have shape ({n},); "
            "pass one score per image."
        )
    arr = arr.astype(np.float64, copy=False)
    _check_finite(arr, "image scores", class_name)
    return arr


def _as_image_list(arrays: MapsLike, what: str, class_name: str | None) -> list[np.ndarray]:
    """Split an [N, H, W] array or a sequence of 2-D arrays into a list of 2-D arrays."""
    if isinstance(arrays, np.ndarray):
        if arrays.ndim != 3:
            raise MetricInputError(
                f"{_where(class_name)}: {what} array has shape {arrays.shape}; expected [N, H, W] "
                "or a sequence of 2-D arrays."
            )
        return list(arrays)
    items = [np.asarray(a) for a in arrays]
    for i, item in enumerate(items):
        if item.ndim != 2:
            raise MetricInputError(
                f"{_where(class_name)}: {what}[{i}] has shape {item.shape}; each must be 2-D (H, W)."
            )
    return items


def _float_dtype(items: Sequence[np.ndarray]) -> np.dtype:
    """float32 when every map already is float32 (saves memory), float64 otherwise."""
    if items and all(a.dtype == np.float32 for a in items):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _flatten(items: Sequence[np.ndarray], dtype: np.dtype) -> np.ndarray:
    if not items:
        return np.zeros(0, dtype=dtype)
    return np.concatenate([np.asarray(a, dtype=dtype).ravel() for a in items])


# --------------------------------------------------------------------------------------------
# ranked cumulative counts (shared by ROC, PR and official PRO curves)
# --------------------------------------------------------------------------------------------


class _Ranking:
    """Scores sorted from highest to lowest, with the last index of each run of equal scores.

    ``cumulative(w)[k]`` is the sum of ``w`` over all samples with ``score >= thresholds[k]``:
    keeping only the last point of each run of ties is exactly the official MVTec rule
    ``append(diff(sorted) != 0, True)``.
    """

    def __init__(self, scores: np.ndarray) -> None:
        self.order = np.argsort(scores)[::-1]  # order within ties is irrelevant: runs are merged
        self.sorted_desc = scores[self.order]
        is_run_end = np.append(self.sorted_desc[1:] != self.sorted_desc[:-1], True)
        self.run_ends = np.flatnonzero(is_run_end)

    @property
    def thresholds(self) -> np.ndarray:
        return self.sorted_desc[self.run_ends]

    def cumulative(self, weights: np.ndarray) -> np.ndarray:
        dtype = np.int64 if weights.dtype == bool else np.float64
        ranked = weights[self.order].astype(dtype, copy=False)
        np.cumsum(ranked, out=ranked)  # in place: pixel inputs have ~10^7 entries
        return ranked[self.run_ends]

    def n_at_or_above(self) -> np.ndarray:
        """Number of samples with ``score >= thresholds[k]``."""
        return self.run_ends + 1

    def ascending_values(self) -> np.ndarray:
        """All scores sorted from lowest to highest (a view; no extra sort)."""
        return self.sorted_desc[::-1]


@dataclass(frozen=True)
class _Counts:
    """Cumulative true/false positives at each distinct threshold (highest first)."""

    tp: np.ndarray
    fp: np.ndarray

    @property
    def n_pos(self) -> int:
        return int(self.tp[-1])

    @property
    def n_neg(self) -> int:
        return int(self.fp[-1])

    @property
    def defined(self) -> bool:
        return self.n_pos > 0 and self.n_neg > 0


def _counts(positive: np.ndarray, ranking: _Ranking) -> _Counts:
    tp = ranking.cumulative(positive)
    return _Counts(tp=tp, fp=ranking.n_at_or_above() - tp)


def _auroc_from_counts(c: _Counts) -> float | None:
    """Area under the ROC curve (trapezoid through (0, 0) and every distinct threshold)."""
    if not c.defined:
        return None
    tpr = np.concatenate(([0.0], c.tp / c.n_pos))
    fpr = np.concatenate(([0.0], c.fp / c.n_neg))
    return float(np.trapezoid(tpr, fpr))


def _precision_recall(c: _Counts) -> tuple[np.ndarray, np.ndarray]:
    precision = c.tp / (c.tp + c.fp)  # tp + fp >= 1 at every threshold
    recall = c.tp / c.n_pos
    return precision, recall


def _ap_from_counts(c: _Counts) -> float | None:
    """Average precision = sum over thresholds of (R_k - R_{k-1}) * P_k (sklearn's definition)."""
    if not c.defined:
        return None
    precision, recall = _precision_recall(c)
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _f1_max_from_counts(c: _Counts) -> float | None:
    """Max over thresholds of 2PR/(P+R); a threshold with P + R = 0 scores 0 (guards 0/0)."""
    if not c.defined:
        return None
    precision, recall = _precision_recall(c)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


# --------------------------------------------------------------------------------------------
# per-class data containers
# --------------------------------------------------------------------------------------------


class _Images:
    """Validated image-level labels and scores of one class."""

    def __init__(self, labels: ArrayLike, scores: ArrayLike, class_name: str | None) -> None:
        self.labels = _as_labels(labels, class_name)
        self.scores = _as_scores(scores, self.labels.shape[0], class_name)

    @cached_property
    def counts(self) -> _Counts | None:
        if self.labels.size == 0:
            return None
        return _counts(self.labels, _Ranking(self.scores))


def _check_pixel_pairs(mask_list: list[np.ndarray], map_list: list[np.ndarray], class_name: str | None) -> None:
    """One finite mask per map, of the same shape."""
    if len(mask_list) != len(map_list):
        raise MetricInputError(
            f"{_where(class_name)}: {len(mask_list)} masks but {len(map_list)} maps; "
            "pass one mask per anomaly map."
        )
    for i, (m, a) in enumerate(zip(mask_list, map_list)):
        if m.shape != a.shape:
            raise MetricInputError(
                f"{_where(class_name)}: mask {i} has shape {m.shape} but map {i} has shape "
                f"{a.shape}; resize the map (or the mask) to the evaluation size first."
            )
        if m.dtype.kind == "f" and not np.isfinite(m).all():
            raise MetricInputError(
                f"{_where(class_name)}: mask {i} contains NaN/Inf; masks must be finite 0/nonzero "
                "images -- re-export the ground-truth mask."
            )


class _Pixels:
    """Validated, flattened pixel maps and masks of one class (with lazily computed regions)."""

    def __init__(self, masks: MapsLike, maps: MapsLike, class_name: str | None) -> None:
        mask_list = _as_image_list(masks, "masks", class_name)
        map_list = _as_image_list(maps, "maps", class_name)
        _check_pixel_pairs(mask_list, map_list, class_name)
        self.class_name = class_name
        self.masks = [np.asarray(m) != 0 for m in mask_list]
        self.shapes = [m.shape for m in mask_list]
        self.scores = self._flat_maps(maps, map_list)
        _check_finite(self.scores, "anomaly-map pixels", class_name)
        self.positive = _flatten(self.masks, np.dtype(bool))

    @staticmethod
    def _flat_maps(maps: MapsLike, map_list: list[np.ndarray]) -> np.ndarray:
        if isinstance(maps, np.ndarray) and maps.dtype in (np.float32, np.float64):
            return maps.reshape(-1)  # a view: no copy of a big [N, H, W] array
        return _flatten(map_list, _float_dtype(map_list))

    @property
    def n_images(self) -> int:
        return len(self.shapes)

    @cached_property
    def ranking(self) -> _Ranking:
        return _Ranking(self.scores)

    @cached_property
    def counts(self) -> _Counts | None:
        if self.scores.size == 0:
            return None
        return _counts(self.positive, self.ranking)

    @cached_property
    def regions(self) -> tuple[np.ndarray, int]:
        """Per-pixel weight 1/|region| on anomalous pixels (0 elsewhere) and the region count."""
        weights, n_regions = [], 0
        for mask in self.masks:
            labeled, n = ndimage.label(mask, structure=_CONNECTIVITY)
            sizes = np.bincount(labeled.ravel(), minlength=n + 1).astype(np.float64)
            inverse = np.divide(1.0, sizes, out=np.zeros_like(sizes), where=sizes > 0)
            inverse[0] = 0.0
            weights.append(inverse[labeled].ravel())
            n_regions += n
        return _flatten(weights, np.dtype(np.float64)), n_regions

    @property
    def n_regions(self) -> int:
        return self.regions[1]

    @cached_property
    def pro_cumulative(self) -> np.ndarray:
        """Sum of 1/|region| over region pixels with ``score >= thresholds[k]`` (highest first)."""
        return self.ranking.cumulative(self.regions[0])

    def image_slices(self) -> list[slice]:
        """Where each image's pixels lie in the flattened arrays."""
        ends = np.cumsum([h * w for h, w in self.shapes])
        return [slice(int(e - h * w), int(e)) for e, (h, w) in zip(ends, self.shapes)]


def _pixels(masks: MapsLike, maps: MapsLike) -> _Pixels:
    return _Pixels(masks, maps, class_name=None)


# --------------------------------------------------------------------------------------------
# image- and pixel-level public metrics
# --------------------------------------------------------------------------------------------


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float | None:
    """Image AUROC; ``None`` when only one class (normal or anomalous) is present."""
    c = _Images(labels, scores, None).counts
    return None if c is None else _auroc_from_counts(c)


def image_ap(labels: ArrayLike, scores: ArrayLike) -> float | None:
    """Image average precision (sklearn's step definition); ``None`` unless both classes occur."""
    c = _Images(labels, scores, None).counts
    return None if c is None else _ap_from_counts(c)


def image_f1_max(labels: ArrayLike, scores: ArrayLike) -> float | None:
    """Best image F1 over all thresholds.

    This uses an *oracle* threshold chosen on the test labels themselves, so it is an upper bound
    on what a deployed detector would reach; ``None`` unless both classes occur.
    """
    c = _Images(labels, scores, None).counts
    return None if c is None else _f1_max_from_counts(c)


def pixel_auroc(masks: MapsLike, maps: MapsLike) -> float | None:
    """Pixel AUROC over all pixels of all images; ``None`` without both pixel classes."""
    c = _pixels(masks, maps).counts
    return None if c is None else _auroc_from_counts(c)


def pixel_ap(masks: MapsLike, maps: MapsLike) -> float | None:
    """Pixel average precision over all pixels; ``None`` without both pixel classes."""
    c = _pixels(masks, maps).counts
    return None if c is None else _ap_from_counts(c)


def pixel_f1_max(masks: MapsLike, maps: MapsLike) -> float | None:
    """Best pixel F1 over all thresholds (an *oracle* threshold chosen on the test masks)."""
    c = _pixels(masks, maps).counts
    return None if c is None else _f1_max_from_counts(c)


# --------------------------------------------------------------------------------------------
# AU-PRO, official MVTec definition
# --------------------------------------------------------------------------------------------


def _check_limit(limit: float) -> float:
    if not 0.0 < limit <= 1.0:
        raise MetricInputError(f"AU-PRO limit must be in (0, 1], got {limit!r}; the usual value is 0.3.")
    return float(limit)


def _pro_curve(px: _Pixels) -> tuple[np.ndarray, np.ndarray] | None:
    """Official MVTec PRO curve (FPR, PRO), or ``None`` with no regions or no normal pixels.

    Steps (spec section 4): FPR = cumulative count of OK pixels / number of OK pixels, computed
    in float32 (counts and denominator cast to float32, then divided, as the official code does);
    PRO = cumulative sum of 1/|region| over region pixels / number of regions (float64); only the
    last point of each run of equal scores is kept; both are clipped to <= 1; (0, 0) is prepended
    and (1, 1) appended.
    """
    c = px.counts
    if c is None or px.n_regions == 0 or c.n_neg == 0:
        return None
    fprs = c.fp.astype(np.float32) / np.float32(c.n_neg)  # normal pixels are exactly the OK pixels
    pros = px.pro_cumulative / px.n_regions
    fprs = np.minimum(fprs, np.float32(1.0)).astype(np.float64)
    pros = np.minimum(pros, 1.0)
    return np.concatenate(([0.0], fprs, [1.0])), np.concatenate(([0.0], pros, [1.0]))


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the piecewise-linear curve (x, y) from x[0] to ``x_max`` (x non-decreasing).

    As the official ``trapezoid``: when ``x_max`` is not one of the x values, the curve is linearly
    interpolated between the neighbouring points and that last partial trapezoid is added; then
    the trapezoids of all points with ``x <= x_max`` are summed.
    """
    correction = 0.0
    if not np.any(x == x_max):
        ins = int(np.searchsorted(x, x_max, side="right"))  # = bisect.bisect
        if not 0 < ins < len(x):
            raise MetricInputError(f"x_max={x_max} lies outside the curve's range [{x[0]}, {x[-1]}].")
        x0, x1, y0, y1 = x[ins - 1], x[ins], y[ins - 1], y[ins]
        y_at_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        correction = 0.5 * (y_at_max + y0) * (x_max - x0)
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    return float(np.sum(0.5 * (ys[1:] + ys[:-1]) * (xs[1:] - xs[:-1])) + correction)


def _aupro_official(px: _Pixels, limit: float) -> float | None:
    curve = _pro_curve(px)
    if curve is None:
        return None
    fprs, pros = curve
    return _trapezoid_to(fprs, pros, limit) / limit


def aupro(masks: MapsLike, maps: MapsLike, limit: float = 0.3) -> float | None:
    """Area under the per-region-overlap curve up to FPR ``limit``, divided by ``limit``.

    The official MVTec AD definition (``pro_curve_util.compute_pro`` + ``generic_util.trapezoid``),
    computed over all images of a class: regions are 8-connected components of each mask;
    ``PRO(t)`` = mean over all regions of the fraction of the region with ``score >= t``;
    ``FPR(t)`` = fraction of normal pixels with ``score >= t`` (normal images only add normal
    pixels). The curve is exact (every distinct score is a threshold), so the result is invariant
    to strictly monotone rescaling of the maps and to image order. Area by trapezoids with linear
    interpolation at ``limit``. ``None`` when the class has no anomalous region or no normal pixel.
    """
    return _aupro_official(_pixels(masks, maps), _check_limit(limit))


# --------------------------------------------------------------------------------------------
# AU-PRO, CFlow-style legacy variant
# --------------------------------------------------------------------------------------------


def _aupro_legacy(px: _Pixels, limit: float, n_thresholds: int) -> float | None:
    c = px.counts
    if c is None or px.n_regions == 0 or c.n_neg == 0:
        return None
    low, high = float(px.scores.min()), float(px.scores.max())
    if high <= low:
        return None  # a constant map gives no thresholds at all
    thresholds = low + (high - low) / n_thresholds * np.arange(n_thresholds)
    # The official curve already holds the cumulative counts at every distinct score (highest
    # first); at threshold t the pixels with score > t are those of the first j distinct scores.
    distinct_asc = px.ranking.thresholds[::-1]
    j = distinct_asc.size - np.searchsorted(distinct_asc, thresholds, side="right")
    fp = np.where(j > 0, c.fp[np.maximum(j - 1, 0)], 0)
    pro = np.where(j > 0, px.pro_cumulative[np.maximum(j - 1, 0)], 0.0)
    fprs, pros = fp / c.n_neg, pro / px.n_regions
    keep = fprs < limit
    fprs, pros = fprs[keep], pros[keep]
    if fprs.size < 2 or fprs.max() == fprs.min():
        return None  # the rescaling below would divide by zero
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return float(_sklearn_auc(fprs, pros))


def aupro_cflow_legacy(
    masks: MapsLike, maps: MapsLike, limit: float = 0.3, n_thresholds: int = LEGACY_N_THRESHOLDS
) -> float | None:
    """AU-PRO as computed by the CFlow-derived code of zero-shot AD papers (e.g. AnomalyCLIP).

    What is implemented, precisely:

    1. ``n_thresholds`` thresholds ``t_k = min + k * (max - min) / n_thresholds``, ``k = 0..n-1``
       (uniform over ``[min, max)`` of all map pixels of the class; the original builds them with
       ``np.arange`` and may get one more through rounding);
    2. a pixel is positive at ``t_k`` iff ``score > t_k`` (strict);
    3. regions = 8-connected components of the nonzero mask pixels;
       ``PRO(t_k)`` = mean over all regions of all images of the positive fraction of the region;
       ``FPR(t_k)`` = positive normal pixels / normal pixels;
    4. keep the thresholds with ``FPR < limit`` (no interpolation at ``limit``);
    5. min-max rescale the kept FPRs to [0, 1] and return ``sklearn.metrics.auc(FPR, PRO)``.

    Known flaws kept on purpose (to match published numbers): the threshold grid depends on the
    score scale, so the result is NOT invariant to monotone rescaling; the rescaling stretches
    whatever FPR range the grid reached to [0, 1]. ``None`` when the class has no region, no
    normal pixel, a constant map, or fewer than two distinct kept FPRs.
    """
    if n_thresholds < 2:
        raise MetricInputError(f"n_thresholds must be >= 2, got {n_thresholds}; the usual value is 200.")
    return _aupro_legacy(_pixels(masks, maps), _check_limit(limit), n_thresholds)


# --------------------------------------------------------------------------------------------
# one class
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassInputs:
    """Everything the evaluation needs for one class: image labels/scores and optional pixels."""

    labels: ArrayLike
    scores: ArrayLike
    masks: MapsLike | None = None
    maps: MapsLike | None = None


@dataclass
class _ClassData:
    """Validated inputs of one class; ``pixels`` is None when masks or maps are absent."""

    name: str | None
    images: _Images
    pixels: _Pixels | None

    @classmethod
    def build(
        cls,
        labels: ArrayLike,
        scores: ArrayLike,
        masks: MapsLike | None,
        maps: MapsLike | None,
        *,
        with_pixel: bool,
        class_name: str | None,
    ) -> _ClassData:
        images = _Images(labels, scores, class_name)
        if images.labels.size == 0:
            raise MetricInputError(f"{_where(class_name)}: no test images; drop the class or supply its images.")
        pixels = None
        if with_pixel and masks is not None and maps is not None:
            pixels = _Pixels(masks, maps, class_name)
            if pixels.n_images != images.labels.size:
                raise MetricInputError(
                    f"{_where(class_name)}: {pixels.n_images} maps but {images.labels.size} labels; "
                    "pass one mask and one map per image."
                )
        return cls(class_name, images, pixels)


def _undefined_note(class_name: str | None, metrics: Sequence[str], reason: str) -> str:
    return (
        f"{_where(class_name)}: {', '.join(metrics)} not defined ({reason}); reported as None "
        "(never 0) and excluded from class means."
    )


def _image_metrics(data: _ClassData, notes: list[str]) -> dict[str, float | None]:
    labels = data.images.labels
    if labels.all() or not labels.any():
        missing = "anomalous" if not labels.any() else "normal"
        notes.append(_undefined_note(data.name, IMAGE_METRICS, f"no {missing} images"))
        return dict.fromkeys(IMAGE_METRICS)
    c = data.images.counts
    return {
        "image_auroc": _auroc_from_counts(c),
        "image_ap": _ap_from_counts(c),
        "image_f1_max": _f1_max_from_counts(c),
    }


def _consistency_notes(data: _ClassData, notes: list[str]) -> None:
    """Warn (not fail) when image labels and masks disagree: usually a pairing mistake."""
    px, labels = data.pixels, data.images.labels
    has_anomaly = np.array([m.any() for m in px.masks], dtype=bool)
    normal_with_pixels = int(np.count_nonzero(~labels & has_anomaly))
    anomalous_without = int(np.count_nonzero(labels & ~has_anomaly))
    if normal_with_pixels or anomalous_without:
        notes.append(
            f"{_where(data.name)}: {normal_with_pixels} normal images have anomalous mask pixels and "
            f"{anomalous_without} anomalous images have empty masks; check the image/mask pairing."
        )


def _pixel_metrics(data: _ClassData, limit: float, notes: list[str]) -> dict[str, float | None]:
    px = data.pixels
    if px is None:
        notes.append(_undefined_note(data.name, PIXEL_METRICS, "no masks or no maps given"))
        return dict.fromkeys(PIXEL_METRICS)
    _consistency_notes(data, notes)
    c = px.counts
    if c is None or not c.defined:
        reason = "no anomalous mask pixels" if (c is None or c.n_pos == 0) else "no normal pixels"
        notes.append(_undefined_note(data.name, PIXEL_METRICS, reason))
        return dict.fromkeys(PIXEL_METRICS)
    result = {
        "pixel_auroc": _auroc_from_counts(c),
        "pixel_ap": _ap_from_counts(c),
        "pixel_f1_max": _f1_max_from_counts(c),
        "aupro": _aupro_official(px, limit),
        "aupro_cflow_legacy": _aupro_legacy(px, limit, LEGACY_N_THRESHOLDS),
    }
    if result["aupro_cflow_legacy"] is None:
        notes.append(_undefined_note(data.name, ["aupro_cflow_legacy"], "degenerate threshold grid"))
    return result


def _evaluate(data: _ClassData, *, with_pixel: bool, limit: float) -> tuple[dict, list[str]]:
    notes: list[str] = []
    result: dict[str, float | int | None] = _image_metrics(data, notes)
    if with_pixel:
        result.update(_pixel_metrics(data, limit, notes))
    result["n_normal"] = int(np.count_nonzero(~data.images.labels))
    result["n_anomalous"] = int(np.count_nonzero(data.images.labels))
    return result, notes


def _warn_all(notes: Sequence[str]) -> None:
    for note in notes:
        warnings.warn(note, MetricWarning, stacklevel=3)


def evaluate_class(
    labels: ArrayLike,
    scores: ArrayLike,
    masks: MapsLike | None = None,
    maps: MapsLike | None = None,
    *,
    with_pixel: bool,
    aupro_limit: float = 0.3,
    class_name: str | None = None,
) -> dict[str, float | None]:
    """All metrics of one class (pixel ones only when ``with_pixel``), plus image counts.

    Undefined metrics are ``None`` and each reason is emitted as a :class:`MetricWarning`
    naming the class. ``aupro_limit`` applies to both AU-PRO variants; ``class_name`` is only used
    in messages.
    """
    limit = _check_limit(aupro_limit)
    data = _ClassData.build(labels, scores, masks, maps, with_pixel=with_pixel, class_name=class_name)
    result, notes = _evaluate(data, with_pixel=with_pixel, limit=limit)
    _warn_all(notes)
    return result


# --------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------


def _auroc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC from counts per score bin (last axis, bins in ascending score order).

    A positive beats every negative in a lower bin and ties (counts half) with the negatives in
    its own bin. NaN where a row has no positive or no negative.
    """
    neg_below = np.cumsum(neg, axis=-1) - neg
    wins = np.sum(pos * (neg_below + 0.5 * neg), axis=-1)
    pairs = pos.sum(axis=-1) * neg.sum(axis=-1)
    return np.divide(wins, pairs, out=np.full(np.shape(wins), np.nan), where=pairs > 0)


def bootstrap_indices(n_images: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """The images drawn by ``n`` bootstrap resamples of a class of ``n_images`` images: shape (n, N).

    Row ``b`` lists the image indices (with replacement) of replicate ``b``; :func:`bootstrap_class` and
    :func:`evaluate_dataset` draw exactly these from the ``rng`` they are given (one call per class), so a
    replicate can be recomputed from its images (tests do).
    """
    return rng.integers(0, n_images, size=(n, n_images))


def _resample_counts(n_images: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """How often each image is drawn in each of ``n`` resamples with replacement: shape (n, N)."""
    draws = bootstrap_indices(n_images, n, rng)
    flat = (draws + n_images * np.arange(n)[:, None]).ravel()
    return np.bincount(flat, minlength=n * n_images).reshape(n, n_images).astype(np.float64)


def _image_histograms(images: _Images) -> tuple[np.ndarray, np.ndarray]:
    """One-hot (N, U) histograms over the U distinct image scores: binning here loses nothing."""
    _, bins = np.unique(images.scores, return_inverse=True)
    onehot = np.zeros((images.labels.size, int(bins.max()) + 1))
    onehot[np.arange(images.labels.size), bins] = 1.0
    pos = onehot * images.labels[:, None]
    return pos, onehot - pos


def _pixel_histograms(px: _Pixels, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (N, B) counts of positive and negative pixels on quantile bins of the class.

    Bin edges are the order statistics at ``k / n_bins`` of all pixel scores of the class
    (duplicates merged, so B <= n_bins); bins are half-open ``[e_k, e_{k+1})``.
    """
    sorted_scores = px.ranking.ascending_values()
    positions = np.floor(np.linspace(0, sorted_scores.size - 1, n_bins + 1)).astype(np.intp)
    inner_edges = np.unique(sorted_scores[positions])[1:]
    n_b = inner_edges.size + 1
    pos = np.zeros((px.n_images, n_b))
    neg = np.zeros((px.n_images, n_b))
    for i, part in enumerate(px.image_slices()):
        bins = np.searchsorted(inner_edges, px.scores[part], side="right")
        positive = px.positive[part]
        pos[i] = np.bincount(bins[positive], minlength=n_b)
        neg[i] = np.bincount(bins[~positive], minlength=n_b)
    return pos, neg


def _replicates(counts: np.ndarray, hists: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    pos, neg = hists
    return _auroc_from_histograms(counts @ pos, counts @ neg)


def _bootstrap(data: _ClassData, n: int, rng: np.random.Generator, with_pixel: bool, n_bins: int) -> dict:
    counts = _resample_counts(data.images.labels.size, n, rng)  # drawn even when unused: keeps later classes stable
    out = {"image_auroc": _replicates(counts, _image_histograms(data.images))}
    if with_pixel:
        px = data.pixels
        pixel_defined = px is not None and px.counts is not None and px.counts.defined
        out["pixel_auroc"] = (
            _replicates(counts, _pixel_histograms(px, n_bins)) if pixel_defined else np.full(len(counts), np.nan)
        )
    return out


def bootstrap_class(
    labels: ArrayLike,
    scores: ArrayLike,
    masks: MapsLike | None = None,
    maps: MapsLike | None = None,
    *,
    n: int,
    rng: np.random.Generator,
    with_pixel: bool,
    n_bins: int = 1024,
    class_name: str | None = None,
) -> dict[str, np.ndarray]:
    """``n`` bootstrap replicates of image AUROC (and pixel AUROC when ``with_pixel``).

    Each replicate resamples the class's IMAGES with replacement (all pixels of a drawn image come
    along), and the same resample serves both metrics. A replicate is NaN where it is undefined
    (e.g. a resample without anomalous images). Image replicates are exact. Pixel replicates are
    computed on BINNED scores -- ``n_bins`` quantile bins of the class's pixel scores, ties within
    a bin counting half -- so that one replicate is a (counts @ per-image histograms) product
    instead of a sort; pixel point estimates elsewhere in this module are exact.
    """
    if n < 0 or n_bins < 2:
        raise MetricInputError(f"bootstrap needs n >= 0 and n_bins >= 2, got n={n}, n_bins={n_bins}.")
    data = _ClassData.build(labels, scores, masks, maps, with_pixel=with_pixel, class_name=class_name)
    return _bootstrap(data, n, rng, with_pixel, n_bins)


# --------------------------------------------------------------------------------------------
# summaries over classes
# --------------------------------------------------------------------------------------------


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise MetricInputError(f"confidence must be in (0, 1), got {confidence!r}; the usual value is 0.95.")


def percentile_ci(replicates: np.ndarray, confidence: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval ignoring NaN replicates; ``None`` when none is finite."""
    _check_confidence(confidence)
    values = np.asarray(replicates, dtype=np.float64).ravel()
    if np.isinf(values).any():
        raise NumericalError("bootstrap replicates contain Inf; fix the metric inputs that produced them.")
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


def _metric_keys(per_class: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Metric names in first-seen order (counts and nested CIs are not metrics)."""
    keys: dict[str, None] = {}
    for values in per_class.values():
        keys.update((k, None) for k in values if k not in COUNT_KEYS and k != "ci")
    return list(keys)


def _defined_value(cls: str, metric: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise MetricInputError(f"class '{cls}': {metric} = {value!r} is not a number or None.")
    if not math.isfinite(float(value)):
        raise NumericalError(f"class '{cls}': {metric} = {value}; per-class metrics must be finite or None.")
    return float(value)


def _class_replicates(
    metric: str, classes: list[str], replicates: Mapping[str, Mapping[str, np.ndarray]]
) -> np.ndarray:
    """(classes, n) matrix of replicates; every listed class must have them, all of one length."""
    rows = []
    for cls in classes:
        if metric not in replicates.get(cls, {}):
            raise MetricInputError(
                f"class '{cls}': no bootstrap replicates of {metric} although other classes have "
                "them; bootstrap every class or none."
            )
        rows.append(np.asarray(replicates[cls][metric], dtype=np.float64).ravel())
    if len({r.size for r in rows}) > 1:
        raise MetricInputError(f"{metric}: bootstrap replicates of different lengths across classes {classes}.")
    return np.vstack(rows)


def _nan_mean_rows(matrix: np.ndarray) -> np.ndarray:
    """Column means over the finite entries; NaN where a column has none."""
    finite = ~np.isnan(matrix)
    total = np.where(finite, matrix, 0.0).sum(axis=0)
    count = finite.sum(axis=0)
    return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)


def summarize(
    per_class: Mapping[str, Mapping[str, float | None]],
    replicates: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    confidence: float = 0.95,
) -> dict:
    """Unweighted class means, their bootstrap CIs and the warnings explaining exclusions.

    * ``mean[m]``: mean over the classes where ``m`` is defined (None when it is defined nowhere);
      ``n_classes[m]`` counts them. Each excluded class gives a warning naming class and metric.
    * ``mean_replicates[m][b]``: mean over those classes of their replicate ``b``; a class whose
      replicate ``b`` is NaN (undefined resample) is left out of that replicate's mean only (a
      warning counts such replicates). ``ci[m]``: percentile CI of those, NaN-aware.
    """
    _check_confidence(confidence)
    replicates = replicates or {}
    out: dict[str, Any] = {
        "mean": {}, "n_classes": {}, "ci": {}, "mean_replicates": {}, "undefined_replicates": {}, "warnings": []
    }
    for metric in _metric_keys(per_class):
        defined = {}
        for cls in sorted(per_class):
            value = _defined_value(cls, metric, per_class[cls].get(metric))
            if value is None:
                out["warnings"].append(
                    f"class '{cls}': {metric} is not defined (None); excluded from the mean of {metric}."
                )
            else:
                defined[cls] = value
        out["mean"][metric] = float(np.mean(list(defined.values()))) if defined else None
        out["n_classes"][metric] = len(defined)
        if defined and any(metric in replicates.get(c, {}) for c in per_class):
            _summarize_replicates(metric, sorted(defined), replicates, confidence, out)
    _warn_all(out["warnings"])
    return out


def _summarize_replicates(
    metric: str, classes: list[str], replicates: Mapping, confidence: float, out: dict
) -> None:
    matrix = _class_replicates(metric, classes, replicates)
    # Resamples that lack a normal or an anomalous image are routine for small classes: they are
    # counted (not warned about) and the CIs use the other replicates.
    undefined = {cls: int(np.isnan(row).sum()) for cls, row in zip(classes, matrix)}
    out["undefined_replicates"][metric] = {cls: n for cls, n in undefined.items() if n}
    mean_reps = _nan_mean_rows(matrix)
    out["mean_replicates"][metric] = [float(v) for v in mean_reps]
    ci = percentile_ci(mean_reps, confidence)
    out["ci"][metric] = None if ci is None else list(ci)


# --------------------------------------------------------------------------------------------
# a whole dataset
# --------------------------------------------------------------------------------------------


def evaluate_dataset(
    per_class_inputs: Mapping[str, ClassInputs],
    *,
    with_pixel: bool,
    n_bootstrap: int,
    seed: int,
    aupro_limit: float = 0.3,
    confidence: float = 0.95,
    progress: bool = False,
) -> dict:
    """Per-class metrics with bootstrap CIs, class means with CIs, and all warnings.

    Deterministic: one ``np.random.default_rng(seed)`` is consumed class by class in sorted class
    order. Undefined metrics are None (never 0), warned about and excluded from the means.
    """
    limit = _check_limit(aupro_limit)
    _check_confidence(confidence)
    if n_bootstrap < 0:
        raise MetricInputError(f"n_bootstrap must be >= 0, got {n_bootstrap}.")
    rng = np.random.default_rng(seed)
    classes: dict[str, dict] = {}
    metrics: dict[str, dict] = {}
    replicates: dict[str, dict] = {}
    notes: list[str] = []
    for cls in tqdm(sorted(per_class_inputs), desc="metrics", unit="class", disable=not progress):
        inp = per_class_inputs[cls]
        data = _ClassData.build(inp.labels, inp.scores, inp.masks, inp.maps, with_pixel=with_pixel, class_name=cls)
        metrics[cls], class_notes = _evaluate(data, with_pixel=with_pixel, limit=limit)
        notes.extend(class_notes)
        if n_bootstrap > 0:
            replicates[cls] = _bootstrap(data, n_bootstrap, rng, with_pixel, 1024)
        classes[cls] = {**metrics[cls], "ci": _class_cis(metrics[cls], replicates.get(cls, {}), confidence)}
    _warn_all(notes)
    summary = summarize(metrics, replicates or None, confidence)
    return {
        "classes": classes,
        "mean": summary["mean"],
        "ci": summary["ci"],
        "n_classes": summary["n_classes"],
        "mean_replicates": summary["mean_replicates"],
        "warnings": notes + summary["warnings"],
        "bootstrap": {
            "n": n_bootstrap,
            "seed": seed,
            "confidence": confidence,
            "undefined_replicates": summary["undefined_replicates"],
        },
    }


def _class_cis(metrics: Mapping[str, Any], reps: Mapping[str, np.ndarray], confidence: float) -> dict:
    """Per-class CI of each bootstrapped metric; None where the metric or all replicates are undefined."""
    cis: dict[str, list[float] | None] = {}
    for metric, values in reps.items():
        ci = percentile_ci(values, confidence) if metrics.get(metric) is not None else None
        cis[metric] = None if ci is None else list(ci)
    return cis


# --------------------------------------------------------------------------------------------
# LLM judgement (AnomalyGPT, SIAD-LLM)
# --------------------------------------------------------------------------------------------

LLM_METRICS: tuple[str, ...] = ("accuracy", "unparsed_rate", "p_yes_auroc")
LLM_METRIC_LABELS: dict[str, str] = {
    "accuracy": "LLM judgement accuracy (parsed yes/no verdict vs label, AnomalyGPT's definition)",
    "unparsed_rate": "fraction of answers parsed as neither yes nor no (counted wrong in accuracy)",
    "p_yes_auroc": 'image AUROC of P("Yes") at the answer\'s first token',
}


def _llm_judgement(
    labels: ArrayLike, answers: Sequence[str], p_yes: ArrayLike | None, class_name: str | None
) -> tuple[dict[str, float | int | None], list[str]]:
    from siad.llm.answers import parse_answer  # deferred: siad.llm imports torch, this module does not

    label_arr = _as_labels(labels, class_name)
    if label_arr.size == 0:
        raise MetricInputError(f"{_where(class_name)}: no test images; drop the class or supply its images.")
    if len(answers) != label_arr.size:
        raise MetricInputError(
            f"{_where(class_name)}: {len(answers)} answers but {label_arr.size} labels; pass one answer per image."
        )
    verdicts = np.array([parse_answer(str(a)).verdict for a in answers])
    correct = np.where(label_arr, verdicts == "yes", verdicts == "no")
    notes: list[str] = []
    auroc = None
    if p_yes is not None:
        images = _Images(label_arr, p_yes, class_name)
        auroc = _auroc_from_counts(images.counts)
        if auroc is None:
            missing = "anomalous" if not label_arr.any() else "normal"
            notes.append(_undefined_note(class_name, ["p_yes_auroc"], f"no {missing} images"))
    result: dict[str, float | int | None] = {
        "accuracy": float(correct.mean()),
        "unparsed_rate": float(np.mean(verdicts == "unparsed")),
        "p_yes_auroc": auroc,
        "n_normal": int(np.count_nonzero(~label_arr)),
        "n_anomalous": int(np.count_nonzero(label_arr)),
    }
    return result, notes


def llm_judgement(
    labels: ArrayLike, answers: Sequence[str], p_yes: ArrayLike | None = None, *, class_name: str | None = None
) -> dict[str, float | int | None]:
    """The LLM's yes/no judgement of one class, scored against the image labels.

    * ``accuracy``: AnomalyGPT's accuracy -- an anomalous image counts as correct when its answer says
      "yes", a normal one when it says "no". The verdict is :func:`siad.llm.parse_answer`'s (a leading
      Yes/No, else the "there is/are (no) anomal..." phrases) instead of the reference's substring test
      ``'Yes' in answer``; an answer parsed as neither counts as wrong.
    * ``unparsed_rate``: the fraction of answers parsed as neither yes nor no.
    * ``p_yes_auroc``: image AUROC of ``p_yes`` (P("Yes") at the answer's first token); ``None`` when
      ``p_yes`` is not given or the class has one label only (then a :class:`MetricWarning` says why).

    Fractions in [0, 1] like every metric here; ``n_normal``/``n_anomalous`` count the images.
    """
    result, notes = _llm_judgement(labels, answers, p_yes, class_name)
    _warn_all(notes)
    return result


@dataclass(frozen=True)
class LlmInputs:
    """The LLM judgement inputs of one class: labels, generated answers and optional P("Yes")."""

    labels: ArrayLike
    answers: Sequence[str]
    p_yes: ArrayLike | None = None


def evaluate_llm_judgement(per_class_inputs: Mapping[str, LlmInputs]) -> dict:
    """:func:`llm_judgement` per class and the unweighted mean over classes (AnomalyGPT averages the
    per-class accuracies); undefined values are excluded from the means, with warnings, as in
    :func:`summarize`. Returns ``classes``, ``mean``, ``n_classes`` and ``warnings``.
    """
    classes: dict[str, dict] = {}
    notes: list[str] = []
    for cls in sorted(per_class_inputs):
        inp = per_class_inputs[cls]
        classes[cls], class_notes = _llm_judgement(inp.labels, inp.answers, inp.p_yes, cls)
        notes.extend(class_notes)
    _warn_all(notes)
    summary = summarize(classes)
    return {
        "classes": classes,
        "mean": summary["mean"],
        "n_classes": summary["n_classes"],
        "warnings": notes + summary["warnings"],
    }
