"""SIAD-LLM Tables 3a, 3b, 4 and 5: rows from the config's variants, claims from the reference, ordering claims."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from siad.errors import ConfigError
from siad.plan import validate_workflow_config
from siad.report.paper import PAPER_TABLES, render_report
from siad.report.reference import load_reference
from siad.report.render import render_latex, render_markdown
from siad.report.siad_tables import case_rows, lambda_rows
from siad.report.tables import AVERAGE, FAILS, HOLDS, NOT_CHECKED

REFERENCES = Path(__file__).resolve().parents[2] / "config" / "reference"
INDUSTRIAL = ("mvtec", "visa", "mpdd", "dtd", "sdd", "btad")
METHOD = "toy_siad_llm"


def _build(stem: str, config: dict[str, Any], runs: list[dict[str, Any]]):
    table = PAPER_TABLES.get(stem)
    return table.build(config, runs, load_reference(REFERENCES / table.reference))


def _runs(make_run, values: dict[str, tuple[float, float]], targets=INDUSTRIAL) -> list[dict[str, Any]]:
    """One run per (variant, target); every target of a variant gets the variant's (image, pixel) value."""
    return [make_run(METHOD, t, image, pixel, variant=v, seed=k)
            for k, (v, (image, pixel)) in enumerate(values.items()) for t in targets]


def test_table3a_asks_for_its_variants_on_the_industrial_targets_with_protocol_sources(llm_config):
    keys = PAPER_TABLES.get("siad_table3a_si_sp").runs(llm_config)
    assert {(k.variant, k.target) for k in keys} == {(v, t) for v in ("wo_si", "wo_sp", "default") for t in INDUSTRIAL}
    assert {k.source for k in keys if k.target == "mvtec"} == {"visa"}
    assert {k.source for k in keys if k.target != "mvtec"} == {"mvtec"}
    assert {k.method for k in keys} == {METHOD}


def test_table3a_places_claims_and_reproduced_numbers(llm_config, make_run):
    runs = _runs(make_run, {"wo_si": (0.70, 0.85), "wo_sp": (0.69, 0.86), "default": (0.73, 0.90)})
    table = _build("siad_table3a_si_sp", llm_config, runs)
    assert table.row_keys == [("image", "w/o SI"), ("image", "w/o SP"), ("image", "Full"),
                              ("pixel", "w/o SI"), ("pixel", "w/o SP"), ("pixel", "Full")]
    assert table.columns == ["MVTecAD", "VisA", "MPDD", "DTD", "SDD", "BTAD", AVERAGE]
    cell = table.cell(("image", "w/o SI"), "MVTecAD")
    assert cell.claimed == pytest.approx(70.9) and cell.reproduced == pytest.approx(70.0)
    assert table.cell(("pixel", "Full"), AVERAGE).claimed == pytest.approx(90.0)
    assert table.cell(("pixel", "w/o SP"), "SDD").claimed == pytest.approx(88.2)
    assert table.cell(("image", "Full"), AVERAGE).reproduced == pytest.approx(73.0)


def test_table3_full_model_claim_holds_or_names_the_row_that_breaks_it(llm_config, make_run):
    runs = _runs(make_run, {"wo_si": (0.70, 0.85), "wo_sp": (0.74, 0.86), "default": (0.73, 0.90)})
    image, pixel = _build("siad_table3a_si_sp", llm_config, runs).checks
    assert pixel.verdict == HOLDS and "Full 90.0 vs w/o SI 85.0, w/o SP 86.0" in pixel.detail
    assert image.verdict == FAILS and image.detail.endswith("not below Full: w/o SP")


def test_table3b_has_five_rows_and_a_missing_run_leaves_its_claim_unchecked(llm_config, make_run):
    values = {"wo_em": (0.6, 0.8), "wo_sem": (0.6, 0.8), "wo_pem": (0.6, 0.8), "wo_adapter": (0.6, 0.8),
              "default": (0.7, 0.9)}
    runs = [r for r in _runs(make_run, values) if not (r["run"]["variant"] == "wo_pem" and r["run"]["target"] == "sdd")]
    table = _build("siad_table3b_encoder", llm_config, runs)
    assert [k[1] for k in table.row_keys[:5]] == ["w/o EM", "w/o SEM", "w/o PEM", "w/o Adapter", "Full"]
    assert table.cell(("image", "w/o Adapter"), "VisA").claimed == pytest.approx(68.9)
    assert [c.verdict for c in table.checks] == [NOT_CHECKED, NOT_CHECKED]
    assert "no reproduced value for w/o PEM" in table.checks[0].detail


def test_table3_without_a_full_row_is_a_config_error(llm_config):
    llm_config["report"]["siad_ablations"]["table3a"] = {"w/o SI": "wo_si", "w/o SP": "wo_sp"}
    with pytest.raises(ConfigError, match="table3a: no row maps to variant 'default'"):
        PAPER_TABLES.get("siad_table3a_si_sp").runs(llm_config)


