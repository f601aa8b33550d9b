"""The claims check: every number the paper claims, next to ours, its CI and a verdict.

A claim is "inside CI" when the printed claimed value lies in the closed bootstrap interval of the
reproduced number (compared exactly as printed, no tolerance for the paper's rounding; with several training seeds
the interval is that of one training run's number, :func:`siad.report.tables.seed_interval`), "outside CI"
otherwise, "no CI" when we have a number but no interval, and "not reproduced" when we have no
number (missing run, or metric not defined). Cells without a claimed number are not listed. The claims of a
method this suite does not run (rows of status ``not_run``: not implemented yet, or not configured) are listed
with the verdict "not run" and left out of the checked counts.

Tables may also carry ordering claims (:class:`~siad.report.tables.OrderCheck`, e.g. "the full
model has the highest Average"); they follow in a section of their own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from siad.errors import DataError
from siad.report.render import DEMO_STAMP, NOT_RUN_TEXT, fmt_pct
from siad.report.tables import NOT_RUN, ORDER_VERDICTS, Cell, ClaimTable

INSIDE, OUTSIDE, NO_CI, NOT_REPRODUCED = "inside CI", "outside CI", "no CI", "not reproduced"
VERDICTS = (INSIDE, OUTSIDE, NO_CI, NOT_REPRODUCED)
#: The verdict of a claim whose method is not run: listed, never counted as checked.
NOT_RUN_VERDICT = "not run"


def verdict(cell: Cell) -> str:
    """The verdict for a cell that has a claimed number."""
    if cell.status == NOT_RUN:
        return NOT_RUN_VERDICT
    if cell.reproduced is None:
        return NOT_REPRODUCED
    if cell.ci is None:
        return NO_CI
    low, high = cell.ci
    return INSIDE if low <= cell.claimed <= high else OUTSIDE  # type: ignore[operator]


@dataclass(frozen=True)
class ClaimRow:
    """One claimed number and how it fared."""

    table: str
    row: tuple[str, ...]
    column: str
    cell: Cell
    verdict: str

    @property
    def difference(self) -> float | None:
        """Reproduced minus claimed, in percentage points."""
        if self.cell.reproduced is None or self.cell.claimed is None:
            return None
        return self.cell.reproduced - self.cell.claimed


def claim_rows(tables: Sequence[ClaimTable]) -> list[ClaimRow]:
    """Every cell with a claimed number, in table, row, column order; a claim a table repeats from an earlier one
    (the same row, column and cell: SIAD-LLM's Table 1 row printed again in Table 2) is listed once, where it first
    appears, so its verdict is not counted twice."""
    rows, seen = [], set()
    for t in tables:
        for row in t.row_keys:
            for col in t.columns:
                cell = t.cell(row, col)
                if cell.claimed is None or (row, col, cell) in seen:
                    continue
                seen.add((row, col, cell))
                rows.append(ClaimRow(t.name, row, col, cell, verdict(cell)))
    return rows


def _common_demo(tables: Sequence[ClaimTable]) -> bool:
    flags = {t.demo for t in tables}
    if len(flags) > 1:
        demo = [t.name for t in tables if t.demo]
        real = [t.name for t in tables if not t.demo]
        raise DataError(
            f"claims check mixes demo tables ({', '.join(demo)}) with real ones ({', '.join(real)}); "
            "check one profile's tables at a time"
        )
    return flags == {True}


def _ci_header(tables: Sequence[ClaimTable]) -> str:
    levels = {t.confidence for t in tables if t.confidence is not None}
    return f"{100 * levels.pop():g} % CI" if len(levels) == 1 else "CI (level varies by table)"


def _row_header(tables: Sequence[ClaimTable]) -> list[str]:
    """The row key fields if all tables share them (e.g. level, method), else one joined "row" column."""
    headers = {t.row_header for t in tables}
    return list(headers.pop()) if len(headers) == 1 else ["row"]


def _column_header(tables: Sequence[ClaimTable]) -> str:
    headers = {t.column_header for t in tables}
    return headers.pop() if len(headers) == 1 else "column"


def _title(field: str) -> str:
    return field[:1].upper() + field[1:]


def _fmt_diff(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}"


def _fmt_ci(cell: Cell) -> str:
    return "n/a" if cell.ci is None else f"[{cell.ci[0]:.1f}, {cell.ci[1]:.1f}]"


def _unclaimed_count(tables: Sequence[ClaimTable]) -> int:
    """Reproduced numbers with no claim to compare against (e.g. a baseline the paper lacks)."""
    return sum(c.claimed is None and c.reproduced is not None for t in tables for c in t.cells.values())


def _summary(rows: Sequence[ClaimRow], unclaimed: int) -> str:
    counts = Counter(r.verdict for r in rows)
    parts = ", ".join(f"{counts[v]} {v}" for v in VERDICTS)
    checked = len(rows) - counts[NOT_RUN_VERDICT]
    not_run = (f" {counts[NOT_RUN_VERDICT]} claimed numbers belong to methods this suite does not run: listed as "
               f"\"{NOT_RUN_VERDICT}\", not checked." if counts[NOT_RUN_VERDICT] else "")
    return (f"**{checked} claimed numbers checked:** {parts}.{not_run} "
            f"({unclaimed} reproduced numbers have no claim and are not listed.)")


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _ordering_section(tables: Sequence[ClaimTable]) -> list[str]:
    """The ordering claims of every table, with their verdicts (empty when no table has any)."""
    checks = [(t.name, c) for t in tables for c in t.checks]
    if not checks:
        return []
    counts = Counter(c.verdict for _, c in checks)
    summary = ", ".join(f"{counts[v]} {v}" for v in ORDER_VERDICTS)
    lines = ["", "## Ordering claims", "", f"**{len(checks)} ordering claims checked** (on the reproduced point "
             f"estimates): {summary}.", "", "| Table | Claim | Verdict | Numbers |", "|---|---|---|---|"]
    return lines + [f"| {name} | {_escape(c.claim)} | {c.verdict} | {_escape(c.detail)} |" for name, c in checks]


def claims_check(tables: Sequence[ClaimTable]) -> str:
    """Markdown report: summary counts first, then one line per claimed number with its verdict.

    Raises:
        DataError: demo and non-demo tables are mixed.
    """
    demo = _common_demo(tables)
    rows = claim_rows(tables)
    key_header = _row_header(tables)
    header = ["Table", *map(_title, key_header), _title(_column_header(tables)), "Claimed", "Reproduced",
              "Difference", _ci_header(tables), "Verdict"]
    lines = [f"> **{DEMO_STAMP}**", ""] if demo else []
    lines += ["# Claims check", "", _summary(rows, _unclaimed_count(tables)), "",
              "_Difference = reproduced − claimed (percentage points); a claim is inside the CI when the "
              "printed claimed value lies in the closed bootstrap interval of the reproduced number (with several "
              "training seeds: the interval of one run's number, from the seeds' bootstrap replicates pooled; the "
              "reproduced number is their mean). A claim a table repeats from an earlier table is listed once._",
              ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in rows:
        keys = list(r.row) if key_header != ["row"] else [" / ".join(r.row)]
        reproduced = NOT_RUN_TEXT if r.verdict == NOT_RUN_VERDICT else fmt_pct(r.cell.reproduced)
        values = [r.table, *keys, r.column, fmt_pct(r.cell.claimed), reproduced,
                  _fmt_diff(r.difference), _fmt_ci(r.cell), r.verdict]
        lines.append("| " + " | ".join(map(_escape, values)) + " |")
    lines += _ordering_section(tables)
    return "\n".join(lines) + "\n"
