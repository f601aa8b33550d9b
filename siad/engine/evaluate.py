"""Run a method over a target dataset and score it: the evaluation step of every run.

Maps are resized (bilinear) to one evaluation size before pixel metrics, so every method is scored
on the same grid; ground-truth masks are resized with nearest neighbour by the dataset loader.
Metrics are computed from the float32 maps in memory; ``predictions.npz`` keeps them as float16
(for figures), which is why metrics are never recomputed from that file.

LLM methods (AnomalyGPT, SIAD-LLM) also return the generated answer and P("Yes") per image
(:class:`siad.methods.base.MethodOutput`); they are kept beside the scores, scored as the ``llm``
block of ``metrics.json`` and stored in ``predictions.npz``.
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
from siad.errors import NumericalError, SiadError
from siad.files import atomic_write
from siad.methods import Method
from siad.methods.base import MethodOutput


class MethodOutputError(SiadError, ValueError):
    """A method's batch output is malformed (wrong lengths, answers for some batches only)."""


@dataclass
class Predictions:
    """Per-image outputs of one method on one dataset split, aligned with the ground truth."""

    cls_names: list[str]
    img_paths: list[str]
    labels: np.ndarray  # [N] int
    scores: np.ndarray  # [N] float32
    maps: list[np.ndarray]  # N × [H, W] float32 at the evaluation size
    masks: list[np.ndarray]  # N × [H, W] bool at the evaluation size
    answers: list[str] | None = None  # N generated answers (LLM methods only)
    p_yes: np.ndarray | None = None  # [N] float32 P("Yes") (LLM methods only)

    def class_indices(self, cls_name: str) -> list[int]:
        """Positions of the images of one class."""
        return [i for i, c in enumerate(self.cls_names) if c == cls_name]

    def select(self, cls_name: str) -> metrics.ClassInputs:
        """The metric inputs of one class."""
        idx = self.class_indices(cls_name)
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
    """Run ``method.predict_batch`` over ``dataset`` (whose masks already have the evaluation size).

    A method with ``per_class_postprocess`` (AA-CLIP) gets every class's raw scores and maps through
    :meth:`~siad.methods.base.Method.postprocess_class` before the maps are resized to the evaluation size.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    out = Predictions([], [], np.zeros(0, int), np.zeros(0, np.float32), [], [])
    labels, scores, raw_maps = [], [], []
    llm = _LlmOutputs(type(method).__name__)
    root = getattr(dataset, "root", None)
    name = getattr(dataset, "name", "")
    postprocess = bool(getattr(method, "per_class_postprocess", False))
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress):
        if root is not None:  # lets methods key a feature cache by file
            batch["image_file"] = [str(Path(root) / p) for p in batch["img_path"]]
        if name:  # the registry name of the dataset, for methods whose prompts name it (AdaCLIP's release names)
            batch["dataset"] = name
        output = method.predict_batch(batch)
        llm.add(output, len(batch["img_path"]))
        _check_finite(output, batch["img_path"])
        masks = [np.asarray(mask, dtype=bool) for mask in batch["mask"]]
        if postprocess:  # raw maps held until the class is complete
            raw_maps += [m.detach().float().cpu() for m in output.maps]
        else:
            out.maps += [_resize_map(m, mask.shape) for m, mask in zip(output.maps, masks, strict=True)]
        out.masks += masks
        scores.append(output.scores.detach().float().cpu())
        labels.append(batch["label"].numpy())
        out.cls_names += list(batch["cls_name"])
        out.img_paths += list(batch["img_path"])
    all_scores = torch.cat(scores) if scores else torch.zeros(0)
    if postprocess:
        all_scores, raw_maps = _postprocess_classes(method, out.cls_names, all_scores, raw_maps)
        out.maps = [_resize_map(m, mask.shape) for m, mask in zip(raw_maps, out.masks, strict=True)]
    out.labels = np.concatenate(labels).astype(int) if labels else out.labels
    out.scores = all_scores.numpy().astype(np.float32)
    out.answers, out.p_yes = llm.answers, llm.p_yes()
    return out


def _postprocess_classes(method: Method, cls_names: Sequence[str], scores: torch.Tensor,
                         maps: list[torch.Tensor | None]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """``method.postprocess_class`` on each class's images (in dataset order); the outputs are checked like a batch."""
    scores = scores.clone()
    maps = list(maps)
    for cls in sorted(set(cls_names)):
        idx = [i for i, c in enumerate(cls_names) if c == cls]
        stacked = torch.stack([maps[i] for i in idx])
        for i in idx:  # the per-image copies are not needed any more (a class's maps at 518 px can be GBs)
            maps[i] = None
        new_scores, new_maps = method.postprocess_class(cls, scores[idx], stacked)
        del stacked
        if tuple(new_scores.shape) != (len(idx),) or new_maps.shape[0] != len(idx):
            raise MethodOutputError(
                f"{type(method).__name__}.postprocess_class({cls!r}) returned scores {tuple(new_scores.shape)} and "
                f"maps {tuple(new_maps.shape)} for {len(idx)} images; it must keep one score and one map per image")
        _check_finite(MethodOutput(new_scores, new_maps), [f"{cls} (after postprocess_class)"] * len(idx))
        scores[idx] = new_scores.detach().float().cpu()
        for j, i in enumerate(idx):
            maps[i] = new_maps[j].detach().float().cpu()
    return scores, maps


