"""Synthetic metrics.json runs and a small reference table shared by the report tests.

Everything is exposed as fixtures (factories included) so test modules never import this file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from siad.methods import METHODS as METHOD_REGISTRY
from siad.methods import Method
from siad.report.reference import load_reference

METHODS = {"clip": "CLIP", "siad_llm": "SIAD-LLM"}
DATASETS = {"mvtec": "MVTecAD", "visa": "VisA", "btad": "BTAD", "headct": "HeadCT"}
MEDICAL = {"headct"}

REFERENCE_TEXT = """\
# Toy reference: Table 1 shape, AUROC in percent.
# Pixel level not reported for medical sets.
level,method,MVTecAD,VisA,BTAD,HeadCT,Average
image,CLIP,60.9,49.1,59.3,56.5,56.5
image,SIAD-LLM,72.8,,73.1,76.0,74.0
pixel,CLIP,53.4,51.3,47.5,,50.7
pixel,SIAD-LLM,86.0,88.1,88.2,,87.4
"""

#: Reproduced dataset means (fractions): (method, dataset) -> (image, pixel or None).
VALUES = {
    ("clip", "mvtec"): (0.610, 0.534),   # claims lie inside the CIs
    ("clip", "visa"): (0.492, 0.513),
    ("clip", "btad"): (0.593, 0.475),
    ("clip", "headct"): (0.565, None),
    ("siad_llm", "mvtec"): (0.500, 0.700),  # claims lie far outside the CIs
    ("siad_llm", "visa"): (0.600, 0.880),
    ("siad_llm", "btad"): (0.731, 0.882),
    ("siad_llm", "headct"): (0.760, None),
}


def _make_run(
    method: str,
    target: str,
    image: float,
    pixel: float | None,
    *,
    demo: bool = True,
    setting: str = "uzad",
    variant: str = "default",
    n_replicates: int = 200,
    half_width: float = 0.02,
    seed: int = 0,
    confidence: float = 0.95,
    run_seed: int = 0,
) -> dict[str, Any]:
    """A metrics.json dict with seeded (``seed``) bootstrap-like replicates around the means; ``run_seed`` is the
    run's training seed."""
    rng = np.random.default_rng(seed)
    means = {"image_auroc": image, "pixel_auroc": pixel}
    ci = {k: None if v is None else [v - half_width, v + half_width] for k, v in means.items()}
    reps = {k: [] if v is None else list(v + rng.normal(0.0, half_width / 2, n_replicates)) for k, v in means.items()}
    return {
        "run": {"profile": "demo" if demo else "paper", "demo": demo, "setting": setting, "method": method,
                "variant": variant, "source": "mvtec", "target": target, "eval_size": [256, 256], "seed": run_seed},
        "classes": {},
        "mean": means,
        "ci": ci,
        "n_classes": {"image_auroc": 1},
        "mean_replicates": reps,
        "bootstrap": {"n": n_replicates, "seed": 0, "confidence": confidence},
        "warnings": [],
    }


def _standard_runs(**kwargs: Any) -> list[dict[str, Any]]:
    """One run per (method, dataset) of :data:`VALUES`, each with its own replicate seed."""
    return [_make_run(m, d, i, p, seed=k, **kwargs) for k, ((m, d), (i, p)) in enumerate(VALUES.items())]


