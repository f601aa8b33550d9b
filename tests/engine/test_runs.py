"""fit_run / evaluate_run on synthetic stand-ins, with a toy training-based method."""

import copy
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import transforms

from siad.data.prepare import prepare_dataset
from siad.data.synthetic import write_standin
from siad.engine import runs
from siad.engine.evaluate import load_maps
from siad.engine.protocol import RunKey, training_meta
from siad.engine.runs import evaluate_run, evaluate_runs, fit_run
from siad.engine.spec import resolve_run_spec, results_digest
from siad.errors import ConfigError, DataError, LeakageError
from siad.methods import METHODS, Method
from siad.methods.base import MethodOutput

ROOT = Path(__file__).resolve().parents[2]


class MeanImage(Method):
    """Toy training-based method: anomaly map = distance to the mean training image."""

    training_free = False
    defaults = {"size": 32}

    def __init__(self, params=None, *, device="cpu", seed=0, weights_seed=None):
        super().__init__(params, device=device, seed=seed, weights_seed=weights_seed)
        self.mean = None
        self.seen_setting = None
        size = (self.input_size, self.input_size)
        self._transform = transforms.Compose([transforms.Resize(size), transforms.ToTensor()])

    @property
    def transform(self):
        return self._transform

    @property
    def input_size(self):
        return self.params["size"]

    def fit(self, train_data, setting):
        self.seen_setting = setting
        self.mean = torch.stack([train_data[i]["image"] for i in range(len(train_data))]).mean(0)

    def predict(self, batch):
        maps = (batch["image"] - self.mean).abs().mean(1)
        return maps.flatten(1).amax(1), maps

    def save(self, path):
        torch.save({"mean": self.mean}, path)

    def load(self, path):
        self.mean = torch.load(path, weights_only=True)["mean"]


class TalkingMeanImage(MeanImage):
    """MeanImage that also 'answers' like an LLM method: Yes when its score exceeds 0.3, P(Yes) = score."""

    def predict_batch(self, batch):
        scores, maps = self.predict(batch)
        answers = ["Yes, there is an anomaly in the image." if s > 0.3 else "No." for s in scores.tolist()]
        return MethodOutput(scores, maps, answers=answers, p_yes=scores.clamp(0, 1))


if "test_mean_image" not in METHODS:
    METHODS.add("test_mean_image", MeanImage)
if "test_talking_mean_image" not in METHODS:
    METHODS.add("test_talking_mean_image", TalkingMeanImage)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    config["data"]["root"] = str(tmp / "data")
    config["evaluation"].update(size=32, n_bootstrap=20)
    config["methods"]["test_mean_image"] = {"display_name": "Mean", "params": {"size": 32}}
    config["methods"]["test_talking_mean_image"] = {"display_name": "Talking", "params": {"size": 32}}
    metas = {}
    for name, classes in (("mvtec", ["bottle", "carpet"]), ("visa", ["candle"]), ("headct", None)):
        config["datasets"][name] = {"classes": classes} if classes else {}
        write_standin(name, tmp / "data" / name, seed=0, classes=classes, size=32)
        metas[name] = tmp / "meta" / name / "meta.json"
        prepare_dataset(name, tmp / "data" / name, metas[name], verify_counts=False)
    return tmp, config, metas


def test_fit_then_evaluate_writes_model_metrics_and_predictions(workspace):
    tmp, config, metas = workspace
    model_dir = tmp / "results" / "uzad" / "test_mean_image" / "default" / "mvtec"
    fit_run(config, RunKey("uzad", "test_mean_image", "default", "mvtec", "", 0),
            meta_path=metas["mvtec"], model_dir=model_dir)
    info = json.loads((model_dir / "model.json").read_text())
    assert info["trained_on"] == ["mvtec"] and (model_dir / info["weights"]).is_file()

    key = RunKey("uzad", "test_mean_image", "default", "mvtec", "visa", 0)
    body = evaluate_run(config, key, meta_path=metas["visa"], metrics_path=tmp / "m.json",
                        predictions_path=tmp / "p.npz", model_dir=model_dir, progress=False)
    written = json.loads((tmp / "m.json").read_text())
    assert written["run"]["trained_on"] == ["mvtec"] and written["run"]["demo"] is True
    assert set(written["classes"]) == {"candle"}
    assert "oracle" in written["metric_labels"]["image_f1_max"] and "0.3" in written["metric_labels"]["aupro"]
    assert 0.0 <= written["mean"]["image_auroc"] <= 1.0 and written["mean"]["pixel_auroc"] is not None
    assert body["classes"]["candle"]["n_normal"] + body["classes"]["candle"]["n_anomalous"] == 8
    with np.load(tmp / "p.npz") as preds:
        assert preds["map_shapes"].tolist() == [[32, 32]] * 8


