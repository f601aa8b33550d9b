"""Run a method over a target dataset and score it: the evaluation step of every run.

Maps are resized (bilinear) to one evaluation size before pixel metrics, so every method is scored
on the same grid; ground-truth masks are resized with nearest neighbour by the dataset loader.
Metrics are computed from the float32 maps in memory; ``predictions.npz`` keeps them as float16
(for figures), which is why metrics are never recomputed from that file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from siad import metrics
from siad.errors import NumericalError
from siad.methods import Method


@dataclass
class Predictions:
    """Per-image outputs of one method on one dataset split, aligned with the ground truth."""

    cls_names: list[str]
    img_paths: list[str]
    labels: np.ndarray  # [N] int
    scores: np.ndarray  # [N] float32
    maps: list[np.ndarray]  # N × [H, W] float32 at the evaluation size
    masks: list[np.ndarray]  # N × [H, W] bool at the evaluation size

    def select(self, cls_name: str) -> metrics.ClassInputs:
        """The metric inputs of one class."""
        idx = [i for i, c in enumerate(self.cls_names) if c == cls_name]
        return metrics.ClassInputs(
            labels=self.labels[idx],
            scores=self.scores[idx],
            masks=_stack_if_uniform([self.masks[i] for i in idx]),
            maps=_stack_if_uniform([self.maps[i] for i in idx]),
        )


def _stack_if_uniform(arrays: Sequence[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    shapes = {a.shape for a in arrays}
    return np.stack(arrays) if len(shapes) == 1 else list(arrays)


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images and labels; keep masks as a list (their sizes differ at the 'original' size)."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.tensor([int(it["label"]) for it in items]),
        "mask": [it["mask"] for it in items],
        "cls_name": [it["cls_name"] for it in items],
        "img_path": [it["img_path"] for it in items],
    }


def _resize_map(anomaly_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    if tuple(anomaly_map.shape[-2:]) != size:
        resized = F.interpolate(anomaly_map[None, None].float(), size=size, mode="bilinear", align_corners=False)
        anomaly_map = resized[0, 0]
    return anomaly_map.float().cpu().numpy()


def predict_dataset(
    method: Method, dataset: Dataset, *, batch_size: int = 8, num_workers: int = 0, progress: bool = True
) -> Predictions:
    """Run ``method.predict`` over ``dataset`` (whose masks already have the evaluation size)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    out = Predictions([], [], np.zeros(0, int), np.zeros(0, np.float32), [], [])
    labels, scores = [], []
    root = getattr(dataset, "root", None)
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress):
        if root is not None:  # lets methods key a feature cache by file
            batch["image_file"] = [str(Path(root) / p) for p in batch["img_path"]]
        batch_scores, batch_maps = method.predict(batch)
        _check_finite(batch_scores, batch_maps, batch["img_path"])
        for i, mask in enumerate(batch["mask"]):
            out.maps.append(_resize_map(batch_maps[i], tuple(mask.shape)))
            out.masks.append(np.asarray(mask, dtype=bool))
        scores.append(batch_scores.float().cpu().numpy())
        labels.append(batch["label"].numpy())
        out.cls_names += list(batch["cls_name"])
        out.img_paths += list(batch["img_path"])
    out.labels = np.concatenate(labels).astype(int) if labels else out.labels
    out.scores = np.concatenate(scores).astype(np.float32) if scores else out.scores
    return out


def _check_finite(scores: torch.Tensor, maps: torch.Tensor, paths: Sequence[str]) -> None:
    bad = ~torch.isfinite(scores) | ~torch.isfinite(maps.flatten(1)).all(dim=1)
    if bool(bad.any()):
        first = paths[int(bad.nonzero()[0, 0])]
        raise NumericalError(f"the method produced NaN/Inf for {first} (and {int(bad.sum()) - 1} more images)")


def evaluate_predictions(
    preds: Predictions, *, with_pixel: bool, n_bootstrap: int, seed: int, aupro_limit: float = 0.3,
    progress: bool = False,
) -> dict[str, Any]:
    """Per-class and mean metrics with bootstrap CIs (the body of ``metrics.json``)."""
    per_class = {c: preds.select(c) for c in sorted(set(preds.cls_names))}
    return metrics.evaluate_dataset(
        per_class, with_pixel=with_pixel, n_bootstrap=n_bootstrap, seed=seed, aupro_limit=aupro_limit,
        progress=progress,
    )


def save_predictions(preds: Predictions, path: Path) -> None:
    """Write scores, labels and float16 maps (flattened with their shapes, so sizes may differ)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = np.array([m.shape for m in preds.maps], dtype=np.int32).reshape(-1, 2)
    flat = np.concatenate([m.ravel() for m in preds.maps]).astype(np.float16) if preds.maps else np.zeros(0, np.float16)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(
        tmp,
        cls_names=np.array(preds.cls_names, dtype=str),
        img_paths=np.array(preds.img_paths, dtype=str),
        labels=preds.labels,
        scores=preds.scores,
        maps_flat=flat,
        map_shapes=shapes,
    )
    tmp.replace(path)


def load_maps(path: Path) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Read ``predictions.npz``: the per-image arrays and the list of (float16) maps."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in ("cls_names", "img_paths", "labels", "scores")}
        sizes = [int(math.prod(s)) for s in data["map_shapes"]]
        chunks = np.split(data["maps_flat"], np.cumsum(sizes)[:-1]) if sizes else []
        maps = [c.reshape(s) for c, s in zip(chunks, data["map_shapes"])]
    return arrays, maps
