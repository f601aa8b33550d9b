"""The LLM's memory switches (off by default): gradient checkpointing recomputes layers, 8-bit needs bitsandbytes."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch

from siad.errors import ConfigError
from siad.llm.loader import checkpointing_active, load_llm, tiny_llm_spec


def _forward_backward(checkpointing: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(calls of layer 0's forward, the logits, the gradient reaching inputs_embeds) of one training pass."""
    llm = load_llm(replace(tiny_llm_spec(seed=3), gradient_checkpointing=checkpointing))
    calls = []
    llm.model.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    embeds = torch.randn(2, 5, llm.spec.hidden_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with checkpointing_active(llm):  # a training forward: checkpointed when the spec says so
        logits = llm.model(inputs_embeds=embeds).logits
    assert not any(layer.training for layer in llm.model.model.layers)  # eval mode again (generation keeps its cache)
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


# -- the switches as params of the LLM methods (methods/<m>/params/llm_gradient_checkpointing, llm_load_in_8bit) --


@pytest.mark.parametrize("name", ["anomalygpt", "siad_llm"])
def test_llm_methods_take_the_switches_as_params_off_by_default_and_the_cost_table_names_them(name):
    from siad.engine.scale import SWITCHES
    from siad.methods import get_method_class

    cls = get_method_class(name)
    assert cls.defaults["llm_gradient_checkpointing"] is False and cls.defaults["llm_load_in_8bit"] is False
    for switch in SWITCHES.names():  # every switch the cost table suggests is a param the method accepts
        assert SWITCHES.get(switch).param in cls.defaults and SWITCHES.get(switch).param in cls.param_rules
    with pytest.raises(ConfigError, match="llm_gradient_checkpointing"):
        cls.resolve_params({"llm": "tiny-random", "llm_gradient_checkpointing": "yes"})


def _training_pass(params: dict) -> tuple[object, int, float, list[torch.Tensor], list[str]]:
    """(the method, calls of LLM layer 0 in one training loss + backward, the loss, the trainable gradients, the
    answers of one generation) of a tiny AnomalyGPT built with ``params``."""
    from siad.methods import build_method

    method = build_method("anomalygpt", params, seed=0)
    calls = []
    handle = method.llm.model.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    images = torch.rand(2, 3, method.input_size, method.input_size, generator=torch.Generator().manual_seed(1))
    stages, embedding = method.encode_images(images)
    out = method.forward_pass(method.visual_tokens(stages), method.text_features(["bottle", "bottle"]))
    loss = method.answer_loss(embedding, out.prompts, ["bottle", "bottle"],
                              ["No, there is no anomaly in the image.", "Yes, there is an anomaly in the image."])
    loss.backward()
    n_calls = len(calls)
    handle.remove()
    grads = [p.grad.clone() for p in method.trainable_parameters() if p.grad is not None]
    with torch.no_grad():
        answers, _ = method.judge(embedding.detach(), out.prompts.detach(), ["bottle", "bottle"])
    return method, n_calls, float(loss.detach()), grads, answers


def test_llm_gradient_checkpointing_param_checkpoints_the_training_forward_only_and_changes_no_number(
        tiny_llm_params):
    plain = _training_pass(dict(tiny_llm_params))
    ckpt = _training_pass({**tiny_llm_params, "llm_gradient_checkpointing": True})
    assert not plain[0].llm.spec.gradient_checkpointing and ckpt[0].llm.spec.gradient_checkpointing
    assert (plain[1], ckpt[1]) == (1, 2)  # the backward pass replays the layer
    assert ckpt[2] == pytest.approx(plain[2], rel=1e-6)
    assert len(ckpt[3]) == len(plain[3]) > 0
    for a, b in zip(ckpt[3], plain[3]):
        torch.testing.assert_close(a, b)
    assert ckpt[4] == plain[4]  # generation keeps its KV cache: the layers are in eval mode outside the loss
    assert not any(layer.training for layer in ckpt[0].llm.model.model.layers)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_llm_load_in_8bit_param_reaches_the_loader(tiny_llm_params):
    from siad.methods import build_method

    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        build_method("anomalygpt", {**tiny_llm_params, "llm_load_in_8bit": True}, seed=0)
