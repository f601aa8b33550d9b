"""The registry of paper tables: the runs each table asks for, and tables built from runs + claims."""

import shutil
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from siad.engine.protocol import NO_SOURCE, RunKey
from siad.errors import ConfigError, DataError
from siad.methods import METHODS, Method
from siad.report.paper import PAPER_TABLES, render_report, required_runs, run_key
from siad.report.reference import load_reference

ROOT = Path(__file__).resolve().parents[2]
REFERENCES = ROOT / "config" / "reference"


class TrainedToy(Method):
    training_free: ClassVar[bool] = False
    transform = input_size = None  # never built here

    def predict(self, batch):  # pragma: no cover - not called
        raise AssertionError


if "test_trained_toy" not in METHODS:
    METHODS.add("test_trained_toy", TrainedToy)


def demo_config():
    return yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())


def test_table1_asks_for_one_run_per_target():
    config = demo_config()
    keys = PAPER_TABLES.get("table1_uzad").runs(config)
    for method in config["report"]["table1"]["methods"]:
        own = [k for k in keys if k.method == method]
        assert sorted(k.target for k in own) == sorted(config["datasets"]), method
        assert {k.setting for k in own} == {"uzad"} and len(own) == len(config["datasets"])
    assert {k.source for k in keys if k.method == "clip"} == {NO_SOURCE}
    assert {(k.source, k.target) for k in keys if k.method == "siad_llm"} >= {("visa", "mvtec"), ("mvtec", "sdd"),
                                                                             ("br35h", "headct"), ("brainmri", "br35h")}


def test_run_key_uses_the_protocol_source_for_trained_methods():
    config = demo_config()
    assert run_key(config, "uzad", "test_trained_toy", "default", "mvtec", 0) == RunKey(
        "uzad", "test_trained_toy", "default", "visa", "mvtec", 0)
    assert run_key(config, "uzad", "test_trained_toy", "default", "headct", 0).source == "br35h"
    assert run_key(config, "uzad", "clip", "default", "headct", 0).source == NO_SOURCE
    config["protocol"] = [{"source": "mvtec", "targets": ["visa"]}]
    with pytest.raises(ConfigError, match="no protocol target"):
        run_key(config, "uzad", "test_trained_toy", "default", "sdd", 0)


def test_required_runs_are_unique_and_cover_every_table(llm_config):
    config = llm_config  # the demo config plus the sections of the SIAD-LLM and LLM tables
    config["report"]["tables"] = list(PAPER_TABLES.names())
    keys = required_runs(config)
    assert len(keys) == len(set(keys))
    siad = {(k.variant, k.target) for k in keys if k.method == "toy_siad_llm"}
    assert {("wo_si", "btad"), ("wo_adapter", "visa"), ("lambda09", "sdd"), ("case1", "mvtec")} <= siad
    assert ("case1", "visa") not in siad  # Table 5 is MVTecAD-only
    assert {k.target for k in keys if k.method == "toy_anomalygpt"} == set(config["datasets"])  # LLM side table
    anovl = {(k.variant, k.target) for k in keys if k.method == "anovl"}
    assert {("tfa", "visa"), ("default", "visa"), ("attn_qkv", "mvtec"), ("prompt_base", "mvtec"),
            ("linear_probe", "mvtec"), ("default", "btad")} <= anovl
    assert ("attn_qkv", "visa") not in anovl  # ablations are MVTecAD-only, as in the paper


def anovl_run(make_run, variant, target, **means):
    run = make_run("anovl", target, means.pop("image_auroc", 0.9), means.pop("pixel_auroc", 0.8), variant=variant)
    run["run"]["source"] = NO_SOURCE
    run["mean"].update(means)
    return run


