from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from siad.errors import DataError
from siad.report.runs import SOURCE_KEY, ci_value, demo_flag, load_runs, mean_value, validate_run


def test_load_runs_reads_files_and_records_source(tmp_path: Path, make_run: Any, write_runs: Any) -> None:
    runs = [make_run("clip", "visa", 0.7, 0.8), make_run("clip", "mvtec", 0.6, None)]
    paths = write_runs(runs, tmp_path)
    loaded = load_runs(paths)
    assert [r[SOURCE_KEY] for r in loaded] == [str(p) for p in paths]
    assert mean_value(loaded[0], "image_auroc") == pytest.approx(0.7)
    assert mean_value(loaded[1], "pixel_auroc") is None
    assert ci_value(loaded[1], "pixel_auroc") is None
    assert ci_value(loaded[0], "pixel_auroc") == pytest.approx((0.78, 0.82))


def test_nan_replicates_are_accepted(tmp_path: Path, make_run: Any, write_runs: Any) -> None:
    run = make_run("clip", "visa", 0.7, 0.8, n_replicates=3)
    run["mean_replicates"]["image_auroc"] = [0.7, float("nan"), 0.71]
    (loaded,) = load_runs(write_runs([run], tmp_path))
    assert math.isnan(loaded["mean_replicates"]["image_auroc"][1])


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=r"metrics.json: not valid JSON.*rerun the job"):
        load_runs([path])


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere.json: cannot read"):
        load_runs([tmp_path / "nowhere.json"])


def _broken(make_run: Any, mutate: Any) -> dict[str, Any]:
    run = copy.deepcopy(make_run("clip", "visa", 0.7, 0.8))
    mutate(run)
    return run


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.pop("mean_replicates"), "missing section.*mean_replicates"),
        (lambda r: r["run"].pop("target"), "'run' lacks target"),
        (lambda r: r["run"].update(demo="yes"), "run.demo"),
        (lambda r: r["mean"].update(image_auroc="0.7"), "mean.image_auroc"),
        (lambda r: r["ci"].update(image_auroc=[0.1]), "ci.image_auroc"),
        (lambda r: r["mean_replicates"].update(image_auroc=["x"]), "mean_replicates.image_auroc"),
        (lambda r: r["bootstrap"].update(confidence=95), "bootstrap.confidence"),
    ],
)
def test_schema_problems_are_named(mutate: Any, message: str, make_run: Any) -> None:
    with pytest.raises(DataError, match=message):
        validate_run(_broken(make_run, mutate), "results/x/metrics.json")


def test_schema_error_from_file_names_path(tmp_path: Path, make_run: Any, write_runs: Any) -> None:
    run = _broken(make_run, lambda r: r.pop("run"))
    (path,) = write_runs([run], tmp_path)
    with pytest.raises(DataError, match=str(path)):
        load_runs([path])
    assert json.loads(path.read_text())["mean"]  # file untouched


def test_demo_flag(make_run: Any) -> None:
    assert demo_flag([make_run("a", "b", 0.5, None, demo=True)]) is True
    assert demo_flag([make_run("a", "b", 0.5, None, demo=False)]) is False
    with pytest.raises(DataError, match="demo and non-demo runs mixed"):
        demo_flag([make_run("a", "b", 0.5, None, demo=True), make_run("a", "c", 0.5, None, demo=False)])


def test_a_broken_metrics_file_names_the_job_that_rewrites_it(tmp_path: Path) -> None:
    path = tmp_path / "results" / "demo" / "uzad" / "clip" / "default" / "seed0" / "none" / "visa" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text("{trunc", encoding="utf-8")
    expected = r"snakemake --cores 1 --force .*none/visa/metrics\.json` and `snakemake --cores 1 all`"
    with pytest.raises(DataError, match=expected):
        load_runs([path])