def test_evaluating_on_the_training_dataset_is_refused(workspace):
    tmp, config, metas = workspace
    model_dir = tmp / "results" / "uzad" / "test_mean_image" / "default" / "visa"
    fit_run(config, RunKey("uzad", "test_mean_image", "default", "visa", "", 0),
            meta_path=metas["visa"], model_dir=model_dir)
    key = RunKey("uzad", "test_mean_image", "default", "visa", "visa", 0)
    with pytest.raises(LeakageError, match="trained on"):
        evaluate_run(config, key, meta_path=metas["visa"], metrics_path=tmp / "x.json",
                     predictions_path=tmp / "x.npz", model_dir=model_dir, progress=False)
    assert not (tmp / "x.json").exists()


def test_medical_uzad_training_needs_normal_images(workspace):
    tmp, config, metas = workspace
    # all_test medical protocol: the train split is empty, so the default (train split) has nothing
    with pytest.raises(DataError, match="normal_images"):
        fit_run(config, RunKey("uzad", "test_mean_image", "default", "headct", "", 0),
            meta_path=metas["headct"], model_dir=tmp / "h")
    config = copy.deepcopy(config)
    config["training"] = {"normal_images": "all"}
    fit_run(config, RunKey("uzad", "test_mean_image", "default", "headct", "", 0),
            meta_path=metas["headct"], model_dir=tmp / "h")
    assert (tmp / "h" / "model.json").is_file()


def test_training_meta_per_setting():
    def rec(path, anomaly):
        return {"img_path": path, "mask_path": "", "cls_name": "c", "specie_name": "", "anomaly": anomaly}

    meta = {"train": {"c": [rec("t0", 0)]}, "test": {"c": [rec("n0", 0), rec("a0", 1)]}}
    assert [r["img_path"] for r in training_meta(meta, "uzad")["train"]["c"]] == ["t0"]
    assert [r["img_path"] for r in training_meta(meta, "pseudo", "all")["train"]["c"]] == ["t0", "n0"]
    assert [r["img_path"] for r in training_meta(meta, "zad")["train"]["c"]] == ["n0", "a0"]


def test_evaluation_is_deterministic(workspace):
    tmp, config, metas = workspace
    key = RunKey("uzad", "clip", "default", "none", "visa", 0)
    outs = [
        evaluate_run(config, key, meta_path=metas["visa"], metrics_path=tmp / f"c{i}.json",
                     predictions_path=tmp / f"c{i}.npz", progress=False)
        for i in range(2)
    ]
    assert outs[0]["mean"] == outs[1]["mean"] and outs[0]["ci"] == outs[1]["ci"]


@pytest.fixture(scope="module")
def mvtec_model(workspace):
    tmp, config, metas = workspace
    model_dir = tmp / "results" / "uzad" / "test_mean_image" / "default" / "mvtec"
    fit_run(config, RunKey("uzad", "test_mean_image", "default", "mvtec", "", 0),
            meta_path=metas["mvtec"], model_dir=model_dir)
    return model_dir


def _paths(tmp, prefix, targets):
    return {"metrics_paths": [tmp / prefix / t / "metrics.json" for t in targets],
            "predictions_paths": [tmp / prefix / t / "predictions.npz" for t in targets]}


