from dataclasses import replace

import pytest
import torch

from siad.errors import ConfigError, MissingWeightsError
from siad.llm.loader import (
    LORA_MODULES,
    apply_pandagpt_delta,
    collect_lora_pairs,
    load_llm,
    merge_lora,
    tiny_llm_spec,
    vicuna_pandagpt_spec,
)

R, ALPHA = 4, 8


@pytest.fixture()
def tiny():
    return load_llm(tiny_llm_spec(seed=3, image_dim=16))


def _lora_state(model, spelling: str, skip: tuple[int, str] | None = None, seed: int = 0) -> dict:
    """Synthetic PandaGPT-style delta for ``model`` (peft prefix, chosen key spelling)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    hidden = model.config.hidden_size
    for layer in range(model.config.num_hidden_layers):
        for module in LORA_MODULES:
            if (layer, module) == skip:
                continue
            out_dim, in_dim = model.state_dict()[f"model.layers.{layer}.self_attn.{module}.weight"].shape
            prefix = f"llama_model.base_model.model.model.layers.{layer}.self_attn.{module}"
            state[f"{prefix}.lora_A{spelling}.weight"] = torch.randn(R, in_dim, generator=gen)
            state[f"{prefix}.lora_B{spelling}.weight"] = torch.randn(out_dim, R, generator=gen)
    state["llama_proj.weight"] = torch.randn(hidden, 16, generator=gen)
    state["llama_proj.bias"] = torch.randn(hidden, generator=gen)
    return state


def test_tiny_model_is_seeded_frozen_and_llama_like(tiny):
    again = load_llm(tiny_llm_spec(seed=3, image_dim=16))
    other = load_llm(tiny_llm_spec(seed=4, image_dim=16))
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(tiny.model.state_dict()[w], again.model.state_dict()[w])
    assert not torch.equal(tiny.model.state_dict()[w], other.model.state_dict()[w])
    assert torch.equal(tiny.image_proj.weight, again.image_proj.weight)
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert tiny.model.config.bos_token_id == 1 and tiny.model.config.eos_token_id == 2
    assert tiny.embed_tokens.num_embeddings == len(tiny.tokenizer)


@pytest.mark.parametrize("spelling", ["", ".default"])
def test_merge_lora_adds_scaled_product(tiny, spelling):
    state = tiny.model.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    lora = _lora_state(tiny.model, spelling)
    merged = merge_lora(state, lora, r=R, alpha=ALPHA)
    assert len(merged) == tiny.model.config.num_hidden_layers * 4
    key = "model.layers.1.self_attn.v_proj.weight"
    prefix = "llama_model.base_model.model.model.layers.1.self_attn.v_proj"
    a, b = lora[f"{prefix}.lora_A{spelling}.weight"], lora[f"{prefix}.lora_B{spelling}.weight"]
    expected = before[key] + (ALPHA / R) * b @ a
    torch.testing.assert_close(tiny.model.state_dict()[key], expected)  # in place: the model itself changed
    untouched = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(tiny.model.state_dict()[untouched], before[untouched])


def test_both_spellings_are_recognised_and_duplicates_rejected(tiny):
    plain, default = _lora_state(tiny.model, ""), _lora_state(tiny.model, ".default")
    assert collect_lora_pairs(plain).keys() == collect_lora_pairs(default).keys()
    with pytest.raises(ConfigError, match="two tensors"):
        collect_lora_pairs({**plain, **default})


def test_merge_lora_rejects_wrong_rank(tiny):
    with pytest.raises(ConfigError, match="r=8"):
        merge_lora(tiny.model.state_dict(), _lora_state(tiny.model, ""), r=8, alpha=8)


def test_apply_delta_loads_everything(tiny):
    spec = replace(tiny_llm_spec(image_dim=16), lora_r=R, lora_alpha=ALPHA)
    delta = _lora_state(tiny.model, ".default")
    merged, proj = apply_pandagpt_delta(tiny.model, delta, spec)
    assert len(merged) == 8
    assert torch.equal(proj.weight, delta["llama_proj.weight"]) and torch.equal(proj.bias, delta["llama_proj.bias"])


def test_apply_delta_names_the_missing_layer(tiny):
    spec = replace(tiny_llm_spec(image_dim=16), lora_r=R, lora_alpha=ALPHA)
    delta = _lora_state(tiny.model, "", skip=(1, "k_proj"))
    before = tiny.model.state_dict()["model.layers.0.self_attn.q_proj.weight"].clone()
    with pytest.raises(MissingWeightsError, match=r"layers\.1\.self_attn\.k_proj\.lora_A.*lora_B") as err:
        apply_pandagpt_delta(tiny.model, delta, spec)
    assert "layers.0" not in str(err.value)
    # nothing was merged before the check failed
    assert torch.equal(tiny.model.state_dict()["model.layers.0.self_attn.q_proj.weight"], before)


def test_apply_delta_requires_projection(tiny):
    spec = replace(tiny_llm_spec(image_dim=16), lora_r=R, lora_alpha=ALPHA)
    delta = _lora_state(tiny.model, "")
    del delta["llama_proj.bias"]
    with pytest.raises(MissingWeightsError, match="llama_proj"):
        apply_pandagpt_delta(tiny.model, delta, spec)


def test_paper_profile_lists_every_missing_file(tmp_path):
    vicuna = tmp_path / "vicuna-7b-v0"
    vicuna.mkdir()
    (vicuna / "config.json").write_text("{}")
    spec = vicuna_pandagpt_spec(vicuna, tmp_path / "pandagpt" / "pytorch_model.pt")
    with pytest.raises(MissingWeightsError) as err:
        load_llm(spec)
    message = str(err.value)
    assert "tokenizer.model" in message and "apply_delta" in message
    assert "pytorch_model*.bin" in message
    assert "openllmplayground/pandagpt_7b_max_len_1024" in message and str(tmp_path / "pandagpt") in message
    assert str(vicuna / "config.json") not in message  # present files are not reported
