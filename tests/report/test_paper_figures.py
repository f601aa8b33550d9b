"""SIAD-LLM Figures 1 (right) and 2 from hand-made metrics.json / predictions.npz files: values, seeds, files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from siad.engine.protocol import NO_SOURCE
from siad.errors import ConfigError, DataError
from siad.plan import build_plan, validate_workflow_config
from siad.report.paper import protocol_targets
from siad.report.paper_figures import (
    FIGURE1_TEXT,
    draw_figure1,
    figure1_panel,
    figure1_runs,
    figure2_panel_runs,
    figure2_panels,
    figure2_runs,
    figure_outputs,
    figure_runs,
    image_auroc,
    render_figure1,
    render_figure2,
)
from siad.report.reference import load_reference
from siad.report.render import DEMO_STAMP

REFERENCES = Path(__file__).resolve().parents[2] / "config" / "reference"
TABLE1 = REFERENCES / "siad_table1_uzad.csv"
FILO = REFERENCES / "filo_table1.csv"
INDUSTRIAL = ("mvtec", "visa", "mpdd", "dtd", "sdd", "btad")
MEDICAL = ("brainmri", "headct", "br35h")


@pytest.fixture
def config(llm_config: dict[str, Any]) -> dict[str, Any]:
    """The demo config with a toy trained AnomalyCLIP and both figures on CLIP and it."""
    llm_config["methods"]["toy_anomalyclip"] = {"display_name": "AnomalyCLIP"}
    llm_config["report"]["figure1"] = {"methods": ["clip", "toy_anomalyclip"]}
    llm_config["report"]["figure2"] = {"methods": ["clip", "toy_anomalyclip"], "datasets": ["mvtec"], "count": 1}
    return llm_config


def clip_value(target: str) -> float:
    """CLIP's image AUROC on ``target`` in these tests (one run: training-free)."""
    return 0.5 + (INDUSTRIAL + MEDICAL).index(target) / 100


def _run(make_run, method: str, target: str, setting: str, value: float, seed: int = 0, **kwargs) -> dict:
    run = make_run(method, target, value, None if target in MEDICAL else value, setting=setting, **kwargs)
    run["run"].update(seed=seed, source=NO_SOURCE if method == "clip" else run["run"]["source"])
    return run


def _figure_runs(make_run, **kwargs) -> list[dict]:
    """CLIP's one run per target; the toy AnomalyCLIP with two seeds (0.6, 0.8) under UZAD and 0.9 under ZAD."""
    runs = []
    for target in INDUSTRIAL + MEDICAL:
        runs.append(_run(make_run, "clip", target, "uzad", clip_value(target), **kwargs))
        runs += [_run(make_run, "toy_anomalyclip", target, "uzad", v, seed=s, **kwargs)
                 for s, v in ((0, 0.6), (1, 0.8))]
        runs.append(_run(make_run, "toy_anomalyclip", target, "zad", 0.9, **kwargs))
    return runs


def test_figure_values_average_the_seeds_of_one_cell(make_run):
    runs = [_run(make_run, "toy_anomalyclip", "visa", "uzad", v, seed=s) for s, v in ((0, 0.6), (1, 0.8))]
    runs.append(_run(make_run, "toy_anomalyclip", "mpdd", "uzad", 0.5))
    select = {"setting": "uzad", "method": "toy_anomalyclip", "variant": "default"}
    assert image_auroc(runs, {**select, "target": "visa"}) == pytest.approx(70.0)
    assert image_auroc(runs, {**select, "target": "mpdd"}) == pytest.approx(50.0)
    runs[1]["mean"]["image_auroc"] = None  # one seed failed to define it: no mean hides that
    assert image_auroc(runs, {**select, "target": "visa"}) is None
    with pytest.raises(DataError, match="2 runs of one seed"):
        image_auroc([*runs, runs[0]], {**select, "target": "visa"})
    with pytest.raises(DataError, match="no run matches"):
        image_auroc(runs, {**select, "target": "sdd"})


def test_figure_runs_follow_the_training_seeds(config):
    config["training"]["seeds"] = [0, 1, 2]
    keys = figure1_runs(config)
    assert sorted({k.seed for k in keys if k.method == "toy_anomalyclip"}) == [0, 1, 2]
    assert len([k for k in keys if k.method == "toy_anomalyclip"]) == 3 * len(config["datasets"])
    assert len([k for k in keys if k.method == "clip"]) == len(config["datasets"])  # training-free: one run
    assert {k.seed for k in figure2_panel_runs(config)} == {0}  # the maps of the first training seed


