"""Two processes writing the same trained model (``save_trained``) and the same ``predictions.npz``
(``save_predictions``) while they read them back (``load_trained``, ``load_maps``), as two jobs could on a shared
file system. A read gives one writer's whole file, and a model is loaded only with the record written with it:
mixing one writer's ``model.json`` with the other's weights is refused (DataError), never loaded. No temporary file
is left behind.

The workers are this file run as a script (``python test_concurrent_writes.py <folder> <worker>``): two real
processes with their own interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

from siad.engine.evaluate import Predictions, load_maps, save_predictions
from siad.engine.runs import load_trained, save_trained
from siad.errors import DataError

_spec = importlib.util.spec_from_file_location("two_processes",
                                               Path(__file__).resolve().parents[1] / "two_processes.py")
two_processes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(two_processes)

ITERATIONS = 150
WEIGHT_FLOATS = 65_536  # 256 KiB of weights: a write is slow enough for the other process to read mid-way


def weights_of(writer: int) -> torch.Tensor:
    return torch.full((WEIGHT_FLOATS,), float(writer + 1))


class ToyModel:
    """Just the save/load part of a method: its weights say which writer made them."""

    def __init__(self, writer: int = -1) -> None:
        self.writer = writer
        self.loaded: dict[str, torch.Tensor] | None = None

    def save(self, path: Path) -> None:
        torch.save({"writer": torch.tensor(self.writer), "weights": weights_of(self.writer)}, path)

    def load(self, path: Path) -> None:
        self.loaded = torch.load(path, weights_only=True)


def predictions_of(writer: int) -> Predictions:
    n = 8
    return Predictions(cls_names=["bottle"] * n, img_paths=[f"w{writer}/{i}.png" for i in range(n)],
                       labels=np.arange(n) % 2, scores=np.full(n, writer, dtype=np.float32),
                       maps=[np.full((64, 64), writer, dtype=np.float32) for _ in range(n)],
                       masks=[np.zeros((64, 64), dtype=bool) for _ in range(n)])


def worker(folder: Path, writer: int) -> None:
    """Write the model and the predictions, read both back, ``ITERATIONS`` times; write counters to JSON."""
    two_processes.wait_for_go(folder, writer)
    counts = {"loaded": 0, "refused": 0, "wrong": 0, "predictions_read": 0, "predictions_wrong": 0}
    for _ in range(ITERATIONS):
        save_trained(ToyModel(writer), folder / "model", {"trained_on": [f"writer{writer}"]})
        model = ToyModel()
        try:
            trained_on = load_trained(model, folder / "model")
        except DataError:  # the record is being replaced, or the weights are not the record's: refused
            counts["refused"] += 1
        else:
            counts["loaded"] += 1
            author = int(model.loaded["writer"])
            counts["wrong"] += trained_on != [f"writer{author}"] or not torch.equal(model.loaded["weights"],
                                                                                     weights_of(author))
        save_predictions(predictions_of(writer), folder / "predictions.npz")
        arrays, maps = load_maps(folder / "predictions.npz")
        author = int(arrays["scores"][0])
        expected = predictions_of(author)
        counts["predictions_read"] += 1
        counts["predictions_wrong"] += not (list(arrays["img_paths"]) == expected.img_paths
                                            and np.array_equal(arrays["scores"], expected.scores)
                                            and all(np.array_equal(m, e) for m, e in zip(maps, expected.maps)))
    (folder / f"result-{writer}.json").write_text(json.dumps(counts))


def test_two_processes_writing_one_model_and_one_predictions_file_never_mix_or_tear_them(tmp_path):
    codes = two_processes.run_two_workers(__file__, tmp_path)
    assert codes == [0, 0]  # a torn predictions file or a colliding temporary file raises in the worker
    results = [json.loads((tmp_path / f"result-{i}.json").read_text()) for i in range(2)]
    for result in results:
        assert result["wrong"] == 0 and result["predictions_wrong"] == 0, result
        assert result["loaded"] > 0 and result["predictions_read"] == ITERATIONS, result
    leftovers = sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and "tmp" in p.name)
    assert leftovers == []
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["model.json", "model.pt"]


if __name__ == "__main__":
    worker(Path(sys.argv[1]), int(sys.argv[2]))
