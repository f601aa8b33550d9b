"""Table 2 (pseudo-anomalies, SIAD-LLM repeated from UZAD) and the ZAD table, from hand-made runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from siad.engine.protocol import NO_SOURCE
from siad.errors import ConfigError
from siad.report.claims import NOT_RUN_VERDICT, claim_rows, claims_check
from siad.report.paper import PAPER_TABLES, protocol_targets, required_runs
from siad.report.reference import AVERAGE, load_reference
from siad.report.render import render_markdown
from siad.report.tables import NOT_APPLICABLE, NOT_RUN, OK

REFERENCES = Path(__file__).resolve().parents[2] / "config" / "reference"
MEDICAL = ("brainmri", "headct", "br35h")


@pytest.fixture
def config(llm_config: dict[str, Any]) -> dict[str, Any]:
    """The demo config with toy AnomalyCLIP / SIAD-LLM rows (trained methods) in Table 2 and the ZAD table."""
    llm_config["methods"]["toy_anomalyclip"] = {"display_name": "AnomalyCLIP"}
    llm_config["report"]["tables"] = ["table2_pseudo", "table_zad"]
    llm_config["report"]["table2"] = {"methods": ["toy_anomalyclip"], "repeat_uzad": ["toy_siad_llm"]}
    llm_config["report"]["table1"]["methods"] = ["clip", "toy_siad_llm"]  # the repeated row is a Table 1 row
    llm_config["report"]["zad"] = {"methods": ["clip", "toy_anomalyclip", "toy_siad_llm"]}
    return llm_config


def _runs(make_run, method: str, setting: str, value: float, targets, source: str | None = None) -> list[dict]:
    """One run per target: image AUROC ``value`` (+ 0.01 per target index), pixel ``value`` where masks exist."""
    runs = []
    for i, target in enumerate(targets):
        run = make_run(method, target, value + i / 100, None if target in MEDICAL else value, setting=setting, seed=i)
        run["run"]["source"] = source or run["run"]["source"]
        runs.append(run)
    return runs


def test_table2_asks_for_pseudo_runs_and_the_repeated_uzad_runs(config):
    keys = PAPER_TABLES.get("table2_pseudo").runs(config)
    assert {(k.setting, k.method) for k in keys} == {("pseudo", "toy_anomalyclip"), ("uzad", "toy_siad_llm")}
    assert sorted(k.target for k in keys if k.method == "toy_anomalyclip") == sorted(config["datasets"])
    assert {(k.source, k.target) for k in keys if k.method == "toy_anomalyclip"} >= {("visa", "mvtec"),
                                                                                    ("br35h", "headct")}


def test_table2_rows_follow_the_paper_with_not_run_rows_keeping_their_claims(config, make_run):
    targets = list(protocol_targets(config))
    runs = (_runs(make_run, "toy_anomalyclip", "pseudo", 0.80, targets)
            + _runs(make_run, "toy_anomalyclip", "uzad", 0.10, targets)  # Table 1's runs: not Table 2's row
            + _runs(make_run, "toy_siad_llm", "uzad", 0.70, targets)
            + _runs(make_run, "toy_siad_llm", "pseudo", 0.20, targets))  # a decoy: SIAD-LLM repeats UZAD
    table = PAPER_TABLES.get("table2_pseudo").build(config, runs, load_reference(REFERENCES / "siad_table2_pseudo.csv"))
    assert [k[1] for k in table.row_keys if k[0] == "image"] == ["AdaCLIP", "AnomalyCLIP", "FiLo", "AA-CLIP",
                                                                 "SIAD-LLM"]
    ada = table.cell(("image", "AdaCLIP"), "MVTecAD")
    assert ada.status == NOT_RUN and ada.claimed == pytest.approx(79.8) and ada.reproduced is None
    assert table.cell(("image", "AdaCLIP"), AVERAGE).status == NOT_RUN
    assert table.cell(("image", "AdaCLIP"), AVERAGE).claimed == pytest.approx(83.2)
    assert table.cell(("pixel", "FiLo"), "HeadCT").status == NOT_APPLICABLE
    clip_cell = table.cell(("image", "AnomalyCLIP"), "VisA")
    assert clip_cell.status == OK and clip_cell.reproduced == pytest.approx(81.0) and clip_cell.claimed == 69.1
    siad = table.cell(("image", "SIAD-LLM"), "MVTecAD")
    assert siad.reproduced == pytest.approx(70.0) and siad.claimed == pytest.approx(72.8)
    average = table.cell(("image", "AnomalyCLIP"), AVERAGE)
    assert average.reproduced == pytest.approx(80.0 + 4.0) and average.claimed == pytest.approx(87.5)
    assert average.ci is not None
    md = render_markdown(table)
    assert "| image | AdaCLIP | not run (79.8) |" in md
    assert "SIAD-LLM: repeated from the Table 1 runs (UZAD" in md
    assert "Not run: AdaCLIP, FiLo, AA-CLIP" in md


def test_table2_average_claim_is_dropped_when_the_paper_averages_other_datasets(config, make_run):
    config["protocol"] = [{"source": "mvtec", "targets": ["visa", "btad"]}, {"source": "visa", "targets": ["mvtec"]}]
    runs = _runs(make_run, "toy_anomalyclip", "pseudo", 0.8, ["mvtec", "visa", "btad"])
    table = PAPER_TABLES.get("table2_pseudo").build(config, runs, load_reference(REFERENCES / "siad_table2_pseudo.csv"))
    assert table.cell(("image", "AnomalyCLIP"), AVERAGE).claimed is None
    assert table.cell(("image", "AnomalyCLIP"), AVERAGE).reproduced == pytest.approx(81.0)
    assert any("Average also covers" in n for n in table.notes)


@pytest.mark.parametrize(("section", "expected"), [
    ({"methods": ["clip"]}, "need no training"),
    ({"methods": ["toy_anomalyclip"], "repeat_uzad": ["toy_anomalyclip"]}, "under both"),
    ({"methods": ["winclip"]}, "report/table2/methods: 'winclip' is not listed"),
    (None, "report/table2 is missing"),
])
def test_table2_refuses_a_bad_section(config, section, expected):
    config["report"]["table2"] = section
    with pytest.raises(ConfigError, match=expected):
        PAPER_TABLES.get("table2_pseudo").runs(config)


def test_zad_table_asks_for_zad_runs_and_clip_s_one_run(config):
    keys = PAPER_TABLES.get("table_zad").runs(config)
    assert {(k.setting, k.method, k.source == NO_SOURCE) for k in keys} == {
        ("uzad", "clip", True), ("zad", "toy_anomalyclip", False), ("zad", "toy_siad_llm", False)}
    assert len(keys) == 3 * len(config["datasets"])


def _zad_table(config, make_run):
    """The ZAD table of CLIP's one UZAD run (0.74), toy AnomalyCLIP (0.90) and SIAD-LLM (0.60) under zad."""
    targets = list(protocol_targets(config))
    runs = (_runs(make_run, "clip", "uzad", 0.74, targets, NO_SOURCE)
            + _runs(make_run, "toy_anomalyclip", "zad", 0.90, targets)
            + _runs(make_run, "toy_siad_llm", "zad", 0.60, targets))
    return PAPER_TABLES.get("table_zad").build(config, runs, load_reference(REFERENCES / "filo_table1.csv"))


