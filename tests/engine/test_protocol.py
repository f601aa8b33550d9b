import pytest

from siad.engine.protocol import NO_SOURCE, RunKey, check_no_leakage, protocol_pairs, protocol_runs
from siad.errors import ConfigError, LeakageError

PAPER = [
    {"source": "mvtec", "targets": ["visa", "mpdd", "dtd", "sdd", "btad"]},
    {"source": "visa", "targets": ["mvtec"]},
    {"source": "br35h", "targets": ["brainmri", "headct"]},
    {"source": "brainmri", "targets": ["br35h"]},
]


def test_paper_protocol_has_one_run_per_target():
    runs = protocol_runs(PAPER, setting="uzad", method="m", variant="default", training_free=False, seeds=[0])
    assert [(r.source, r.target) for r in runs] == [
        ("mvtec", "visa"), ("mvtec", "mpdd"), ("mvtec", "dtd"), ("mvtec", "sdd"), ("mvtec", "btad"),
        ("visa", "mvtec"), ("br35h", "brainmri"), ("br35h", "headct"), ("brainmri", "br35h"),
    ]


def test_training_free_methods_have_no_source():
    runs = protocol_runs(PAPER, setting="uzad", method="clip", variant="default", training_free=True, seeds=[0])
    assert {r.source for r in runs} == {NO_SOURCE}
    assert len({r.target for r in runs}) == 9


def test_run_key_paths():
    key = RunKey("uzad", "clip", "default", "none", "visa", 0)
    assert key.run_dir("results/demo").as_posix() == "results/demo/uzad/clip/default/seed0/none/visa"
    assert key.model_dir("r").as_posix() == "r/uzad/clip/default/seed0/none"
    assert RunKey("zad", "m", "v", "mvtec", "visa", 42).run_dir("r").as_posix() == "r/zad/m/v/seed42/mvtec/visa"


def test_run_key_seed_must_be_an_integer():
    with pytest.raises(ConfigError, match="seed must be an integer"):
        RunKey("uzad", "clip", "default", "none", "visa", "0")
    with pytest.raises(ConfigError, match="seed must be an integer"):
        RunKey("uzad", "clip", "default", "none", "visa", True)


def test_target_equal_to_source_is_refused():
    with pytest.raises(ConfigError, match="both source and target"):
        protocol_pairs([{"source": "mvtec", "targets": ["visa", "mvtec"]}])


def test_target_under_two_sources_is_refused():
    with pytest.raises(ConfigError, match="more than one source"):
        protocol_pairs([{"source": "mvtec", "targets": ["visa"]}, {"source": "mpdd", "targets": ["visa"]}])


def test_unknown_setting():
    with pytest.raises(ConfigError, match="setting"):
        protocol_runs(PAPER, setting="fewshot", method="m", variant="default", training_free=True, seeds=[0])


def test_leakage_guard():
    check_no_leakage(["mvtec"], "visa")
    check_no_leakage([], "visa")
    with pytest.raises(LeakageError, match="trained on"):
        check_no_leakage(["mvtec", "visa"], "visa")