def test_grouped_evaluation_builds_once_and_matches_per_target_runs(workspace, mvtec_model, monkeypatch):
    tmp, config, metas = workspace
    targets = ["visa", "headct"]  # headct has no masks: a pixel-less target in the same job
    keys = [RunKey("uzad", "test_mean_image", "default", "mvtec", t, 0) for t in targets]
    built = []
    real_build = runs.build_method
    monkeypatch.setattr(runs, "build_method", lambda *a, **k: built.append(a) or real_build(*a, **k))
    bodies = evaluate_runs(config, keys, meta_paths=[metas[t] for t in targets], model_dir=mvtec_model,
                           progress=False, **_paths(tmp, "grouped", targets))
    assert len(built) == 1
    assert [b["run"]["target"] for b in bodies] == targets
    assert bodies[0]["mean"]["pixel_auroc"] is not None and "pixel_auroc" not in bodies[1]["mean"]
    for key in keys:
        single = evaluate_run(config, key, meta_path=metas[key.target], model_dir=mvtec_model, progress=False,
                              metrics_path=tmp / "single" / key.target / "m.json",
                              predictions_path=tmp / "single" / key.target / "p.npz")
        grouped = json.loads((tmp / "grouped" / key.target / "metrics.json").read_text())
        assert grouped == json.loads(json.dumps(single))
        (g_arrays, g_maps), (s_arrays, s_maps) = (load_maps(tmp / "grouped" / key.target / "predictions.npz"),
                                                  load_maps(tmp / "single" / key.target / "p.npz"))
        assert np.array_equal(g_arrays["scores"], s_arrays["scores"])
        assert all(np.array_equal(a, b) for a, b in zip(g_maps, s_maps, strict=True))


def test_grouped_evaluation_refuses_leakage_before_writing_anything(workspace, mvtec_model):
    tmp, config, metas = workspace
    targets = ["visa", "mvtec"]
    keys = [RunKey("uzad", "test_mean_image", "default", "mvtec", t, 0) for t in targets]
    with pytest.raises(LeakageError, match="'mvtec'"):
        evaluate_runs(config, keys, meta_paths=[metas[t] for t in targets], model_dir=mvtec_model,
                      progress=False, **_paths(tmp, "leaky", targets))
    assert not (tmp / "leaky").exists()


@pytest.mark.parametrize(("keys", "n_paths", "match"), [
    ([], 0, "no runs"),
    ([RunKey("uzad", "test_mean_image", "default", "mvtec", "visa", 0)], 2, "one of each per run"),
    ([RunKey("uzad", "test_mean_image", "default", "mvtec", "visa", 0),
      RunKey("uzad", "test_mean_image", "other", "mvtec", "headct", 0)], 2, "differ in setting, method, variant"),
    ([RunKey("uzad", "test_mean_image", "default", "mvtec", "visa", 0)] * 2, 2, "listed twice"),
])
def test_grouped_evaluation_needs_one_model_and_distinct_targets(workspace, keys, n_paths, match):
    tmp, config, _ = workspace
    paths = [tmp / f"g{i}" for i in range(n_paths)]
    with pytest.raises(ConfigError, match=match):
        evaluate_runs(config, keys, meta_paths=paths, metrics_paths=paths, predictions_paths=paths,
                      model_dir=tmp, progress=False)


def test_missing_model_is_a_data_error_naming_the_file(workspace):
    tmp, config, metas = workspace
    key = RunKey("uzad", "test_mean_image", "default", "mvtec", "visa", 0)
    with pytest.raises(DataError, match="model.json"):
        evaluate_run(config, key, meta_path=metas["visa"], metrics_path=tmp / "n.json",
                     predictions_path=tmp / "n.npz", model_dir=tmp / "nowhere", progress=False)