def test_anovl_localization_table_places_claims_and_results(make_run):
    config = demo_config()
    runs = [anovl_run(make_run, v, t, pixel_auroc=0.5 + i / 10, pixel_f1_max=0.3, aupro_cflow_legacy=0.7)
            for i, (v, t) in enumerate([("tfa", "mvtec"), ("tfa", "visa"), ("default", "mvtec"),
                                        ("default", "visa")])]
    table = PAPER_TABLES.get("anovl_table1_localization").build(
        config, runs, load_reference(REFERENCES / "anovl_tables.csv"))
    tta = table.cell(("AnoVL-TTA",), "MVTecAD AUROC")
    assert tta.claimed == pytest.approx(90.6) and tta.reproduced == pytest.approx(70.0)
    assert table.cell(("AnoVL-TFA",), "VisA PRO").claimed == pytest.approx(65.1)
    assert table.cell(("AnoVL-TFA",), "VisA PRO").reproduced == pytest.approx(70.0)
    assert any("CFlow" in note for note in table.notes)


def test_anovl_ablation_tables_read_their_reference_rows(make_run):
    config = demo_config()
    prompts = PAPER_TABLES.get("anovl_table4_prompts").build(
        config, [], load_reference(REFERENCES / "anovl_prompt_ablation.csv"))
    assert prompts.cell(("Base",), "MVTecAD AD AUROC").claimed == pytest.approx(79.0)
    assert prompts.cell(("+DA Prompt",), "MVTecAD AL PRO").claimed == pytest.approx(70.4)
    attention = PAPER_TABLES.get("anovl_table3_attention").build(
        config, [], load_reference(REFERENCES / "anovl_ablations.csv"))
    assert attention.cell(("with V (last layer)",), "MVTecAD F1Max").claimed == pytest.approx(22.2)
    adapter = PAPER_TABLES.get("anovl_table5_adapter").build(
        config, [], load_reference(REFERENCES / "anovl_ablations.csv"))
    assert adapter.cell(("Linear Probe",), "MVTecAD PRO").claimed == pytest.approx(74.4)


def test_a_table_row_needs_its_variant_in_the_config():
    config = demo_config()
    del config["methods"]["anovl"]["variants"]["attn_qkv"]
    with pytest.raises(ConfigError, match="attn_qkv"):
        PAPER_TABLES.get("anovl_table3_attention").build(config, [], load_reference(
            REFERENCES / "anovl_ablations.csv"))


def test_render_report_writes_every_configured_table(tmp_path, make_run, write_runs):
    config = demo_config()
    config["report"]["tables"] = ["table1_uzad", "siad_table7_training_free"]
    runs = []
    for i, target in enumerate(config["datasets"]):
        run = make_run("clip", target, 0.6, None if target in ("brainmri", "headct", "br35h") else 0.5, seed=i)
        run["run"]["source"] = NO_SOURCE
        runs.append(run)
        if target in ("mvtec", "visa", "mpdd", "dtd", "sdd", "btad"):
            runs.append(anovl_run(make_run, "default", target, pixel_auroc=0.8))
    paths = write_runs(runs, tmp_path / "runs")
    written = render_report(config, paths, tmp_path / "tables", REFERENCES, require_current=False)
    names = {p.name for p in written}
    assert {"table1_uzad.md", "siad_table7_training_free.csv", "claims_check.md"} <= names
    table7 = (tmp_path / "tables" / "siad_table7_training_free.md").read_text()
    assert "| AnoVL | 80.0 (n/a) |" in table7 and "not recoverable" in table7