@pytest.fixture
def reference_path(tmp_path: Path) -> Path:
    path = tmp_path / "toy_table1.csv"
    path.write_text(REFERENCE_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def reference(reference_path: Path) -> pd.DataFrame:
    return load_reference(reference_path)


@pytest.fixture
def runs() -> list[dict[str, Any]]:
    return _standard_runs()


@pytest.fixture
def make_run() -> Callable[..., dict[str, Any]]:
    return _make_run


@pytest.fixture
def standard_runs() -> Callable[..., list[dict[str, Any]]]:
    return _standard_runs


@pytest.fixture
def toy() -> SimpleNamespace:
    """The toy table's configuration: methods, datasets (config -> display), medical set, values."""
    return SimpleNamespace(methods=dict(METHODS), datasets=dict(DATASETS), medical=set(MEDICAL), values=VALUES)


def _write_runs(runs: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Write runs as metrics.json files (one folder per run) and return the paths."""
    paths = []
    for k, run in enumerate(runs):
        path = folder / f"run{k}" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(run), encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture
def write_runs() -> Callable[[list[dict[str, Any]], Path], list[Path]]:
    return _write_runs


# --- LLM methods (SIAD-LLM ablation tables, LLM-judgement table, figure) ---------------------------


class _ToyLLMDetector(Method):
    """Stands in for SIAD-LLM / AnomalyGPT in report tests: only its parameter defaults are used."""

    training_free: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {"adapter_lambda": 0.1, "stage_case": 3, "self_improvement": True,
                                          "stage_prompts": True, "sem": True, "pem": True}
    transform = input_size = None  # never built here

    def predict(self, batch):  # pragma: no cover - not called
        raise AssertionError


for _name in ("toy_siad_llm", "toy_anomalygpt", "toy_anomalyclip"):  # toy_anomalyclip: a trained baseline's rows
    if _name not in METHOD_REGISTRY:
        METHOD_REGISTRY.add(_name, _ToyLLMDetector)

REPO = Path(__file__).resolve().parents[2]

TOY_SIAD_VARIANTS = {
    "wo_si": {"self_improvement": False}, "wo_sp": {"stage_prompts": False}, "wo_em": {"sem": False, "pem": False},
    "wo_sem": {"sem": False}, "wo_pem": {"pem": False}, "wo_adapter": {"adapter_lambda": 0.0},
    "lambda05": {"adapter_lambda": 0.5}, "lambda03": {"adapter_lambda": 0.3}, "lambda09": {"adapter_lambda": 0.9},
    "case1": {"stage_case": 1}, "case2": {"stage_case": 2},
}


def _llm_config() -> dict[str, Any]:
    """The demo config plus the toy LLM methods and every report section of issue 4."""
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["methods"]["toy_siad_llm"] = {"display_name": "SIAD-LLM",
                                         "variants": {k: dict(v) for k, v in TOY_SIAD_VARIANTS.items()}}
    config["methods"]["toy_anomalygpt"] = {"display_name": "AnomalyGPT"}
    config["report"]["siad_ablations"] = {
        "method": "toy_siad_llm",
        "table3a": {"w/o SI": "wo_si", "w/o SP": "wo_sp", "Full": "default"},
        "table3b": {"w/o EM": "wo_em", "w/o SEM": "wo_sem", "w/o PEM": "wo_pem", "w/o Adapter": "wo_adapter",
                    "Full": "default"},
    }
    config["report"]["llm_judgement"] = {"methods": ["toy_anomalygpt", "toy_siad_llm"]}
    config["report"]["figure4"] = {"methods": ["toy_anomalygpt", "toy_siad_llm"], "datasets": ["mvtec"], "count": 2}
    return config


@pytest.fixture
def llm_config() -> dict[str, Any]:
    """A fresh copy per test (tests mutate it)."""
    return _llm_config()


# --- qualitative panels (Figures 4 and 2(b)) --------------------------------------------------------------------

PANEL_CLASSES = ("bottle", "carpet")


def _write_dataset(root: Path, meta_path: Path) -> list[dict[str, Any]]:
    """Two classes, 2 normal + 2 anomalous test images each (64 px), masks for the anomalous ones; the index
    (meta.json) at ``meta_path``. Returns the test records."""
    rng = np.random.default_rng(0)
    records = []
    for cls in PANEL_CLASSES:
        for k in range(4):
            anomalous = k >= 2
            img_path = f"{cls}/test/{'broken' if anomalous else 'good'}/{k:03d}.png"
            (root / img_path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / img_path)
            mask_path = ""
            if anomalous:
                mask_path = f"{cls}/ground_truth/broken/{k:03d}_mask.png"
                (root / mask_path).parent.mkdir(parents=True, exist_ok=True)
                mask = np.zeros((64, 64), np.uint8)
                mask[10:30, 20:40] = 255
                Image.fromarray(mask).save(root / mask_path)
            records.append({"img_path": img_path, "mask_path": mask_path, "cls_name": cls, "specie_name": "",
                            "anomaly": int(anomalous)})
    meta = {"train": {}, "test": {c: [r for r in records if r["cls_name"] == c] for c in PANEL_CLASSES}}
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta))
    return records


def _write_predictions(path: Path, records: list[dict[str, Any]], answers: list[str] | None = None) -> None:
    """A predictions.npz of ``records``: map i is 0.2 * (i % 4) everywhere (32 x 32)."""
    from siad.engine.evaluate import Predictions, save_predictions

    maps = [np.full((32, 32), 0.2 * (i % 4), np.float32) for i in range(len(records))]
    preds = Predictions([r["cls_name"] for r in records], [r["img_path"] for r in records],
                        np.array([r["anomaly"] for r in records]), np.zeros(len(records), np.float32), maps, [],
                        answers=answers)
    save_predictions(preds, path)


@pytest.fixture
def write_dataset() -> Callable[[Path, Path], list[dict[str, Any]]]:
    return _write_dataset


@pytest.fixture
def write_predictions() -> Callable[..., None]:
    return _write_predictions
