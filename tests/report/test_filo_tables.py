"""FiLo's own Table 1 (ZAD, MVTecAD <-> VisA) and Table 4 (HQ-Loc ablation), from hand-made runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from siad.engine.protocol import NO_SOURCE
from siad.errors import ConfigError
from siad.report.filo_tables import HQLOC_VARIANTS
from siad.report.paper import PAPER_TABLES
from siad.report.reference import load_reference
from siad.report.render import render_markdown
from siad.report.tables import NOT_RUN, OK

REFERENCES = Path(__file__).resolve().parents[2] / "config" / "reference"


@pytest.fixture
def config(llm_config: dict[str, Any]) -> dict[str, Any]:
    llm_config["report"]["tables"] = ["filo_table1_zad", "filo_table4_hqloc"]
    llm_config["report"]["filo_tables"] = {"table1_methods": ["clip", "filo"]}
    return llm_config


def _run(make_run, method: str, variant: str, target: str, value: float, setting: str = "zad") -> dict:
    run = make_run(method, target, value, value - 0.05, setting=setting, variant=variant)
    run["run"]["source"] = NO_SOURCE if method == "clip" else ("visa" if target == "mvtec" else "mvtec")
    return run


def test_table1_asks_for_the_zad_runs_on_mvtec_and_visa(config):
    keys = PAPER_TABLES.get("filo_table1_zad").runs(config)
    assert {(k.setting, k.method, k.source, k.target) for k in keys} == {
        ("uzad", "clip", NO_SOURCE, "visa"), ("uzad", "clip", NO_SOURCE, "mvtec"),
        ("zad", "filo", "mvtec", "visa"), ("zad", "filo", "visa", "mvtec")}


def test_table1_keeps_filo_s_rows_and_claims_and_reproduces_the_configured_methods(config, make_run):
    runs = [_run(make_run, "clip", "default", t, 0.70, "uzad") for t in ("visa", "mvtec")]
    runs += [_run(make_run, "filo", "default", t, 0.80) for t in ("visa", "mvtec")]
    table = PAPER_TABLES.get("filo_table1_zad").build(config, runs, load_reference(REFERENCES / "filo_table1.csv"))
    assert [k[0] for k in table.row_keys] == ["CLIP", "CLIP-AC", "WinCLIP", "APRIL-GAN", "AnomalyCLIP",
                                              "AnomalyCLIP-", "FiLo"]
    filo = table.cell(("FiLo", "ViT-L/14@336px"), "VisA image")
    assert filo.claimed == pytest.approx(83.9) and filo.reproduced == pytest.approx(80.0) and filo.status == OK
    assert table.cell(("FiLo", "ViT-L/14@336px"), "MVTecAD pixel").reproduced == pytest.approx(75.0)
    assert table.cell(("CLIP", "ViT-L/14@336px"), "MVTecAD image").claimed == pytest.approx(74.1)
    assert table.cell(("WinCLIP", "ViT-B/16@240px"), "VisA pixel").status == NOT_RUN
    assert "FiLo Table 1" in render_markdown(table)


def test_table4_rows_are_the_hqloc_variants_in_the_paper_s_order(config, make_run):
    runs = [_run(make_run, "filo", variant, t, 0.6 + k / 100) for k, variant in enumerate(HQLOC_VARIANTS.values())
            for t in ("visa", "mvtec")]
    assert {(k.variant, k.target) for k in PAPER_TABLES.get("filo_table4_hqloc").runs(config)} == {
        (r["run"]["variant"], r["run"]["target"]) for r in runs}
    table = PAPER_TABLES.get("filo_table4_hqloc").build(config, runs,
                                                         load_reference(REFERENCES / "filo_hqloc_ablation.csv"))
    assert table.row_keys[0] == ("✗", "✗", "✗", "✗") and table.row_keys[-1] == ("✓", "✓", "✓", "✓")
    assert table.row_keys[4] == ("✓", "✓", "✗", "✓")  # multi-scale without multi-shape
    first = table.cell(("✗", "✗", "✗", "✗"), "VisA image")
    assert first.claimed == pytest.approx(78.1) and first.reproduced == pytest.approx(60.0)
    full = table.cell(("✓", "✓", "✓", "✓"), "MVTecAD pixel")
    assert full.claimed == pytest.approx(92.3) and full.reproduced == pytest.approx(60.0)


def test_table4_needs_the_variants(config):
    del config["methods"]["filo"]["variants"]["hq_shape"]
    with pytest.raises(ConfigError, match="hq_shape"):
        PAPER_TABLES.get("filo_table4_hqloc").build(config, [], load_reference(REFERENCES / "filo_hqloc_ablation.csv"))


def test_filo_tables_need_mvtec_or_visa_targets(config):
    config["protocol"] = [{"source": "br35h", "targets": ["brainmri", "headct"]}]
    with pytest.raises(ConfigError, match="MVTecAD or VisA"):
        PAPER_TABLES.get("filo_table1_zad").runs(config)
