"""Target answers (3×3 position words) from masks or pasted patches, and parsing of generated answers.

Three readings of "where is the anomaly":

- ``"siad"`` mask reading (default of :func:`position_words`, SIAD-LLM Appendix F: "several regions are listed
  when the mask spans them"): every 3×3 grid cell that contains at least one mask pixel, in row-major order.
  Cell of pixel row i of H is ⌊3i/H⌋ (for 224: rows 0–74, 75–149, 150–223).
- ``"anomalygpt"`` mask reading (``components``): one word per 8-connected region of the binarised mask
  (raster order of first pixel), from the centre of the region's bounding box, cell ⌊3c/H⌋ clipped to 2.
- AnomalyGPT's released reading (:func:`patch_words`, ``datasets/mvtec.py`` / ``visa.py``): one word per
  **pasted patch**, in paste order, from the centre ((min + max) / 2, max exclusive) of the patch's
  rectangle as NSA's ``patch_ex`` returns it, cell "top" when centre / side ≤ 1/3, "center" row when ≤ 2/3.
  The release takes the 2nd and later centres from the running union of the boxes pasted so far (a bug:
  ``union_box=True`` reproduces it); by default every patch uses its own box (the stated intent). A patch
  whose soft label splits at the 0.3 threshold, or vanishes, is still one anomaly here.

Answer strings (exact): SIAD — "No, there are no anomalies in the image." / "Yes, there is an anomaly in
the image, at the {positions} of the image." (several positions joined "a, b and c" — the paper does not
say how; this is our choice). AnomalyGPT (:func:`anomalygpt_sentence`, the release's loop reproduced) —
"No, there is no anomaly in the image." / "Yes, there is an anomaly in the image, at the {p1} of the image." /
"Yes, there are 2 anomalies in the image, they are at the {p1} and {p2} of the image." (p1 = p2: "…they are at
the {p1} of the image."). With 3 or more anomalies the release's loop only handles the first two and never
closes the sentence: "Yes, there are 3 anomalies in the image, they are at the {p1}, {p2}" (p1 = p2: "…they are
at the {p1}"), reproduced as released. The released MVTec / VisA settings paste at most 2 patches, so the
released reading never meets it; the region reading can (3 regions of 2 patches).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from scipy import ndimage

from siad.errors import ConfigError

__all__ = [
    "POSITION_WORDS", "ParsedAnswer", "anomalygpt_sentence", "join_words", "parse_answer", "patch_answer",
    "patch_words", "position_words", "target_answer",
]

POSITION_WORDS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)  # fmt: skip
Style = Literal["siad", "anomalygpt"]
Box = tuple[int, int, int, int]  # (row0, row1, col0, col1), half-open, as siad.data.pseudo returns pasted patches
ANOMALYGPT_NO = "No, there is no anomaly in the image."
SIAD_NO = "No, there are no anomalies in the image."
#: The training answer for an anomalous image whose anomaly is not located: a real anomaly of a dataset without
#: pixel masks (the medical sets under ``zad``). Both wordings say "Yes" and name no position. [choice]
UNLOCATED_YES = "Yes, there is an anomaly in the image."


def _binary(mask: np.ndarray | torch.Tensor, threshold: float) -> np.ndarray:
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    array = np.squeeze(array)
    if array.ndim != 2 or min(array.shape) == 0:
        raise ConfigError(f"mask must be one H×W map, got shape {tuple(np.shape(mask))}.")
    return array > threshold


def _cell(coord: float, size: int) -> int:
    return min(int(3 * coord / size), 2)


def _cells_spanned(binary: np.ndarray) -> list[int]:
    height, width = binary.shape
    rows, cols = np.nonzero(binary)
    row_cells = np.minimum(3 * rows // height, 2)
    col_cells = np.minimum(3 * cols // width, 2)
    return sorted({int(c) for c in 3 * row_cells + col_cells})


def _region_cells(binary: np.ndarray) -> list[int]:
    labels, _ = ndimage.label(binary, structure=np.ones((3, 3), dtype=bool))
    height, width = binary.shape
    cells = []
    for box in ndimage.find_objects(labels):
        centre_row = (box[0].start + box[0].stop - 1) / 2
        centre_col = (box[1].start + box[1].stop - 1) / 2
        cells.append(3 * _cell(centre_row, height) + _cell(centre_col, width))
    return cells


def position_words(mask: np.ndarray | torch.Tensor, mode: Style = "siad", threshold: float = 0.5) -> list[str]:
    """Grid words of the anomalous area of ``mask`` (pixels > ``threshold``); empty for a normal mask.

    ``siad``: cells the mask spans (unique, row-major). ``anomalygpt``: one word per connected region (may
    repeat). See the module docstring.
    """
    binary = _binary(mask, threshold)
    if not binary.any():
        return []
    if mode == "siad":
        return [POSITION_WORDS[c] for c in _cells_spanned(binary)]
    if mode == "anomalygpt":
        return [POSITION_WORDS[c] for c in _region_cells(binary)]
    raise ConfigError(f"unknown position mode {mode!r}; use 'siad' or 'anomalygpt'.")


def _released_cell(centre: float, size: int) -> int:
    """AnomalyGPT's rule: third 0 when centre / size ≤ 1/3, 1 when ≤ 2/3, else 2."""
    fraction = centre / size
    return 0 if fraction <= 1 / 3 else 1 if fraction <= 2 / 3 else 2


