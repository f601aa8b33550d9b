"""The paper's ordering claims ("the full model is best", "AUROC falls as lambda grows"), checked on a
built :class:`~siad.report.tables.ClaimTable`.

Ablation tables make claims about the *order* of numbers rather than (or besides) the numbers
themselves. The claims check lists them with a verdict: ``holds`` / ``does not hold`` on the
reproduced point estimates, or ``not checked`` when a number is missing. A failing claim names the
rows (or the steps of a sweep) that break it, so the reader sees where the reproduction departs.
Point estimates only: with CIs of a few points, a "does not hold" inside overlapping intervals is
weak evidence either way, which the table's own CIs show.
"""

from __future__ import annotations

from collections.abc import Sequence

from siad.report.tables import FAILS, HOLDS, NOT_CHECKED, ClaimTable, OrderCheck, RowKey


def _label(row: RowKey) -> str:
    """How a row is named in a check's detail: its last key element (e.g. "Full", "0.3")."""
    return row[-1]


def _values(table: ClaimTable, rows: Sequence[RowKey], column: str) -> dict[RowKey, float | None]:
    return {row: table.cell(row, column).reproduced for row in rows}


def _missing(values: dict[RowKey, float | None]) -> OrderCheck | None:
    """The 'not checked' detail when any row lacks a reproduced number, else None."""
    absent = [_label(r) for r, v in values.items() if v is None]
    return None if not absent else OrderCheck("", NOT_CHECKED, f"no reproduced value for {', '.join(absent)}")


def best_row_check(table: ClaimTable, best: RowKey, others: Sequence[RowKey], column: str, claim: str) -> OrderCheck:
    """Claim: row ``best`` is strictly higher than every row of ``others`` in ``column``.

    Strict, because the paper's claim is that removing a module *degrades* the result; a tie fails.
    """
    values = _values(table, [best, *others], column)
    missing = _missing(values)
    if missing:
        return OrderCheck(claim, missing.verdict, missing.detail)
    top = values[best]
    shown = ", ".join(f"{_label(r)} {values[r]:.1f}" for r in others)
    detail = f"{_label(best)} {top:.1f} vs {shown}"
    not_below = [r for r in others if values[r] >= top]  # type: ignore[operator]
    if not not_below:
        return OrderCheck(claim, HOLDS, detail)
    breaking = ", ".join(_label(r) for r in not_below)
    return OrderCheck(claim, FAILS, f"{detail}; not below {_label(best)}: {breaking}")


def non_increasing_check(table: ClaimTable, rows: Sequence[RowKey], column: str, claim: str) -> OrderCheck:
    """Claim: ``column`` never rises from one row to the next (rows in sweep order); names each rise."""
    values = _values(table, rows, column)
    missing = _missing(values)
    if missing:
        return OrderCheck(claim, missing.verdict, missing.detail)
    detail = " → ".join(f"{_label(r)}: {values[r]:.1f}" for r in rows)
    rises = [
        f"{_label(a)}→{_label(b)} (+{values[b] - values[a]:.2f})"  # type: ignore[operator]
        for a, b in zip(rows, rows[1:])
        if values[b] > values[a]  # type: ignore[operator]
    ]
    if len(rows) < 2:
        return OrderCheck(claim, NOT_CHECKED, f"{detail}; a trend needs at least two rows")
    if not rises:
        return OrderCheck(claim, HOLDS, detail)
    return OrderCheck(claim, FAILS, f"{detail}; rises at {', '.join(rises)}")
