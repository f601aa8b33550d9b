"""Fixtures shared across test packages: a tiny MVTec AD stand-in and the tiny LLM-detector settings."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from siad.data.loading import AnomalyDataset
from siad.data.prepare import prepare_dataset
from siad.data.records import load_meta
from siad.data.synthetic import write_standin
from siad.engine.protocol import training_meta


@pytest.fixture(scope="session", autouse=True)
def shipped_external_methods() -> None:
    """The external methods of the shipped profiles (the demo's worked example) registered, as validating the config
    does in the workflow: tests read the profiles' YAML directly."""
    import yaml

    from siad.methods.external import register_external_methods

    root = Path(__file__).resolve().parents[1]
    for name in ("demo.yaml", "config.yaml"):
        register_external_methods(yaml.safe_load((root / "config" / name).read_text()))


@pytest.fixture(scope="session")
def mvtec_standin(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """(root, index) of a two-class MVTec AD stand-in at 64 px (6 train, 4 + 4 test images per class)."""
    tmp = tmp_path_factory.mktemp("mvtec_standin")
    root = tmp / "mvtec"
    write_standin("mvtec", root, seed=0, classes=["bottle", "carpet"], size=64)
    prepare_dataset("mvtec", root, tmp / "meta.json", verify_counts=False)
    return root, load_meta(tmp / "meta.json", root)


@pytest.fixture(scope="session")
def mvtec_uzad_train(mvtec_standin) -> tuple[Path, dict[str, Any]]:
    """(root, one-split training index) of the stand-in's normal train images (the UZAD auxiliary data)."""
    root, meta = mvtec_standin
    return root, training_meta(meta, "uzad")


@pytest.fixture(scope="session")
def tiny_llm_params() -> dict[str, Any]:
    """AnomalyGPT / SIAD-LLM parameters for the tiny random ViT-H/14-shaped backbone and the tiny LM (copy before
    changing: the dict is shared by the session)."""
    return {"backbone": "tiny-vit-h14-demo", "llm": "tiny-random", "max_new_tokens": 4, "progress": False,
            "epochs": 1, "batch_size": 2}


@pytest.fixture(scope="session")
def llm_batches(mvtec_standin, mvtec_uzad_train) -> SimpleNamespace:
    """Batch factories for the LLM detectors: ``test(method, n)`` (images of the stand-in's test split, spread
    over both classes) and ``train(method, n)`` (``[normal || pseudo]`` from n normal train images)."""

    def test(method, n: int = 4) -> dict[str, Any]:
        root, meta = mvtec_standin
        data = AnomalyDataset(root, meta, split="test", transform=method.transform)
        items = [data[i] for i in range(0, len(data), max(1, len(data) // n))][:n]
        return {"image": torch.stack([it["image"] for it in items]), "cls_name": [it["cls_name"] for it in items],
                "img_path": [it["img_path"] for it in items]}

    def train(method, n: int = 2) -> dict[str, Any]:
        root, meta = mvtec_uzad_train
        records = [r for rs in meta["train"].values() for r in rs][:n]
        return method.training_batch(root, records, "mvtec", np.random.default_rng(0))

    return SimpleNamespace(test=test, train=train)
