"""fit_run / evaluate_run on synthetic stand-ins, with a toy training-based method."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torchvision import transforms

from siad.data.prepare import prepare_dataset
from siad.data.synthetic import write_standin
from siad.engine.protocol import RunKey
from siad.engine.runs import evaluate_run, fit_run, training_meta
from siad.errors import DataError, LeakageError
from siad.methods import METHODS, Method

ROOT = Path(__file__).resolve().parents[2]


class MeanImage(Method):
    """Toy training-based method: anomaly map = distance to the mean training image."""

    training_free = False
    defaults = {"size": 32}

    def __init__(self, params=None, *, device="cpu", seed=0):
        super().__init__(params, device=device, seed=seed)
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


if "test_mean_image" not in METHODS:
    METHODS.add("test_mean_image", MeanImage)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    config["data"]["root"] = str(tmp / "data")
    config["evaluation"].update(size=32, n_bootstrap=20)
    config["methods"]["test_mean_image"] = {"display_name": "Mean", "params": {"size": 32}}
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
    fit_run(config, "uzad", "test_mean_image", "default", "mvtec", meta_path=metas["mvtec"], model_dir=model_dir)
    info = json.loads((model_dir / "model.json").read_text())
    assert info["trained_on"] == ["mvtec"] and (model_dir / info["weights"]).is_file()

    key = RunKey("uzad", "test_mean_image", "default", "mvtec", "visa")
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
    fit_run(config, "uzad", "test_mean_image", "default", "visa", meta_path=metas["visa"], model_dir=model_dir)
    key = RunKey("uzad", "test_mean_image", "default", "visa", "visa")
    with pytest.raises(LeakageError, match="trained on"):
        evaluate_run(config, key, meta_path=metas["visa"], metrics_path=tmp / "x.json",
                     predictions_path=tmp / "x.npz", model_dir=model_dir, progress=False)
    assert not (tmp / "x.json").exists()


def test_medical_uzad_training_needs_normal_images(workspace):
    tmp, config, metas = workspace
    # all_test medical protocol: the train split is empty, so the default (train split) has nothing
    with pytest.raises(DataError, match="normal_images"):
        fit_run(config, "uzad", "test_mean_image", "default", "headct", meta_path=metas["headct"], model_dir=tmp / "h")
    config = copy.deepcopy(config)
    config["training"] = {"normal_images": "all"}
    fit_run(config, "uzad", "test_mean_image", "default", "headct", meta_path=metas["headct"], model_dir=tmp / "h")
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
    key = RunKey("uzad", "clip", "default", "none", "visa")
    outs = [
        evaluate_run(config, key, meta_path=metas["visa"], metrics_path=tmp / f"c{i}.json",
                     predictions_path=tmp / f"c{i}.npz", progress=False)
        for i in range(2)
    ]
    assert outs[0]["mean"] == outs[1]["mean"] and outs[0]["ci"] == outs[1]["ci"]
