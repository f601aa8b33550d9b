"""The Figure-4-style qualitative figure: deterministic choice of images, answers under maps, demo title."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from siad.errors import ConfigError, DataError
from siad.report.figures import (
    FIGURE_STEM,
    NO_ANSWER,
    collect_examples,
    dataset_rng,
    draw_figure4,
    figure4_outputs,
    figure4_runs,
    render_figure4,
    select_examples,
)
from siad.report.render import DEMO_STAMP

CLASSES = ("bottle", "carpet")  # the classes of the write_dataset fixture


def meta_file(results: Path, dataset: str) -> Path:
    return results / "datasets" / dataset / "meta.json"


def _inputs(config: dict[str, Any], results: Path) -> tuple[list[Path], list[Path]]:
    """The files the figure rule passes: predictions in figure4_runs order, the datasets' meta.json."""
    return ([k.run_dir(results) / "predictions.npz" for k in figure4_runs(config)],
            [meta_file(results, d) for d in config["report"]["figure4"]["datasets"]])


def test_selection_is_anomalous_only_round_robin_over_classes_and_seeded():
    cls_names = ["bottle"] * 6 + ["carpet"] * 6 + ["screw"] * 2
    img_paths = [f"{c}/test/{i:03d}.png" for i, c in enumerate(cls_names)]
    labels = [0, 1, 1, 1, 0, 1] + [1, 1, 0, 1, 1, 1] + [0, 0]
    picks = select_examples(cls_names, img_paths, labels, 4, dataset_rng(0, "mvtec"))
    assert len(picks) == 4 and all(labels[i] == 1 for i in picks)
    assert [cls_names[i] for i in picks] == ["bottle", "carpet", "bottle", "carpet"]  # screw has no anomaly
    assert picks == select_examples(cls_names, img_paths, labels, 4, dataset_rng(0, "mvtec"))
    draws = {tuple(select_examples(cls_names, img_paths, labels, 4, dataset_rng(s, "mvtec"))) for s in range(8)}
    assert len(draws) > 1  # the seed matters
    assert len(select_examples(cls_names, img_paths, labels, 50, dataset_rng(0, "mvtec"))) == sum(labels)


def _write_run(run_dir: Path, records: list[dict[str, Any]], make_run, write_predictions, method: str,
               answers: list[str] | None, demo: bool = True) -> None:
    write_predictions(run_dir / "predictions.npz", records, answers)
    (run_dir / "metrics.json").write_text(json.dumps(make_run(method, "mvtec", 0.7, 0.8, demo=demo)))


@pytest.fixture
def figure_setup(llm_config, tmp_path, make_run, write_dataset, write_predictions):
    root, results = tmp_path / "data" / "mvtec", tmp_path / "results"
    records = write_dataset(root, meta_file(results, "mvtec"))
    llm_config["datasets"]["mvtec"]["root"] = str(root)
    llm_config["datasets"]["mvtec"].pop("classes")
    answers = [f"Yes, there is an anomaly in image {i}, at the top left of the image." for i in range(len(records))]
    for key in figure4_runs(llm_config):
        run_answers = answers if key.method == "toy_anomalygpt" else None
        _write_run(key.run_dir(results), records, make_run, write_predictions, key.method, run_answers)
    return llm_config, results, records


def test_figure_runs_and_outputs_follow_the_config(llm_config):
    keys = figure4_runs(llm_config)
    assert [(k.method, k.source, k.target) for k in keys] == [("toy_anomalygpt", "visa", "mvtec"),
                                                              ("toy_siad_llm", "visa", "mvtec")]
    assert figure4_outputs("tables/demo", llm_config) == [f"tables/demo/{FIGURE_STEM}.png",
                                                          f"tables/demo/{FIGURE_STEM}.pdf"]
    del llm_config["report"]["figure4"]
    assert figure4_runs(llm_config) == [] and figure4_outputs("tables/demo", llm_config) == []
    with pytest.raises(ConfigError, match="report/figure4 is not configured"):
        collect_examples(llm_config, [], [])


