import numpy as np
import pytest
import torch

from siad.errors import ConfigError
from siad.llm.answers import (
    POSITION_WORDS,
    ParsedAnswer,
    anomalygpt_sentence,
    parse_answer,
    patch_answer,
    patch_words,
    position_words,
    target_answer,
)

SIZE = 224
CENTRES = (37, 112, 187)  # centre pixel of each third of 224 (0–74, 75–149, 150–223)


def _mask(*boxes):
    mask = np.zeros((SIZE, SIZE), dtype=np.float32)
    for r0, r1, c0, c1 in boxes:
        mask[r0:r1, c0:c1] = 1.0
    return mask


@pytest.mark.parametrize("mode", ["siad", "anomalygpt"])
@pytest.mark.parametrize("cell", range(9))
def test_a_blob_in_each_cell(mode, cell):
    r, c = CENTRES[cell // 3], CENTRES[cell % 3]
    mask = _mask((r - 10, r + 10, c - 10, c + 10))
    assert position_words(mask, mode=mode) == [POSITION_WORDS[cell]]
    assert position_words(torch.from_numpy(mask)[None], mode=mode) == [POSITION_WORDS[cell]]


def test_cell_boundaries():
    assert position_words(_mask((74, 75, 0, 1))) == ["top left"]
    assert position_words(_mask((75, 76, 223, 224))) == ["right"]
    assert position_words(_mask((150, 151, 150, 151))) == ["bottom right"]


def test_siad_lists_every_spanned_cell_but_anomalygpt_the_box_centre():
    wide = _mask((100, 120, 60, 160))  # middle row, crosses left|center|right
    assert position_words(wide, mode="siad") == ["left", "center", "right"]
    assert position_words(wide, mode="anomalygpt") == ["center"]
    assert target_answer(wide) == "Yes, there is an anomaly in the image, at the left, center and right of the image."


def test_anomalygpt_one_word_per_region_in_raster_order():
    two = _mask((180, 200, 10, 30), (10, 30, 190, 210))
    assert position_words(two, mode="anomalygpt") == ["top right", "bottom left"]
    assert target_answer(two, style="anomalygpt") == (
        "Yes, there are 2 anomalies in the image, they are at the top right and bottom left of the image."
    )
    same = _mask((10, 20, 10, 20), (40, 50, 40, 50))
    assert target_answer(same, style="anomalygpt") == (
        "Yes, there are 2 anomalies in the image, they are at the top left of the image."
    )
    diagonal = _mask((10, 12, 10, 12), (12, 14, 12, 14))  # touching corners: one region (8-connectivity)
    assert position_words(diagonal, mode="anomalygpt") == ["top left"]


def test_exact_answer_strings():
    normal = np.zeros((SIZE, SIZE))
    one = _mask((180, 200, 100, 120))
    assert target_answer(normal) == "No, there are no anomalies in the image."
    assert target_answer(normal, style="anomalygpt") == "No, there is no anomaly in the image."
    assert target_answer(one) == "Yes, there is an anomaly in the image, at the bottom of the image."
    assert (
        target_answer(one, style="anomalygpt") == "Yes, there is an anomaly in the image, at the bottom of the image."
    )
    assert target_answer(one * 0.4) == "No, there are no anomalies in the image."  # below threshold 0.5
    assert target_answer(one * 0.4, threshold=0.3).startswith("Yes")


def test_bad_mask_and_mode():
    with pytest.raises(ConfigError, match="H×W"):
        position_words(np.zeros((2, 3, 4, 5)))
    with pytest.raises(ConfigError, match="position mode"):
        position_words(_mask((0, 5, 0, 5)), mode="grid")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "verdict", "positions"),
    [
        ("No, there are no anomalies in the image.", "no", []),
        ("No, there is no anomaly in the image.", "no", []),
        ("Yes, there is an anomaly in the image, at the bottom right of the image.", "yes", ["bottom right"]),
        ("Yes, there are 2 anomalies in the image, they are at the top left and top of the image.", "yes",
         ["top left", "top"]),
        ("yes. Left, centre and left again", "yes", ["left", "center"]),
        ("  There is an anomaly at the top right.", "yes", ["top right"]),
        ("I think there are no anomalies here.", "no", []),
        ("The bottle looks round and shiny.", "unparsed", []),
        ("", "unparsed", []),
        ("Nothing at the bottom", "unparsed", ["bottom"]),
    ],
)  # fmt: skip
def test_parse_answer(text, verdict, positions):
    assert parse_answer(text) == ParsedAnswer(verdict=verdict, positions=positions)


def test_parse_round_trips_every_target():
    for cell in range(9):
        r, c = CENTRES[cell // 3], CENTRES[cell % 3]
        for style in ("siad", "anomalygpt"):
            parsed = parse_answer(target_answer(_mask((r - 5, r + 5, c - 5, c + 5)), style=style))
            assert parsed == ParsedAnswer("yes", [POSITION_WORDS[cell]])


def test_patch_words_follow_paste_order_not_raster_order():
    boxes = ((180, 200, 180, 200), (10, 30, 10, 30))  # pasted bottom right first, then top left
    mask = _mask(*boxes)
    assert patch_words(boxes, (SIZE, SIZE)) == ["bottom right", "top left"]
    assert position_words(mask, mode="anomalygpt") == ["top left", "bottom right"]  # regions: raster order
    assert patch_answer(boxes, (SIZE, SIZE)) == (
        "Yes, there are 2 anomalies in the image, they are at the bottom right and top left of the image."
    )
    assert patch_answer((), (SIZE, SIZE)) == "No, there is no anomaly in the image."


def test_patch_centre_uses_the_released_cell_rule():
    # centre = (min + max) / 2 with max exclusive; "top" while centre / side <= 1/3 (both thirds inclusive above)
    assert patch_words([(0, 149, 0, 10)], (SIZE, SIZE)) == ["top left"]  # centre row 74.5 ≤ 74.67
    assert patch_words([(0, 150, 0, 10)], (SIZE, SIZE)) == ["left"]  # 75.0
    assert patch_words([(100, 120, 190, 210)], (SIZE, SIZE)) == ["right"]
    assert patch_words([(100, 120, 190, 210)], (SIZE, 448)) == ["center"]  # centres are read in the image's frame


def test_union_box_reproduces_the_released_second_centre():
    boxes = ((10, 30, 10, 30), (190, 210, 190, 210))  # the union box of both is centred in the middle
    assert patch_words(boxes, (SIZE, SIZE)) == ["top left", "bottom right"]
    assert patch_words(boxes, (SIZE, SIZE), union_box=True) == ["top left", "center"]


def test_three_anomalies_give_the_released_unfinished_sentence():
    assert anomalygpt_sentence(["top left", "bottom", "center"]) == (
        "Yes, there are 3 anomalies in the image, they are at the top left, bottom"
    )
    same = "Yes, there are {} anomalies in the image, they are at the left"
    assert anomalygpt_sentence(["left", "left", "center"]) == same.format(3)
    assert anomalygpt_sentence(["left", "left"]) == same.format(2) + " of the image."
    three_regions = _mask((10, 20, 10, 20), (100, 110, 100, 110), (200, 210, 200, 210))
    assert target_answer(three_regions, style="anomalygpt") == (
        "Yes, there are 3 anomalies in the image, they are at the top left, center"
    )
