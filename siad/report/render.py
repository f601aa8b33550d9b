"""Render a :class:`~siad.report.tables.ClaimTable` as Markdown, LaTeX (booktabs) and long CSV.

Every cell reads "reproduced (claimed)": the reproduced number first, the paper's claim after it
in parentheses (smaller in LaTeX), both in percent with one decimal as in the paper. A number measured under
several training seeds reads "mean ± std (claimed)" (the sample standard deviation over the seeds). Demo outputs
carry :data:`DEMO_STAMP` on their first line so they cannot be mistaken for real results.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

from siad.files import write_text_atomic
from siad.report.tables import MISSING, NOT_APPLICABLE, NOT_RUN, Cell, ClaimTable

DEMO_STAMP = (
    "DEMO OUTPUT: these numbers come from synthetic stand-in data and random-initialised models; "
    "they are NOT comparable to the paper."
)
LEGEND = (
    "Each cell: reproduced (claimed by the paper), in percent; mean ± std over training seeds where several; "
    "n/a = not reported / not defined; – = not applicable (no pixel masks); missing = no run found; "
    "not run = a method of the paper this suite does not run (the claim only)."
)
#: The legend of a table without claimed numbers (:attr:`ClaimTable.has_claims` False: a user table).
LEGEND_NO_CLAIMS = (
    "Each cell: reproduced, in percent; mean ± std over training seeds where several; n/a = not defined; "
    "– = not applicable (no pixel masks); missing = no run found."
)
#: The reproduced side of a cell whose method is not run (status ``not_run``).
NOT_RUN_TEXT = "not run"
DASH = "–"
CSV_VALUE_FIELDS = ("reproduced", "claimed", "ci_low", "ci_high", "status", "std", "seeds")


def fmt_pct(value: float | None) -> str:
    """One decimal, or "n/a" for an absent number."""
    return "n/a" if value is None else f"{value:.1f}"


def reproduced_text(cell: Cell) -> str:
    """The reproduced part of a cell: a number, "n/a", "missing", "not run" or "–"."""
    if cell.status == NOT_APPLICABLE:
        return DASH
    if cell.status == MISSING:
        return MISSING
    if cell.status == NOT_RUN:
        return NOT_RUN_TEXT
    if cell.std is not None and cell.reproduced is not None:
        return f"{fmt_pct(cell.reproduced)} ± {fmt_pct(cell.std)}"
    return fmt_pct(cell.reproduced)


def _header_label(field: str) -> str:
    return field[:1].upper() + field[1:]


def _stamp_lines(table: ClaimTable, prefix: str, suffix: str = "") -> list[str]:
    """The demo stamp as the output's first line (in the format's comment/emphasis syntax)."""
    return [prefix + DEMO_STAMP + suffix] if table.demo else []


# ----------------------------------------------------------------------------------------- Markdown


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def claimed_text(table: ClaimTable, cell: Cell) -> str:
    """The claimed part of a cell: a number, or the table's placeholder for "no claim"."""
    return table.no_claim if cell.claimed is None else fmt_pct(cell.claimed)


def legend(table: ClaimTable) -> str:
    """The legend of ``table``: with or without claimed numbers."""
    return LEGEND if table.has_claims else LEGEND_NO_CLAIMS


def _md_cell(table: ClaimTable, cell: Cell) -> str:
    if not table.has_claims:
        return reproduced_text(cell)
    if cell.status == NOT_APPLICABLE:
        return DASH
    return f"{reproduced_text(cell)} ({claimed_text(table, cell)})"


def _md_checks(table: ClaimTable) -> list[str]:
    """The table's ordering claims with their verdicts (checked on the reproduced point estimates)."""
    if not table.checks:
        return []
    lines = ["", "Ordering claims of the paper, checked on the reproduced point estimates:"]
    return lines + [f"- {c.claim}: **{c.verdict}** ({c.detail})" for c in table.checks]


