"""The LLM's memory switches (off by default): gradient checkpointing recomputes layers, 8-bit needs bitsandbytes."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch

from siad.errors import ConfigError
from siad.llm.loader import load_llm, tiny_llm_spec


def _forward_backward(checkpointing: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(calls of layer 0's forward, the logits, the gradient reaching inputs_embeds) of one training pass."""
    llm = load_llm(replace(tiny_llm_spec(seed=3), gradient_checkpointing=checkpointing))
    calls = []
    llm.model.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    embeds = torch.randn(2, 5, llm.spec.hidden_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    logits = llm.model(inputs_embeds=embeds).logits
    logits.sum().backward()
    return len(calls), logits.detach(), embeds.grad


def test_gradient_checkpointing_recomputes_each_layer_and_changes_no_number():
    plain_calls, plain_logits, plain_grad = _forward_backward(False)
    ckpt_calls, ckpt_logits, ckpt_grad = _forward_backward(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the backward pass replays the layer
    torch.testing.assert_close(ckpt_logits, plain_logits)
    torch.testing.assert_close(ckpt_grad, plain_grad)


def test_switches_are_off_by_default():
    spec = tiny_llm_spec()
    assert not spec.gradient_checkpointing and not spec.load_in_8bit


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_8bit_without_bitsandbytes_names_the_package():
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        load_llm(replace(tiny_llm_spec(), load_in_8bit=True))
