"""Scoring the runs of an external method: predictions written by a user's own rule, checked and scored by the suite.

**The contract.** For each run, the user's rule writes ``<run dir>/external.npz`` (:data:`EXTERNAL_FILE`; the run dir
is ``results/<profile>/<setting>/<method>/<variant>/seed<seed>/<source>/<target>/``, ``source`` is ``none`` for a
training-free method) holding, for the target's test split as its ``meta.json`` lists it:

- ``img_paths`` — str [N]: every test image's ``img_path`` exactly as in ``meta.json`` (relative to the dataset
  root), each once, in any order;
- ``scores`` — float [N]: the image anomaly scores (higher = more anomalous);
- ``maps`` — float [N, H, W]: the anomaly maps at any resolution (resized bilinearly to the evaluation size, as every
  method's are); or, when sizes differ, ``maps_flat`` (float [sum of H_i * W_i]) with ``map_shapes`` (int [N, 2]);
- optionally ``answers`` (str [N]) and ``p_yes`` (float [N]) for an LLM judgement.

On read (:func:`read_external`) the suite refuses, naming the file, the array and the fix: a missing array, lengths
that differ, a test image missing or listed twice, an image that is not in the test split, non-finite values, maps
that are not 2-D. Labels and masks always come from the dataset, never from the file. The scored run is written like
any other (``metrics.json`` stamped with the run specification, ``predictions.npz``), so the tables, the claims check
and the figures read it as they read a method of the suite.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from siad.config import dataset_root, method_params
from siad.data.loading import AnomalyDataset
from siad.data.records import load_meta
from siad.engine.protocol import NO_SOURCE, RunKey, check_no_leakage
from siad.engine.spec import RunSpec, resolve_run_spec
from siad.errors import DataError
from siad.methods import build_method

log = logging.getLogger("siad")

#: The file a user's rule writes in each run's folder.
EXTERNAL_FILE = "external.npz"
REQUIRED_ARRAYS = ("img_paths", "scores")


class ExternalPredictionError(DataError):
    """An ``external.npz`` breaks the contract (:mod:`siad.engine.external`)."""


def external_file(key: RunKey, results_root: str | Path) -> Path:
    """Where the user's rule writes run ``key``'s predictions."""
    return key.run_dir(results_root) / EXTERNAL_FILE


def read_external(path: Path, test_paths: Sequence[str]) -> dict[str, Any]:
    """The predictions of ``path`` keyed by image: {img_path: (score, map [H, W], answer | None, p_yes | None)}.

    ``test_paths``: the ``img_path`` of every test image the run is scored on; the file must hold each exactly once.
    """
    fix = "fix the rule that writes it (the contract: README, Adding a baseline; siad/engine/external.py)"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise ExternalPredictionError(f"{path}: missing; the external method's rule did not write it; {fix}") from None
    except (OSError, ValueError) as err:
        raise ExternalPredictionError(f"{path}: not a readable .npz file ({err}); {fix}") from None
    missing = [name for name in REQUIRED_ARRAYS if name not in arrays]
    if missing or not ("maps" in arrays or {"maps_flat", "map_shapes"} <= set(arrays)):
        missing += [] if ("maps" in arrays or {"maps_flat", "map_shapes"} <= set(arrays)) else ["maps"]
        raise ExternalPredictionError(f"{path}: no array(s) {missing} (it has {sorted(arrays)}); {fix}")
    img_paths = [str(p) for p in arrays["img_paths"].reshape(-1)]
    n = len(img_paths)
    scores = _floats(arrays["scores"], path, "scores", fix).reshape(-1)
    maps = _maps(arrays, n, path, fix)
    optional = {name: arrays[name].reshape(-1) for name in ("answers", "p_yes") if name in arrays}
    lengths = {"img_paths": n, "scores": len(scores), "maps": len(maps), **{k: len(v) for k, v in optional.items()}}
    if len(set(lengths.values())) != 1:
        raise ExternalPredictionError(f"{path}: the arrays have different lengths {lengths}; one entry per test "
                                      f"image in each; {fix}")
    _check_images(path, img_paths, test_paths, fix)
    p_yes = _floats(optional["p_yes"], path, "p_yes", fix) if "p_yes" in optional else None
    answers = [str(a) for a in optional["answers"]] if "answers" in optional else None
    return {p: (float(scores[i]), maps[i], None if answers is None else answers[i],
                None if p_yes is None else float(p_yes[i])) for i, p in enumerate(img_paths)}


def _floats(values: np.ndarray, path: Path, name: str, fix: str) -> np.ndarray:
    if values.dtype.kind not in "fiu":
        raise ExternalPredictionError(f"{path}: {name} has dtype {values.dtype}, not numbers; {fix}")
    values = values.astype(np.float32)
    if not np.isfinite(values).all():
        raise ExternalPredictionError(f"{path}: {name} holds {int((~np.isfinite(values)).sum())} non-finite "
                                      f"value(s) (NaN or inf); {fix}")
    return values


def _maps(arrays: Mapping[str, np.ndarray], n: int, path: Path, fix: str) -> list[np.ndarray]:
    if "maps" in arrays:
        maps = arrays["maps"]
        if maps.ndim != 3:
            raise ExternalPredictionError(f"{path}: maps has shape {maps.shape}; expected [N, H, W] (or maps_flat and "
                                          f"map_shapes for maps of different sizes); {fix}")
        return list(_floats(maps, path, "maps", fix))
    shapes = arrays["map_shapes"]
    if shapes.ndim != 2 or shapes.shape[1] != 2 or shapes.dtype.kind not in "iu" or (shapes <= 0).any():
        raise ExternalPredictionError(f"{path}: map_shapes must be positive integers of shape [N, 2], not "
                                      f"{shapes.dtype} {shapes.shape}; {fix}")
    flat = _floats(arrays["maps_flat"].reshape(-1), path, "maps_flat", fix)
    sizes = [int(math.prod(s)) for s in shapes]
    if sum(sizes) != len(flat):
        raise ExternalPredictionError(f"{path}: maps_flat has {len(flat)} values but map_shapes describe "
                                      f"{sum(sizes)}; {fix}")
    chunks = np.split(flat, np.cumsum(sizes)[:-1]) if sizes else []
    return [c.reshape(tuple(int(v) for v in s)) for c, s in zip(chunks, shapes)]


def _check_images(path: Path, img_paths: Sequence[str], test_paths: Sequence[str], fix: str) -> None:
    seen: dict[str, int] = {}
    for p in img_paths:
        seen[p] = seen.get(p, 0) + 1
    twice = sorted(p for p, count in seen.items() if count > 1)
    expected = set(test_paths)
    absent = sorted(expected - set(seen))
    foreign = sorted(set(seen) - expected)
    for problem, names in (("listed more than once", twice),
                           ("not in the test split scored (wrong path form or class?)", foreign),
                           ("missing (every test image needs a prediction)", absent)):
        if names:
            shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
            raise ExternalPredictionError(f"{path}: {len(names)} image(s) {problem}: {shown}; img_paths must be the "
                                          f"meta.json img_path of each test image; {fix}")


def score_external_runs(
    config: Mapping[str, Any], keys: Sequence[RunKey], *, meta_paths: Mapping[str, Path], results_root: Path,
    expected_digests: Mapping[RunKey, str] | None = None, progress: bool = True,
) -> None:
    """Score every run of ``keys`` (one external method and seed) from its ``external.npz``; write each run's
    ``metrics.json`` and ``predictions.npz``. A run whose specification changed since planning is refused."""
    from siad.engine.runs import _check_planned, _evaluate_target

    specs = {key: resolve_run_spec(config, key, meta_paths) for key in keys}
    _check_planned(specs, expected_digests or {})
    for key in keys:
        spec: RunSpec = specs[key]
        base = build_method(key.method, method_params(config, key.method, key.variant), seed=spec.seed)
        trained_on = [] if key.source == NO_SOURCE else [key.source]
        check_no_leakage(trained_on, key.target)
        root = dataset_root(config, key.target)
        meta = load_meta(meta_paths[key.target], root)
        classes = sorted(config["datasets"][key.target].get("classes") or []) or None
        test = AnomalyDataset(root, meta, split="test", classes=classes, transform=base.transform, name=key.target)
        base.replay = read_external(external_file(key, results_root), [r["img_path"] for r in test.records])
        run_dir = key.run_dir(results_root)
        log.info("scoring %s from %s", key, external_file(key, results_root))
        _evaluate_target(config, base, spec, meta, trained_on, near_duplicates=[],
                         metrics_path=run_dir / "metrics.json", predictions_path=run_dir / "predictions.npz",
                         progress=progress)
