import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from torchvision import transforms

from siad import metrics
from siad.engine import runs
from siad.engine.evaluate import (
    MethodOutputError,
    Predictions,
    _resize_map,
    evaluate_predictions,
    load_maps,
    predict_dataset,
    save_predictions,
)
from siad.engine.protocol import RunKey
from siad.errors import NumericalError
from siad.methods import METHODS, Method
from siad.methods.base import MethodOutput

ROOT = Path(__file__).resolve().parents[2]


class FakeDataset(torch.utils.data.Dataset):
    """Images 3×16×16; masks at a given evaluation size; labels alternate."""

    def __init__(self, n=5, mask_size=(8, 8)):
        self.n, self.mask_size = n, mask_size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        mask = np.zeros(self.mask_size, bool)
        mask[: i % 3, :] = True
        return {"image": torch.full((3, 16, 16), float(i)), "label": i % 2, "mask": torch.from_numpy(mask),
                "cls_name": "a" if i < 3 else "b", "img_path": f"img{i}.png"}


class Constant:
    def __init__(self, value=0.5):
        self.value = value

    def predict_batch(self, batch):
        b = batch["image"].shape[0]
        maps = batch["image"][:, 0] / 10.0  # 16×16, resized to the mask size by the engine
        return MethodOutput(torch.full((b,), self.value) + batch["image"][:, 0, 0, 0], maps)


class Talking(Constant):
    """Answers "Yes" for odd image values, "No" otherwise; P(Yes) = value / 10; optionally misbehaves."""

    def __init__(self, answers_from_batch=0, p_yes_nan=False, short=False):
        super().__init__()
        self.answers_from_batch, self.p_yes_nan, self.short = answers_from_batch, p_yes_nan, short
        self.calls = 0

    def predict_batch(self, batch):
        out = super().predict_batch(batch)
        values = batch["image"][:, 0, 0, 0]
        self.calls += 1
        if self.calls > self.answers_from_batch:
            out.answers = ["Yes, there is an anomaly." if int(v) % 2 else "No, there is no anomaly." for v in values]
            out.answers = out.answers[:-1] if self.short else out.answers
            out.p_yes = torch.full_like(values, float("nan")) if self.p_yes_nan else values / 10
        return out


def test_predict_dataset_resizes_maps_to_the_mask_size_and_keeps_order():
    preds = predict_dataset(Constant(), FakeDataset(), batch_size=2, progress=False)
    assert preds.img_paths == [f"img{i}.png" for i in range(5)]
    assert preds.labels.tolist() == [0, 1, 0, 1, 0]
    assert np.allclose(preds.scores, 0.5 + np.arange(5))
    assert all(m.shape == (8, 8) for m in preds.maps)
    assert np.allclose(preds.maps[3], 0.3)
    inputs = preds.select("b")
    assert inputs.labels.tolist() == [1, 0] and inputs.maps.shape == (2, 8, 8)


class ClassNormalising(Constant):
    """Min–max normalises each class over all its images (AA-CLIP's per-class post-processing); records calls."""

    per_class_postprocess = True

    def __init__(self, broken=False):
        super().__init__()
        self.calls, self.broken = [], broken

    def predict_batch(self, batch):
        self.dataset = batch.get("dataset")
        return super().predict_batch(batch)

    def postprocess_class(self, cls_name, scores, maps):
        self.calls.append((cls_name, tuple(maps.shape)))
        if self.broken:
            return scores[:1], maps
        norm = (scores - scores.min()) / (scores.max() - scores.min())
        return norm, (maps - maps.min()) / (maps.max() - maps.min())


def test_per_class_postprocessing_sees_every_image_of_a_class_before_the_resize():
    method = ClassNormalising()
    dataset = FakeDataset()
    dataset.name = "mvtec"
    preds = predict_dataset(method, dataset, batch_size=2, progress=False)  # class "a" spans two batches
    assert method.calls == [("a", (3, 16, 16)), ("b", (2, 16, 16))]  # raw maps at the method's size
    assert method.dataset == "mvtec"  # the dataset's registry name reaches the method with each batch
    assert preds.scores.tolist() == [0.0, 0.5, 1.0, 0.0, 1.0]
    assert all(m.shape == (8, 8) for m in preds.maps)
    assert np.allclose(preds.maps[0], 0.0) and np.allclose(preds.maps[2], 1.0) and np.allclose(preds.maps[4], 1.0)
    assert preds.img_paths == [f"img{i}.png" for i in range(5)]


