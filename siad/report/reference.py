"""The paper's claimed numbers: ``config/reference/*.csv`` (copied from ``shared/reference``).

Format: comment lines starting with ``#`` (the table's provenance and caveats), then an ordinary
CSV with a header; an empty cell means the paper reports no number there.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from siad.errors import DataError

#: The column of a paper table that averages its dataset columns.
AVERAGE = "Average"

_FIX = "copy the file from shared/reference/ into config/reference/ again"


def load_reference(path: Path) -> pd.DataFrame:
    """Read a reference CSV; the '#' lines (without the '# ') are kept in ``df.attrs["comments"]``.

    ``df.attrs["source"]`` holds the path (relative to the repository when inside it), for notes and error
    messages. Empty cells become NaN.

    Raises:
        DataError: the file is missing, unreadable, or not a CSV with a header.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read reference table ({exc}); {_FIX}") from exc
    comments = [ln.lstrip()[1:].strip() for ln in lines if ln.lstrip().startswith("#")]
    body = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not body:
        raise DataError(f"{path}: no CSV header after the '#' comment lines; {_FIX}")
    try:
        df = pd.read_csv(io.StringIO("\n".join(body) + "\n"), skipinitialspace=True)
    except (pd.errors.ParserError, ValueError) as exc:
        raise DataError(f"{path}: malformed CSV ({exc}); {_FIX}") from exc
    df.attrs["comments"] = comments
    df.attrs["source"] = _shown_path(path)
    return df


def _shown_path(path: Path) -> str:
    """``path`` relative to the repository when it lies in it (``config/reference/<name>``), else its file name:
    table notes never print a path of the machine that made them, so they read the same on every machine."""
    repository = Path(__file__).resolve().parents[2]
    try:
        return str(path.resolve().relative_to(repository))
    except ValueError:
        return path.name


def _as_claim(value: object, where: str) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(f"{where}: claimed value {value!r} is not a number; {_FIX}") from None


def reference_claims(
    reference: pd.DataFrame, match: Mapping[str, object], columns: Sequence[str]
) -> dict[str, float | None] | None:
    """Claimed numbers of the one reference row matching ``match`` (column -> value), per column.

    Returns None when no row matches (e.g. a baseline the paper did not evaluate). A column the
    reference does not have, or an empty cell, gives None for that column.

    Raises:
        DataError: ``match`` names a column the reference lacks, or several rows match.
    """
    source = reference.attrs.get("source", "reference table")
    unknown = [k for k in match if k not in reference.columns]
    if unknown:
        raise DataError(
            f"{source}: no column(s) {', '.join(unknown)} (has {', '.join(map(str, reference.columns))}); "
            "fix the table definition or the reference file header"
        )
    mask = pd.Series(True, index=reference.index)
    for key, value in match.items():
        mask &= reference[key].astype(str) == str(value)
    rows = reference[mask]
    if rows.empty:
        return None
    if len(rows) > 1:
        raise DataError(f"{source}: {len(rows)} rows match {dict(match)}; keep exactly one per row key")
    row = rows.iloc[0]
    where = f"{source} row {dict(match)}"
    claims = {c: _as_claim(row[c], f"{where}, column {c}") if c in reference.columns else None for c in columns}
    if AVERAGE in claims and average_outside(reference, match, columns, row):
        claims[AVERAGE] = None  # the paper averages datasets this table does not show: not comparable
    return claims


def average_outside(reference: pd.DataFrame, match: Mapping[str, object], columns: Sequence[str],
                    row: pd.Series | None = None) -> list[str]:
    """The reference's dataset columns with a claimed value that ``columns`` lacks: the datasets the paper's
    Average covers beyond the table's (non-empty: the claimed Average is not comparable with the reproduced one).

    ``row``: the matching reference row (None: any row with a value counts).
    """
    data_columns = [c for c in reference.columns if c not in match and c != AVERAGE and c not in columns]
    frame = reference if row is None else row.to_frame().T
    return [c for c in data_columns if pd.to_numeric(frame[c], errors="coerce").notna().any()]
