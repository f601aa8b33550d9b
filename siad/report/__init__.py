"""Paper tables with the claimed numbers beside the reproduced ones, and the claims check.

``runs`` reads metrics.json files, ``reference`` the claimed numbers, ``tables`` builds the generic
:class:`ClaimTable` (and paper Tables 1/2), ``render`` writes Markdown / LaTeX / CSV, ``claims``
lists every claimed number with a verdict. ``paper`` is the registry of rendered tables (``siad_tables``:
SIAD-LLM Tables 3-5; ``setting_tables``: Table 2 and the ZAD table; ``llm_tables``: the LLM-judgement side
table), ``orderings`` checks the papers' ordering claims, ``figures`` draws the Figure-4-style qualitative
figure (and holds the panel code), ``paper_figures`` SIAD-LLM Figures 1 and 2.
"""

from __future__ import annotations

from siad.report.claims import claims_check
from siad.report.reference import load_reference, reference_claims
from siad.report.render import render_csv, render_latex, render_markdown, write_table, write_text_atomic
from siad.report.runs import load_runs, validate_run
from siad.report.tables import (
    Cell,
    ClaimTable,
    ColumnSpec,
    RowSpec,
    build_claim_table,
    build_dataset_table,
    build_table1,
)

__all__ = [
    "Cell",
    "ClaimTable",
    "ColumnSpec",
    "RowSpec",
    "build_claim_table",
    "build_dataset_table",
    "build_table1",
    "claims_check",
    "load_reference",
    "load_runs",
    "reference_claims",
    "render_csv",
    "render_latex",
    "render_markdown",
    "validate_run",
    "write_table",
    "write_text_atomic",
]
