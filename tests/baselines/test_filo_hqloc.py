"""FiLo HQ-Loc box logic (baselines/filo/hqloc.py) on hand-made detector outputs, then against the release's own
outputs stored in tests/data/filo/vectors.npz (made by running test.py's code)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from baselines.filo import hqloc as h

VECTORS = Path(__file__).resolve().parents[1] / "data" / "filo" / "vectors.npz"
T = 256


def _probs(rows):
    """[len(rows), T] probabilities: each row is {position: prob}, everything else 0."""
    out = torch.zeros(len(rows), T)
    for i, row in enumerate(rows):
        for pos, p in row.items():
            out[i, pos] = p
    return out


# a caption "[CLS] anomaly . dented . cracked large . [SEP]" with made-up ids
IDS = [101, 11, 1012, 12, 1012, 13, 14, 1012, 102]
VOCAB = {101: "[CLS]", 11: "anomaly", 1012: ".", 12: "dented", 13: "cracked", 14: "large", 102: "[SEP]"}
WORDS = ["dented", "cracked large", *h.GENERIC_WORDS]


def decode(ids):
    return " ".join(VOCAB[i] for i in ids)


def test_caption_order_and_text():
    cap = h.grounding_caption(h.GENERIC_WORDS, ["cracked large", "uneven shape "])
    assert cap == "anomaly . damage . broken . defect . contamination . cracked large . uneven shape "


def test_select_boxes_thresholds_are_strict():
    probs = _probs([{1: 0.25}, {1: 0.2501}, {1: 0.9}, {1: 0.9}])
    boxes = torch.tensor([[0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 1.0, 0.7], [0.5, 0.5, 0.8, 0.87]])
    sel = h.select_boxes(probs, boxes)
    # 0.25 is not > 0.25; area 0.7 is not < 0.7; 0.8 * 0.87 = 0.696 passes
    assert sel.indices.tolist() == [1, 3] and not sel.fallback
    assert torch.equal(sel.boxes, boxes[[1, 3]]) and torch.equal(sel.probs, probs[[1, 3]])


def test_select_boxes_fallback_takes_first_argmax_whatever_its_area():
    probs = _probs([{1: 0.1}, {3: 0.2}, {1: 0.2}, {5: 0.9}])
    boxes = torch.tensor([[0.5, 0.5, 0.1, 0.1]] * 3 + [[0.5, 0.5, 0.9, 0.9]])
    sel = h.select_boxes(probs, boxes)
    assert sel.fallback and sel.indices.tolist() == [3]  # area 0.81 filtered it, the fallback brings it back
    sel = h.select_boxes(probs[:3], boxes[:3])
    assert sel.fallback and sel.indices.tolist() == [1]  # tie 0.2 / 0.2: the first one


def test_selected_token_ids_clears_position_0_and_from_255():
    row = torch.zeros(T, dtype=torch.bool)
    row[[0, 1, 3, 255]] = True
    ids = list(range(1000, 1000 + T))
    assert h.selected_token_ids(row, ids) == [1001, 1003]
    assert row[0] and row[255]  # the caller's mask is not modified
    with pytest.raises(Exception, match="position 5"):
        h.selected_token_ids(row.logical_or(torch.arange(T) == 5), ids[:4])


def test_label_score_text_truncates_the_repr():
    assert h.phrase_label("dented", torch.tensor([0.0, 0.2999])) == "dented(0.29)"
    assert h.phrase_label("x", torch.tensor([0.5])) == "x(0.5)"
    assert h.score_text(4.5397868702434395e-05) == "4.53" and h.label_number("(4.53)#$%") == 4.53
    assert h.score_text(5e-05) == "5e-0" and h.label_number("(5e-0)") == 5.0


def test_phrase_filter_is_a_case_sensitive_substring_test():
    assert h.phrase_matches("dented small(0.41)", ["dented"])
    assert h.phrase_matches("undented(0.41)", ["dented"])  # substring, not word
    assert not h.phrase_matches("uneven coating(0.77)", ["Uneven coating"])
    assert not h.phrase_matches("uneven shape(0.9)", ["uneven shape "])  # trailing space in the description
    assert not h.phrase_matches("(0.23)", h.GENERIC_WORDS)


def test_text_threshold_is_the_box_threshold():
    # token "large" (position 6) at 0.27: selected with the default (= box threshold 0.25), not with 0.3
    probs = _probs([{5: 0.6, 6: 0.27}])
    boxes = torch.tensor([[0.5, 0.5, 0.1, 0.1]])
    assert h.hq_localise(probs, boxes, IDS, decode, WORDS).phrases == ["cracked large"]
    res = h.hq_localise(probs, boxes, IDS, decode, WORDS, box_threshold=0.3)
    assert res.phrases == ["cracked"] and res.kept == [False]


def test_pixel_conversion_only_for_kept_rows():
    boxes = torch.tensor([[0.5, 0.25, 0.2, 0.1], [0.3, 0.4, 0.2, 0.1]])
    px = h.to_pixel_boxes(boxes, [True, False], 518)
    assert px[0].tolist() == pytest.approx([207.2, 103.6, 310.8, 155.4], abs=1e-4)
    assert torch.equal(px[1], boxes[1])  # dropped: still normalised cx, cy, w, h
    # a typical dropped row marks nothing
    assert not h.box_mask(px[1:], 518).any()


def test_dropped_fallback_box_of_full_size_marks_pixel_0_0_as_released():
    probs = _probs([{1: 0.1}])  # below the text threshold: empty phrase, dropped
    res = h.hq_localise(probs, torch.tensor([[0.5, 0.5, 1.0, 1.0]]), IDS, decode, WORDS)
    assert res.selection.fallback and res.kept == [False] and res.labels == ["(0.10)"]  # float32 0.1 = 0.10000000149…
    mask = res.mask()
    assert mask.sum() == 1 and mask[0, 0]
    assert not res.mask(paint_dropped=False).any()


@pytest.mark.parametrize(
    ("centre", "expected"),
    [((172.0, 100.0), ["top left"]), ((173.0, 100.0), ["top"]), ((172.5, 100.0), []), ((172.5, 172.5), []),
     ((344.0, 344.0), ["center"]), ((345.0, 344.0), ["right"]), ((344.5, 200.0), []), ((200.0, 344.2), []),
     ((345.0, 517.0), ["bottom right"]), ((400.0, 517.4), []), ((0.0, 0.0), ["top left"]),
     (h.RELEASE_DEFAULT_CENTRE, ["center"])],
)
def test_cells_have_inclusive_integer_bounds(centre, expected):
    assert h.cell_of(centre) == expected


def test_best_box_tie_last_wins_and_centre_gives_the_position():
    # two kept boxes whose labels both read 0.86, the later one is the best; a third reads 0.85
    probs = _probs([{3: 0.8612}, {5: 0.8671, 6: 0.8}, {1: 0.8599}])
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1], [0.5, 0.2, 0.1, 0.1]])
    res = h.hq_localise(probs, boxes, IDS, decode, WORDS)
    assert res.labels == ["dented(0.86)", "cracked large(0.86)", "anomaly(0.85)"]
    assert res.best == 1 and res.positions == ["bottom right"]
    assert res.centre == pytest.approx((414.4, 414.4), abs=1e-3)
    assert "best box" in res.decisions[1]


def test_no_kept_box_gives_the_default_centre():
    probs = _probs([{4: 0.9}])  # selects "." only: phrase "." matches no word
    res = h.hq_localise(probs, torch.tensor([[0.1, 0.1, 0.1, 0.1]]), IDS, decode, WORDS)
    assert res.kept == [False] and res.best is None
    assert res.centre == (259, 259) and res.positions == ["center"]


def test_box_mask_truncation_and_python_slicing():
    mask = h.box_mask(torch.tensor([[-3.2, 10.0, 20.0, 30.0]]), 518)
    assert not mask.any()  # int(-3.2) = -3 -> columns 515:20, empty
    mask = h.box_mask(torch.tensor([[-3.2, 10.0, 517.6, 12.0]]), 518)
    assert mask.sum() == 2 * 2 and mask[10:12, 515:517].all()  # -3:517 wraps to 515:517
    mask = h.box_mask(torch.tensor([[-0.5, 1.9, 2.9, 3.0]]), 518)
    assert mask.sum() == 2 * 2 and mask[1:3, 0:2].all()  # int(-0.5) = 0, int(1.9) = 1, int(2.9) = 2


def test_suppress_outside_keeps_exact_ones_and_damps_elsewhere():
    score = torch.full((1, 1, 6, 6), 0.5)
    score[0, 0, 5, 5] = 1.0  # outside the box, but exactly 1: kept
    score[0, 0, 0, 0] = 0.9
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[1:3, 1:4] = True
    out = h.suppress_outside(score, mask)
    assert out[0, 0, 5, 5] == 1.0
    assert out[0, 0, 1, 1] == 0.5 and out[0, 0, 2, 3] == 0.5  # inside: unchanged
    assert out[0, 0, 0, 0] == torch.tensor(0.9) * 0.7 and out[0, 0, 4, 4] == torch.tensor(0.5) * 0.7
    assert torch.equal(h.suppress_outside(score, mask, lam=0.5)[0, 0, 4, 4], torch.tensor(0.25))
    assert (out == score).sum() == 6 + 1


def test_end_to_end_hand_made_image():
    probs = _probs([{5: 0.62, 6: 0.5}, {3: 0.2}, {1: 0.9}, {14: 0.0, 2: 0.7}])
    boxes = torch.tensor([[0.30, 0.25, 0.10, 0.12], [0.7, 0.7, 0.1, 0.1], [0.5, 0.5, 0.9, 0.85],
                          [0.8, 0.2, 0.05, 0.05]])
    res = h.hq_localise(probs, boxes, IDS, decode, WORDS)
    assert res.selection.indices.tolist() == [0, 3]  # 0.2 below threshold, area 0.765 too large
    assert res.labels == ["cracked large(0.62)", ".(0.69)"] and res.kept == [True, False]
    assert res.best == 0 and res.positions == ["top left"]
    assert res.boxes_px[0].tolist() == pytest.approx([129.5, 98.42, 181.3, 160.58], abs=1e-3)
    mask = res.mask()
    assert mask.sum() == (160 - 98) * (181 - 129) and mask[98:160, 129:181].all()


# ---- the release's own outputs --------------------------------------------------------------------------------

# test.py's descriptions of the two classes of the stored cases (data, verbatim: capitals and stray spaces kept)
DESCRIPTIONS = {
    "bottle": ["cracked large", "cracked small", "dented large", "dented small", "leaking", "discolored", "deformed",
               "missing cap", "excessive condensation", "unusual odor"],
    "macaroni1": ["uneven shape ", "small scratches", "small cracks", "uneven coloring", "signs of insect infestation",
                  "uneven texture", "Unusual consistency"],
}


@pytest.fixture(scope="module")
def vectors():
    assert VECTORS.exists(), f"{VECTORS} is committed with the tests; restore it (tests/data/filo/README.md)"
    return np.load(VECTORS, allow_pickle=False)


def test_grounding_cases_match_the_release(vectors, tmp_path):
    from transformers import BertTokenizer

    (tmp_path / "vocab.txt").write_text("\n".join(str(t) for t in vectors["gd_vocab"]) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(tmp_path), do_lower_case=True)
    box_thr, text_thr, area_thr = vectors["gd_thresholds"].tolist()
    assert (box_thr, text_thr, area_thr) == (0.25, 0.25, 0.7)
    captions = {"bottle": str(vectors["gd_captions"][0]), "macaroni1": str(vectors["gd_captions"][1])}
    assert captions["bottle"] == h.grounding_caption(h.GENERIC_WORDS, DESCRIPTIONS["bottle"]).lower() + "."
    names = [str(n) for n in vectors["gd_case_names"]]
    assert len(names) == 16
    for c, name in enumerate(names):
        cls = str(vectors["gd_case_class"][c])
        probs = torch.from_numpy(vectors["gd_pred_logits"][c]).sigmoid()
        boxes = torch.from_numpy(vectors["gd_pred_boxes"][c])
        ids = tokenizer(captions[cls])["input_ids"]
        res = h.hq_localise(probs, boxes, ids, tokenizer.decode, DESCRIPTIONS[cls] + list(h.GENERIC_WORDS))
        n = int(vectors["gd_n_boxes"][c])
        released = [str(p) for p in vectors["gd_phrases"][c][:n]]
        ours = [lab + ("" if keep else "#$%") for lab, keep in zip(res.labels, res.kept)]
        assert ours == released, name
        assert torch.equal(res.boxes_px, torch.from_numpy(vectors["gd_boxes"][c][:n])), name
        n_pos = int(vectors["gd_n_position"][c])
        assert res.positions == ([str(vectors["gd_position"][c])] if n_pos else []), name
        assert res.centre == tuple(vectors["gd_center"][c].tolist()), name
        max_box = vectors["gd_max_box"][c]
        if res.best is None:
            assert np.isnan(max_box).all(), name
        else:
            assert torch.equal(res.boxes_px[res.best], torch.from_numpy(max_box)), name


def test_box_suppression_matches_the_release(vectors):
    for k in range(len(vectors["supp_n_boxes"])):
        n = int(vectors["supp_n_boxes"][k])
        mask = h.box_mask(torch.from_numpy(vectors["supp_boxes"][k][:n]), 518)
        assert torch.equal(mask, torch.from_numpy(vectors["supp_keep"][k])), k
        for img in range(vectors["supp_map_s7"].shape[1]):
            before = torch.from_numpy(vectors["test_mean_s7"][0, img])  # the ("top left",) maps, every 7th pixel
            after = h.suppress_outside(before, mask[::7, ::7])
            assert torch.equal(after, torch.from_numpy(vectors["supp_map_s7"][k, img])), (k, img)
