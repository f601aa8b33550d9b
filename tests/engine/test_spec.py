"""The resolved run specification: what changes which digest, and what does not."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from siad import code_hash
from siad.engine import spec as spec_module
from siad.engine.protocol import RunKey
from siad.engine.spec import resolve_run_spec, spec_differences
from siad.methods import get_method_class

ROOT = Path(__file__).resolve().parents[2]
KEY = RunKey("uzad", "anomalygpt", "default", "mvtec", "visa", 0)
FREE = RunKey("uzad", "clip", "default", "none", "visa", 0)


@pytest.fixture
def config():
    return yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())


@pytest.fixture
def metas(tmp_path):
    paths = {}
    for name in ("mvtec", "visa"):
        paths[name] = tmp_path / name / "meta.json"
        paths[name].parent.mkdir()
        paths[name].write_text(json.dumps({"test": {name: []}}))
    return paths


def digests(config, metas, key=KEY):
    spec = resolve_run_spec(config, key, metas)
    return spec.planned_digest, spec.training_digest, spec.digest


def test_resolved_params_overlay_class_defaults_config_and_variant(config, metas):
    spec = resolve_run_spec(config, RunKey("uzad", "siad_llm", "wo_si", "mvtec", "visa", 0), metas)
    defaults = get_method_class("siad_llm").defaults
    assert set(spec.params) == set(defaults) - spec_module.PLACEMENT_PARAMS
    assert spec.params["self_improvement"] is False  # the variant
    assert spec.params["backbone"] == "tiny-vit-h14-demo"  # the config
    untouched = next(k for k in defaults if k not in config["methods"]["siad_llm"]["params"]
                     and k not in spec_module.PLACEMENT_PARAMS and k != "self_improvement")
    assert spec.params[untouched] == json.loads(json.dumps(defaults[untouched]))  # the class default


@pytest.mark.parametrize(("mutate", "training_changes"), [
    (lambda c: c["methods"]["anomalygpt"]["params"].update(epochs=2), True),
    (lambda c: c.update(seed=7), True),
    (lambda c: c["datasets"]["mvtec"].update(classes=["bottle"]), True),
    (lambda c: c["training"].update(normal_images="all"), True),
    (lambda c: c["evaluation"].update(size=32), False),
    (lambda c: c["evaluation"].update(n_bootstrap=50), False),
    (lambda c: c["evaluation"].update(aupro_limit=0.05), False),
    (lambda c: c["evaluation"].update(batch_size=4), False),
    (lambda c: c["datasets"]["visa"].update(classes=["candle"]), False),
])
def test_each_input_changes_the_planned_digest_and_only_training_inputs_the_fingerprint(
        config, metas, mutate, training_changes):
    before = digests(config, metas)
    changed = copy.deepcopy(config)
    mutate(changed)
    after = digests(changed, metas)
    assert after[0] != before[0] and after[2] != before[2]
    assert (after[1] != before[1]) is training_changes


def test_changed_class_default_changes_the_digests(config, metas, monkeypatch):
    cls = get_method_class("anomalygpt")
    before = digests(config, metas)
    name = next(k for k, v in cls.defaults.items() if isinstance(v, float) and k not in
                config["methods"]["anomalygpt"]["params"])
    monkeypatch.setattr(cls, "defaults", {**cls.defaults, name: cls.defaults[name] * 2 + 1})
    after = digests(config, metas)
    assert all(a != b for a, b in zip(before, after, strict=True))


def test_unrelated_changes_leave_the_digests_alone(config, metas):
    before = digests(config, metas)
    changed = copy.deepcopy(config)
    changed["methods"]["anomalygpt"]["params"]["feature_cache"] = "elsewhere/cache"  # where, not what
    changed["methods"]["clip"]["params"]["backbone"] = "tiny-vit-b16plus-demo"  # another method
    changed["evaluation"]["num_workers"] = 2  # no effect on numbers
    changed["data"]["options"]["sdd_protocol"] = "anomalyclip_drive"  # a dataset this run does not read
    assert digests(changed, metas) == before


def test_dataset_content_changes_the_stamp_but_not_the_planned_digest(config, metas):
    before = resolve_run_spec(config, KEY, metas)
    metas["visa"].write_text(json.dumps({"test": {"visa": [{"img_path": "x.png"}]}}))
    after = resolve_run_spec(config, KEY, metas)
    assert after.digest != before.digest and after.planned_digest == before.planned_digest
    assert after.training_digest == before.training_digest  # the target is no training input
    record = {"img_path": "bottle/test/good/000.png", "mask_path": "", "anomaly": 0, "sha256": "a" * 64}
    metas["mvtec"].write_text(json.dumps({"test": {"bottle": [record]}, "train": {}}))
    source_test_changed = resolve_run_spec(config, KEY, metas)
    assert source_test_changed.digest != before.digest  # the stamp sees every index change
    assert source_test_changed.training_digest == before.training_digest  # uzad trains on the train split only
    metas["mvtec"].write_text(json.dumps({"test": {}, "train": {"bottle": [record]}}))
    assert resolve_run_spec(config, KEY, metas).training_digest != before.training_digest


def test_a_data_option_changes_exactly_the_runs_of_the_datasets_it_shapes(config, metas):
    medical = RunKey("uzad", "clip", "default", "none", "headct", 0)
    before = [resolve_run_spec(config, k, metas).planned_digest for k in (KEY, medical)]
    config["data"]["options"]["medical_protocol"] = "dra_75_25"
    after = [resolve_run_spec(config, k, metas).planned_digest for k in (KEY, medical)]
    assert after[0] == before[0] and after[1] != before[1]


def test_training_free_runs_have_no_training_part(config, metas):
    spec = resolve_run_spec(config, FREE, metas)
    assert spec.training is None and set(spec.datasets) == {"visa"}


def test_code_hash_follows_the_method_modules_and_their_data_files(monkeypatch):
    closure = code_hash.module_closure("baselines.anomalygpt")
    assert {"baselines.anomalygpt", "siad.methods.llm_detector", "siad.methods.base", "siad.llm.loader"} <= closure
    assert not any(m.startswith(("siad.report", "siad.engine", "siad.plan")) for m in closure)
    before = code_hash.modules_hash(("baselines.anomalygpt",))
    real = code_hash.module_fingerprint
    monkeypatch.setattr(code_hash, "module_fingerprint",
                        lambda name: real(name) + ("edited" if name == "siad.methods.llm_detector" else ""))
    assert code_hash.modules_hash(("baselines.anomalygpt",)) != before
    monkeypatch.setattr(code_hash, "module_fingerprint", real)
    monkeypatch.setattr(code_hash, "package_data_hash", lambda package, folders: package + "-edited")
    assert code_hash.modules_hash(("baselines.anomalygpt",)) != before  # the descriptions / tokenizer JSON


def test_comments_and_docstrings_do_not_count_but_statements_do(tmp_path, monkeypatch):
    module = tmp_path / "module.py"
    monkeypatch.setattr(code_hash, "module_file", lambda name: module)

    def fingerprint(text):
        module.write_text(text)
        code_hash.module_fingerprint.cache_clear()
        return code_hash.module_fingerprint("siad.fake")

    base = fingerprint('"""Doc."""\n\ndef f(x):\n    """What."""\n    return x + 1\n')
    assert fingerprint('"""Other doc."""\n# a comment\ndef f(x):\n    return x + 1  # same\n') == base
    assert fingerprint('"""Doc."""\n\ndef f(x):\n    return x + 2\n') != base
    code_hash.module_fingerprint.cache_clear()


def test_package_data_globs_are_all_hashed():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["siad"]
    folders = {("siad." + g.split("/")[0], g.split("/")[1]) for g in globs}
    hashed = {(package, folder) for package, names in code_hash.PACKAGE_DATA.items() for folder in names}
    assert folders == hashed


def test_every_module_the_run_loop_reaches_is_hashed_or_exempt_with_a_reason():
    from siad.engine.spec import EVALUATION_MODULES, TRAINING_MODULES, UNHASHED_MODULES, evaluation_code_modules

    method_side = ("siad.methods", "siad.backbones", "siad.prompts", "siad.llm")
    unaccounted = {m for m in evaluation_code_modules()
                   if m not in EVALUATION_MODULES + TRAINING_MODULES and not m.startswith(method_side)
                   and not any(m == u or m.startswith(u + ".") for u in UNHASHED_MODULES if u != "siad")
                   and m != "siad"}
    assert unaccounted == set()


def test_a_replaced_input_file_changes_the_specification(config, metas, tmp_path):
    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"one")
    config["methods"]["anomalygpt"]["params"]["checkpoint"] = str(checkpoint)
    before = resolve_run_spec(config, KEY, metas).training_digest
    checkpoint.write_bytes(b"other weights")
    assert resolve_run_spec(config, KEY, metas).training_digest != before


def test_spec_differences_names_the_changed_keys(config, metas):
    a = resolve_run_spec(config, KEY, metas).identity()
    config["seed"] = 3
    config["methods"]["anomalygpt"]["params"]["epochs"] = 5
    b = resolve_run_spec(config, KEY, metas).identity()
    assert spec_differences(a, b) == ["config_seed", "params.epochs"]
    c = resolve_run_spec(config, dataclasses.replace(KEY, seed=42), metas)
    assert spec_differences(b, c.identity()) == ["seed"]
    assert c.training_digest != resolve_run_spec(config, KEY, metas).training_digest


def test_the_device_is_specified_as_configured_so_every_host_plans_alike(config, metas):
    config["device"] = "auto"
    auto = resolve_run_spec(config, KEY, metas)
    assert auto.device == "auto"
    config["device"] = "cpu"
    assert resolve_run_spec(config, KEY, metas).planned_digest != auto.planned_digest
