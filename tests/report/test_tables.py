from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from siad.errors import ConfigError, DataError
from siad.report.tables import (
    AVERAGE,
    MISSING,
    NOT_APPLICABLE,
    OK,
    ColumnSpec,
    RowSpec,
    build_claim_table,
    build_dataset_table,
    build_table1,
)


def _table1(runs: list[dict[str, Any]], reference: pd.DataFrame, toy: Any) -> Any:
    return build_table1(runs, reference, methods=toy.methods, datasets=toy.datasets, medical=toy.medical)


def _run_for(runs: list[dict[str, Any]], method: str, target: str) -> dict[str, Any]:
    return next(r for r in runs if r["run"]["method"] == method and r["run"]["target"] == target)


def test_rows_are_image_then_pixel_and_columns_end_with_average(runs, reference, toy) -> None:
    table = _table1(runs, reference, toy)
    assert table.row_keys == [("image", "CLIP"), ("image", "SIAD-LLM"), ("pixel", "CLIP"), ("pixel", "SIAD-LLM")]
    assert table.columns == ["MVTecAD", "VisA", "BTAD", "HeadCT", AVERAGE]
    assert [len(b) for b in table.blocks()] == [2, 2]
    assert table.demo is True and table.confidence == 0.95


def test_cells_hold_percent_reproduced_claimed_and_ci(runs, reference, toy) -> None:
    table = _table1(runs, reference, toy)
    cell = table.cell(("image", "SIAD-LLM"), "BTAD")
    assert cell.status == OK
    assert cell.reproduced == pytest.approx(73.1)
    assert cell.claimed == pytest.approx(73.1)
    assert cell.ci == pytest.approx((71.1, 75.1))
    assert table.cell(("image", "SIAD-LLM"), "VisA").claimed is None  # empty reference cell


def test_medical_pixel_cells_are_not_applicable(runs, reference, toy) -> None:
    table = _table1(runs, reference, toy)
    for method in toy.methods.values():
        assert table.cell(("pixel", method), "HeadCT").status == NOT_APPLICABLE
        assert table.cell(("image", method), "HeadCT").status == OK


def test_average_is_mean_of_dataset_means(runs, reference, toy) -> None:
    table = _table1(runs, reference, toy)
    for method, display in toy.methods.items():
        image = [toy.values[(method, d)][0] for d in toy.datasets]
        pixel = [toy.values[(method, d)][1] for d in toy.datasets if d not in toy.medical]
        assert table.cell(("image", display), AVERAGE).reproduced == pytest.approx(100 * np.mean(image))
        assert table.cell(("pixel", display), AVERAGE).reproduced == pytest.approx(100 * np.mean(pixel))
    assert table.cell(("pixel", "CLIP"), AVERAGE).claimed == pytest.approx(50.7)


def test_average_ci_from_per_replicate_means(runs, reference, toy) -> None:
    table = _table1(runs, reference, toy)
    targets = [d for d in toy.datasets if d not in toy.medical]
    reps = np.array([_run_for(runs, "clip", d)["mean_replicates"]["pixel_auroc"] for d in targets])
    expected = np.quantile(reps.mean(axis=0), [0.025, 0.975]) * 100
    assert table.cell(("pixel", "CLIP"), AVERAGE).ci == pytest.approx(tuple(expected))
    # the average of independent replicates is narrower than any single dataset's spread
    low, high = table.cell(("pixel", "CLIP"), AVERAGE).ci
    assert high - low < 4.0


def test_average_ci_skips_nan_replicates(runs, reference, toy) -> None:
    run = _run_for(runs, "clip", "visa")
    run["mean_replicates"]["image_auroc"][0] = float("nan")
    table = _table1(runs, reference, toy)
    reps = np.array([_run_for(runs, "clip", d)["mean_replicates"]["image_auroc"] for d in toy.datasets])
    averages = reps.mean(axis=0)[1:]
    expected = np.quantile(averages, [0.025, 0.975]) * 100
    assert table.cell(("image", "CLIP"), AVERAGE).ci == pytest.approx(tuple(expected))


def test_unequal_replicate_counts_give_no_average_ci(runs, reference, toy) -> None:
    run = _run_for(runs, "clip", "visa")
    run["mean_replicates"]["image_auroc"] = run["mean_replicates"]["image_auroc"][:50]
    table = _table1(runs, reference, toy)
    cell = table.cell(("image", "CLIP"), AVERAGE)
    assert cell.ci is None and cell.reproduced is not None
    assert any("replicate counts differ" in n and "image/CLIP" in n for n in table.notes)


def test_duplicate_runs_for_a_cell_fail(runs, reference, toy, make_run) -> None:
    twin = make_run("clip", "visa", 0.5, 0.5)
    twin["_source"] = "results/demo/uzad/clip/default/mvtec/visa/again.json"
    _run_for(runs, "clip", "visa")["_source"] = "results/demo/uzad/clip/default/mvtec/visa/metrics.json"
    with pytest.raises(DataError, match="2 runs of one seed match.*visa/metrics.json.*again.json"):
        _table1(runs + [twin], reference, toy)


