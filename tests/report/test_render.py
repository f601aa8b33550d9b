from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from siad.report.render import (
    DEMO_STAMP,
    latex_escape,
    render_csv,
    render_latex,
    render_markdown,
    write_table,
)
from siad.report.tables import NOT_APPLICABLE, ClaimTable, build_table1, reference_methods


@pytest.fixture
def table(runs, reference, toy) -> ClaimTable:
    return build_table1(runs, reference, methods=toy.methods, datasets=toy.datasets, medical=toy.medical)


@pytest.fixture
def real_table(reference, toy, standard_runs) -> ClaimTable:
    return build_table1(standard_runs(demo=False), reference, methods=toy.methods, datasets=toy.datasets,
                        medical=toy.medical)


def _md_row(markdown: str, level: str, method: str) -> list[str]:
    line = next(ln for ln in markdown.splitlines() if ln.startswith(f"| {level} | {method} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_markdown_shows_reproduced_beside_claimed(table: ClaimTable) -> None:
    md = render_markdown(table)
    assert _md_row(md, "image", "CLIP")[2:] == ["61.0 (60.9)", "49.2 (49.1)", "59.3 (59.3)", "56.5 (56.5)",
                                                 "56.5 (56.5)"]
    assert _md_row(md, "image", "SIAD-LLM")[3] == "60.0 (n/a)"  # claim not reported
    assert "| Level | Method | MVTecAD | VisA | BTAD | HeadCT | Average |" in md
    assert "reproduced (claimed by the paper)" in md


def test_markdown_medical_pixel_cells_are_dashes(table: ClaimTable) -> None:
    row = _md_row(render_markdown(table), "pixel", "SIAD-LLM")
    assert row[5] == "–" and row[2] == "70.0 (86.0)"


def test_markdown_shows_missing_and_notes(runs, reference, toy) -> None:
    runs[:] = [r for r in runs if not (r["run"]["method"] == "clip" and r["run"]["target"] == "btad")]
    md = render_markdown(build_table1(runs, reference, methods=toy.methods, datasets=toy.datasets,
                                      medical=toy.medical))
    assert _md_row(md, "image", "CLIP")[4] == "missing (59.3)"
    assert _md_row(md, "image", "CLIP")[6] == "n/a (56.5)"
    assert "- missing run: setting=uzad method=clip variant=default target=btad" in md


def test_demo_stamp_is_the_first_line_of_every_output(table: ClaimTable, real_table: ClaimTable) -> None:
    outputs = {"md": render_markdown(table), "tex": render_latex(table), "csv": render_csv(table)}
    first = {k: v.splitlines()[0] for k, v in outputs.items()}
    assert first["md"] == f"> **{DEMO_STAMP}**"
    assert first["tex"] == f"% {DEMO_STAMP}"
    assert first["csv"] == f"# {DEMO_STAMP}"
    assert r"\caption{" in outputs["tex"] and r"\textbf{DEMO OUTPUT" in outputs["tex"]
    for render in (render_markdown, render_latex, render_csv):
        assert "DEMO" not in render(real_table)


def test_latex_uses_booktabs_with_a_rule_between_levels(table: ClaimTable) -> None:
    tex = render_latex(table)
    lines = tex.splitlines()
    assert lines.count(r"\toprule") == 1 and lines.count(r"\bottomrule") == 1
    assert lines.count(r"\midrule") == 2  # under the header, between image and pixel blocks
    between = lines.index(r"\midrule", lines.index(r"\midrule") + 1)
    assert lines[between - 1].startswith(" & SIAD-LLM") and lines[between + 1].startswith("pixel & CLIP")
    assert r"\begin{tabular}{llccccc}" in tex
    assert r"61.0 {\scriptsize(60.9)}" in tex
    assert "& -- &" in tex and "–" not in tex.split(r"\begin{tabular}")[1]


def test_latex_escapes_specials(table: ClaimTable) -> None:
    assert latex_escape(r"a_b & 5% #1 $x$ {y} ~ ^ \ –") == (
        r"a\_b \& 5\% \#1 \$x\$ \{y\} \textasciitilde{} \textasciicircum{} \textbackslash{} --"
    )
    table.title = "Ablation w/o SI_& 50%"
    table.row_keys = [(lvl, m.replace("SIAD-LLM", "SIAD_LLM")) for lvl, m in table.row_keys]
    table.cells = {((r[0], r[1].replace("SIAD-LLM", "SIAD_LLM")), c): v for (r, c), v in table.cells.items()}
    tex = render_latex(table)
    assert r"\caption{Ablation w/o SI\_\& 50\%." in tex
    assert r" & SIAD\_LLM & " in tex


def test_csv_round_trips_with_pandas(table: ClaimTable) -> None:
    df = pd.read_csv(io.StringIO(render_csv(table)), comment="#")
    assert list(df.columns) == ["table", "level", "method", "dataset", "reproduced", "claimed", "ci_low",
                                "ci_high", "status", "std", "seeds"]
    assert len(df) == len(table.row_keys) * len(table.columns)
    for rec in df.itertuples():
        cell = table.cell((rec.level, rec.method), rec.dataset)
        assert rec.status == cell.status
        for got, want in ((rec.reproduced, cell.reproduced), (rec.claimed, cell.claimed)):
            assert (pd.isna(got) and want is None) or got == want  # exact: repr round-trips
        if cell.ci is not None:
            assert (rec.ci_low, rec.ci_high) == cell.ci
    medical = df[(df.level == "pixel") & (df.dataset == "HeadCT")]
    assert (medical.status == NOT_APPLICABLE).all() and medical.reproduced.isna().all()


def test_write_table_writes_three_files_atomically(table: ClaimTable, tmp_path: Path) -> None:
    out = tmp_path / "tables" / "demo"
    paths = write_table(table, out, "table1")
    assert [p.name for p in paths] == ["table1.md", "table1.tex", "table1.csv"]
    assert paths[0].read_text(encoding="utf-8") == render_markdown(table)
    assert paths[1].read_text(encoding="utf-8") == render_latex(table)
    assert paths[2].read_text(encoding="utf-8") == render_csv(table)
    assert sorted(p.name for p in out.iterdir()) == ["table1.csv", "table1.md", "table1.tex"]  # no temp files


def test_rendering_is_deterministic(runs: list[dict[str, Any]], reference, toy) -> None:
    def make() -> ClaimTable:
        return build_table1(runs, reference, methods=toy.methods, datasets=toy.datasets, medical=toy.medical)

    assert render_csv(make()) == render_csv(make())


def test_not_run_rows_render_with_their_claims_in_every_format(runs, reference, toy) -> None:
    del toy.methods["clip"]  # CLIP is in the reference, so its rows become "not run" in the paper's order
    table = build_table1(runs, reference, methods=toy.methods, datasets=toy.datasets, medical=toy.medical,
                         order=reference_methods(reference))
    assert [k[1] for k in table.row_keys] == ["CLIP", "SIAD-LLM", "CLIP", "SIAD-LLM"]
    md = render_markdown(table)
    assert _md_row(md, "image", "CLIP")[2:] == ["not run (60.9)", "not run (49.1)", "not run (59.3)",
                                                 "not run (56.5)", "not run (56.5)"]
    assert _md_row(md, "pixel", "CLIP")[5] == "–"
    assert "- Not run: CLIP (not implemented in this suite yet" in md and "not run = a method" in md
    assert r"not run {\scriptsize(60.9)}" in render_latex(table)
    lines = render_csv(table).splitlines()
    assert "table1,image,CLIP,MVTecAD,,60.9,,,not_run,," in lines
    assert "table1,pixel,CLIP,HeadCT,,,,,not_applicable,," in lines
    assert not any("missing run" in n for n in table.notes)  # a not-run row looks up no run


def test_a_cell_of_several_seeds_reads_mean_plus_minus_std(table: ClaimTable) -> None:
    from dataclasses import replace

    row = ("image", "CLIP")
    table.cells[(row, "VisA")] = replace(table.cell(row, "VisA"), std=1.25, seeds=3)
    assert _md_row(render_markdown(table), "image", "CLIP")[3] == "49.2 ± 1.2 (49.1)"
    assert "49.2 $\\pm$ 1.2 {\\scriptsize(49.1)}" in render_latex(table)
    frame = pd.read_csv(io.StringIO(render_csv(table)), comment="#")
    visa = frame[(frame["method"] == "CLIP") & (frame["level"] == "image") & (frame["dataset"] == "VisA")].iloc[0]
    assert visa["std"] == pytest.approx(1.25) and visa["seeds"] == 3
    mvtec = frame[(frame["method"] == "CLIP") & (frame["level"] == "image") & (frame["dataset"] == "MVTecAD")].iloc[0]
    assert pd.isna(mvtec["std"]) and mvtec["seeds"] == 1
