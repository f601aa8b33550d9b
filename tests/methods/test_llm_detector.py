"""The training machinery AnomalyGPT and SIAD-LLM share (siad/methods/llm_detector.py), on both methods."""

from __future__ import annotations

import pytest
import torch

from siad.methods import build_method

METHODS = ["anomalygpt", "siad_llm"]


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
