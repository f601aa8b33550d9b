import numpy as np
import pytest
import torch

from siad.engine.evaluate import Predictions, load_maps, predict_dataset, save_predictions
from siad.errors import NumericalError


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

    def predict(self, batch):
        b = batch["image"].shape[0]
        maps = batch["image"][:, 0] / 10.0  # 16×16, resized to the mask size by the engine
        return torch.full((b,), self.value) + batch["image"][:, 0, 0, 0], maps


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