def test_per_class_postprocessing_must_keep_one_output_per_image():
    with pytest.raises(MethodOutputError, match="postprocess_class"):
        predict_dataset(ClassNormalising(broken=True), FakeDataset(), batch_size=2, progress=False)


def test_nan_scores_are_an_error_naming_the_image():
    with pytest.raises(NumericalError, match="img0.png"):
        predict_dataset(Constant(float("nan")), FakeDataset(), batch_size=2, progress=False)


def test_predictions_round_trip_with_mixed_sizes(tmp_path):
    maps = [np.random.default_rng(0).random((4, 6)).astype(np.float32), np.ones((3, 3), np.float32)]
    preds = Predictions(["a", "b"], ["x.png", "y.png"], np.array([0, 1]), np.array([0.1, 0.9], np.float32),
                        maps, [m > 0.5 for m in maps])
    save_predictions(preds, tmp_path / "p.npz")
    arrays, loaded = load_maps(tmp_path / "p.npz")
    assert arrays["img_paths"].tolist() == ["x.png", "y.png"]
    assert [m.shape for m in loaded] == [(4, 6), (3, 3)]
    assert np.allclose(loaded[0], maps[0], atol=1e-3)  # stored as float16
    assert not list(tmp_path.glob("*.tmp*"))


def test_answers_and_p_yes_are_collected_in_order():
    preds = predict_dataset(Talking(), FakeDataset(), batch_size=2, progress=False)
    assert preds.answers == [("Yes" if i % 2 else "No") + (", there is an anomaly." if i % 2 else
                                                          ", there is no anomaly.") for i in range(5)]
    assert np.allclose(preds.p_yes, np.arange(5) / 10) and preds.p_yes.dtype == np.float32
    plain = predict_dataset(Constant(), FakeDataset(), batch_size=2, progress=False)
    assert plain.answers is None and plain.p_yes is None


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"answers_from_batch": 1}, "for every batch or for none"),
    ({"short": True}, "one per image"),
])
def test_malformed_llm_outputs_are_errors(kwargs, match):
    with pytest.raises(MethodOutputError, match=match):
        predict_dataset(Talking(**kwargs), FakeDataset(), batch_size=2, progress=False)


def test_nan_p_yes_is_an_error_naming_the_image():
    with pytest.raises(NumericalError, match="img0.png"):
        predict_dataset(Talking(p_yes_nan=True), FakeDataset(), batch_size=2, progress=False)


def test_llm_block_in_metrics_only_when_answers_exist():
    preds = predict_dataset(Talking(), FakeDataset(), batch_size=2, progress=False)
    # the fake labels are i % 2 and the answers say "Yes" exactly for odd i: every verdict is right
    preds.answers[3] = "I am not sure."  # class b (images 3, 4): one unparsed, counted wrong
    body = evaluate_predictions(preds, with_pixel=False, n_bootstrap=0, seed=0)
    llm = body["llm"]
    assert llm["classes"]["a"]["accuracy"] == 1.0 and llm["classes"]["b"]["accuracy"] == 0.5
    assert llm["classes"]["b"]["unparsed_rate"] == 0.5
    assert llm["mean"]["accuracy"] == pytest.approx(0.75)  # mean over classes, not over images (0.8)
    # P(Yes) = i / 10: class a ranks its anomaly (0.1) above one of two normals (0.0, 0.2), class b below
    assert llm["classes"]["a"]["p_yes_auroc"] == 0.5 and llm["classes"]["b"]["p_yes_auroc"] == 0.0
    assert llm["mean"]["p_yes_auroc"] == pytest.approx(0.25)
    assert "warnings" not in llm and "accuracy" in llm["metric_labels"]
    json.dumps(body["llm"])  # plain JSON types
    plain = predict_dataset(Constant(), FakeDataset(), batch_size=2, progress=False)
    assert "llm" not in evaluate_predictions(plain, with_pixel=False, n_bootstrap=0, seed=0)


