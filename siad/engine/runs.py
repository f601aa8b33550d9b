"""One workflow job = one call here: evaluate a (setting, method, variant, source, target) run.

Kept out of the Snakemake scripts so the same code runs from Python, tests and notebooks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from siad import metrics
from siad.config import dataset_root, method_params
from siad.data.loading import AnomalyDataset
from siad.data.records import load_meta
from siad.data.registry import get_dataset
from siad.engine.evaluate import evaluate_predictions, predict_dataset, save_predictions
from siad.engine.protocol import NO_SOURCE, RunKey, check_no_leakage
from siad.errors import ConfigError, DataError
from siad.methods import Method, build_method
from siad.runtime import resolve_device, seed_everything

log = logging.getLogger("siad")

MODEL_INFO = "model.json"


def evaluation_mask_size(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """The evaluation grid (None = each image's original size)."""
    size = config["evaluation"]["size"]
    return None if size == "original" else (int(size), int(size))


def load_trained(method: Method, key: RunKey, model_dir: Path) -> list[str]:
    """Load the model trained for ``key`` and return the datasets it was trained on."""
    info_path = model_dir / MODEL_INFO
    info = json.loads(info_path.read_text())
    method.load(model_dir / info["weights"])
    return list(info["trained_on"])


def evaluate_run(
    config: Mapping[str, Any],
    key: RunKey,
    *,
    meta_path: Path,
    metrics_path: Path,
    predictions_path: Path,
    model_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict ``key.target``'s test split with the run's method and write metrics and predictions."""
    seed = int(config["seed"])
    seed_everything(seed)
    method = build_method(key.method, method_params(config, key.method, key.variant),
                          device=resolve_device(config["device"]), seed=seed)
    trained_on = [] if key.source == NO_SOURCE else load_trained(method, key, model_dir or Path("."))
    check_no_leakage(trained_on, key.target)

    spec = get_dataset(key.target)
    root = dataset_root(config, key.target)
    dataset = AnomalyDataset(
        root,
        load_meta(meta_path, root),
        split="test",
        classes=config["datasets"][key.target].get("classes"),
        transform=method.transform,
        mask_size=evaluation_mask_size(config),
    )
    log.info("evaluating %s on %s (%d images)", key, key.target, len(dataset))
    evaluation = config["evaluation"]
    preds = predict_dataset(method, dataset, batch_size=evaluation["batch_size"],
                            num_workers=evaluation.get("num_workers", 0), progress=progress)
    body = evaluate_predictions(preds, with_pixel=spec.has_masks, n_bootstrap=evaluation["n_bootstrap"],
                                seed=seed, aupro_limit=evaluation.get("aupro_limit", 0.3), progress=progress)
    body["metric_labels"] = metrics.metric_labels(evaluation.get("aupro_limit", 0.3))
    body["run"] = {
        "profile": config["profile"],
        "demo": bool(config["demo"] or method.random_init),
        "random_init": method.random_init,
        "setting": key.setting,
        "method": key.method,
        "variant": key.variant,
        "source": key.source,
        "target": key.target,
        "trained_on": trained_on,
        "eval_size": evaluation["size"],
        "seed": seed,
    }
    for warning in body.get("warnings", []):
        log.warning(warning)
    save_predictions(preds, predictions_path)
    _write_json(body, metrics_path)
    return body


def _write_json(body: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1, default=_jsonable))
    tmp.replace(path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def training_meta(meta: Mapping[str, Any], setting: str, normal_images: str = "train") -> dict[str, Any]:
    """The auxiliary training data of ``setting`` as a one-split index (``train``).

    uzad / pseudo: normal images only (``normal_images``: ``train`` = the train split, the SIAD
    reading of "normal images of the auxiliary dataset"; ``all`` = normal images of train and test).
    pseudo-anomalies are made from them by the method. zad: the auxiliary *test* split with its real
    anomalies and masks, as AnomalyCLIP / AdaCLIP train.
    """
    if setting == "zad":
        return {"train": {c: list(rs) for c, rs in meta["test"].items()}}
    if normal_images not in ("train", "all"):
        raise ConfigError(f"training.normal_images must be 'train' or 'all', not {normal_images!r}")
    splits = ("train",) if normal_images == "train" else ("train", "test")
    by_class: dict[str, list] = {}
    for split in splits:
        for cls, records in meta.get(split, {}).items():
            by_class.setdefault(cls, []).extend(r for r in records if not r["anomaly"])
    return {"train": {c: rs for c, rs in by_class.items() if rs}}


def fit_run(
    config: Mapping[str, Any], setting: str, method_name: str, variant: str, source: str, *,
    meta_path: Path, model_dir: Path,
) -> None:
    """Train ``method_name`` on ``source`` under ``setting``; write weights and ``model.json``."""
    seed = int(config["seed"])
    seed_everything(seed)
    method = build_method(method_name, method_params(config, method_name, variant),
                          device=resolve_device(config["device"]), seed=seed)
    root = dataset_root(config, source)
    normal_images = config.get("training", {}).get("normal_images", "train")
    meta = training_meta(load_meta(meta_path, root), setting, normal_images)
    if not meta["train"]:
        raise DataError(
            f"{meta_path}: no {setting} training images in {source!r} (training.normal_images={normal_images!r}); "
            "with the all_test medical protocol set training.normal_images: all"
        )
    dataset = AnomalyDataset(root, meta, split="train", classes=config["datasets"][source].get("classes"),
                             transform=method.transform, mask_size=(method.input_size, method.input_size))
    log.info("training %s/%s on %s under %s (%d images)", method_name, variant, source, setting, len(dataset))
    method.fit(dataset, setting)
    model_dir.mkdir(parents=True, exist_ok=True)
    method.save(model_dir / "model.pt")
    info = {"weights": "model.pt", "trained_on": [source], "setting": setting, "method": method_name,
            "variant": variant, "seed": seed, "random_init": method.random_init}
    _write_json(info, model_dir / MODEL_INFO)