def test_other_variants_and_settings_are_not_duplicates(runs, reference, toy, make_run) -> None:
    extra = [make_run("clip", "visa", 0.1, 0.1, variant="wo_si"), make_run("clip", "visa", 0.1, 0.1, setting="pseudo")]
    table = _table1(runs + extra, reference, toy)
    assert table.cell(("image", "CLIP"), "VisA").reproduced == pytest.approx(49.2)


def test_mixed_demo_and_real_runs_fail(runs, reference, toy, make_run) -> None:
    runs.append(make_run("clip", "other", 0.5, 0.5, demo=False))
    with pytest.raises(DataError, match="demo and non-demo"):
        _table1(runs, reference, toy)


def test_missing_run_is_shown_and_noted(runs, reference, toy) -> None:
    runs.remove(_run_for(runs, "siad_llm", "visa"))
    table = _table1(runs, reference, toy)
    assert table.cell(("image", "SIAD-LLM"), "VisA").status == MISSING
    assert table.cell(("pixel", "SIAD-LLM"), AVERAGE).reproduced is None
    assert "missing run: setting=uzad method=siad_llm variant=default target=visa" in table.notes
    assert sum(n.startswith("missing run") for n in table.notes) == 1  # deduplicated across levels


def test_method_without_reference_row_has_no_claims(runs, reference, toy, make_run) -> None:
    runs += [make_run("newbase", d, 0.5, None if d in toy.medical else 0.5) for d in toy.datasets]
    methods = {**toy.methods, "newbase": "NewBase"}
    table = build_table1(runs, reference, methods=methods, datasets=toy.datasets, medical=toy.medical)
    cell = table.cell(("image", "NewBase"), "VisA")
    assert cell.claimed is None and cell.reproduced == pytest.approx(50.0)
    assert any("no image-level row for method 'NewBase'" in n for n in table.notes)


def test_run_warnings_become_notes(runs, reference, toy) -> None:
    _run_for(runs, "clip", "btad")["warnings"] = ["class 02 has 3 anomalies"]
    table = _table1(runs, reference, toy)
    assert any(n.endswith("class 02 has 3 anomalies") for n in table.notes)


def test_unknown_medical_name_fails(runs, reference, toy) -> None:
    with pytest.raises(ConfigError, match="brainmri"):
        build_table1(runs, reference, methods=toy.methods, datasets=toy.datasets, medical={"brainmri"})


def test_differing_confidence_levels_fail(runs, reference, toy) -> None:
    _run_for(runs, "clip", "visa")["bootstrap"]["confidence"] = 0.9
    with pytest.raises(DataError, match="confidence"):
        _table1(runs, reference, toy)


def test_setting_override_takes_the_row_from_another_setting(reference, toy, standard_runs) -> None:
    uzad = [r for r in standard_runs() if r["run"]["method"] == "siad_llm"]
    pseudo = [r for r in standard_runs(setting="pseudo") if r["run"]["method"] == "clip"]
    table = build_dataset_table(
        uzad + pseudo, reference, name="table2", title="T2", methods=toy.methods, datasets=toy.datasets,
        medical=toy.medical, setting="pseudo", setting_overrides={"siad_llm": "uzad"},
    )
    assert table.cell(("image", "SIAD-LLM"), "MVTecAD").reproduced == pytest.approx(50.0)
    assert table.cell(("pixel", "CLIP"), "VisA").reproduced == pytest.approx(51.3)
    assert not any(n.startswith("missing run") for n in table.notes)


def test_generic_table_with_metrics_in_columns(make_run) -> None:
    runs = [make_run("siad_llm", "mvtec", 0.70 + 0.01 * c, 0.80 + 0.01 * c, variant=f"case{c}") for c in (1, 2, 3)]
    rows = [RowSpec((str(c),), {"method": "siad_llm", "variant": f"case{c}", "target": "mvtec"},
                    claimed={"image": 68.2, "pixel": None}) for c in (1, 2, 3)]
    cols = [ColumnSpec("image", metric="image_auroc"), ColumnSpec("pixel", metric="pixel_auroc")]
    table = build_claim_table(runs, rows, cols, name="table5", title="T5", row_header=("case",), column_header="metric")
    assert table.columns == ["image", "pixel"]
    assert table.cell(("2",), "pixel").reproduced == pytest.approx(82.0)
    assert table.cell(("3",), "image").claimed == 68.2