def test_answers_and_p_yes_round_trip(tmp_path):
    preds = predict_dataset(Talking(), FakeDataset(), batch_size=2, progress=False)
    save_predictions(preds, tmp_path / "p.npz")
    arrays, _ = load_maps(tmp_path / "p.npz")
    assert arrays["answers"].tolist() == preds.answers
    assert np.allclose(arrays["p_yes"], np.arange(5) / 10)


# ------------------------------------------------------------------------------------------------
# resizing maps to the evaluation grid: bilinear, align_corners=False (half-pixel centres)
# ------------------------------------------------------------------------------------------------


def half_pixel_bilinear_1d(values, n_out):
    """1-D linear interpolation with half-pixel centres (PyTorch's align_corners=False), written out by hand:
    output pixel i samples the input at x = (i + 0.5) * n_in / n_out - 0.5, clamped to the first/last pixel."""
    values = np.asarray(values, dtype=np.float64)
    n_in = values.size
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    return values[lo] + (x - lo) * (values[hi] - values[lo])


def test_half_pixel_reference_is_the_documented_interpolation():
    # hand-computed: a ramp 0, 1, 2, 3 upsampled to 8 samples at x = -0.25 (clamped), 0.25, 0.75, ..., 3.25 (clamped)
    np.testing.assert_allclose(half_pixel_bilinear_1d([0, 1, 2, 3], 8), [0, .25, .75, 1.25, 1.75, 2.25, 2.75, 3])
    # align_corners=True would give i * 3/7 instead (0, 0.43, 0.86, ...): a different grid
    ramp = torch.arange(4.0)[None, None, None]
    expected = F.interpolate(ramp, size=(1, 8), mode="bilinear", align_corners=False)[0, 0, 0].numpy()
    np.testing.assert_allclose(half_pixel_bilinear_1d([0, 1, 2, 3], 8), expected, atol=1e-6)