def test_figure_runs_cover_both_settings_and_the_panel(config):
    assert {(k.setting, k.method) for k in figure1_runs(config)} == {("uzad", "clip"), ("uzad", "toy_anomalyclip")}
    assert {(k.setting, k.method) for k in figure2_runs(config)} == {
        ("uzad", "clip"), ("uzad", "toy_anomalyclip"), ("zad", "toy_anomalyclip")}
    assert len(figure2_runs(config)) == 3 * len(config["datasets"])  # CLIP's ZAD run is its UZAD run
    panel = figure2_panel_runs(config)
    assert [(k.method, k.target, k.setting) for k in panel] == [("clip", "mvtec", "uzad"),
                                                              ("toy_anomalyclip", "mvtec", "uzad")]
    keys = figure_runs(config)
    assert len(keys) == len(set(keys)) and set(panel) <= set(keys)
    assert figure_outputs("tables/demo", config)[-4:] == [
        "tables/demo/figure1_auroc.png", "tables/demo/figure1_auroc.pdf",
        "tables/demo/figure2_zero_shot.png", "tables/demo/figure2_zero_shot.pdf"]
    del config["report"]["figure1"], config["report"]["figure2"]
    assert figure1_runs(config) == figure2_runs(config) == figure2_panel_runs(config) == []
    assert not [p for p in figure_outputs("tables/demo", config) if "figure1" in p or "figure2" in p]


def test_the_plan_schedules_the_figures_zad_runs(config):
    config["report"]["tables"] = ["table1_uzad"]
    config["report"]["table1"]["methods"] = ["clip"]
    config["workflow"] = {"job_per": "source"}
    jobs = {(g.method, g.source) for g in build_plan(config).groups}
    assert {("toy_anomalyclip", "mvtec"), ("toy_anomalyclip", "visa"), ("toy_anomalyclip", "br35h"),
            ("clip", "none")} <= jobs
    settings = {k.setting for g in build_plan(config).groups if g.method == "toy_anomalyclip" for k in g.keys}
    assert settings == {"uzad", "zad"}  # Figure 2's (a) and (c): one job per source holds both settings


def test_figure1_values_are_domain_means_with_table1_claims(config, make_run):
    runs = _figure_runs(make_run)
    panel = figure1_panel(config, runs, load_reference(TABLE1))
    assert panel.categories == ("Industrial", "Medical")
    assert [s.label for s in panel.series] == ["CLIP", "AdaCLIP", "AnomalyCLIP", "AnomalyGPT", "FiLo", "AA-CLIP",
                                               "SIAD-LLM"]
    clip, ada, anomalyclip = panel.series[:3]
    assert clip.reproduced == pytest.approx((100 * np.mean([clip_value(t) for t in INDUSTRIAL]),
                                             100 * np.mean([clip_value(t) for t in MEDICAL])))
    assert clip.claimed == pytest.approx((np.mean([60.9, 49.1, 44.9, 75.2, 40.1, 59.3]), np.mean([91.0, 56.5, 80.2])))
    assert anomalyclip.reproduced == pytest.approx((70.0, 70.0))  # the mean of its two seeds
    assert ada.reproduced is None  # not run: claims only
    assert ada.claimed == pytest.approx((np.mean([42.1, 44.2, 56.8, 36.6, 27.4, 33.8]), np.mean([75.0, 38.8, 37.7])))


def test_figure1_without_medical_targets_has_one_group(config, make_run):
    config["protocol"] = [{"source": "mvtec", "targets": ["visa"]}, {"source": "visa", "targets": ["mvtec"]}]
    panel = figure1_panel(config, _figure_runs(make_run), load_reference(TABLE1))
    assert panel.categories == ("Industrial",)
    assert panel.series[0].claimed == pytest.approx((np.mean([60.9, 49.1]),))


def _cell(runs: list[dict], method: str, setting: str, target: str, seed: int = 0) -> int:
    """The index of one run in ``runs``."""
    return next(i for i, r in enumerate(runs) if (r["run"]["method"], r["run"]["setting"], r["run"]["target"],
                                                   r["run"]["seed"]) == (method, setting, target, seed))


def test_figure1_is_written_as_png_and_pdf_with_the_demo_stamp(config, make_run, tmp_path, write_runs):
    paths = write_runs(_figure_runs(make_run), tmp_path / "results")
    written = render_figure1(config, paths, REFERENCES, tmp_path / "tables", require_current=False)
    assert [p.name for p in written] == ["figure1_auroc.png", "figure1_auroc.pdf"]
    assert written[1].read_bytes().startswith(b"%PDF")
    config["demo"] = False
    real = render_figure1(config, write_runs(_figure_runs(make_run, demo=False), tmp_path / "real"),
                          REFERENCES, tmp_path / "real_tables", require_current=False)
    with Image.open(written[0]) as demo_png, Image.open(real[0]) as real_png:
        assert demo_png.size[1] > real_png.size[1] > 500  # the demo stamp takes its own lines above the title
    panel = figure1_panel(config, _figure_runs(make_run), load_reference(TABLE1))
    assert draw_figure1(panel, demo=True)._suptitle.get_text().replace("\n", " ").startswith(DEMO_STAMP)
    title = draw_figure1(panel, demo=False)._suptitle.get_text()
    assert "DEMO" not in title and title.replace("\n", " ") == FIGURE1_TEXT