class _LlmOutputs:
    """Collects answers and P("Yes") over batches; each must come with every batch or with none."""

    def __init__(self, method_name: str) -> None:
        self.method_name = method_name
        self.answers: list[str] | None = None
        self._p_yes: list[np.ndarray] | None = None
        self.n_batches = 0

    def add(self, output: MethodOutput, batch_size: int) -> None:
        self._check_presence("answers", output.answers is not None, self.answers is not None)
        self._check_presence("p_yes", output.p_yes is not None, self._p_yes is not None)
        if output.answers is not None:
            self._check_length("answers", len(output.answers), batch_size)
            self.answers = (self.answers or []) + [str(a) for a in output.answers]
        if output.p_yes is not None:
            self._check_length("p_yes", int(output.p_yes.numel()), batch_size)
            self._p_yes = (self._p_yes or []) + [output.p_yes.detach().float().cpu().numpy().reshape(-1)]
        self.n_batches += 1

    def p_yes(self) -> np.ndarray | None:
        return None if self._p_yes is None else np.concatenate(self._p_yes).astype(np.float32)

    def _check_presence(self, field: str, given: bool, given_before: bool) -> None:
        if self.n_batches and given != given_before:
            raise MethodOutputError(
                f"{self.method_name}.predict_batch gave {field} for batch {self.n_batches} but "
                f"{'not ' if given_before else ''}for the batches before it; a method must return {field} for "
                "every batch or for none (fix the method's predict_batch)."
            )

    def _check_length(self, field: str, n: int, batch_size: int) -> None:
        if n != batch_size:
            raise MethodOutputError(
                f"{self.method_name}.predict_batch returned {n} {field} for a batch of {batch_size} images; "
                "it must return one per image (fix the method's predict_batch)."
            )


def _check_finite(output: MethodOutput, paths: Sequence[str]) -> None:
    if isinstance(output.maps, torch.Tensor):
        maps_finite = torch.isfinite(output.maps.flatten(1)).all(dim=1)
    else:  # maps of differing sizes (an external method's replayed file, siad.engine.external)
        maps_finite = torch.tensor([bool(torch.isfinite(m).all()) for m in output.maps], dtype=torch.bool)
    bad = ~torch.isfinite(output.scores) | ~maps_finite.to(output.scores.device)
    if output.p_yes is not None:
        bad |= ~torch.isfinite(output.p_yes.reshape(-1).to(bad.device))
    if bool(bad.any()):
        first = paths[int(bad.nonzero()[0, 0])]
        raise NumericalError(f"the method produced NaN/Inf for {first} (and {int(bad.sum()) - 1} more images)")


