"""Ordering claims on a ClaimTable: strict "best row", non-increasing sweeps, missing numbers."""

from __future__ import annotations

from siad.report.orderings import best_row_check, non_increasing_check
from siad.report.tables import FAILS, HOLDS, NOT_CHECKED, Cell, ClaimTable


def _table(values: dict[str, float | None]) -> ClaimTable:
    rows = [(label,) for label in values]
    cells = {((label,), "Average"): Cell(reproduced=v) for label, v in values.items()}
    return ClaimTable("t", "t", ("row",), rows, ["Average"], cells)


def test_best_row_is_strict():
    assert best_row_check(_table({"Full": 72.0, "a": 71.9}), ("Full",), [("a",)], "Average", "c").verdict == HOLDS
    tie = best_row_check(_table({"Full": 72.0, "a": 72.0}), ("Full",), [("a",)], "Average", "Full is best")
    assert tie.verdict == FAILS and tie.claim == "Full is best" and tie.detail.endswith("not below Full: a")


def test_non_increasing_allows_plateaus_and_names_each_rise():
    rows = [("0.1",), ("0.3",), ("0.5",), ("0.7",)]
    assert non_increasing_check(_table({"0.1": 70, "0.3": 70, "0.5": 69, "0.7": 60}), rows, "Average", "c").verdict \
        == HOLDS
    check = non_increasing_check(_table({"0.1": 70, "0.3": 71, "0.5": 69, "0.7": 69.5}), rows, "Average", "c")
    assert check.verdict == FAILS and check.detail.endswith("rises at 0.1→0.3 (+1.00), 0.5→0.7 (+0.50)")
    assert non_increasing_check(_table({"0.1": 70}), [("0.1",)], "Average", "c").verdict == NOT_CHECKED


def test_a_missing_number_leaves_the_claim_unchecked():
    check = best_row_check(_table({"Full": 72.0, "a": None}), ("Full",), [("a",)], "Average", "c")
    assert check.verdict == NOT_CHECKED and check.detail == "no reproduced value for a"