def test_figures_refuse_stale_runs_and_write_nothing(config, make_run, tmp_path, write_runs):
    config["report"]["figure1"] = {"methods": ["clip"]}
    paths = write_runs([r for r in _figure_runs(make_run) if r["run"]["method"] == "clip"], tmp_path / "results")
    with pytest.raises(DataError, match="another run specification"):
        render_figure1(config, paths, REFERENCES, tmp_path / "tables")
    assert not (tmp_path / "tables").exists()


def test_a_figure_given_too_few_runs_names_the_missing_cell(config, make_run):
    runs = [r for r in _figure_runs(make_run) if r["run"]["target"] != "sdd"]
    with pytest.raises(DataError, match="no run matches .*'target': 'sdd'"):
        figure1_panel(config, runs, load_reference(TABLE1))


@pytest.fixture
def figure2_setup(config, make_run, tmp_path, write_runs, write_dataset, write_predictions):
    """Hand-made runs of Figure 2 under tmp_path/results (predictions beside the panel's runs), a two-class
    MVTecAD for its panel."""
    root, results = tmp_path / "data" / "mvtec", tmp_path / "results"
    meta = results / "datasets" / "mvtec" / "meta.json"
    records = write_dataset(root, meta)
    config["datasets"]["mvtec"] = {"root": str(root)}
    runs = _figure_runs(make_run)
    paths = write_runs(runs, results / "runs")
    predictions = [paths[_cell(runs, m, "uzad", "mvtec")].parent / "predictions.npz"
                   for m in ("clip", "toy_anomalyclip")]
    for path in predictions:
        write_predictions(path, records)
    return config, paths, predictions, [meta]


def test_figure2_panels_share_methods_and_axes_with_their_own_claims(figure2_setup, make_run):
    config = figure2_setup[0]
    zad, uzad = figure2_panels(config, _figure_runs(make_run), load_reference(TABLE1),
                               load_reference(FILO))
    assert zad.categories == uzad.categories == tuple(protocol_targets(config).values())
    assert [s.label for s in zad.series] == [s.label for s in uzad.series] == ["CLIP", "AnomalyCLIP"]
    clip_a, anomalyclip_a = zad.series
    assert clip_a.reproduced[0] == uzad.series[0].reproduced[0] == pytest.approx(100 * clip_value("mvtec"))
    assert clip_a.claimed[:3] == (74.1, 66.4, None)  # FiLo Table 1: MVTecAD, VisA only
    assert anomalyclip_a.reproduced[2] == pytest.approx(90.0) and anomalyclip_a.claimed[:2] == (91.5, 82.1)
    assert uzad.series[1].reproduced[2] == pytest.approx(70.0)
    assert uzad.series[1].claimed[:2] == (52.0, 39.4)  # SIAD-LLM Table 1


def test_figure2_is_written_with_its_panel_and_the_demo_stamp(figure2_setup, tmp_path):
    config, metrics, predictions, metas = figure2_setup
    written = render_figure2(config, metrics, predictions, metas, REFERENCES, tmp_path / "tables",
                             require_current=False)
    assert [p.name for p in written] == ["figure2_zero_shot.png", "figure2_zero_shot.pdf"]
    assert written[1].read_bytes().startswith(b"%PDF")
    with Image.open(written[0]) as png:
        assert png.size[0] >= 1500 and png.size[1] > 900  # bar charts above one row of image | mask | 2 maps
    with pytest.raises(ConfigError, match="1 predictions and 1 dataset indexes given for 1 datasets x 2 methods"):
        render_figure2(config, metrics, predictions[:1], metas, REFERENCES, tmp_path / "tables",
                       require_current=False)


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda r: r["figure1"].update(methods=["winclip"]), "figure1/methods: 'winclip'"),
    (lambda r: r["figure2"].update(datasets=["kolektor2"]), "figure2/datasets: 'kolektor2'"),
    (lambda r: r["figure2"].update(count=0), "figure2/count"),
    (lambda r: r.update(zad={"methods": ["gpt9"]}), "zad/methods: 'gpt9'"),
])
def test_config_validation_names_the_figure_key(config, mutate, expected):
    validate_workflow_config(config)  # the unmutated config is valid
    mutate(config["report"])
    with pytest.raises(ConfigError, match=expected):
        validate_workflow_config(config)
