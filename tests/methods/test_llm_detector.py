"""The training machinery AnomalyGPT and SIAD-LLM share (siad/methods/llm_detector.py), on both methods."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from siad.data.loading import AnomalyDataset
from siad.methods import build_method

METHODS = ["anomalygpt", "siad_llm"]
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "config" / "demo.yaml"


@pytest.mark.parametrize("name", METHODS)
def test_training_steps_on_a_fixed_batch_lower_the_loss(name, tiny_llm_params, llm_batches):
    method = build_method(name, tiny_llm_params, seed=0)
    method.trainable.train()
    batch = llm_batches.train(method)
    params = method.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(4):
        loss, _ = method.training_loss(batch)
        method.optimizer_step(loss, optimizer, params)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", METHODS)
def test_gradients_reach_only_the_trainable_modules(name, tiny_llm_params, llm_batches):
    method = build_method(name, tiny_llm_params, seed=0)
    method.trainable.train()
    loss, parts = method.training_loss(llm_batches.train(method))
    assert set(parts) == {"ce", "focal", "dice"}
    loss.backward()
    frozen = [*method.backbone.model.parameters(), *method.llm.model.parameters(), *method.llm.image_proj.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in frozen)
    for module_name, module in method.trainable.items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), module_name


@pytest.mark.parametrize("name", METHODS)
def test_demo_schedule_moves_the_weights_on_the_smallest_demo_source(name, mvtec_uzad_train):
    """The demo's medical sources train on their normal test images (``standin.n_test_normal``, 4): with the demo
    profile's parameters every LLM method must take at least two optimiser steps there and change every trained
    tensor. (At the released batch size one step would run at the log warm-up's learning-rate factor 0 and leave
    AnomalyGPT's weights as initialised.)"""
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    params = {**config["methods"][name]["params"], "feature_cache": None, "progress": False}
    root, meta = mvtec_uzad_train
    records = sorted((r for rs in meta["train"].values() for r in rs), key=lambda r: r["img_path"])
    records = records[: config["data"]["standin"]["n_test_normal"]]
    subset = {"train": {c: [r for r in records if r["cls_name"] == c] for c in {r["cls_name"] for r in records}}}
    method = build_method(name, params, seed=0)
    data = AnomalyDataset(root, subset, split="train", transform=method.transform, name="mvtec")
    before = {k: v.clone() for k, v in method.trainable.state_dict().items()}
    method.fit(data, "uzad")
    assert len(method.loss_history) >= 2
    after = method.trainable.state_dict()
    assert [k for k in before if torch.equal(before[k], after[k])] == []


@pytest.mark.parametrize("setting", ["zad", "pseudo"])
def test_given_labels_train_without_twins_and_answer_from_the_masks(setting, tiny_llm_params, mvtec_standin,
                                                                    monkeypatch):
    """Under zad (real anomalies) and pseudo (the engine's pseudo-anomalies) the LLM detectors train on the set's
    images with their labels and masks, 2 x batch_size a step; only uzad makes the method's own NSA twins."""
    from siad.engine.settings import TrainingSetRequest, build_training_set

    method = build_method("anomalygpt", tiny_llm_params, seed=0)
    root, meta = mvtec_standin
    data = build_training_set(TrainingSetRequest(
        setting=setting, name="mvtec", root=root, meta=meta, classes=["bottle"], normal_images="train",
        transform=method.transform, input_size=method.input_size, seed=0, options={"anomalous_fraction": 0.5}))
    batches = []
    monkeypatch.setattr(method, "training_batch", lambda *a, **k: pytest.fail("uzad's twins made under " + setting))
    real_loss = method.training_loss
    monkeypatch.setattr(method, "training_loss", lambda batch: batches.append(batch) or real_loss(batch))
    method.fit(data, setting)
    per_step = 2 * tiny_llm_params["batch_size"]
    assert [len(b["answers"]) for b in batches] == [per_step] * (len(data) // per_step) + (
        [len(data) % per_step] if len(data) % per_step else [])
    answers = [a for b in batches for a in b["answers"]]
    anomalous = [bool(m.any()) for b in batches for m in b["mask"]]
    assert any(anomalous) and not all(anomalous)
    assert all(a.startswith("Yes") == flag for a, flag in zip(answers, anomalous))


def test_an_anomaly_without_pixel_truth_answers_yes_and_skips_the_pixel_losses(tiny_llm_params, monkeypatch):
    from siad.llm import UNLOCATED_YES

    method = build_method("anomalygpt", tiny_llm_params, seed=0)
    size = method.input_size
    mask = torch.zeros(size, size, dtype=torch.bool)
    located = mask.clone()
    located[: size // 3, : size // 3] = True
    image = torch.zeros(3, size, size)
    items = [{"image": image, "mask": mask, "label": 0, "cls_name": "brain", "mask_valid": True},
             {"image": image, "mask": mask, "label": 1, "cls_name": "brain", "mask_valid": False},
             {"image": image, "mask": located, "label": 1, "cls_name": "brain", "mask_valid": True}]
    batch = method.labelled_batch(items, np.random.default_rng(0))
    assert batch["answers"][1] == UNLOCATED_YES
    assert batch["answers"][0].startswith("No") and "top left" in batch["answers"][2]
    seen = []
    monkeypatch.setattr(method, "pixel_losses", lambda probs, target: seen.append(len(target)) or (probs.sum(),) * 2)
    method.batch_pixel_losses(torch.rand(3, 4, 2, 8, 8), batch)
    assert seen == [2]


def test_the_training_memory_takes_normal_images_only(tiny_llm_params, mvtec_standin, monkeypatch):
    """Under zad the records are the source's test split, whose first path per class is often a defect."""
    method = build_method("anomalygpt", tiny_llm_params, seed=0)
    root, meta = mvtec_standin
    records = sorted((r for rs in meta["test"].values() for r in rs), key=lambda r: r["img_path"])
    assert records[0]["anomaly"]  # the stand-in's defect folders sort before good/
    used = []
    real = method._raw_image
    monkeypatch.setattr(method, "_raw_image", lambda root, record: used.append(record) or real(root, record))
    method.train_memory(root, records)
    assert used and not any(r["anomaly"] for r in used)
    assert {r["cls_name"] for r in used} == {r["cls_name"] for r in records}