def test_examples_carry_image_mask_scaled_maps_and_answers(figure_setup):
    config, results, records = figure_setup
    spec, examples, demo = collect_examples(config, *_inputs(config, results))
    assert demo is True and len(examples) == 2 and spec.size == 224
    assert {e.cls_name for e in examples} == set(CLASSES)  # count 2 over two classes: one each
    paths = {r["img_path"]: i for i, r in enumerate(records)}
    for example in examples:
        assert records[paths[example.img_path]]["anomaly"] == 1
        assert example.image.shape == (224, 224, 3) and example.mask.shape == (224, 224)
        assert example.mask[50, 80] and not example.mask[200, 10]  # the 10:30 x 20:40 box, rescaled
        i = paths[example.img_path]
        assert example.answers == [f"Yes, there is an anomaly in image {i}, at the top left of the image.", NO_ANSWER]
        # maps are 0.2 * (i % 4) over a run whose values span 0 .. 0.6: scaled by that run-wide range
        assert example.maps[0] == pytest.approx(np.full((224, 224), (i % 4) / 3), abs=1e-3)
    assert collect_examples(config, *_inputs(config, results))[1][0].img_path == examples[0].img_path  # deterministic


def test_render_writes_png_and_pdf_with_the_demo_stamp_in_the_title(figure_setup, tmp_path):
    config, results, _ = figure_setup
    written = render_figure4(config, *_inputs(config, results), tmp_path / "tables")
    assert [p.name for p in written] == [f"{FIGURE_STEM}.png", f"{FIGURE_STEM}.pdf"]
    with Image.open(written[0]) as png:
        assert png.size[0] > 400 and png.size[1] > 300
    assert written[1].read_bytes().startswith(b"%PDF")
    spec, examples, _ = collect_examples(config, *_inputs(config, results))
    demo_title = draw_figure4(examples, ["AnomalyGPT", "SIAD-LLM"], setting="uzad", demo=True)._suptitle.get_text()
    real_title = draw_figure4(examples, ["AnomalyGPT", "SIAD-LLM"], setting="uzad", demo=False)._suptitle.get_text()
    assert demo_title.replace("\n", " ").startswith(DEMO_STAMP) and "DEMO" not in real_title


def test_inputs_must_match_the_configured_runs(figure_setup):
    config, results, _ = figure_setup
    predictions, metas = _inputs(config, results)
    with pytest.raises(ConfigError, match="1 predictions and 1 dataset indexes given for 1 datasets x 2 methods"):
        collect_examples(config, predictions[:1], metas)


def test_a_run_missing_an_image_is_refused(figure_setup, make_run, write_predictions):
    config, results, records = figure_setup
    key = figure4_runs(config)[1]
    lost = records[:3]  # lost the anomalous images
    _write_run(key.run_dir(results), lost, make_run, write_predictions, key.method, None)
    with pytest.raises(DataError, match="has no prediction for"):
        collect_examples(config, *_inputs(config, results))


def test_mixed_demo_and_real_runs_are_refused(figure_setup, make_run, write_predictions):
    config, results, records = figure_setup
    key = figure4_runs(config)[1]
    _write_run(key.run_dir(results), records, make_run, write_predictions, key.method, None, demo=False)
    with pytest.raises(DataError, match="demo and non-demo"):
        collect_examples(config, *_inputs(config, results))


def test_only_methods_with_answers_get_a_caption():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from siad.report.figures import Example, draw_examples

    example = Example("mvtec", "bottle", "a.png", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), bool),
                      [np.zeros((8, 8)), np.zeros((8, 8))], ["Yes, there is an anomaly.", NO_ANSWER])
    fig = plt.figure()
    draw_examples(fig, [example], ["SIAD-LLM", "AdaCLIP"], answers=True)
    llm, clip_family = fig.axes[2:4]
    assert llm.get_xlabel() == "Yes, there is an anomaly." and clip_family.get_xlabel() == ""
    plt.close(fig)