def test_lambda_rows_come_from_resolved_params_sorted_without_lambda_zero(llm_config):
    # default's 0.1 is the class default (not in the config); wo_adapter's 0.0 is Table 3b's row, not the sweep
    assert lambda_rows(llm_config) == [(0.1, "default"), (0.3, "lambda03"), (0.5, "lambda05"), (0.9, "lambda09")]
    llm_config["report"]["siad_ablations"]["table4"] = ["lambda09", "default"]
    assert lambda_rows(llm_config) == [(0.1, "default"), (0.9, "lambda09")]
    llm_config["report"]["siad_ablations"]["table4"] = ["lambda09", "default", "wo_si"]  # wo_si keeps lambda 0.1
    with pytest.raises(ConfigError, match="several rows have adapter_lambda = 0.1"):
        lambda_rows(llm_config)


def test_table4_has_dashes_for_the_missing_claims_and_checks_the_monotone_fall(llm_config, make_run):
    values = {"default": (0.72, 0.90), "lambda03": (0.70, 0.91), "lambda05": (0.68, 0.88), "lambda09": (0.60, 0.89)}
    table = _build("siad_table4_lambda", llm_config, _runs(make_run, values))
    assert table.row_keys[:4] == [("image", "0.1"), ("image", "0.3"), ("image", "0.5"), ("image", "0.9")]
    assert all(c.claimed is None for c in table.cells.values())
    image, pixel = table.checks
    assert image.verdict == HOLDS and image.detail == "0.1: 72.0 → 0.3: 70.0 → 0.5: 68.0 → 0.9: 60.0"
    assert pixel.verdict == FAILS and pixel.detail.endswith("rises at 0.1→0.3 (+1.00), 0.5→0.9 (+1.00)")
    md = render_markdown(table)
    assert "| image | 0.1 | 72.0 (–) |" in md and "(n/a)" not in md
    assert "missing from its source text" in md and "**does not hold**" in md
    assert "72.0 {\\scriptsize(--)}" in render_latex(table)


def test_table5_rows_are_cases_with_claims_and_case3_must_be_best(llm_config, make_run):
    runs = [make_run(METHOD, "mvtec", image, pixel, variant=v)
            for v, (image, pixel) in {"case1": (0.70, 0.80), "case2": (0.65, 0.88), "default": (0.72, 0.86)}.items()]
    table = _build("siad_table5_stage_prompts", llm_config, runs)
    assert table.row_keys == [("Case 1",), ("Case 2",), ("Case 3",)] and table.columns == ["image", "pixel"]
    assert table.cell(("Case 2",), "pixel").claimed == pytest.approx(83.6)
    assert table.cell(("Case 3",), "image").reproduced == pytest.approx(72.0)
    image, pixel = table.checks
    assert image.verdict == HOLDS and pixel.verdict == FAILS and pixel.detail.endswith("not below Case 3: Case 2")
    words = "very small region of / small region of / large region of / very large region of"
    assert any(n.startswith("Case 1 stage words") and n.endswith(words) for n in table.notes)
    assert any(n.startswith("Appendix C's text calls Case 1") and "follow Table 6" in n for n in table.notes)
    assert {k.target for k in PAPER_TABLES.get("siad_table5_stage_prompts").runs(llm_config)} == {"mvtec"}


def test_table5_needs_the_default_case(llm_config):
    assert case_rows(llm_config) == [(1, "case1"), (2, "case2"), (3, "default")]
    llm_config["report"]["siad_ablations"]["table5"] = ["case1", "case2"]
    with pytest.raises(ConfigError, match="no row has stage_case = 3"):
        case_rows(llm_config)


def test_claims_check_lists_the_ordering_claims(llm_config, make_run, tmp_path, write_runs):
    llm_config["report"]["tables"] = ["siad_table3a_si_sp", "siad_table4_lambda"]
    values = {"wo_si": (0.70, 0.85), "wo_sp": (0.74, 0.86), "default": (0.73, 0.90), "lambda03": (0.72, 0.89),
              "lambda05": (0.71, 0.88), "lambda09": (0.70, 0.87)}
    paths = write_runs(_runs(make_run, values), tmp_path / "runs")
    render_report(llm_config, paths, tmp_path / "tables", REFERENCES, require_current=False)
    report = (tmp_path / "tables" / "claims_check.md").read_text()
    assert "**4 ordering claims checked** (on the reproduced point estimates): 3 holds, 1 does not hold, " \
           "0 not checked." in report
    assert "| siad_table3a | Full has the highest Average image AUROC | does not hold |" in report
    assert (tmp_path / "tables" / "siad_table4_lambda.tex").is_file()


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r.pop("siad_ablations"), "report/siad_ablations is missing"),
        (lambda r: r["siad_ablations"].update(method="nope"), "siad_ablations/method: 'nope'"),
        (lambda r: r["siad_ablations"]["table3b"].update({"w/o EM": "wo_everything"}), "wo_everything"),
        (lambda r: r["siad_ablations"].update(table4=["default", "lambda7"]), "lambda7"),
        (lambda r: r["llm_judgement"].update(methods=["gpt9"]), "llm_judgement/methods: 'gpt9'"),
        (lambda r: r["figure4"].update(datasets=["mvtec", "kolektor2"]), "figure4/datasets: 'kolektor2'"),
        (lambda r: r["figure4"].update(count=0), "figure4/count"),
    ],
)
def test_config_validation_names_the_report_key(llm_config, mutate, expected):
    needed = ["siad_table3a_si_sp", "siad_table3b_encoder", "siad_table4_lambda", "siad_table5_stage_prompts",
              "llm_judgement"]
    llm_config["report"]["tables"] += [t for t in needed if t not in llm_config["report"]["tables"]]
    validate_workflow_config(llm_config)  # the unmutated config is valid
    mutate(llm_config["report"])
    with pytest.raises(ConfigError, match=expected):
        validate_workflow_config(llm_config)