def test_llm_answers_reach_metrics_and_predictions(workspace, mvtec_model):
    tmp, config, metas = workspace
    key = RunKey("uzad", "test_talking_mean_image", "default", "mvtec", "visa", 0)
    body = evaluate_run(config, key, meta_path=metas["visa"], metrics_path=tmp / "t.json",
                        predictions_path=tmp / "t.npz", model_dir=mvtec_model, progress=False)
    arrays, _ = load_maps(tmp / "t.npz")
    verdict_yes = np.char.startswith(arrays["answers"].astype(str), "Yes")
    assert verdict_yes.tolist() == (arrays["scores"] > 0.3).tolist()
    expected = float(np.mean(verdict_yes == arrays["labels"].astype(bool)))  # one class (candle)
    written = json.loads((tmp / "t.json").read_text())
    assert written["llm"]["mean"]["accuracy"] == pytest.approx(expected) == body["llm"]["classes"]["candle"][
        "accuracy"]
    assert written["llm"]["mean"]["p_yes_auroc"] is not None and written["llm"]["mean"]["unparsed_rate"] == 0.0


def test_per_dataset_normal_images_override_the_default():
    from siad.config import training_normal_images

    config = {"training": {"normal_images": "train", "normal_images_per_dataset": {"br35h": "all"}}}
    assert training_normal_images(config, "br35h") == "all"
    assert training_normal_images(config, "mvtec") == "train"
    assert training_normal_images({}, "mvtec") == "train"


def test_run_group_trains_each_variant_once_then_reuses_the_current_model(workspace, monkeypatch):
    tmp, config, metas = workspace
    config = copy.deepcopy(config)
    config["methods"]["test_mean_image"]["variants"] = {"small": {"size": 16}}
    results = tmp / "group_results"
    keys = [RunKey("uzad", "test_mean_image", v, "mvtec", t, 0)
            for v in ("default", "small") for t in ("visa", "headct")]
    fits = []
    real_fit = runs.fit_run
    monkeypatch.setattr(runs, "fit_run", lambda *a, **k: fits.append(a[1].variant) or real_fit(*a, **k))
    runs.run_group(config, keys, meta_paths=metas, results_root=results, progress=False)
    assert fits == ["default", "small"]
    first = {k: (k.run_dir(results) / "metrics.json").read_text() for k in keys}
    assert json.loads(first[keys[0]])["run"]["trained_on"] == ["mvtec"]
    runs.run_group(config, keys, meta_paths=metas, results_root=results, progress=False)
    assert fits == ["default", "small"]  # reused: the fingerprints match
    assert {k: (k.run_dir(results) / "metrics.json").read_text() for k in keys} == first  # same numbers
    config["methods"]["test_mean_image"]["variants"]["small"] = {"size": 24}
    runs.run_group(config, keys, meta_paths=metas, results_root=results, progress=False)
    assert fits == ["default", "small", "small"]  # only the changed variant is retrained


class MeanImageWithThreshold(MeanImage):
    """MeanImage with a test-time-only parameter (``clip_at``: the map is clipped at it)."""

    defaults = {"size": 32, "clip_at": 10.0}
    evaluation_params = frozenset({"clip_at"})

    def predict(self, batch):
        scores, maps = super().predict(batch)
        return scores, maps.clamp(max=self.params["clip_at"])


if "test_mean_image_eval" not in METHODS:
    METHODS.add("test_mean_image_eval", MeanImageWithThreshold)


def test_variants_differing_only_in_evaluation_parameters_share_one_training(workspace, monkeypatch):
    tmp, config, metas = workspace
    config = copy.deepcopy(config)
    config["methods"]["test_mean_image_eval"] = {
        "display_name": "MeanEval", "params": {"size": 32},
        "variants": {"clipped": {"clip_at": 0.1}, "small": {"size": 16}}}
    keys = [RunKey("uzad", "test_mean_image_eval", v, "mvtec", "visa", 0) for v in ("default", "clipped", "small")]
    fits = []
    real_fit = runs.fit_run
    monkeypatch.setattr(runs, "fit_run", lambda *a, **k: fits.append(a[1].variant) or real_fit(*a, **k))
    results = tmp / "shared"
    runs.run_group(config, keys, meta_paths=metas, results_root=results, progress=False)
    assert fits == ["default", "small"]  # "clipped" trains exactly as "default": copied
    default_dir, clipped_dir = keys[0].model_dir(results), keys[1].model_dir(results)
    assert (clipped_dir / runs.WEIGHTS).read_bytes() == (default_dir / runs.WEIGHTS).read_bytes()
    record = json.loads((clipped_dir / runs.MODEL_INFO).read_text())
    assert record["variant"] == "clipped" and record["shared_from"] == str(default_dir)
    specs = [resolve_run_spec(config, k, metas) for k in keys]
    assert record["fingerprint"] == specs[1].training_digest != specs[0].training_digest
    assert specs[0].shared_training_digest == specs[1].shared_training_digest != specs[2].shared_training_digest
    numbers = [json.loads((k.run_dir(results) / "metrics.json").read_text())["mean"] for k in keys[:2]]
    assert numbers[0] != numbers[1]  # evaluated with their own parameter
    runs.run_group(config, keys, meta_paths=metas, results_root=results, progress=False)
    assert fits == ["default", "small"]  # every model current: nothing trained again