@pytest.mark.parametrize(("shape", "size"), [((4, 6), (8, 9)), ((7, 5), (16, 16)), ((16, 16), (6, 10))])
def test_resize_map_is_bilinear_with_half_pixel_centres_on_a_ramp(shape, size):
    # a ramp in both directions: bilinear interpolation is separable and exact on it, so the expectation is the
    # sum of the two 1-D interpolations (independent of torch)
    rows, cols = np.arange(shape[0], dtype=np.float64), np.arange(shape[1], dtype=np.float64)
    ramp = 10.0 * rows[:, None] + cols[None, :]
    expected = 10.0 * half_pixel_bilinear_1d(rows, size[0])[:, None] + half_pixel_bilinear_1d(cols, size[1])[None, :]
    resized = _resize_map(torch.tensor(ramp, dtype=torch.float32), size)
    assert resized.shape == size and resized.dtype == np.float32
    np.testing.assert_allclose(resized, expected, rtol=0, atol=1e-4)
    torch_reference = F.interpolate(torch.tensor(ramp)[None, None], size=size, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(resized, torch_reference[0, 0].numpy(), rtol=0, atol=1e-4)


class Ramp(Constant):
    """Maps are a 4×4 ramp (value 10·row + col) plus the image value: not constant, so the resize grid matters."""

    def predict_batch(self, batch):
        out = super().predict_batch(batch)
        ramp = 10.0 * torch.arange(4.0)[:, None] + torch.arange(4.0)[None, :]
        out.maps = ramp[None] + batch["image"][:, 0, :4, :4]
        return out


def test_predict_dataset_resizes_non_constant_maps_bilinearly_with_half_pixel_centres():
    preds = predict_dataset(Ramp(), FakeDataset(mask_size=(8, 8)), batch_size=2, progress=False)
    line = half_pixel_bilinear_1d(np.arange(4.0), 8)
    for i, amap in enumerate(preds.maps):
        np.testing.assert_allclose(amap, 10.0 * line[:, None] + line[None, :] + i, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# the metrics written for a run equal the public metric functions and scikit-learn
# ------------------------------------------------------------------------------------------------


def sklearn_f1_max(y, s):
    precision, recall, _ = precision_recall_curve(y, s)
    denom = precision + recall
    return float(np.max(np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)))


SKLEARN = {"auroc": roc_auc_score, "ap": average_precision_score, "f1_max": sklearn_f1_max}


def signal_predictions(seed=0, n_per_class=16, size=(12, 12)):
    """Predictions of two classes with a real but imperfect signal (image and pixel AUROC well above 0.5)."""
    rng = np.random.default_rng(seed)
    cls_names, labels, scores, maps, masks = [], [], [], [], []
    for cls in ("a", "b"):
        for i in range(n_per_class):
            label = i % 2
            mask = np.zeros(size, bool)
            if label:
                r, c = rng.integers(0, size[0] - 4, 2)
                mask[r:r + rng.integers(2, 5), c:c + rng.integers(2, 5)] = True
            cls_names.append(cls)
            labels.append(label)
            scores.append(1.5 * label + rng.normal())
            maps.append((0.5 * rng.normal() + rng.normal(size=size) + 2.0 * mask).astype(np.float32))
            masks.append(mask)
    return Predictions(cls_names, [f"{c}{i}.png" for i, c in enumerate(cls_names)], np.array(labels),
                       np.array(scores, np.float32), maps, masks)


def expected_from_sklearn(preds, cls, limit=0.3):
    idx = preds.class_indices(cls)
    y, s = preds.labels[idx], preds.scores[idx]
    m = np.stack([preds.masks[i] for i in idx])
    a = np.stack([preds.maps[i] for i in idx])
    out = {f"image_{k}": f(y, s) for k, f in SKLEARN.items()}
    out |= {f"pixel_{k}": f(m.ravel(), a.ravel()) for k, f in SKLEARN.items()}
    out["aupro"] = metrics.aupro(m, a, limit=limit)  # scikit-learn has no AU-PRO: the public function
    out["aupro_cflow_legacy"] = metrics.aupro_cflow_legacy(m, a, limit=limit)
    return out


def test_evaluate_predictions_equals_sklearn_on_data_with_signal():
    preds = signal_predictions()
    body = evaluate_predictions(preds, with_pixel=True, n_bootstrap=0, seed=0)
    expected = {c: expected_from_sklearn(preds, c) for c in ("a", "b")}
    assert all(0.7 < expected[c][m] < 0.99 for c in expected for m in ("image_auroc", "pixel_auroc"))
    for metric in metrics.IMAGE_METRICS + metrics.PIXEL_METRICS:
        for cls in ("a", "b"):
            assert body["classes"][cls][metric] == pytest.approx(expected[cls][metric], abs=1e-9), (cls, metric)
        mean = (expected["a"][metric] + expected["b"][metric]) / 2
        assert body["mean"][metric] == pytest.approx(mean, abs=1e-9), metric


def test_evaluate_predictions_passes_the_aupro_limit_on():
    preds = signal_predictions(seed=1)
    body = evaluate_predictions(preds, with_pixel=True, n_bootstrap=0, seed=0, aupro_limit=0.05)
    for cls in ("a", "b"):
        at_005, at_03 = expected_from_sklearn(preds, cls, 0.05), expected_from_sklearn(preds, cls, 0.3)
        for metric in ("aupro", "aupro_cflow_legacy"):
            assert abs(at_005[metric] - at_03[metric]) > 0.01
            assert body["classes"][cls][metric] == pytest.approx(at_005[metric], abs=1e-12)


# ------------------------------------------------------------------------------------------------
# the whole engine path (evaluate_runs -> metrics.json) with a toy training-free method
# ------------------------------------------------------------------------------------------------


class Deviation(Method):
    """Toy training-free method: map = distance of each pixel's colour to the image's median colour (16×16, so
    the engine resizes it) plus seeded noise, score = the map's maximum."""

    training_free = True
    defaults = {"noise": 0.1}

    @property
    def transform(self):
        return transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])

    @property
    def input_size(self):
        return 16

    def predict(self, batch):
        images = batch["image"]
        median = images.flatten(2).median(dim=2).values[:, :, None, None]
        maps = (images - median).abs().mean(1)
        noise = torch.randn(maps.shape, generator=torch.Generator().manual_seed(len(batch["img_path"])))
        maps = maps + self.params["noise"] * noise  # an imperfect map: AU-PRO far from 1
        return maps.flatten(1).amax(1), maps


