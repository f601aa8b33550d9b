"""The report refuses metrics.json files computed under another run specification."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from siad.engine.protocol import RunKey
from siad.engine.spec import resolve_run_spec, results_digest
from siad.errors import DataError
from siad.report.runs import refuse_stale_runs, stale_runs

ROOT = Path(__file__).resolve().parents[2]
KEY = RunKey("uzad", "anomalygpt", "default", "mvtec", "visa", 0)


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the specification reads the prepared indexes under results/<profile>/datasets
    for name in ("mvtec", "visa"):
        meta = tmp_path / "results" / "demo" / "datasets" / name / "meta.json"
        meta.parent.mkdir(parents=True)
        meta.write_text(json.dumps({"test": {}}))
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    return config


def stamped_run(config, key=KEY):
    ident = {"setting": key.setting, "method": key.method, "variant": key.variant, "source": key.source,
             "target": key.target, "seed": key.seed}
    run = {"run": ident, "mean": {"image_auroc": 0.75}}
    stamp = {**resolve_run_spec(config, key).stamp(), "results_digest": results_digest(run)}
    return {**run, "spec": stamp, "_source": f"results/{key.target}.json"}


def test_a_current_run_passes(config):
    assert stale_runs(config, [stamped_run(config)]) == {}


@pytest.mark.parametrize(("mutate", "changed"), [
    (lambda c, tmp: c.update(seed=7), "config_seed"),
    (lambda c, tmp: c["methods"]["anomalygpt"]["params"].update(epochs=3), "params.epochs"),
    (lambda c, tmp: c["evaluation"].update(size=32), "evaluation.size"),
    (lambda c, tmp: (tmp / "results/demo/datasets/visa/meta.json").write_text("{}"), "datasets.visa"),
])
def test_a_run_of_another_specification_is_refused_naming_the_change_and_the_command(config, tmp_path, mutate,
                                                                                      changed):
    run = stamped_run(config)
    config = copy.deepcopy(config)
    mutate(config, tmp_path)
    stale = stale_runs(config, [run])
    assert list(stale) == ["results/visa.json"]  # the file `snakemake --force` recomputes
    assert len(stale["results/visa.json"]) == 1
    line = stale["results/visa.json"][0]
    assert "results/visa.json" in line and changed in line
    with pytest.raises(DataError, match="1 run\\(s\\) were computed under another") as err:
        refuse_stale_runs(config, [run])
    assert "snakemake --cores 1 --force results/visa.json, then snakemake --cores 1 all (plus" in str(err.value)


def test_stale_runs_of_several_jobs_get_one_command(config):
    runs = [stamped_run(config), stamped_run(config, RunKey("uzad", "clip", "default", "none", "sdd", 0))]
    config["seed"] = 5
    with pytest.raises(DataError, match="2 run") as err:
        refuse_stale_runs(config, runs)
    assert "--force results/visa.json results/sdd.json, then" in str(err.value)


def test_a_run_without_a_stamp_is_refused(config):
    run = stamped_run(config)
    del run["spec"]
    assert "(no specification stamp)" in stale_runs(config, [run])["results/visa.json"][0]
    run["spec"] = {"digest": "x", "spec": "not a mapping"}
    assert "(no specification stamp)" in stale_runs(config, [run])["results/visa.json"][0]


def test_a_hand_edited_number_is_refused(config):
    run = stamped_run(config)
    run["mean"]["image_auroc"] = 0.123
    lines = stale_runs(config, [run])["results/visa.json"]
    assert "edited after the run" in lines[0]