def test_zad_table_shows_the_methods_own_claims_from_filo_table1(config, make_run):
    table = _zad_table(config, make_run)
    assert [k[1] for k in table.row_keys if k[0] == "image"] == ["CLIP", "AnomalyCLIP", "FiLo", "SIAD-LLM"]
    assert table.cell(("image", "CLIP"), "MVTecAD").claimed == pytest.approx(74.1)
    assert table.cell(("pixel", "CLIP"), "VisA").claimed == pytest.approx(46.6)
    assert table.cell(("image", "CLIP"), "MVTecAD").reproduced == pytest.approx(74.0)  # the one UZAD run
    assert table.cell(("image", "AnomalyCLIP"), "VisA").claimed == pytest.approx(82.1)
    assert table.cell(("image", "AnomalyCLIP"), "VisA").reproduced == pytest.approx(91.0)
    assert table.cell(("image", "AnomalyCLIP"), "MPDD").claimed is None
    assert table.cell(("image", "AnomalyCLIP"), AVERAGE).claimed is None
    assert table.cell(("image", "SIAD-LLM"), "MVTecAD").claimed is None
    filo = table.cell(("pixel", "FiLo"), "MVTecAD")
    assert filo.status == NOT_RUN and filo.claimed == pytest.approx(92.3)
    assert any("FiLo's Table 1" in n and "ViT-L/14@336px" in n for n in table.notes)
    assert any(n.startswith("CLIP: training-free") for n in table.notes)


def test_not_run_claims_are_listed_apart_in_the_claims_check(config, make_run):
    table = _zad_table(config, make_run)
    rows = claim_rows([table])
    assert [r.verdict for r in rows if r.row[1] == "FiLo"] == [NOT_RUN_VERDICT] * 4
    assert all(r.verdict != NOT_RUN_VERDICT for r in rows if r.row[1] != "FiLo")
    report = claims_check([table])
    assert "**8 claimed numbers checked:**" in report  # CLIP and AnomalyCLIP, MVTecAD and VisA, image and pixel
    assert "4 claimed numbers belong to methods this suite does not run" in report
    assert "| table_zad | pixel | FiLo | MVTecAD | 92.3 | not run | n/a | n/a | not run |" in report


def test_required_runs_list_the_pseudo_and_zad_runs(config):
    config["report"].pop("user_tables", None)
    keys = required_runs(config)
    settings = {(k.setting, k.method) for k in keys}
    assert {("pseudo", "toy_anomalyclip"), ("zad", "toy_anomalyclip"), ("zad", "toy_siad_llm"),
            ("uzad", "toy_siad_llm"), ("uzad", "clip")} == settings
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize(("table2", "message"), [
    ({"methods": [], "repeat_uzad": []}, "no method under `methods` or `repeat_uzad`"),
    ({"methods": [], "repeat_uzad": ["toy_anomalyclip"]}, "does not repeat AnomalyCLIP's Table 1 row"),
    ({"methods": ["toy_anomalyclip"], "repeat_uzad": ["clip"]}, "need no training"),
])
def test_table2_rows_that_would_be_checked_against_the_wrong_claims_are_refused(config, table2, message):
    from siad.report.setting_tables import table2_settings

    config["report"]["table1"]["methods"] = ["clip", "toy_anomalyclip", "toy_siad_llm"]
    config["report"]["table2"] = table2
    with pytest.raises(ConfigError, match=message):
        table2_settings(config)


def test_a_repeated_row_must_be_a_table1_row(config):
    from siad.report.setting_tables import table2_settings

    config["report"]["table1"]["methods"] = ["clip"]
    with pytest.raises(ConfigError, match=r"repeat_uzad: \['toy_siad_llm'\] are not Table 1 rows"):
        table2_settings(config)
    config["report"]["table1"]["methods"] = ["clip", "toy_siad_llm"]
    assert table2_settings(config) == {"toy_anomalyclip": "pseudo", "toy_siad_llm": "uzad"}
