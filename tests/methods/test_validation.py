"""Method parameters are validated by ``Method.resolve_params`` (``validate_params``), before anything is built.

The workflow's config validation calls ``resolve_params`` for every variant at start-up, so a bad value stops the
run there, with ``methods/<name>/params/<key>`` and the fix in the message, before any download or job.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

import siad.methods.backbone_method as backbone_method
import siad.methods.llm_detector as llm_detector
from siad.backbones import BACKBONES, get_backbone_spec
from siad.config import validate_config
from siad.errors import ConfigError
from siad.methods import METHODS, build_method, get_method_class

CONFIG = Path(__file__).resolve().parents[2] / "config"
# the smallest parameters each method resolves with (the paper LLM needs its files named)
VALID = {"clip": {}, "anovl": {}, "anomalygpt": {"llm": "tiny-random"}, "siad_llm": {"llm": "tiny-random"}}

BAD = [
    ("anomalygpt", "lr", float("nan"), "a finite number > 0"),
    ("anomalygpt", "lr", "1e-3", "write 1.0e-3"),
    ("anomalygpt", "epochs", -1, "an integer ≥ 1"),
    ("anomalygpt", "epochs", 2.5, "an integer ≥ 1"),
    ("anomalygpt", "batch_size", True, "an integer ≥ 1"),
    ("anomalygpt", "warmup", "cosine", "choose one of ['log', 'linear', 'constant']"),
    ("anomalygpt", "warmup_fraction", 1.5, "in [0, 1]"),
    ("anomalygpt", "betas", [0.9], "a list of 2 numbers"),
    ("anomalygpt", "llm", "gpt-4", "choose one of ['vicuna-pandagpt', 'tiny-random']"),
    ("anomalygpt", "backbone", "vit-huge-xl", "registered backbone name"),
    ("anomalygpt", "answer_regions", "regions", "choose one of ['patches', 'patches_union_box', 'components']"),
    ("anomalygpt", "map_size", 256, "224"),
    ("anomalygpt", "do_sample", "yes", "true or false"),
    ("siad_llm", "adapter_lambda", 1.5, "in [0, 1]"),
    ("siad_llm", "stage_case", 4, "choose one of [1, 2, 3]"),
    ("siad_llm", "train_response", "target", "choose one of ['generated', 'teacher']"),
    ("siad_llm", "pass_weights", [-1.0, 1.0], "each a finite number ≥ 0"),
    ("siad_llm", "pem_substitute", "mlp", "choose one of ['conv', 'none']"),
    ("siad_llm", "gamma", float("inf"), "a finite number ≥ 0"),
    ("anovl", "tta", "always", "choose one of"),
    ("anovl", "attention", "qk", "choose one of ['vv', 'v', 'qkv']"),
    ("anovl", "tta_lr", -1e-3, "a finite number > 0"),
    ("anovl", "start_block", 12, "12 blocks"),
    ("anovl", "backbone", "nope", "registered backbone name"),
    ("clip", "logit_scale", 0, "a finite number > 0"),
    ("clip", "ensemble", "nope", "registered prompt ensemble name"),
    ("clip", "image_size", -224, "an integer ≥ 16 or null"),
]


@pytest.fixture
def nothing_is_built(monkeypatch):
    """Loading a backbone or an LLM fails the test: validation must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the parameters were validated")

    monkeypatch.setattr(backbone_method, "load_openclip", refuse)
    monkeypatch.setattr(llm_detector, "load_llm", refuse)


@pytest.mark.parametrize(("method", "key", "value", "fix"), BAD)
def test_a_bad_value_fails_in_resolve_params_naming_the_key_and_the_fix(method, key, value, fix, nothing_is_built):
    cls = get_method_class(method)
    with pytest.raises(ConfigError) as err:
        cls.resolve_params({**VALID[method], key: value})
    assert f"methods/{method}/params/{key}: {value!r} is not accepted" in str(err.value)
    assert fix in str(err.value)
    with pytest.raises(ConfigError):  # and building the method stops there too, before any weights
        build_method(method, {**VALID[method], key: value})


