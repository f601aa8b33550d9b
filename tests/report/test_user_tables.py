"""Tables declared in the config (report.user_tables): their runs, their cells without claims, their errors."""

from pathlib import Path

import pytest
import yaml

from siad.errors import ConfigError
from siad.plan import validate_workflow_config
from siad.report.paper import configured_tables, render_table, table_runs
from siad.report.render import LEGEND_NO_CLAIMS, render_csv, render_latex, render_markdown
from siad.report.user_tables import build_user_table, user_table_runs

ROOT = Path(__file__).resolve().parents[2]


def config_with(table: dict) -> dict:
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    config["report"]["user_tables"] = {"mine": table}
    return config


def test_a_user_table_reads_each_rows_runs_on_its_datasets():
    config = config_with({"rows": {"CLIP": "clip", "TTA code": "anovl/tta_code"}, "datasets": ["visa", "btad"]})
    keys = user_table_runs(config, "mine")
    assert {(k.method, k.variant, k.target) for k in keys} == {
        (m, v, t) for m, v in (("clip", "default"), ("anovl", "tta_code")) for t in ("visa", "btad")}
    assert all(k.setting == "uzad" and k.source == "none" for k in keys)  # training-free: their one run
    assert "mine" in configured_tables(config) and table_runs(config, "mine") == keys


def test_a_trained_method_row_reads_every_training_seed_under_the_tables_setting():
    config = config_with({"rows": {"FiLo": "filo"}, "setting": "pseudo", "datasets": ["visa"]})
    config["training"]["seeds"] = [0, 3]
    keys = user_table_runs(config, "mine")
    assert {(k.setting, k.source, k.seed) for k in keys} == {("pseudo", "mvtec", 0), ("pseudo", "mvtec", 3)}


def test_cells_show_the_reproduced_number_and_the_legend_speaks_of_no_claim(make_run):
    config = config_with({"title": "Mine", "rows": {"CLIP": "clip"}, "datasets": ["mvtec", "headct"]})
    runs = [make_run("clip", "mvtec", 0.7, 0.6), make_run("clip", "headct", 0.8, None)]
    for run in runs:
        run["run"]["source"] = "none"
    table = build_user_table(config, "mine", runs)
    markdown = render_markdown(table)
    assert LEGEND_NO_CLAIMS in markdown and "claimed" not in markdown.split("Notes:")[0]
    assert "| image | CLIP | 70.0 | 80.0 | 75.0 |" in markdown  # reproduced only, with the Average column
    assert "| pixel | CLIP | 60.0 | – | 60.0 |" in markdown  # no masks on HeadCT
    assert "scriptsize" not in render_latex(table).split("\\begin{tabular}")[1]
    assert render_csv(table).splitlines()[2].split(",")[5] == ""  # the claimed column stays empty


def test_render_table_writes_a_user_table(tmp_path, make_run):
    config = config_with({"rows": {"CLIP": "clip"}, "datasets": ["mvtec"], "levels": {"image": "image_auroc"}})
    run = make_run("clip", "mvtec", 0.7, 0.6)
    run["run"]["source"] = "none"
    metrics = tmp_path / "m.json"
    metrics.write_text(__import__("json").dumps(run))
    written = render_table(config, "mine", [metrics], tmp_path / "out", tmp_path, require_current=False)
    assert [p.name for p in written] == ["mine.md", "mine.tex", "mine.csv"]
    assert "| image | CLIP | 70.0 | 70.0 |" in (tmp_path / "out" / "mine.md").read_text()


@pytest.mark.parametrize(("table", "message"), [
    ({"rows": {"X": "clipp"}}, r"report/user_tables/mine/rows/X: method 'clipp' is not listed under `methods`"),
    ({"rows": {"X": "anovl/ttta"}}, r"report/user_tables/mine/rows/X: 'anovl' has no variant 'ttta' "
                                    r"\(methods/anovl/variants\)"),
    ({"rows": {"X": "clip"}, "datasets": ["mvtec", "nowhere"]}, r"report/user_tables/mine/datasets: \['nowhere'\]"),
    ({"rows": {"X": "clip"}, "levels": {"image": "image_aurok"}}, r"report/user_tables/mine/levels: unknown metric"),
    ({"rows": {}}, r"report/user_tables/mine/rows"),
])
def test_a_bad_user_table_stops_at_start_up_naming_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        validate_workflow_config(config_with(table))


def test_a_user_table_may_not_take_a_paper_tables_file():
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    config["report"]["user_tables"] = {"table1_uzad": {"rows": {"CLIP": "clip"}}}
    with pytest.raises(ConfigError, match="report/user_tables/table1_uzad: the name is taken"):
        validate_workflow_config(config)
