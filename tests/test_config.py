import copy
from pathlib import Path

import pytest
import yaml

from siad.config import dataset_root, method_params, method_variants
from siad.errors import ConfigError
from siad.plan import validate_workflow_config

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    return yaml.safe_load((ROOT / "config" / name).read_text())


@pytest.mark.parametrize("name", ["config.yaml", "demo.yaml"])
def test_shipped_profiles_are_valid(name):
    config = validate_workflow_config(load(name))
    assert set(config["datasets"]) == {"mvtec", "visa", "mpdd", "dtd", "sdd", "btad", "brainmri", "headct", "br35h"}


def test_demo_and_paper_differ_where_they_must():
    paper, demo = load("config.yaml"), load("demo.yaml")
    assert paper["demo"] is False and demo["demo"] is True
    assert demo["data"]["synthetic"] and not paper["data"]["synthetic"]
    assert paper["protocol"] == demo["protocol"]


def broken(mutate):
    config = copy.deepcopy(load("demo.yaml"))
    mutate(config)
    return config


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c.update(unknown_key=1), "unknown_key"),
        (lambda c: c["evaluation"].update(size="big"), "evaluation/size"),
        (lambda c: c["evaluation"].update(batch_size=0), "evaluation/batch_size"),
        (lambda c: c.pop("protocol"), "protocol"),
        (lambda c: c["data"]["options"].update(sdd_protocol="halves"), "data/options/sdd_protocol"),
        (lambda c: c["datasets"].update(kolektor2={}), "kolektor2"),
        (lambda c: c["datasets"]["mvtec"].update(classes=["bottle", "banana"]), "banana"),
        (lambda c: c["methods"].update(winclip={"display_name": "WinCLIP"}), "winclip"),
        (lambda c: c["methods"]["clip"]["params"].update(temprature=1), "temprature"),
        (lambda c: c["methods"]["clip"].update(variants={"hot": {"logit_scale": 1, "tmp": 2}}), "tmp"),
        (lambda c: c["protocol"].append({"source": "mvtec", "targets": ["mvtec"]}), "both source and target"),
        (lambda c: c["datasets"].pop("sdd"), "'sdd' is not listed"),
        (lambda c: c["report"]["table1"].update(methods=["winclip"]), "winclip"),
        (lambda c: c["report"].update(tables=["table1_uzad", "table9"]), "unknown paper table 'table9'"),
        (lambda c: c["speed"]["rows"].update(WinCLIP={"method": "winclip"}), "speed/rows/WinCLIP"),
        (lambda c: c["speed"].update(backbone="vit-z"), "vit-z"),
        (lambda c: c["methods"]["anovl"]["variants"].pop("prompt_cs"), "prompt_cs"),
    ],
)
def test_malformed_configs_name_the_problem(mutate, expected):
    with pytest.raises(ConfigError, match=expected):
        validate_workflow_config(broken(mutate))


def test_variants_and_params():
    config = broken(lambda c: c["methods"]["clip"].update(variants={"cold": {"logit_scale": 10.0}}))
    assert method_variants(config, "clip") == ["default", "cold"]
    assert method_params(config, "clip", "cold")["logit_scale"] == 10.0
    assert "logit_scale" not in method_params(config, "clip", "default")
    with pytest.raises(ConfigError, match="warm"):
        method_params(config, "clip", "warm")


def test_dataset_root_default_and_override():
    config = load("demo.yaml")
    assert dataset_root(config, "visa").parts[:2] == ("data", "demo")
    config["datasets"]["visa"]["root"] = "/elsewhere/VisA"
    assert dataset_root(config, "visa") == Path("/elsewhere/VisA")


LOWER_LAYERS = ("siad/config.py", "siad/engine", "siad/data", "siad/methods", "siad/backbones", "siad/prompts",
                "siad/llm", "siad/metrics.py", "siad/runtime.py", "baselines")


def test_lower_layers_never_import_the_report_or_the_plan():
    import ast

    root = Path(__file__).resolve().parents[1]
    files = [p for entry in LOWER_LAYERS for p in ((root / entry).rglob("*.py") if (root / entry).is_dir()
                                                    else [root / entry])]
    offenders = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(root)}: {n}" for n in names if n.startswith(("siad.report", "siad.plan"))]
    assert len(files) > 40 and offenders == []


def test_booleans_given_as_text_on_the_command_line_become_booleans():
    config = load("demo.yaml")
    config["data"] = {**config["data"], "verify_counts": "false", "download": "True"}
    checked = validate_workflow_config(config)
    assert checked["data"]["verify_counts"] is False and checked["data"]["download"] is True
    assert config["data"]["verify_counts"] == "false"  # the caller's mapping is not modified
    config["data"]["verify_counts"] = "maybe"
    with pytest.raises(ConfigError, match="data.verify_counts: 'maybe' is not a boolean"):
        validate_workflow_config(config)


def test_non_finite_numbers_are_refused_naming_the_key():
    config = load("demo.yaml")
    config["methods"]["anomalygpt"]["params"]["lr"] = float("nan")
    with pytest.raises(ConfigError, match="methods.anomalygpt.params.lr"):
        validate_workflow_config(config)


def test_numbers_given_as_text_become_numbers_where_the_schema_or_the_parameter_rule_wants_one():
    config = load("demo.yaml")
    config["evaluation"] = {**config["evaluation"], "n_bootstrap": "30", "aupro_limit": "0.05", "size": "32"}
    config["methods"]["anomalygpt"]["params"].update(lr="1e-3", epochs="2")
    checked = validate_workflow_config(config)
    assert checked["evaluation"]["n_bootstrap"] == 30 and checked["evaluation"]["aupro_limit"] == 0.05
    assert checked["evaluation"]["size"] == 32
    assert checked["methods"]["anomalygpt"]["params"]["lr"] == 0.001
    assert checked["methods"]["anomalygpt"]["params"]["epochs"] == 2
    assert checked["methods"]["anomalygpt"]["params"]["backbone"] == "tiny-vit-h14-demo"  # text stays text
    config["evaluation"]["n_bootstrap"] = "thirty"
    with pytest.raises(ConfigError, match="evaluation/n_bootstrap"):
        validate_workflow_config(config)


def test_method_switches_and_lists_from_the_command_line_are_read_by_their_rules():
    import yaml

    from siad.config import validate_config

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "demo.yaml").read_text())
    config["methods"]["anomalyclip"]["params"].update(compound_fp16="false", features=["4", "8"],
                                                      betas=["0.5", "0.9"], epochs="3")
    params = validate_config(config)["methods"]["anomalyclip"]["params"]
    assert params["compound_fp16"] is False and params["features"] == [4, 8]
    assert params["betas"] == [0.5, 0.9] and params["epochs"] == 3
    config["methods"]["anomalyclip"]["params"]["compound_fp16"] = "perhaps"
    with pytest.raises(ConfigError, match="methods/anomalyclip/params/compound_fp16: 'perhaps' is not accepted"):
        validate_config(config)


def test_a_speed_rows_own_params_are_checked_at_start_up():
    from siad.config import validate_config

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "demo.yaml").read_text())
    config["speed"]["rows"]["AnoVL-TFA fused"]["params"] = {"fused_dual_pas": True}
    with pytest.raises(ConfigError, match=r"speed/rows/AnoVL-TFA fused/params: .*unknown parameter\(s\) "
                                          r"\['fused_dual_pas'\]"):
        validate_config(config)