def test_a_backbone_without_four_stage_taps_is_refused_for_the_llm_methods(nothing_is_built, monkeypatch):
    three = dataclasses.replace(get_backbone_spec("tiny-vit-h14-demo"), name="three-taps", taps=(1, 3, 5))
    monkeypatch.setitem(BACKBONES._items, "three-taps", three)
    with pytest.raises(ConfigError, match="methods/siad_llm/params/backbone: 'three-taps' .* 4 stage taps"):
        get_method_class("siad_llm").resolve_params({**VALID["siad_llm"], "backbone": "three-taps"})


@pytest.mark.parametrize("method", sorted(VALID))
def test_every_parameter_has_a_rule_and_the_defaults_pass(method):
    cls = get_method_class(method)
    assert set(cls.param_rules) == set(cls.defaults)
    assert cls.resolve_params(VALID[method])["backbone"] == cls.defaults["backbone"]


def test_the_error_names_the_registered_method_also_for_subclasses():
    cls = get_method_class("siad_llm")
    derived = type("SiadLlmWithGivenLlm", (cls,), {})  # e.g. the speed table's injected-LLM subclass
    assert cls.config_name() == derived.config_name() == "siad_llm"
    with pytest.raises(ConfigError, match="methods/siad_llm/params: unknown parameter"):
        derived.resolve_params({"lamda": 0.1})
    assert "siad_llm" in METHODS


@pytest.mark.parametrize("profile", ["config.yaml", "demo.yaml"])
def test_a_bad_variant_value_stops_the_config_validation_at_start_up(profile, nothing_is_built):
    config = yaml.safe_load((CONFIG / profile).read_text())
    validate_config(config)  # both profiles are valid as committed
    config["methods"]["siad_llm"]["variants"]["wo_si"]["epochs"] = 0
    # named at the variant that sets it
    with pytest.raises(ConfigError, match=r"methods/siad_llm/variants/wo_si/epochs: 0 is not accepted; use an integer "
                                          r"≥ 1 .*fix it under methods/siad_llm/variants/wo_si"):
        validate_config(config)
    config["methods"]["siad_llm"]["variants"]["wo_si"].update(epochs=1, lr="1e-3")  # PyYAML: text, read as 0.001
    assert validate_config(config)["methods"]["siad_llm"]["variants"]["wo_si"]["lr"] == 0.001
    config["methods"]["siad_llm"]["variants"]["wo_si"]["lr"] = "fast"
    with pytest.raises(ConfigError, match=r"methods/siad_llm/variants/wo_si/lr: 'fast' is not accepted"):
        validate_config(config)


def test_an_unknown_key_of_a_variant_is_named_at_the_variant():
    config = yaml.safe_load((CONFIG / "demo.yaml").read_text())
    config["methods"]["anovl"]["variants"]["tfa"]["tta_stepz"] = 3
    with pytest.raises(ConfigError, match=r"^methods/anovl/variants/tfa: unknown parameter\(s\) \['tta_stepz'\]; "
                                          r"accepted: \[.*'tta_steps'"):
        validate_config(config)
    config["methods"]["anovl"]["variants"]["tfa"].pop("tta_stepz")
    config["methods"]["anovl"]["params"]["tta_stepz"] = 3  # in the method's params: named there
    with pytest.raises(ConfigError, match=r"^methods/anovl/params: unknown parameter"):
        validate_config(config)


def test_a_baselines_module_that_registers_nothing_is_named(tmp_path, monkeypatch):
    import baselines
    from siad.errors import UnknownNameError
    from siad.methods import get_method_class

    module = Path(baselines.__path__[0]) / "zz_registers_nothing.py"
    module.write_text('"""A module that forgot @METHODS.register."""\n')
    try:
        with pytest.raises(UnknownNameError, match=r"baselines/zz_registers_nothing.py exists and was imported, but "
                                                   r"it registered no method named 'zz_registers_nothing'; decorate"):
            get_method_class("zz_registers_nothing")
    finally:
        module.unlink()
    with pytest.raises(UnknownNameError, match=r"unknown method 'zz_nowhere'; known: .*clip"):
        get_method_class("zz_nowhere")
    config = yaml.safe_load((CONFIG / "demo.yaml").read_text())
    config["methods"]["zz_nowhere"] = {"display_name": "Nowhere"}
    with pytest.raises(ConfigError, match=r"methods/zz_nowhere: unknown method 'zz_nowhere'; known: .*; fix the name, "
                                          r"add baselines/zz_nowhere.py registering it .*external method"):
        validate_config(config)