def test_a_failing_table_leaves_every_previous_table_untouched(tmp_path, make_run, write_runs):
    config = demo_config()
    config["report"]["tables"] = ["table1_uzad", "siad_table7_training_free"]
    runs = [make_run("clip", t, 0.6, None if t in ("brainmri", "headct", "br35h") else 0.5, seed=i)
            for i, t in enumerate(config["datasets"])]
    for run in runs:
        run["run"]["source"] = NO_SOURCE
    runs += [anovl_run(make_run, "default", t, pixel_auroc=0.8)
             for t in ("mvtec", "visa", "mpdd", "dtd", "sdd", "btad")]
    paths = write_runs(runs, tmp_path / "runs")
    render_report(config, paths, tmp_path / "tables", REFERENCES, require_current=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "tables").iterdir()}
    broken = tmp_path / "reference"
    shutil.copytree(REFERENCES, broken)
    (broken / "siad_table1_uzad.csv").write_text("# the header line was lost\n")  # a broken claims file
    config["report"]["tables"] = ["siad_table7_training_free", "table1_uzad"]  # the good table is built first
    changed = write_runs([*runs[:len(config["datasets"])], *(anovl_run(make_run, "default", t, pixel_auroc=0.7)
                          for t in ("mvtec", "visa", "mpdd", "dtd", "sdd", "btad"))], tmp_path / "runs2")
    with pytest.raises(DataError):
        render_report(config, changed, tmp_path / "tables", broken, require_current=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "tables").iterdir()} == before


def test_render_report_refuses_unstamped_runs_by_default(tmp_path, make_run, write_runs):
    config = demo_config()
    config["report"]["tables"] = ["siad_table7_training_free"]
    paths = write_runs([anovl_run(make_run, "default", "visa", pixel_auroc=0.8)], tmp_path / "runs")
    with pytest.raises(DataError, match="another run specification"):
        render_report(config, paths, tmp_path / "tables", REFERENCES)
    assert not (tmp_path / "tables").exists()


def test_table1_shows_every_paper_row_and_marks_the_unconfigured_ones_not_run(make_run):
    config = demo_config()
    config["report"]["table1"]["methods"] = ["clip", "siad_llm"]
    runs = [make_run("clip", t, 0.6, None if t in ("brainmri", "headct", "br35h") else 0.5, seed=i)
            for i, t in enumerate(config["datasets"])]
    table = PAPER_TABLES.get("table1_uzad").build(config, runs, load_reference(REFERENCES / "siad_table1_uzad.csv"))
    assert [k[1] for k in table.row_keys if k[0] == "image"] == ["CLIP", "AdaCLIP", "AnomalyCLIP", "AnomalyGPT",
                                                                 "FiLo", "AA-CLIP", "SIAD-LLM"]
    assert table.cell(("image", "FiLo"), "SDD").status == "not_run"
    assert table.cell(("image", "FiLo"), "SDD").claimed == pytest.approx(19.8)
    assert table.cell(("image", "SIAD-LLM"), "SDD").status == "missing"  # configured, but no run given
    assert table.cell(("image", "CLIP"), "SDD").reproduced == pytest.approx(60.0)
    assert any(n.startswith("Not run: AdaCLIP, AnomalyCLIP, AnomalyGPT, FiLo, AA-CLIP") for n in table.notes)


def test_table1_under_another_setting_keeps_the_training_free_run():
    config = demo_config()
    config["report"]["table1"].update(methods=["clip", "siad_llm"], setting="zad")
    keys = PAPER_TABLES.get("table1_uzad").runs(config)
    assert {(k.setting, k.method) for k in keys} == {("uzad", "clip"), ("zad", "siad_llm")}


def test_a_report_missing_a_needed_run_is_refused_naming_it(make_run):
    from siad.report.paper import refuse_missing_runs, required_runs

    config = demo_config()
    config["report"].pop("user_tables")
    config["report"]["tables"] = ["siad_table7_training_free"]
    config["report"]["table7"] = {"methods": ["anovl"]}
    targets = ["mvtec", "visa", "mpdd", "dtd", "sdd", "btad"]
    runs = [anovl_run(make_run, "default", t) for t in targets]
    refuse_missing_runs(runs, required_runs(config))  # every run present
    with pytest.raises(DataError, match=r"1 run\(s\) the table\(s\) need .*anovl/default/seed0/none/btad"):
        refuse_missing_runs(runs[:-1], required_runs(config))