def evaluate_predictions(
    preds: Predictions, *, with_pixel: bool, n_bootstrap: int, seed: int, aupro_limit: float = 0.3,
    progress: bool = False,
) -> dict[str, Any]:
    """Per-class and mean metrics with bootstrap CIs (the body of ``metrics.json``).

    When the method gave answers, ``body["llm"]`` holds the LLM judgement metrics per class and
    their mean over classes (:func:`siad.metrics.llm_judgement`); its warnings join the others.
    """
    classes = sorted(set(preds.cls_names))
    body = metrics.evaluate_dataset(
        {c: preds.select(c) for c in classes}, with_pixel=with_pixel, n_bootstrap=n_bootstrap, seed=seed,
        aupro_limit=aupro_limit, progress=progress,
    )
    if preds.answers is not None:
        body["llm"] = _llm_block(preds, classes)
        body["warnings"] += body["llm"].pop("warnings")
    return body


def _llm_block(preds: Predictions, classes: Sequence[str]) -> dict[str, Any]:
    """Per-class LLM judgement metrics, their class means, labels and warnings."""
    inputs = {}
    for cls in classes:
        idx = preds.class_indices(cls)
        p_yes = None if preds.p_yes is None else preds.p_yes[idx]
        inputs[cls] = metrics.LlmInputs(preds.labels[idx], [preds.answers[i] for i in idx], p_yes)
    return {**metrics.evaluate_llm_judgement(inputs), "metric_labels": dict(metrics.LLM_METRIC_LABELS)}


def save_predictions(preds: Predictions, path: Path) -> None:
    """Write scores, labels and float16 maps (flattened with their shapes, so sizes may differ), plus
    ``answers`` (str array) and ``p_yes`` (float32) when the method gave them.

    Atomic (:func:`~siad.files.atomic_write`: a uniquely named temporary file renamed into place), so a reader never
    sees half a file and two writers of the same path never share a temporary file."""
    shapes = np.array([m.shape for m in preds.maps], dtype=np.int32).reshape(-1, 2)
    flat = np.concatenate([m.ravel() for m in preds.maps]).astype(np.float16) if preds.maps else np.zeros(0, np.float16)
    llm = {}
    if preds.answers is not None:
        llm["answers"] = np.array(preds.answers, dtype=str)
    if preds.p_yes is not None:
        llm["p_yes"] = np.asarray(preds.p_yes, dtype=np.float32)
    arrays = {"cls_names": np.array(preds.cls_names, dtype=str), "img_paths": np.array(preds.img_paths, dtype=str),
              "labels": preds.labels, "scores": preds.scores, "maps_flat": flat, "map_shapes": shapes, **llm}
    atomic_write(Path(path), lambda handle: np.savez(handle, **arrays))


OPTIONAL_ARRAYS = ("answers", "p_yes")
"""Per-image arrays of ``predictions.npz`` present only for methods that return them (LLM methods)."""


def load_maps(path: Path) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Read ``predictions.npz``: the per-image arrays (with ``answers`` and ``p_yes`` when stored; files
    written before they existed still load) and the list of (float16) maps."""
    with np.load(path) as data:
        keys = ("cls_names", "img_paths", "labels", "scores", *(k for k in OPTIONAL_ARRAYS if k in data.files))
        arrays = {k: data[k] for k in keys}
        sizes = [int(math.prod(s)) for s in data["map_shapes"]]
        chunks = np.split(data["maps_flat"], np.cumsum(sizes)[:-1]) if sizes else []
        maps = [c.reshape(s) for c, s in zip(chunks, data["map_shapes"])]
    return arrays, maps
