import pytest
import torch

from siad.errors import ConfigError
from siad.llm.conversation import build_conversation, user_text
from siad.llm.generation import (
    GenerationConfig,
    _StopAtSeparator,
    answer_token_ids,
    clean_answer,
    generate_answers,
    generate_judgements,
    yes_probability,
)
from siad.llm.loader import load_llm, tiny_llm_spec

TEXTS = [user_text("bottle"), user_text("metal_nut", "A nut."), user_text("pcb", "A printed circuit board, green.")]


@pytest.fixture(scope="module")
def llm():
    return load_llm(tiny_llm_spec(seed=1, image_dim=8))


@pytest.fixture(scope="module")
def inputs(llm):
    gen = torch.Generator().manual_seed(7)
    dim = llm.embed_tokens.embedding_dim
    return torch.randn(3, 1, dim, generator=gen), torch.randn(3, 4, dim, generator=gen)


def _prompt(llm, inputs, rows=slice(None)):
    image, prompts = inputs
    return build_conversation(llm.embed_tokens, llm.tokenizer, image[rows], prompts[rows], TEXTS[rows])


def test_greedy_is_deterministic_and_batched_equals_single(llm, inputs):
    config = GenerationConfig(max_new_tokens=12)
    batched = generate_answers(llm.model, llm.tokenizer, _prompt(llm, inputs), config)
    assert batched == generate_answers(llm.model, llm.tokenizer, _prompt(llm, inputs), config)
    singles = [
        generate_answers(llm.model, llm.tokenizer, _prompt(llm, inputs, slice(i, i + 1)), config)[0] for i in range(3)
    ]
    assert batched == singles
    assert any(batched)  # the random model does say something


def test_kv_cache_does_not_change_greedy_output(llm, inputs):
    cached = generate_answers(llm.model, llm.tokenizer, _prompt(llm, inputs), GenerationConfig(max_new_tokens=8))
    uncached = GenerationConfig(max_new_tokens=8, use_cache=False)
    assert cached == generate_answers(llm.model, llm.tokenizer, _prompt(llm, inputs), uncached)


def test_sampling_is_seeded(llm, inputs):
    def sample(seed):
        cfg = GenerationConfig(max_new_tokens=10, do_sample=True, top_p=0.95, seed=seed)
        return generate_answers(llm.model, llm.tokenizer, _prompt(llm, inputs), cfg)

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


def test_generation_needs_a_left_padded_prompt(llm, inputs):
    image, prompts = inputs
    train = build_conversation(llm.embed_tokens, llm.tokenizer, image, prompts, TEXTS, ["No."] * 3)
    with pytest.raises(ConfigError, match="answers=None"):
        generate_answers(llm.model, llm.tokenizer, train)


def test_stop_at_separator(llm):
    tok = llm.tokenizer
    rows = [
        tok("Yes, at the top.\n###", add_special_tokens=False)["input_ids"],
        tok("No", add_special_tokens=False)["input_ids"],
    ]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    assert _StopAtSeparator(tok, 0)(ids, None).tolist() == [True, False]
    assert clean_answer(" Yes, at the top.\n### Human: more") == "Yes, at the top."


def test_yes_probability_matches_logits(llm, inputs):
    batch = _prompt(llm, inputs)
    p_yes = yes_probability(llm.model, llm.tokenizer, batch)
    assert p_yes.shape == (3,) and ((p_yes >= 0) & (p_yes <= 1)).all()
    yes_id, no_id = answer_token_ids(llm.tokenizer)
    for i in range(3):  # unpadded single-row forward: last position's logits
        single = _prompt(llm, inputs, slice(i, i + 1))
        logits = llm.model(inputs_embeds=single.inputs_embeds).logits[0, -1]
        expected = torch.sigmoid(logits[yes_id] - logits[no_id])
        torch.testing.assert_close(p_yes[i], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(p_yes, p_yes[0].expand(3))  # depends on the input
    assert torch.equal(p_yes, yes_probability(llm.model, llm.tokenizer, batch))


def test_yes_probability_same_for_right_padding(llm, inputs):
    image, prompts = inputs
    left = yes_probability(llm.model, llm.tokenizer, _prompt(llm, inputs))
    right_batch = build_conversation(llm.embed_tokens, llm.tokenizer, image, prompts, TEXTS, padding_side="right")
    torch.testing.assert_close(yes_probability(llm.model, llm.tokenizer, right_batch), left, atol=1e-5, rtol=1e-5)


def test_one_generation_gives_the_answers_and_p_yes(llm, inputs):
    batch = _prompt(llm, inputs)
    answers, p_yes = generate_judgements(llm.model, llm.tokenizer, batch)
    assert answers == generate_answers(llm.model, llm.tokenizer, batch)
    assert torch.allclose(p_yes, yes_probability(llm.model, llm.tokenizer, batch), atol=1e-5)