def _siad_rows(config: dict[str, Any], table: str) -> dict[str, str]:
    """Point the ablation tables at the real siad_llm variants of the demo profile (its resolved parameters)."""
    config["report"]["siad_ablations"]["method"] = "siad_llm"
    return DEMO_ABLATIONS[table]


DEMO_ABLATIONS = yaml.safe_load((REFERENCES.parents[0] / "demo.yaml").read_text())["report"]["siad_ablations"]


def test_table3b_strict_rows_show_the_paper_rows_claims_and_the_notes_say_what_replaces_pem(llm_config, make_run):
    rows = _siad_rows(llm_config, "table3b")
    llm_config["report"]["siad_ablations"]["table3b"] = rows
    assert {"w/o PEM (strict)", "w/o EM (strict)"} <= set(rows)
    runs = [make_run("siad_llm", t, 0.6, 0.8, variant=v, seed=k)
            for k, v in enumerate(rows.values()) for t in INDUSTRIAL]
    table = _build("siad_table3b_encoder", llm_config, runs)
    assert table.cell(("image", "w/o PEM (strict)"), "MVTecAD").claimed == pytest.approx(69.8)  # the w/o PEM claim
    assert table.cell(("pixel", "w/o EM (strict)"), AVERAGE).claimed == pytest.approx(87.7)
    notes = "\n".join(table.notes)
    assert "w/o PEM: PEM replaced by AnomalyGPT's convolutional prompt learner" in notes
    assert "w/o EM: PEM replaced by AnomalyGPT's convolutional prompt learner" in notes
    assert "w/o PEM (strict): PEM removed with nothing in its place (strict)" in notes
    assert "w/o EM (strict): PEM removed with nothing in its place" in notes
    assert "no image-level row" not in notes  # every label found its paper row


def test_table3a_teacher_forced_full_is_not_an_ablation_the_full_model_must_beat(llm_config, make_run):
    rows = _siad_rows(llm_config, "table3a")
    llm_config["report"]["siad_ablations"]["table3a"] = rows
    values = {"wo_si": (0.70, 0.85), "wo_sp": (0.69, 0.86), "default": (0.73, 0.90), "si_teacher_forced": (0.80, 0.95)}
    runs = [make_run("siad_llm", t, image, pixel, variant=v, seed=k)
            for k, (v, (image, pixel)) in enumerate(values.items()) for t in INDUSTRIAL]
    table = _build("siad_table3a_si_sp", llm_config, runs)
    assert table.cell(("image", "Full (teacher-forced R)"), "MVTecAD").claimed == pytest.approx(72.8)  # Full's
    assert [c.verdict for c in table.checks] == [HOLDS, HOLDS]  # compared with w/o SI and w/o SP only
    notes = "\n".join(table.notes)
    assert "Full (teacher-forced R): trained with the teacher-forced target answer" in notes
    assert "w/o SI: self-improvement removed: one pass, whose focal and dice terms carry the whole pixel-loss" in notes


def test_table7_has_the_siad_llm_row_from_its_table1_runs(llm_config, make_run):
    llm_config["report"]["table7"] = {"methods": ["anovl", "siad_llm"]}
    keys = PAPER_TABLES.get("siad_table7_training_free").runs(llm_config)
    siad = {(k.source, k.target) for k in keys if k.method == "siad_llm"}
    assert siad == {("visa", "mvtec"), *{("mvtec", t) for t in INDUSTRIAL[1:]}}  # the protocol's weights
    assert {k.variant for k in keys} == {"default"}
    runs = [make_run("siad_llm", t, 0.7, 0.9, seed=k) for k, t in enumerate(INDUSTRIAL)]
    table = PAPER_TABLES.get("siad_table7_training_free").build(llm_config, runs, pd.DataFrame())
    assert table.cell(("SIAD-LLM",), "MVTecAD").reproduced == pytest.approx(90.0)
    assert table.cell(("SIAD-LLM",), AVERAGE).claimed is None
    assert any(n.startswith("SIAD-LLM: trained under UZAD") for n in table.notes)
