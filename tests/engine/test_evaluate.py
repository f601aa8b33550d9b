import json

import numpy as np
import pytest
import torch

from siad.engine.evaluate import (
    MethodOutputError,
    Predictions,
    evaluate_predictions,
    load_maps,
    predict_dataset,
    save_predictions,
)
from siad.errors import NumericalError
from siad.methods.base import MethodOutput


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
