from __future__ import annotations

import pytest

from siad.errors import DataError
from siad.report.claims import (
    INSIDE,
    NO_CI,
    NOT_REPRODUCED,
    NOT_RUN_VERDICT,
    OUTSIDE,
    claim_rows,
    claims_check,
    verdict,
)
from siad.report.render import DEMO_STAMP
from siad.report.tables import MISSING, NOT_RUN, Cell, build_table1, reference_methods


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        (Cell(claimed=60.0, reproduced=61.0, ci=(59.0, 63.0)), INSIDE),
        (Cell(claimed=59.0, reproduced=61.0, ci=(59.0, 63.0)), INSIDE),  # closed interval
        (Cell(claimed=58.9, reproduced=61.0, ci=(59.0, 63.0)), OUTSIDE),
        (Cell(claimed=63.1, reproduced=61.0, ci=(59.0, 63.0)), OUTSIDE),
        (Cell(claimed=60.0, reproduced=61.0, ci=None), NO_CI),
        (Cell(claimed=60.0, reproduced=None, status=MISSING), NOT_REPRODUCED),
        (Cell(claimed=60.0, reproduced=None, status=NOT_RUN), NOT_RUN_VERDICT),
    ],
)
def test_verdict(cell: Cell, expected: str) -> None:
    assert verdict(cell) == expected


@pytest.fixture
def table(runs, reference, toy):
    return build_table1(runs, reference, methods=toy.methods, datasets=toy.datasets, medical=toy.medical)


def _line(report: str, method: str, level: str, dataset: str) -> list[str]:
    line = next(ln for ln in report.splitlines() if ln.startswith(f"| table1 | {level} | {method} | {dataset} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_one_row_per_claimed_number(table) -> None:
    rows = claim_rows([table])
    claimed = [c for c in table.cells.values() if c.claimed is not None]
    assert len(rows) == len(claimed) == 17  # 20 reference cells minus 3 empty ones
    report = claims_check([table])
    assert sum(ln.startswith("| table1 |") for ln in report.splitlines()) == 17
    assert not any(ln.startswith("| table1 | image | SIAD-LLM | VisA |") for ln in report.splitlines())


def test_claims_inside_and_outside_the_ci(table) -> None:
    report = claims_check([table])
    assert _line(report, "CLIP", "image", "MVTecAD") == [
        "table1", "image", "CLIP", "MVTecAD", "60.9", "61.0", "+0.1", "[59.0, 63.0]", INSIDE]
    assert _line(report, "SIAD-LLM", "pixel", "MVTecAD") == [
        "table1", "pixel", "SIAD-LLM", "MVTecAD", "86.0", "70.0", "-16.0", "[68.0, 72.0]", OUTSIDE]
    assert "| Table | Level | Method | Dataset | Claimed | Reproduced | Difference | 95 % CI | Verdict |" in report


def test_summary_counts_verdicts(table) -> None:
    verdicts = [r.verdict for r in claim_rows([table])]
    report = claims_check([table])
    summary = next(ln for ln in report.splitlines() if "claimed numbers checked" in ln)
    assert summary.startswith(f"**17 claimed numbers checked:** {verdicts.count(INSIDE)} inside CI, "
                              f"{verdicts.count(OUTSIDE)} outside CI, 0 no CI, 0 not reproduced.")
    # CLIP: all 9 claims inside; SIAD-LLM: BTAD/HeadCT image and VisA/BTAD pixel inside, the other 4 outside
    assert (verdicts.count(INSIDE), verdicts.count(OUTSIDE)) == (13, 4)
    assert "(1 reproduced numbers have no claim" in summary  # SIAD-LLM image VisA
    assert report.splitlines()[0] == f"> **{DEMO_STAMP}**"


def test_missing_run_is_not_reproduced(runs, reference, toy) -> None:
    runs[:] = [r for r in runs if not (r["run"]["method"] == "clip" and r["run"]["target"] == "visa")]
    table = build_table1(runs, reference, methods=toy.methods, datasets=toy.datasets, medical=toy.medical)
    report = claims_check([table])
    assert _line(report, "CLIP", "image", "VisA")[-3:] == ["n/a", "n/a", NOT_REPRODUCED]
    assert _line(report, "CLIP", "image", "Average")[-1] == NOT_REPRODUCED


def test_mixed_demo_tables_fail(table, reference, toy, standard_runs) -> None:
    real = build_table1(standard_runs(demo=False), reference, methods=toy.methods, datasets=toy.datasets,
                        medical=toy.medical)
    assert "DEMO" not in claims_check([real])
    with pytest.raises(DataError, match="mixes demo tables"):
        claims_check([table, real])


def test_claims_of_methods_not_run_are_listed_but_not_checked(runs, reference, toy) -> None:
    del toy.methods["clip"]
    table = build_table1(runs, reference, methods=toy.methods, datasets=toy.datasets, medical=toy.medical,
                         order=reference_methods(reference))
    verdicts = [r.verdict for r in claim_rows([table])]
    assert verdicts.count(NOT_RUN_VERDICT) == 9  # CLIP: 5 image + 4 pixel claims (HeadCT pixel: no claim)
    report = claims_check([table])
    summary = next(ln for ln in report.splitlines() if "claimed numbers checked" in ln)
    assert summary.startswith("**8 claimed numbers checked:** 4 inside CI, 4 outside CI, 0 no CI, 0 not reproduced. "
                              "9 claimed numbers belong to methods this suite does not run")
    assert _line(report, "CLIP", "image", "MVTecAD")[4:] == ["60.9", "not run", "n/a", "n/a", NOT_RUN_VERDICT]


def test_a_claim_repeated_by_a_later_table_is_listed_once(runs, reference, toy) -> None:
    from siad.report.claims import claim_rows
    from siad.report.tables import build_table1

    first = build_table1(runs, reference, methods=toy.methods, datasets=toy.datasets, medical=toy.medical)
    again = build_table1(runs, reference, methods=toy.methods, datasets=toy.datasets, medical=toy.medical)
    again.name = "table2"
    once = claim_rows([first])
    assert claim_rows([first, again]) == once and {r.table for r in once} == {"table1"}