def render_markdown(table: ClaimTable) -> str:
    """A Markdown table (GitHub flavour) with a legend and the table's notes."""
    header = [_header_label(f) for f in table.row_header] + table.columns
    align = ["---"] * len(table.row_header) + ["---:"] * len(table.columns)
    lines = _stamp_lines(table, "> **", "**") + ([""] if table.demo else [])
    lines += [f"### {table.title}", "", f"_{legend(table)}_", ""]
    lines.append("| " + " | ".join(map(_md_escape, header)) + " |")
    lines.append("|" + "|".join(align) + "|")
    for row in table.row_keys:
        values = list(row) + [_md_cell(table, table.cell(row, c)) for c in table.columns]
        lines.append("| " + " | ".join(map(_md_escape, values)) + " |")
    lines += _md_checks(table)
    if table.notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in table.notes]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- LaTeX

_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    DASH: "--",
    "±": r"$\pm$",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters (and write the en dash as ``--``)."""
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)


def _tex_cell(table: ClaimTable, cell: Cell) -> str:
    if cell.status == NOT_APPLICABLE:
        return "--"
    if not table.has_claims:
        return latex_escape(reproduced_text(cell))
    return f"{latex_escape(reproduced_text(cell))} {{\\scriptsize({latex_escape(claimed_text(table, cell))})}}"


def _tex_rows(table: ClaimTable) -> list[str]:
    lines: list[str] = []
    for i, block in enumerate(table.blocks()):
        if i:
            lines.append(r"\midrule")
        for j, row in enumerate(block):
            keys = [latex_escape(k) for k in row]
            if j:  # the block's shared first key is printed on its first row only
                keys[0] = ""
            cells = [_tex_cell(table, table.cell(row, c)) for c in table.columns]
            lines.append(" & ".join(keys + cells) + r" \\")
    return lines


def render_latex(table: ClaimTable) -> str:
    """A booktabs ``table`` environment; image/pixel (first-key) blocks separated by ``\\midrule``."""
    text = latex_escape(legend(table)).replace("(claimed by the paper)", r"{\scriptsize(claimed by the paper)}")
    caption = f"{latex_escape(table.title)}. {text}"
    if table.demo:
        caption += r" \textbf{" + latex_escape(DEMO_STAMP) + "}"
    header = [latex_escape(_header_label(f)) for f in table.row_header] + [latex_escape(c) for c in table.columns]
    lines = _stamp_lines(table, "% ")
    lines += [f"% note: {n}" for n in table.notes]
    lines += [f"% claim: {c.claim}: {c.verdict} ({c.detail})" for c in table.checks]
    lines += [
        r"% requires \usepackage{booktabs}",
        r"\begin{table}[t]",
        r"\centering",
        r"\caption{" + caption + "}",
        r"\label{tab:" + latex_escape(table.name) + "}",
        r"\begin{tabular}{" + "l" * len(table.row_header) + "c" * len(table.columns) + "}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
        *_tex_rows(table),
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- CSV


def _csv_number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def render_csv(table: ClaimTable) -> str:
    """Long format, one line per cell: table, <row key fields>, <column header>, reproduced, claimed,
    ci_low, ci_high, status, std, seeds (percent, full precision; empty = none; ``seeds``: how many training seeds
    the reproduced number averages). Demo: a '#' first line."""
    out = io.StringIO()
    for line in _stamp_lines(table, "# "):
        out.write(line + "\n")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["table", *table.row_header, table.column_header, *CSV_VALUE_FIELDS])
    for row in table.row_keys:
        for column in table.columns:
            cell = table.cell(row, column)
            low, high = cell.ci if cell.ci is not None else (None, None)
            values = [cell.reproduced, cell.claimed, low, high]
            writer.writerow([table.name, *row, column, *map(_csv_number, values), cell.status,
                             _csv_number(cell.std), cell.seeds if cell.reproduced is not None else ""])
    return out.getvalue()


# ------------------------------------------------------------------------------------------ writing


RENDERERS: dict[str, Callable[[ClaimTable], str]] = {"md": render_markdown, "tex": render_latex, "csv": render_csv}


def write_table(table: ClaimTable, out_dir: Path, stem: str) -> list[Path]:
    """Write ``stem.md``, ``stem.tex`` and ``stem.csv`` into ``out_dir`` atomically; return the paths."""
    return [write_text_atomic(Path(out_dir) / f"{stem}.{ext}", render(table)) for ext, render in RENDERERS.items()]
