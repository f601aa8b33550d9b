"""External methods: the contract of external.npz, checked on read, and its scoring like any run."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from siad.config import validate_config
from siad.engine.external import ExternalPredictionError, external_file, read_external, score_external_runs
from siad.engine.protocol import RunKey
from siad.errors import ConfigError
from siad.methods import get_method_class

ROOT = Path(__file__).resolve().parents[2]
PATHS = ["a/test/good/000.png", "a/test/bad/001.png"]


def write(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def good(**changes) -> dict:
    arrays = {"img_paths": np.array(PATHS[::-1]), "scores": np.array([0.9, 0.1], np.float32),
              "maps": np.zeros((2, 4, 4), np.float32)}
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


def test_a_file_keeping_the_contract_is_read_by_image_in_any_order(tmp_path):
    found = read_external(write(tmp_path / "e.npz", **good()), PATHS)
    assert set(found) == set(PATHS) and found["a/test/good/000.png"][0] == pytest.approx(0.1)
    flat = good(maps=None, maps_flat=np.arange(4 + 6, dtype=np.float32), map_shapes=np.array([[2, 2], [2, 3]]))
    found = read_external(write(tmp_path / "f.npz", **flat), PATHS)
    assert found["a/test/good/000.png"][1].shape == (2, 3)  # maps of different sizes


@pytest.mark.parametrize(("arrays", "message"), [
    (good(scores=None), r"no array\(s\) \['scores'\]"),
    (good(maps=None), r"no array\(s\) \['maps'\]"),
    (good(scores=np.array([0.5, np.nan], np.float32)), r"scores holds 1 non-finite"),
    (good(maps=np.full((2, 4, 4), np.inf, np.float32)), r"maps holds 32 non-finite"),
    (good(maps=np.zeros((2, 16), np.float32)), r"maps has shape \(2, 16\); expected \[N, H, W\]"),
    (good(scores=np.array([0.5], np.float32)), r"different lengths"),
    (good(img_paths=np.array([PATHS[0], PATHS[0]])), r"1 image\(s\) listed more than once: a/test/good/000.png"),
    (good(img_paths=np.array([PATHS[0], "elsewhere.png"])), r"not in the test split scored"),
    (good(scores=np.array(["high", "low"])), r"scores has dtype <U4, not numbers"),
    (good(maps=None, maps_flat=np.zeros(9, np.float32), map_shapes=np.array([[2, 2], [2, 3]])),
     r"maps_flat has 9 values but map_shapes describe 10"),
])
def test_a_file_breaking_the_contract_is_refused_naming_it_and_the_fix(tmp_path, arrays, message):
    path = write(tmp_path / "e.npz", **arrays)
    with pytest.raises(ExternalPredictionError, match=message) as err:
        read_external(path, PATHS)
    assert str(path) in str(err.value) and "fix the rule that writes it" in str(err.value)


def test_a_missing_or_unreadable_file_is_refused(tmp_path):
    with pytest.raises(ExternalPredictionError, match="missing; the external method's rule did not write it"):
        read_external(tmp_path / "none.npz", PATHS)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ExternalPredictionError, match="not a readable .npz"):
        read_external(tmp_path / "bad.npz", PATHS)


def external_config(root: Path) -> dict:
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    config["datasets"] = {"mvtec": {"classes": ["bottle", "carpet"], "root": str(root)}, "visa": {}}
    config["protocol"] = [{"source": "visa", "targets": ["mvtec"]}]
    config["report"]["user_tables"] = {}
    config["evaluation"].update(size=32, n_bootstrap=10)
    config["methods"]["oracle"] = {"display_name": "Oracle", "params": {"anything": [1, 2]},
                                   "external": {"rules": "rules/oracle.smk", "training_free": True}}
    return config


def test_an_external_method_is_registered_from_its_config_entry_with_free_params():
    config = validate_config(external_config(Path("/nowhere")))
    cls = get_method_class("oracle")
    assert cls.training_free and cls.resolve_params({"anything": 3})["anything"] == 3
    config["methods"]["oracle"]["external"]["training_free"] = False
    validate_config(config)
    assert not get_method_class("oracle").training_free


def test_an_external_entry_may_not_hide_a_method_of_the_suite():
    config = external_config(Path("/nowhere"))
    config["methods"]["clip"]["external"] = {"rules": "x.smk"}
    with pytest.raises(ConfigError, match="methods/clip/external: 'clip' is the name of a method class"):
        validate_config(config)


def test_scoring_an_oracles_file_gives_perfect_metrics_stamped_like_any_run(tmp_path, mvtec_standin):
    root, meta = mvtec_standin
    config = validate_config(external_config(root))
    meta_path = tmp_path / "meta.json"
    meta_path.write_text(json.dumps(meta))
    key = RunKey("uzad", "oracle", "default", "none", "mvtec", 0)
    records = [r for cls in ("bottle", "carpet") for r in meta["test"][cls]]
    masks = [np.asarray(Image.open(root / r["mask_path"]).convert("L"), np.float32) / 255 if r["mask_path"]
             else np.zeros((64, 64), np.float32) for r in records]
    out = external_file(key, tmp_path / "results")
    out.parent.mkdir(parents=True)
    np.savez(out, img_paths=np.array([r["img_path"] for r in records]),
             scores=np.array([r["anomaly"] for r in records], np.float32), maps=np.stack(masks))
    score_external_runs(config, [key], meta_paths={"mvtec": meta_path}, results_root=tmp_path / "results",
                        progress=False)
    metrics = json.loads((key.run_dir(tmp_path / "results") / "metrics.json").read_text())
    assert metrics["mean"]["image_auroc"] == pytest.approx(1.0) and metrics["mean"]["pixel_auroc"] > 0.99
    assert metrics["run"]["method"] == "oracle" and metrics["spec"]["digest"]
    assert (key.run_dir(tmp_path / "results") / "predictions.npz").is_file()


def test_an_external_methods_runs_depend_on_the_code_that_checks_and_scores_them():
    from siad.code_hash import modules_hash
    from siad.engine.spec import method_code_hash

    validate_config(external_config(Path("/nowhere")))
    cls = get_method_class("oracle")
    assert cls.__module__ == "siad.methods.external"
    assert method_code_hash(cls) == modules_hash(("siad.methods.external", "siad.engine.external"))
    assert method_code_hash(cls) != modules_hash(("siad.methods.external",))  # the scoring code counts too


def test_a_speed_row_may_not_time_an_external_method():
    config = external_config(Path("/nowhere"))
    config["speed"]["rows"]["Oracle"] = {"method": "oracle"}
    with pytest.raises(ConfigError, match=r"speed/rows/Oracle: 'oracle' is an external method"):
        validate_config(config)