def patch_words(boxes: Sequence[Box], shape: tuple[int, int], *, union_box: bool = False) -> list[str]:
    """One position word per pasted patch, in paste order (AnomalyGPT's released reading; module docstring).

    ``boxes``: (row0, row1, col0, col1) half-open, in the pixels of an image of ``shape`` (H, W).
    ``union_box``: the i-th centre is that of the union of boxes 0..i, as the release computes it (a bug).
    """
    height, width = shape
    words = []
    for i, (r0, r1, c0, c1) in enumerate(boxes):
        if union_box:
            r0, c0 = min(b[0] for b in boxes[: i + 1]), min(b[2] for b in boxes[: i + 1])
            r1, c1 = max(b[1] for b in boxes[: i + 1]), max(b[3] for b in boxes[: i + 1])
        words.append(POSITION_WORDS[3 * _released_cell((r0 + r1) / 2, height) + _released_cell((c0 + c1) / 2, width)])
    return words


def anomalygpt_sentence(words: list[str]) -> str:
    """AnomalyGPT's answer for the position words of its anomalies, built as the release's loop builds it.

    0 words: "No, …"; 1: "…at the {p1} of the image."; 2: "…they are at the {p1} and {p2} of the image." or, when
    p1 = p2, "…at the {p1} of the image."; ≥ 3: the release handles only the first two words and never closes
    the sentence ("…they are at the {p1}, {p2}", or "…at the {p1}" when p1 = p2), reproduced as released.
    """
    if not words:
        return ANOMALYGPT_NO
    if len(words) == 1:
        return f"Yes, there is an anomaly in the image, at the {words[0]} of the image."
    sentence = f"Yes, there are {len(words)} anomalies in the image, they are at the {words[0]}"
    if words[1] != words[0]:
        return sentence + (f" and {words[1]} of the image." if len(words) == 2 else f", {words[1]}")
    return sentence + (" of the image." if len(words) == 2 else "")


def patch_answer(boxes: Sequence[Box], shape: tuple[int, int], *, union_box: bool = False) -> str:
    """AnomalyGPT's released training answer from the pasted patches (none: the normal answer)."""
    return anomalygpt_sentence(patch_words(boxes, shape, union_box=union_box))


def join_words(words: list[str]) -> str:
    """'a' / 'a and b' / 'a, b and c'."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _unique(words: list[str]) -> list[str]:
    return list(dict.fromkeys(words))


def target_answer(mask: np.ndarray | torch.Tensor, style: Style = "siad", threshold: float = 0.5) -> str:
    """The training answer read from ``mask`` in the exact wording of the SIAD-LLM or AnomalyGPT spec
    (AnomalyGPT: one anomaly per connected region, the ``components`` reading; :func:`patch_answer` is the
    released per-patch reading)."""
    words = position_words(mask, mode=style, threshold=threshold)
    if style == "anomalygpt":
        return anomalygpt_sentence(words)
    if not words:
        return SIAD_NO
    return f"Yes, there is an anomaly in the image, at the {join_words(words)} of the image."


@dataclass(frozen=True)
class ParsedAnswer:
    """A generated answer read as a verdict (``yes``/``no``/``unparsed``) and the position words it names."""

    verdict: Literal["yes", "no", "unparsed"]
    positions: list[str] = field(default_factory=list)


_LEADING = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
_NEGATIVE = re.compile(r"\b(there (is|are) no anomal|no anomal|without (any )?anomal)", re.IGNORECASE)
_POSITIVE = re.compile(r"\bthere (is an?|are \w+) anomal", re.IGNORECASE)
_POSITION = re.compile(
    r"\b(top left|top right|bottom left|bottom right|top|bottom|left|right|center|centre)\b", re.IGNORECASE
)


def parse_answer(text: str) -> ParsedAnswer:
    """Read ``text``: a leading "Yes"/"No" decides; else the phrases "there is/are no anomaly…" (no) or
    "there is an/are N anomal…" (yes); else ``unparsed``. Positions are the grid words found, in order, once
    each ("centre" counts as "center"); they are kept for any verdict.
    """
    leading = _LEADING.match(text)
    if leading:
        verdict = leading.group(1).lower()
    elif _NEGATIVE.search(text):
        verdict = "no"
    elif _POSITIVE.search(text):
        verdict = "yes"
    else:
        verdict = "unparsed"
    found = [m.group(1).lower().replace("centre", "center") for m in _POSITION.finditer(text)]
    return ParsedAnswer(verdict=verdict, positions=_unique(found))  # type: ignore[arg-type]