def test_run_group_refuses_runs_of_several_methods_or_seeds(workspace):
    tmp, config, metas = workspace
    keys = [RunKey("uzad", "test_mean_image", "default", "mvtec", "visa", 0),
            RunKey("uzad", "test_mean_image", "default", "mvtec", "headct", 1)]
    with pytest.raises(ConfigError, match="one job covers one"):
        runs.run_group(config, keys, meta_paths=metas, results_root=tmp / "x", progress=False)


def test_a_group_of_every_source_trains_each_source_once(workspace, monkeypatch):
    tmp, config, metas = workspace
    keys = [RunKey("uzad", "test_mean_image", "default", "mvtec", "visa", 0),
            RunKey("uzad", "test_mean_image", "default", "visa", "headct", 0)]
    assert [g.rule_name for g in runs.group_runs(keys)] == ["run_test_mean_image_seed0_mvtec",
                                                              "run_test_mean_image_seed0_visa"]
    (group,) = runs.group_runs(keys, "method")
    assert (group.rule_name, group.log_name) == ("run_test_mean_image_seed0", "test_mean_image/seed0/all")
    assert group.datasets == ["mvtec", "visa", "headct"] and group.keys == tuple(keys)
    with pytest.raises(ConfigError, match="job_per"):
        runs.group_runs(keys, "target")
    fits = []
    real_fit = runs.fit_run
    monkeypatch.setattr(runs, "fit_run", lambda *a, **k: fits.append(a[1].source) or real_fit(*a, **k))
    runs.run_group(config, keys, meta_paths=metas, results_root=tmp / "all", progress=False)
    assert fits == ["mvtec", "visa"]
    for key in keys:
        written = json.loads((key.run_dir(tmp / "all") / "metrics.json").read_text())
        assert written["run"]["trained_on"] == [key.source]


class ReferenceMeanImage(MeanImage):
    """Toy few-shot method: needs 2 normal train images per target class."""

    references_needed = 2

    def set_references(self, references):
        self.references = {c: tuple(images.shape) for c, images in references.items()}


def test_few_shot_methods_receive_the_first_normal_train_images_of_each_target_class(workspace, mvtec_model):
    tmp, config, metas = workspace
    METHODS.add("test_reference_mean", ReferenceMeanImage)
    config = copy.deepcopy(config)
    config["methods"]["test_reference_mean"] = {"display_name": "Ref", "params": {"size": 32}}
    key = RunKey("uzad", "test_reference_mean", "default", "mvtec", "visa", 0)
    body = evaluate_run(config, key, meta_path=metas["visa"], model_dir=mvtec_model, progress=False,
                        metrics_path=tmp / "ref" / "m.json", predictions_path=tmp / "ref" / "p.npz")
    refs = body["run"]["references"]
    train = sorted(r["img_path"] for r in json.loads(metas["visa"].read_text())["train"]["candle"] if not r["anomaly"])
    assert refs == train[:2]
    ReferenceMeanImage.references_needed = 50
    try:
        with pytest.raises(DataError, match="fewer than 50 normal train images"):
            evaluate_run(config, key, meta_path=metas["visa"], model_dir=mvtec_model, progress=False,
                         metrics_path=tmp / "ref2" / "m.json", predictions_path=tmp / "ref2" / "p.npz")
    finally:
        ReferenceMeanImage.references_needed = 2