def test_metric_must_be_set_exactly_once(make_run) -> None:
    runs = [make_run("m", "t", 0.5, 0.5)]
    both = [RowSpec(("r",), {"method": "m"}, metric="image_auroc")]
    with pytest.raises(ConfigError, match="exactly one"):
        build_claim_table(runs, both, [ColumnSpec("t", {"target": "t"}, metric="pixel_auroc")],
                          name="x", title="x", row_header=("r",))
    clash = [RowSpec(("r",), {"target": "u"}, metric="image_auroc")]
    with pytest.raises(ConfigError, match="select different"):
        build_claim_table(runs, clash, [ColumnSpec("t", {"target": "t"})], name="x", title="x", row_header=("r",))


# --- training seeds ------------------------------------------------------------------------------------------


def _seeded_runs(make_run: Any, values: dict[int, float], targets=("mvtec", "visa")) -> list[dict[str, Any]]:
    """SIAD-LLM runs of several training seeds (image AUROC ``values[seed]`` + 0.01 per target), no pixel level."""
    return [make_run("siad_llm", t, values[s] + 0.01 * k, None, run_seed=s, seed=100 * s + k)
            for s in values for k, t in enumerate(targets)]


def _seed_table(runs: list[dict[str, Any]]) -> Any:
    rows = [RowSpec(("SIAD-LLM",), {"method": "siad_llm"}, "image_auroc", {"MVTecAD": 60.0, AVERAGE: 60.0})]
    columns = [ColumnSpec("MVTecAD", {"target": "mvtec"}), ColumnSpec("VisA", {"target": "visa"})]
    return build_claim_table(runs, rows, columns, name="t", title="t", row_header=("method",), average=True)


def test_a_cell_of_several_seeds_shows_their_mean_and_spread(make_run) -> None:
    values = {0: 0.60, 42: 0.70, 111: 0.80}
    cell = _seed_table(_seeded_runs(make_run, values)).cell(("SIAD-LLM",), "MVTecAD")
    assert cell.seeds == 3
    assert cell.reproduced == pytest.approx(70.0)
    assert cell.std == pytest.approx(10.0)  # sample standard deviation of 60, 70, 80
    # the interval pools the seeds' replicates: it spans the seeds, wider than any single run's interval
    assert cell.ci[0] < 61.0 and cell.ci[1] > 79.0


def test_one_seed_keeps_the_run_interval_and_no_spread(make_run, runs, reference, toy) -> None:
    cell = _seed_table(_seeded_runs(make_run, {0: 0.6})).cell(("SIAD-LLM",), "MVTecAD")
    assert cell.seeds == 1 and cell.std is None
    assert cell.reproduced == pytest.approx(60.0) and cell.ci == pytest.approx((58.0, 62.0))


def test_the_average_is_taken_per_seed_then_over_seeds(make_run) -> None:
    table = _seed_table(_seeded_runs(make_run, {0: 0.60, 1: 0.64}))
    average = table.cell(("SIAD-LLM",), AVERAGE)
    per_seed = [np.mean([0.60, 0.61]), np.mean([0.64, 0.65])]
    assert average.reproduced == pytest.approx(100 * np.mean(per_seed))
    assert average.std == pytest.approx(100 * np.std(per_seed, ddof=1))
    assert average.seeds == 2 and average.ci[0] < 100 * per_seed[0] < 100 * per_seed[1] < average.ci[1]


def test_an_average_over_columns_run_with_different_seeds_is_not_computed(make_run) -> None:
    runs = [r for r in _seeded_runs(make_run, {0: 0.6, 1: 0.7})
            if not (r["run"]["seed"] == 1 and r["run"]["target"] == "visa")]
    table = _seed_table(runs)
    assert table.cell(("SIAD-LLM",), "VisA").seeds == 1 and table.cell(("SIAD-LLM",), "MVTecAD").seeds == 2
    assert table.cell(("SIAD-LLM",), AVERAGE).reproduced is None
    assert any("different training seeds" in note for note in table.notes)


def test_seed_interval_pools_the_replicates_and_ignores_nan() -> None:
    from siad.report.tables import seed_interval

    low, high = seed_interval([[0.1, 0.2, float("nan")], [0.8, 0.9, None]], 0.5)
    assert (low, high) == pytest.approx(tuple(np.quantile([0.1, 0.2, 0.8, 0.9], [0.25, 0.75])))
    assert seed_interval([[None], []], 0.95) is None


def test_a_table_lists_the_warnings_of_its_own_metrics_only(runs, reference, toy) -> None:
    run = _run_for(runs, "clip", "visa")
    run["mean"]["aupro_cflow_legacy"] = None
    run["warnings"] = ["class 'candle': aupro_cflow_legacy not defined (degenerate threshold grid)",
                       "class 'candle': image_auroc not defined (one label only)", "the map was constant"]
    notes = _table1(runs, reference, toy).notes
    assert not any("aupro_cflow_legacy" in n for n in notes)  # not a metric of Table 1
    assert any("image_auroc not defined" in n for n in notes) and any("the map was constant" in n for n in notes)
