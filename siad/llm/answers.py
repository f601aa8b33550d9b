"""Target answers from masks (3×3 position words) and parsing of generated answers.

Two readings of "where is the anomaly" (``mode``):

- ``"siad"`` (default, SIAD-LLM Appendix F: "several regions are listed when the mask spans them"): every
  3×3 grid cell that contains at least one mask pixel, in row-major order. Cell of pixel row i of H is
  ⌊3i/H⌋ (for 224: rows 0–74, 75–149, 150–223).
- ``"anomalygpt"`` (AnomalyGPT's datasets code): one word per connected region (8-connectivity, raster
  order of first pixel), from the centre of the region's bounding box, cell ⌊3c/H⌋ clipped to 2. The
  reference computes the 2nd centre from the running union box of both patches (a bug); here every region
  uses its own box (the stated intent).

Answer strings (exact): SIAD — "No, there are no anomalies in the image." / "Yes, there is an anomaly in
the image, at the {positions} of the image." (several positions joined "a, b and c" — the paper does not
say how; this is our choice). AnomalyGPT — "No, there is no anomaly in the image." / "Yes, there is an
anomaly in the image, at the {pos} of the image." / "Yes, there are {n} anomalies in the image, they are
at the {positions} of the image." (repeated positions listed once, as the reference does for p1 = p2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from scipy import ndimage

from siad.errors import ConfigError

__all__ = ["POSITION_WORDS", "ParsedAnswer", "join_words", "parse_answer", "position_words", "target_answer"]

POSITION_WORDS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)  # fmt: skip
Style = Literal["siad", "anomalygpt"]


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


def join_words(words: list[str]) -> str:
    """'a' / 'a and b' / 'a, b and c'."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _unique(words: list[str]) -> list[str]:
    return list(dict.fromkeys(words))


def target_answer(mask: np.ndarray | torch.Tensor, style: Style = "siad", threshold: float = 0.5) -> str:
    """The training answer for ``mask`` in the exact wording of the SIAD-LLM or AnomalyGPT spec."""
    words = position_words(mask, mode=style, threshold=threshold)
    if style == "siad":
        if not words:
            return "No, there are no anomalies in the image."
        return f"Yes, there is an anomaly in the image, at the {join_words(words)} of the image."
    if not words:
        return "No, there is no anomaly in the image."
    if len(words) == 1:
        return f"Yes, there is an anomaly in the image, at the {words[0]} of the image."
    return (
        f"Yes, there are {len(words)} anomalies in the image, they are at the {join_words(_unique(words))} "
        "of the image."
    )


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