# --- trained models: atomic, verified, fingerprinted on the resolved specification --------------------------


def _group(config, results, variants=("default",), targets=("visa",)):
    keys = [RunKey("uzad", "test_mean_image", v, "mvtec", t, 0) for v in variants for t in targets]
    return keys, results / "uzad" / "test_mean_image" / "default" / "seed0" / "mvtec"


def _count_fits(monkeypatch):
    fits = []
    real_fit = runs.fit_run
    monkeypatch.setattr(runs, "fit_run", lambda *a, **k: fits.append(a[1].variant) or real_fit(*a, **k))
    return fits


def test_model_record_holds_the_weights_sha256_and_the_training_fingerprint(workspace):
    tmp, config, metas = workspace
    model_dir = tmp / "atomic"
    fit_run(config, RunKey("uzad", "test_mean_image", "default", "mvtec", "", 0),
            meta_path=metas["mvtec"], model_dir=model_dir)
    info = json.loads((model_dir / "model.json").read_text())
    assert info["weights_sha256"] == hashlib.sha256((model_dir / "model.pt").read_bytes()).hexdigest()
    spec = resolve_run_spec(config, RunKey("uzad", "test_mean_image", "default", "mvtec", "visa", 0), metas)
    assert info["fingerprint"] == spec.training_digest
    assert [p.name for p in model_dir.iterdir() if p.name not in ("model.pt", "model.json")] == []  # no temp file


