"""The workflow plan: how the runs are cut into jobs (stable under the choice of tables), unused variants, and the
resources each job asks for."""

from pathlib import Path

import pytest
import yaml

from siad.errors import ConfigError
from siad.plan import build_plan, cut_runs, job_resources, part_labels, readers, validate_workflow_config

ROOT = Path(__file__).resolve().parents[1]


def profile(name: str = "demo.yaml") -> dict:
    return validate_workflow_config(yaml.safe_load((ROOT / "config" / name).read_text()))


def jobs(plan) -> dict[str, tuple]:
    return {g.rule_name: (g.keys, tuple(plan.group_params(g))) for g in plan.groups}


@pytest.fixture(scope="module")
def demo_plan():
    return build_plan(profile())


@pytest.mark.parametrize("chosen", [["table1_uzad"], ["anovl_table3_attention"], ["filo_table4_hqloc", "table_zad"],
                                    ["siad_table3b_encoder"]])
def test_choosing_fewer_tables_keeps_every_job_of_the_chosen_ones_as_it_was(demo_plan, chosen):
    config = profile()
    config["report"]["tables"] = chosen
    config["report"].pop("user_tables")
    for figure in ("figure1", "figure2", "figure4"):
        config["report"].pop(figure)
    fewer = jobs(build_plan(config))
    everything = jobs(demo_plan)
    assert fewer and all(everything[rule] == job for rule, job in fewer.items())  # same runs, same params
    assert len(fewer) < len(everything)


def test_every_job_a_table_needs_holds_only_runs_that_table_reads(demo_plan):
    found = readers(demo_plan.config)
    units = {name: {(k.setting, k.method, k.variant, k.source, k.seed) for k in keys} for name, keys in found.items()}
    for name in ("table1_uzad", "siad_table4_lambda", "anovl_table4_prompts", "filo_table4_hqloc", "table_zad"):
        needed = [g for g in demo_plan.groups if {k for k in g.keys} & set(found[name])]
        assert needed, name
        for group in needed:
            assert {(k.setting, k.method, k.variant, k.source, k.seed) for k in group.keys} <= units[name], (
                name, group.rule_name)


def test_a_variant_nothing_reads_is_named_and_not_run():
    config = profile()
    config["methods"]["clip"]["variants"] = {"cold": {"logit_scale": 10.0}}
    cut = cut_runs(validate_workflow_config(config))
    assert "methods/clip/variants/cold" in cut.unused_variants
    assert not [k for k in cut.runs if k.variant == "cold"]
    assert "methods/filo/variants/no_detector" not in cut.unused_variants  # a speed row times it
    config["report"]["user_tables"]["cold"] = {"rows": {"CLIP cold": "clip/cold"}}  # a user table runs it
    cut = cut_runs(validate_workflow_config(config))
    assert "methods/clip/variants/cold" not in cut.unused_variants and [k for k in cut.runs if k.variant == "cold"]


def test_part_labels_are_readable_and_distinct():
    labels = part_labels([("table1_uzad",), ("table1_uzad", "table_zad"), ("table1_uzad", "figure1"),
                          ("table1_uzad", "table_zad")])
    assert labels[("table1_uzad",)] == "table1_uzad"
    assert labels[("table1_uzad", "table_zad")] != labels[("table1_uzad", "figure1")]
    assert labels[("table1_uzad", "table_zad")].startswith("table1_uzad_and1_")  # same name: told apart by a hash


def test_resources_merge_default_rule_and_method_and_a_cpu_profile_asks_no_gpu():
    config = profile("config.yaml")
    config["resources"] = {"default": {"mem_mb": 8000}, "rules": {"run": {"runtime": 120, "gpu": 1}},
                           "methods": {"siad_llm": {"mem_mb": 64000, "gpu_model": "a100"}}}
    config = validate_workflow_config(config)
    assert job_resources(config, "run", "siad_llm") == {"threads": 1, "mem_mb": 64000, "runtime": 120, "gpu": 1,
                                                        "gpu_model": "a100"}
    assert job_resources(config, "run", "clip")["mem_mb"] == 8000
    assert job_resources(config, "table") == {"threads": 1, "mem_mb": 8000, "runtime": 60, "gpu": 0}
    config["resources"]["methods"]["clip"] = {"gpu": 0, "gpu_model": "a100"}
    assert "gpu_model" not in job_resources(config, "run", "clip")  # no --gpus=a100:0
    config["device"] = "cpu"
    assert job_resources(config, "run", "siad_llm")["gpu"] == 0 and "gpu_model" not in job_resources(
        config, "run", "siad_llm")


@pytest.mark.parametrize(("resources", "message"), [
    ({"methods": {"clipp": {"gpu": 1}}}, r"resources/methods/clipp: 'clipp' is not listed under `methods`"),
    ({"rules": {"evaluate": {"gpu": 1}}}, r"resources/rules/evaluate: no such rule kind"),
    ({"default": {"gpus": 1}}, r"resources/default"),
])
def test_bad_resources_stop_at_start_up_naming_the_key(resources, message):
    config = profile()
    config["resources"] = resources
    with pytest.raises(ConfigError, match=message):
        validate_workflow_config(config)


def test_the_shipped_profiles_size_their_gpu_jobs():
    paper = profile("config.yaml")
    for method in ("siad_llm", "anomalygpt"):
        assert job_resources(paper, "run", method)["gpu"] >= 1
    assert job_resources(paper, "table")["gpu"] == 0 and job_resources(paper, "prepare_dataset")["gpu"] == 0
    assert all(job_resources(profile(), "run", m)["gpu"] == 0 for m in profile()["methods"])  # the demo: CPU


def test_choosing_tables_changes_neither_the_figures_digest_nor_the_claims_checks_inputs_by_user_tables():
    from siad.report.paper import paper_table_runs

    config = profile()
    plan = build_plan(config)
    fewer = profile()
    fewer["report"]["tables"] = ["table1_uzad"]
    fewer["report"].pop("user_tables")
    assert build_plan(validate_workflow_config(fewer)).report_params() == plan.report_params()  # figures stay
    assert not [k for k in paper_table_runs(config) if k.method == "colour_distance"]  # the user table claims nothing
