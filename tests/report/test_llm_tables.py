"""The LLM-judgement side table: accuracy, unparsed rate and P(Yes) AUROC from metrics.json's "llm" block."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from siad.errors import DataError
from siad.report.claims import claims_check
from siad.report.paper import PAPER_TABLES
from siad.report.reference import load_reference
from siad.report.render import render_markdown
from siad.report.tables import AVERAGE

REFERENCES = Path(__file__).resolve().parents[2] / "config" / "reference"
TARGETS = ("mvtec", "visa", "mpdd", "dtd", "sdd", "btad", "brainmri", "headct", "br35h")


def _llm_run(make_run, method: str, target: str, k: int, **llm: float | None) -> dict[str, Any]:
    run = make_run(method, target, 0.7, None, seed=k)
    means = {"accuracy": 0.5 + k / 100, "unparsed_rate": 0.1, "p_yes_auroc": 0.6, **llm}
    run["llm"] = {"classes": {}, "mean": means}
    return run


def _runs(make_run) -> list[dict[str, Any]]:
    return [_llm_run(make_run, m, t, k) for m in ("toy_anomalygpt", "toy_siad_llm") for k, t in enumerate(TARGETS)]


def _build(config, runs):
    return PAPER_TABLES.get("llm_judgement").build(config, runs, load_reference(REFERENCES / "anomalygpt_tables.csv"))


def test_asks_for_the_default_run_of_each_method_on_every_table1_dataset(llm_config):
    keys = PAPER_TABLES.get("llm_judgement").runs(llm_config)
    assert len(keys) == 2 * len(TARGETS)
    assert {(k.method, k.target) for k in keys} == {(m, t) for m in ("toy_anomalygpt", "toy_siad_llm") for t in TARGETS}
    assert {k.variant for k in keys} == {"default"}
    assert next(k.source for k in keys if k.target == "headct") == "br35h"


def test_cells_are_the_llm_block_in_percent_with_an_uncertified_average(llm_config, make_run):
    runs = _runs(make_run)
    runs[0]["llm"]["mean"]["p_yes_auroc"] = None  # e.g. not defined for that dataset
    runs[0]["llm"]["warnings"] = ["bottle: p_yes_auroc not defined (one label only)"]
    runs[0]["_source"] = "anomalygpt/mvtec/metrics.json"
    table = _build(llm_config, runs)
    assert "anomalygpt/mvtec/metrics.json: bottle: p_yes_auroc not defined (one label only)" in table.notes
    assert table.row_keys[:2] == [("accuracy", "AnomalyGPT"), ("accuracy", "SIAD-LLM")]
    assert [k[0] for k in table.row_keys[::2]] == ["accuracy", "unparsed rate", "P(Yes) AUROC"]
    assert table.cell(("accuracy", "SIAD-LLM"), "VisA").reproduced == pytest.approx(51.0)
    assert table.cell(("unparsed rate", "AnomalyGPT"), "HeadCT").reproduced == pytest.approx(10.0)
    average = table.cell(("accuracy", "AnomalyGPT"), AVERAGE)
    assert average.reproduced == pytest.approx(100 * (0.5 + sum(range(9)) / 900)) and average.ci is None
    assert table.cell(("P(Yes) AUROC", "AnomalyGPT"), "MVTecAD").reproduced is None
    assert not any("CI of row" in n for n in table.notes)  # no replicates by design: no per-row complaint


def test_anomalygpt_accuracy_claims_are_context_not_comparisons(llm_config, make_run):
    table = _build(llm_config, _runs(make_run))
    assert all(c.claimed is None for c in table.cells.values())
    note = next(n for n in table.notes if n.startswith("Context, not comparable"))
    assert "unsupervised on MVTecAD 93.3" in note and "1-shot on VisA 77.4" in note
    assert "| accuracy | AnomalyGPT | 50.0 (–) |" in render_markdown(table)
    assert "**0 claimed numbers checked:**" in claims_check([table])


def test_a_run_without_llm_answers_is_refused_with_its_file(llm_config, make_run):
    runs = _runs(make_run)
    del runs[3]["llm"]
    runs[3]["_source"] = "results/demo/uzad/toy_anomalygpt/default/mvtec/dtd/metrics.json"
    with pytest.raises(DataError, match="dtd/metrics.json: no 'llm.mean' block"):
        _build(llm_config, runs)
    runs[3]["llm"] = {"mean": {"accuracy": "high"}}
    with pytest.raises(DataError, match="llm.mean.accuracy must be a number"):
        _build(llm_config, runs)


def test_runs_of_other_methods_and_variants_are_ignored(llm_config, make_run):
    extra = [make_run("clip", "mvtec", 0.6, 0.5), make_run("toy_siad_llm", "mvtec", 0.6, 0.5, variant="wo_si")]
    table = _build(llm_config, _runs(make_run) + extra)  # neither has an llm block, neither is asked for
    assert table.cell(("accuracy", "SIAD-LLM"), "MVTecAD").reproduced == pytest.approx(50.0)