def test_a_crash_while_saving_leaves_no_reusable_model(workspace, monkeypatch):
    tmp, config, metas = workspace
    keys, model_dir = _group(config, tmp / "crash")
    runs.run_group(config, keys, meta_paths=metas, results_root=tmp / "crash", progress=False)
    spec = resolve_run_spec(config, keys[0], metas)
    assert runs.trained_model_is_current(spec, model_dir)

    def crash(self, path):
        Path(path).write_bytes(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(MeanImage, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        fit_run(config, RunKey("uzad", "test_mean_image", "default", "mvtec", "", 0),
            meta_path=metas["mvtec"], model_dir=model_dir)
    assert not (model_dir / "model.json").exists()  # the old record is gone: its weights may no longer pair with it
    assert not runs.trained_model_is_current(spec, model_dir)
    assert sorted(p.name for p in model_dir.iterdir() if p.is_file()) == ["model.pt"]  # old weights, no temp file


def test_corrupt_weights_are_trained_again_with_a_warning(workspace, monkeypatch, caplog):
    tmp, config, metas = workspace
    keys, model_dir = _group(config, tmp / "corrupt")
    fits = _count_fits(monkeypatch)
    runs.run_group(config, keys, meta_paths=metas, results_root=tmp / "corrupt", progress=False)
    metrics = (keys[0].run_dir(tmp / "corrupt") / "metrics.json").read_text()
    weights = model_dir / "model.pt"
    weights.write_bytes(weights.read_bytes()[:20])  # truncated
    with caplog.at_level("WARNING", logger="siad"):
        runs.run_group(config, keys, meta_paths=metas, results_root=tmp / "corrupt", progress=False)
    assert fits == ["default", "default"]
    assert any("SHA-256" in r.getMessage() and "training again" in r.getMessage() for r in caplog.records)
    assert (keys[0].run_dir(tmp / "corrupt") / "metrics.json").read_text() == metrics  # same numbers as before


def test_loading_weights_that_do_not_match_the_record_is_refused(workspace, mvtec_model, tmp_path):
    tmp, config, metas = workspace
    copy_dir = tmp_path / "model"
    copy_dir.mkdir()
    for name in ("model.json", "model.pt"):
        (copy_dir / name).write_bytes((mvtec_model / name).read_bytes())
    torch.save({"mean": torch.zeros(3, 32, 32)}, copy_dir / "model.pt")  # another model's weights
    key = RunKey("uzad", "test_mean_image", "default", "mvtec", "visa", 0)
    with pytest.raises(DataError, match="SHA-256") as err:
        evaluate_run(config, key, meta_path=metas["visa"], model_dir=copy_dir, progress=False,
                     metrics_path=tmp_path / "m.json", predictions_path=tmp_path / "p.npz")
    assert "model.pt" in str(err.value) and "weights_only" not in str(err.value)
    assert not (tmp_path / "m.json").exists()


def test_a_changed_default_in_code_retrains(workspace, monkeypatch):
    tmp, config, metas = workspace
    keys, _ = _group(config, tmp / "default_change")
    fits = _count_fits(monkeypatch)
    runs.run_group(config, keys, meta_paths=metas, results_root=tmp / "default_change", progress=False)
    monkeypatch.setattr(MeanImage, "defaults", {**MeanImage.defaults, "unused_knob": 1})
    runs.run_group(config, keys, meta_paths=metas, results_root=tmp / "default_change", progress=False)
    assert fits == ["default", "default"]


def test_metrics_are_stamped_with_the_run_specification(workspace):
    tmp, config, metas = workspace
    keys, _ = _group(config, tmp / "stamp", targets=("visa", "headct"))
    runs.run_group(config, keys, meta_paths=metas, results_root=tmp / "stamp", progress=False)
    for key in keys:
        written = json.loads((key.run_dir(tmp / "stamp") / "metrics.json").read_text())
        stamp = written["spec"]
        expected = resolve_run_spec(config, key, metas)
        assert stamp["digest"] == expected.digest and stamp["spec"] == json.loads(json.dumps(expected.identity()))
        assert stamp["results_digest"] == results_digest(written)  # the numbers as written, NaN and all


def test_a_job_refuses_a_plan_made_under_another_configuration(workspace):
    tmp, config, metas = workspace
    keys, _ = _group(config, tmp / "planned")
    planned = {keys[0]: resolve_run_spec(config, keys[0], metas).planned_digest}
    changed = copy.deepcopy(config)
    changed["seed"] = 11
    with pytest.raises(ConfigError, match="changed after the workflow planned it"):
        runs.run_group(changed, keys, meta_paths=metas, results_root=tmp / "planned", progress=False,
                       expected_digests=planned)
    assert not (tmp / "planned").exists()


# --- the leakage guard checks content, not names -------------------------------------------------------------


def _visa_with(tmp, workspace, name, replace_with):
    """A copy of the VisA stand-in whose first normal test image is replaced by ``replace_with(bytes)``."""
    ws_tmp, _, _ = workspace
    root = tmp / name / "visa"
    shutil.copytree(ws_tmp / "data" / "visa", root)
    meta = json.loads((ws_tmp / "meta" / "visa" / "meta.json").read_text())
    victim = next(r["img_path"] for r in meta["test"]["candle"] if not r["anomaly"])
    (root / victim).write_bytes(replace_with())
    meta_path = tmp / name / "meta.json"
    prepare_dataset("visa", root, meta_path, verify_counts=False)
    config = copy.deepcopy(workspace[1])
    config["datasets"]["visa"]["root"] = str(root)
    return config, meta_path, victim


def test_a_training_image_among_the_target_test_images_is_refused(workspace, mvtec_model, tmp_path):
    tmp, _, metas = workspace
    train = json.loads(metas["mvtec"].read_text())["train"]["bottle"][0]["img_path"]
    config, meta_path, victim = _visa_with(tmp_path, workspace, "leak",
                                           lambda: (tmp / "data" / "mvtec" / train).read_bytes())
    key = RunKey("uzad", "test_mean_image", "default", "mvtec", "visa", 0)
    with pytest.raises(LeakageError, match="byte-identical") as err:
        evaluate_run(config, key, meta_path=meta_path, model_dir=mvtec_model, progress=False,
                     metrics_path=tmp_path / "m.json", predictions_path=tmp_path / "p.npz")
    assert f"{train} = {victim}" in str(err.value) and not (tmp_path / "m.json").exists()


def test_perceptual_near_duplicates_are_reported_not_refused(workspace, mvtec_model, tmp_path):
    tmp, _, metas = workspace
    train = json.loads(metas["mvtec"].read_text())["train"]["bottle"][0]["img_path"]
    image = np.array(Image.open(tmp / "data" / "mvtec" / train).convert("RGB"))
    image[0, 0] = 255 - image[0, 0]  # one pixel: other bytes, same picture

    def near_copy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    config, meta_path, victim = _visa_with(tmp_path, workspace, "near", near_copy)
    key = RunKey("uzad", "test_mean_image", "default", "mvtec", "visa", 0)
    body = evaluate_run(config, key, meta_path=meta_path, model_dir=mvtec_model, progress=False,
                        metrics_path=tmp_path / "m.json", predictions_path=tmp_path / "p.npz")
    assert [train, victim] in [pair[:2] for pair in body["near_duplicates"]]
    assert json.loads((tmp_path / "m.json").read_text())["near_duplicates"] == body["near_duplicates"]


# --- settings and training seeds ---------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["uzad", "pseudo", "zad"])
def test_every_setting_trains_on_its_own_set_and_records_it(workspace, setting):
    tmp, config, metas = workspace
    model_dir = tmp / "settings" / setting
    key = RunKey(setting, "test_mean_image", "default", "mvtec", "", 0)
    method = fit_run(config, key, meta_path=metas["mvtec"], model_dir=model_dir)
    assert method.seen_setting == setting
    info = json.loads((model_dir / "model.json").read_text())
    expected = {"uzad": (12, 0), "pseudo": (12, 7), "zad": (16, 8)}[setting]  # 0.55 of 12 rounds to 7
    assert (info["training_set"]["images"], info["training_set"]["anomalous"]) == expected
    # the content leakage guard knows every image the model saw: the source's test split under zad
    test_hashes = {r["sha256"] for rs in json.loads(metas["mvtec"].read_text())["test"].values() for r in rs}
    seen = {r["sha256"] for r in info["training_images"]}
    assert bool(seen & test_hashes) == (setting == "zad")


def test_the_same_seed_gives_identical_numbers_and_another_seed_differs(workspace):
    tmp, config, metas = workspace

    def run(seed: int, folder: str) -> dict:
        key = RunKey("pseudo", "test_mean_image", "default", "mvtec", "visa", seed)
        runs.run_group(config, [key], meta_paths=metas, results_root=tmp / folder, progress=False)
        body = json.loads((key.run_dir(tmp / folder) / "metrics.json").read_text())
        assert body["run"]["seed"] == seed and f"seed{seed}" in str(key.run_dir(tmp / folder))
        return body

    first, again, other = run(0, "seeds_a"), run(0, "seeds_b"), run(1, "seeds_a")
    assert first["mean"] == again["mean"] and first["classes"] == again["classes"]
    assert first["mean"] != other["mean"]  # another training seed: other pseudo-anomalies, another model
    assert other["spec"]["spec"]["seed"] == 1 and other["spec"]["spec"]["config_seed"] == first["spec"]["spec"][
        "config_seed"]


def test_one_job_trains_and_evaluates_every_setting_of_its_method_seed_and_source(workspace, monkeypatch):
    tmp, config, metas = workspace
    keys = [RunKey(s, "test_mean_image", "default", "mvtec", "visa", 0) for s in ("uzad", "pseudo", "zad")]
    fits = _count_fits(monkeypatch)
    runs.run_group(config, keys, meta_paths=metas, results_root=tmp / "all_settings", progress=False)
    assert fits == ["default"] * 3  # one model per setting, in one process
    for key in keys:
        body = json.loads((key.run_dir(tmp / "all_settings") / "metrics.json").read_text())
        assert body["run"]["setting"] == key.setting
        assert (key.model_dir(tmp / "all_settings") / "model.json").is_file()
    with pytest.raises(ConfigError, match=r"one job covers one \(method, seed\)"):
        runs.run_group(config, [keys[0], RunKey("uzad", "test_mean_image", "default", "mvtec", "visa", 1)],
                       meta_paths=metas, results_root=tmp / "all_settings", progress=False)