if "test_eval_deviation" not in METHODS:
    METHODS.add("test_eval_deviation", Deviation)


@pytest.fixture
def engine_config(mvtec_standin):
    root, _ = mvtec_standin
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    config["datasets"] = {"mvtec": {"classes": ["bottle", "carpet"], "root": str(root)}}
    config["evaluation"].update(size=32, n_bootstrap=0, aupro_limit=0.05)
    config["methods"]["test_eval_deviation"] = {"display_name": "Deviation", "params": {}}
    return config, root.parent / "meta.json"


def test_metrics_json_uses_the_configured_aupro_limit_and_matches_sklearn(engine_config, tmp_path, monkeypatch):
    config, meta_path = engine_config
    captured = []
    real_predict = runs.predict_dataset
    monkeypatch.setattr(runs, "predict_dataset", lambda *a, **k: captured.append(real_predict(*a, **k)) or captured[-1])
    key = RunKey("uzad", "test_eval_deviation", "default", "none", "mvtec", 0)
    runs.evaluate_runs(config, [key], meta_paths=[meta_path], metrics_paths=[tmp_path / "metrics.json"],
                       predictions_paths=[tmp_path / "predictions.npz"], progress=False)
    written = json.loads((tmp_path / "metrics.json").read_text())
    (preds,) = captured  # the float32 maps the metrics were computed from (predictions.npz holds float16)
    assert "0.05" in written["metric_labels"]["aupro"] and "0.05" in written["metric_labels"]["aupro_cflow_legacy"]
    for cls in ("bottle", "carpet"):
        idx = preds.class_indices(cls)
        masks, maps = np.stack([preds.masks[i] for i in idx]), np.stack([preds.maps[i] for i in idx])
        at_005, at_03 = metrics.aupro(masks, maps, limit=0.05), metrics.aupro(masks, maps, limit=0.3)
        assert abs(at_005 - at_03) > 0.01  # the data tell the limits apart
        assert written["classes"][cls]["aupro"] == pytest.approx(at_005, abs=1e-12)
        assert written["classes"][cls]["aupro_cflow_legacy"] == pytest.approx(
            metrics.aupro_cflow_legacy(masks, maps, limit=0.05), abs=1e-12)
        expected = expected_from_sklearn(preds, cls, 0.05)
        for metric in metrics.IMAGE_METRICS + ("pixel_auroc", "pixel_ap", "pixel_f1_max"):
            assert written["classes"][cls][metric] == pytest.approx(expected[metric], abs=1e-9), (cls, metric)
    # and the image scores and labels in predictions.npz are the ones scored
    arrays, _ = load_maps(tmp_path / "predictions.npz")
    assert np.array_equal(arrays["scores"], preds.scores) and np.array_equal(arrays["labels"], preds.labels)


def test_metrics_json_default_limit_differs(engine_config, tmp_path):
    # the same run with the default limit: the AU-PRO written changes with evaluation.aupro_limit
    config, meta_path = engine_config
    key = RunKey("uzad", "test_eval_deviation", "default", "none", "mvtec", 0)
    bodies = {}
    for limit in (0.05, 0.3):
        cfg = copy.deepcopy(config)
        cfg["evaluation"]["aupro_limit"] = limit
        out = tmp_path / str(limit)
        runs.evaluate_runs(cfg, [key], meta_paths=[meta_path], metrics_paths=[out / "metrics.json"],
                           predictions_paths=[out / "predictions.npz"], progress=False)
        bodies[limit] = json.loads((out / "metrics.json").read_text())
    for cls in ("bottle", "carpet"):
        assert abs(bodies[0.05]["classes"][cls]["aupro"] - bodies[0.3]["classes"][cls]["aupro"]) > 0.01
        assert bodies[0.05]["classes"][cls]["pixel_auroc"] == bodies[0.3]["classes"][cls]["pixel_auroc"]
