"""FiLo's HQ-Loc box logic as released (CASIA-IVA-Lab/FiLo@36ff29c, ``test.py``): pure functions, tensors in and out.

What it does: from Grounding DINO's per-query outputs on one image (``probs`` [nq, T] sigmoid scores per text-token
position, T = 256; ``boxes`` [nq, 4] normalised cx, cy, w, h) it keeps a few boxes, names each with the caption words
it fires on, drops those whose name is no anomaly word, picks the best remaining box, turns its centre into one of
nine position words ("top left" … "bottom right") for FiLo's position-enhanced prompts, and finally damps the
anomaly map outside the kept boxes. Spec: ``baselines_llm_filo_anovl.md`` §2 ("Grounding DINO (test.py)",
"Scoring"). The detector itself lives in :mod:`baselines.filo.grounding`; nothing here needs it.

Why a separate module: every step below carries an oddity of the released script that changes numbers, and the
benchmark reproduces the release, so each one is kept, named and tested on hand-made detector outputs:

1. Box filter (:func:`select_boxes`): keep queries with max-prob > ``box_threshold`` (strict) **and** normalised
   area w·h < ``area_threshold`` (strict; 0.7 from the command line, the function default of 0.8 is never used).
   When nothing survives, the single query with the highest max-prob is kept instead (``torch.argmax``: the first
   of equal maxima), whatever its area or score.
2. Text threshold: the script assigns ``text_threshold = args.box_threshold``, so ``--text_threshold`` is ignored
   and token positions are selected with prob > ``box_threshold`` (:func:`hq_localise` default).
3. Phrase (:func:`selected_token_ids`): positions 0 and ≥ 255 are cleared, the remaining selected positions index
   the caption's token ids, which are decoded as one string (special tokens and "." included).
4. Label (:func:`phrase_label`): ``phrase + "(" + str(score)[:4] + ")"`` where ``score`` is the row's max-prob as a
   Python float. Truncating the *repr* means 0.2999 → "0.29", float32 0.1 → "0.10", 0.5 → "0.5", and a score below
   1e-4 reads as a large number (4.54e-05 → "4.53", 5e-05 → "5e-0" → 5.0) — harmless in practice because such a box
   has an empty phrase and is dropped by step 5.
5. Phrase filter (:func:`phrase_matches`): a box is kept when any description or generic word is a *substring* of
   the label (score suffix included). Case-sensitive, while the phrase is decoded from the lower-cased caption: the
   capitalised descriptions ("Uneven coating", "Signs of infestation", …) can never match. Descriptions with a
   trailing space ("uneven shape ") need the next token to follow after a space in the decoded phrase.
6. Pixel boxes (:func:`to_pixel_boxes`): only kept rows are converted (× ``size``; x1 = cx − w/2, x2 = x1 + w in
   float32 in the script's order). Dropped rows stay in normalised cx, cy, w, h — *and the script still paints
   them* in step 9. Their ``int()`` coordinates are 0 or 1, so they mark nothing except when w = h = 1.0 exactly
   with cx, cy < 1 (possible only for the fallback box): then pixel (0, 0). ``paint_dropped`` chooses.
7. Best box (:func:`best_box`): among kept rows the label's number (step 4) is compared with ``>=`` starting from
   0, so the *last* of equal numbers wins and a box whose number is 0.0 still wins over none.
8. Position (:func:`cell_of`): centre ((x1 + x2)/2, (y1 + y2)/2) (float32), or (259, 259) when no box is kept; the
   first cell whose inclusive integer bounds contain it. The bounds are the script's fixed table for 518 px:
   [0, 172], [173, 344], [345, 517] in x and y. A centre between two cells (e.g. 172.5) or beyond 517 gets **no
   position** (an empty list). The table is not derived from ``--image_size`` in the script and its split
   (173/172/173 pixels) follows no clear formula, so it is kept fixed here too; pass ``cells`` to change it.
9. Map damping (:func:`box_mask`, :func:`suppress_outside`): for every box row, ``int()`` of each coordinate
   (truncation toward zero: −0.5 → 0) and Python slicing ``[y1:y2, x1:x2]``, so a negative start wraps to the far
   end and usually marks nothing (x1 = −3 → 515:x2 is empty). A copy of the map gets 1 on marked pixels and the
   result is ``where(copy == 1, map, λ·map)``, λ = 0.7: a pixel whose score is exactly 1.0 keeps its score even
   outside every box.

Shapes: ``nq`` queries, ``T`` text positions (256), ``k`` boxes after step 1, ``S`` the map size (518).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from siad.errors import ConfigError

__all__ = [
    "BoxSelection",
    "Cells",
    "GENERIC_WORDS",
    "HqLocResult",
    "RELEASE_CELLS",
    "RELEASE_DEFAULT_CENTRE",
    "RELEASE_SIZE",
    "best_box",
    "box_mask",
    "cell_of",
    "grounding_caption",
    "hq_localise",
    "label_number",
    "localised_map",
    "phrase_label",
    "phrase_matches",
    "score_text",
    "select_boxes",
    "selected_token_ids",
    "suppress_outside",
    "to_pixel_boxes",
]

#: The five generic anomaly words that open every caption and join the phrase filter's word list.
GENERIC_WORDS: tuple[str, ...] = ("anomaly", "damage", "broken", "defect", "contamination")
#: The script's map/box size (``--image_size``).
RELEASE_SIZE = 518
#: The script's nine cells: (name, (x1, y1), (x2, y2)), inclusive bounds on the 518-px grid, in its search order.
RELEASE_CELLS: tuple[tuple[str, tuple[int, int], tuple[int, int]], ...] = (
    ("top left", (0, 0), (172, 172)),
    ("top", (173, 0), (344, 172)),
    ("top right", (345, 0), (517, 172)),
    ("left", (0, 173), (172, 344)),
    ("center", (173, 173), (344, 344)),
    ("right", (345, 173), (517, 344)),
    ("bottom left", (0, 345), (172, 517)),
    ("bottom", (173, 345), (344, 517)),
    ("bottom right", (345, 345), (517, 517)),
)
#: The centre used when no box survives the phrase filter (it falls in "center").
RELEASE_DEFAULT_CENTRE: tuple[float, float] = (259, 259)
#: Text positions the phrase decoder never reads: [0, LEFT] and [RIGHT, T).
_LEFT, _RIGHT = 0, 255
_NUMBER = re.compile(r"\((.*?)\)")

Cells = Sequence[tuple[str, tuple[float, float], tuple[float, float]]]


def grounding_caption(generic_words: Sequence[str], descriptions: Sequence[str]) -> str:
    """The detector's caption: generic words then the class's descriptions, joined by " . " (the script's order).

    The detector later lower-cases it, strips it and appends a final "." (:func:`baselines.filo.grounding.
    normalise_caption`). Descriptions are used verbatim, stray spaces included ("uneven shape " → a double space).
    """
    return " . ".join([*generic_words, *descriptions])


@dataclass(frozen=True)
class BoxSelection:
    """Step 1's result: ``probs`` [k, T], ``boxes`` [k, 4] (normalised cxcywh), ``indices`` [k] (query indices, int64)
    and ``fallback`` (True when no query passed and the single best one was taken, k = 1)."""

    probs: Tensor
    boxes: Tensor
    indices: Tensor
    fallback: bool


def select_boxes(probs: Tensor, boxes: Tensor, box_threshold: float = 0.25,
                 area_threshold: float = 0.7) -> BoxSelection:
    """Keep queries with max-prob > ``box_threshold`` and w·h < ``area_threshold``; else the argmax query (step 1).

    Args:
        probs: [nq, T] sigmoid scores (−inf logits give 0).
        boxes: [nq, 4] normalised cx, cy, w, h.
    """
    if probs.ndim != 2 or boxes.shape != (probs.shape[0], 4):
        raise ConfigError(f"select_boxes: probs must be [nq, T] and boxes [nq, 4]; got {tuple(probs.shape)} and "
                          f"{tuple(boxes.shape)}")
    best = probs.max(dim=1)[0]
    keep = (best > box_threshold) & (boxes[:, 2] * boxes[:, 3] < area_threshold)
    if bool(keep.any()):
        indices = keep.nonzero(as_tuple=True)[0]
        return BoxSelection(probs[indices], boxes[indices], indices, False)
    top = torch.argmax(best)
    indices = top.reshape(1)
    return BoxSelection(probs[indices], boxes[indices], indices, True)


def selected_token_ids(mask_row: Tensor, input_ids: Sequence[int], left: int = _LEFT, right: int = _RIGHT) -> list[int]:
    """Token ids at the selected positions of one row (step 3): positions [0, left] and [right, T) are ignored.

    Args:
        mask_row: [T] bool, e.g. ``probs_row > text_threshold``. Not modified.
        input_ids: the caption's token ids (unpadded, [CLS] first); a selected position beyond them is an error
            (the script would raise IndexError; the detector never scores such positions above 0).
    """
    if mask_row.ndim != 1:
        raise ConfigError(f"selected_token_ids: mask_row must be 1-D, got {tuple(mask_row.shape)}")
    row = mask_row.clone().bool()
    row[: left + 1] = False
    row[right:] = False
    positions = row.nonzero(as_tuple=True)[0].tolist()
    if positions and positions[-1] >= len(input_ids):
        raise ConfigError(f"selected_token_ids: position {positions[-1]} is selected but the caption has only "
                          f"{len(input_ids)} tokens")
    return [int(input_ids[p]) for p in positions]


def score_text(value: float) -> str:
    """The label's score text: the first four characters of ``str(value)`` (0.31234 → "0.31", 5e-05 → "5e-0")."""
    return str(value)[:4]


def phrase_label(phrase: str, probs_row: Tensor) -> str:
    """``phrase`` followed by ``(score)``, score = :func:`score_text` of the row's max as a Python float (step 4)."""
    return f"{phrase}({score_text(probs_row.max().item())})"


def label_number(label: str) -> float:
    """The number between the first pair of parentheses of a label, as the script reads it back (step 7)."""
    found = _NUMBER.search(label)
    if found is None:
        raise ConfigError(f"label {label!r} has no '(score)' part")
    return float(found.group(1))


def phrase_matches(label: str, words: Sequence[str]) -> bool:
    """True when any word is a substring of ``label`` (case-sensitive, score suffix included; step 5)."""
    return any(word in label for word in words)


def to_pixel_boxes(boxes: Tensor, kept: Sequence[bool], size: int = RELEASE_SIZE) -> Tensor:
    """Step 6: kept rows → pixel x1, y1, x2, y2 (float32, the script's operation order); other rows unchanged.

    Args:
        boxes: [k, 4] normalised cx, cy, w, h (float32).
        kept: k flags from the phrase filter.
    Returns:
        [k, 4]: kept rows in pixels, dropped rows still normalised cx, cy, w, h (as in the script).
    """
    out = boxes.clone()
    scale = torch.tensor([size, size, size, size], dtype=torch.float32)
    for i, keep in enumerate(kept):
        if not keep:
            continue
        row = out[i] * scale
        row[:2] -= row[2:] / 2
        row[2:] += row[:2]
        out[i] = row
    return out


def best_box(labels: Sequence[str], kept: Sequence[bool]) -> int | None:
    """Step 7: the kept row with the largest label number; ``>=`` from 0, so the last of equal numbers wins."""
    best, best_number = None, 0.0
    for i, (label, keep) in enumerate(zip(labels, kept)):
        if not keep:
            continue
        number = label_number(label)
        if number >= best_number:
            best, best_number = i, number
    return best


def cell_of(centre: tuple[float, float], cells: Cells = RELEASE_CELLS) -> list[str]:
    """Step 8: ``[name]`` of the first cell whose inclusive bounds contain ``centre`` (x, y), else ``[]``."""
    x, y = centre
    for name, (x1, y1), (x2, y2) in cells:
        if x1 <= x <= x2 and y1 <= y <= y2:
            return [name]
    return []


def box_mask(boxes_px: Tensor, size: int = RELEASE_SIZE) -> Tensor:
    """Step 9's painted pixels: [S, S] bool, True inside ``[int(y1):int(y2), int(x1):int(x2)]`` of any row.

    ``int()`` truncates toward zero and the slices are Python's: a negative bound counts from the end, so e.g.
    x1 = −3.2 → −3 → columns 515:x2, empty for any x2 ≤ 515. Args: ``boxes_px`` [k, 4] x1, y1, x2, y2 (rows the
    caller wants painted).
    """
    mask = torch.zeros(size, size, dtype=torch.bool)
    for rect in boxes_px:
        x1, y1, x2, y2 = (int(v.item()) for v in rect)
        mask[y1:y2, x1:x2] = True
    return mask


def suppress_outside(score_map: Tensor, mask: Tensor, lam: float = 0.7) -> Tensor:
    """Step 9: ``where(copy == 1, map, λ·map)`` with copy = map set to 1 on ``mask``.

    Args:
        score_map: [..., S, S] anomaly map (any leading dims, e.g. the script's [1, 1, S, S]).
        mask: [S, S] bool from :func:`box_mask`.
    Returns:
        the map with every pixel outside the mask multiplied by λ — except pixels whose score is exactly 1.0,
        which the comparison with the painted copy cannot tell from box pixels and so keep their score.
    """
    if tuple(mask.shape) != tuple(score_map.shape[-2:]):
        raise ConfigError(f"suppress_outside: mask {tuple(mask.shape)} does not match the map's last two dims "
                          f"{tuple(score_map.shape[-2:])}")
    painted = score_map.clone()
    painted[..., mask] = 1
    return torch.where(painted == 1, score_map, score_map * lam)


@dataclass
class HqLocResult:
    """Every decision of one image's HQ-Loc (row i = the i-th box after :func:`select_boxes`).

    Attributes:
        selection: step 1 (probs [k, T], boxes [k, 4], query indices [k], fallback flag).
        phrases: k decoded phrases; ``labels``: the same with the ``(score)`` suffix.
        kept: k phrase-filter flags (step 5).
        boxes_px: [k, 4] the script's ``boxes_filt`` after step 6 (kept rows in pixels, dropped rows normalised).
        best: row of the best kept box, or None.
        centre: (x, y) of the best box, or the default centre.
        positions: ``[cell name]`` or ``[]`` (step 8) — what FiLo's prompts receive.
        decisions: one human-readable line per row.
        size: S.
    """

    selection: BoxSelection
    phrases: list[str]
    labels: list[str]
    kept: list[bool]
    boxes_px: Tensor
    best: int | None
    centre: tuple[float, float]
    positions: list[str]
    decisions: list[str] = field(default_factory=list)
    size: int = RELEASE_SIZE

    def painted_boxes(self, paint_dropped: bool = True) -> Tensor:
        """[m, 4] the rows step 9 paints: all rows as the script does, or only kept rows (``paint_dropped=False``)."""
        if paint_dropped:
            return self.boxes_px
        rows = [i for i, keep in enumerate(self.kept) if keep]
        return self.boxes_px[rows]

    def mask(self, paint_dropped: bool = True) -> Tensor:
        """[S, S] bool: :func:`box_mask` of :meth:`painted_boxes`."""
        return box_mask(self.painted_boxes(paint_dropped), self.size)


def hq_localise(
    probs: Tensor,
    boxes: Tensor,
    input_ids: Sequence[int],
    decode: Callable[[list[int]], str],
    words: Sequence[str],
    *,
    box_threshold: float = 0.25,
    text_threshold: float | None = None,
    area_threshold: float = 0.7,
    size: int = RELEASE_SIZE,
    cells: Cells = RELEASE_CELLS,
    default_centre: tuple[float, float] = RELEASE_DEFAULT_CENTRE,
) -> HqLocResult:
    """Steps 1–8 on one image's detector outputs.

    Args:
        probs: [nq, T] sigmoid scores; ``boxes``: [nq, 4] normalised cx, cy, w, h.
        input_ids: the caption's token ids as the detector saw them (unpadded).
        decode: token ids → text (the detector tokenizer's ``decode``).
        words: the phrase filter's words (the class's descriptions + :data:`GENERIC_WORDS`).
        text_threshold: None reproduces the script (= ``box_threshold``); a number uses it instead.
    """
    text_thr = box_threshold if text_threshold is None else text_threshold
    selection = select_boxes(probs, boxes, box_threshold, area_threshold)
    phrases, labels, kept, decisions = [], [], [], []
    for i, row in enumerate(selection.probs):
        phrase = decode(selected_token_ids(row > text_thr, input_ids))
        label = phrase_label(phrase, row)
        keep = phrase_matches(label, words)
        phrases.append(phrase)
        labels.append(label)
        kept.append(keep)
        query = int(selection.indices[i])
        origin = "fallback (nothing passed the box filter)" if selection.fallback else "passed the box filter"
        decisions.append(f"query {query}: {origin}; label {label!r} "
                         + ("matches a word: kept" if keep else "matches no word: dropped"))
    boxes_px = to_pixel_boxes(selection.boxes, kept, size)
    best = best_box(labels, kept)
    if best is None:
        centre = default_centre
    else:
        x1, y1, x2, y2 = boxes_px[best]
        centre = (float(((x1 + x2) / 2).item()), float(((y1 + y2) / 2).item()))
        decisions[best] += "; best box"
    positions = cell_of(centre, cells)
    return HqLocResult(selection, phrases, labels, kept, boxes_px, best, centre, positions, decisions, size)


def localised_map(score_map: Tensor, result: HqLocResult, lam: float = 0.7, paint_dropped: bool = True) -> Tensor:
    """Step 9 for one image: :func:`suppress_outside` with the mask of ``result`` ([..., S, S] in and out)."""
    return suppress_outside(score_map, result.mask(paint_dropped), lam)
