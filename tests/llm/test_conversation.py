import pytest
import torch

from siad.errors import ConfigError
from siad.llm.conversation import (
    ANSWER_END,
    ASSISTANT_END,
    IGNORE_INDEX,
    IMAGE_END,
    PROMPT_START,
    build_conversation,
    fallback_description,
    user_text,
)
from siad.llm.loader import load_llm, tiny_llm_spec

K = 5


@pytest.fixture(scope="module")
def llm():
    return load_llm(tiny_llm_spec(seed=0, image_dim=8))


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _inputs(llm, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dim = llm.embed_tokens.embedding_dim
    return torch.randn(batch, 1, dim, generator=gen), torch.randn(batch, K, dim, generator=gen)


def test_user_text_and_fallback():
    assert fallback_description("metal_nut") == (
        "This is a photo of a metal nut for anomaly detection, which should be without any damage, flaw, defect, "
        "scratch, hole or broken part."
    )
    assert user_text("bottle", "A round bottle.") == "A round bottle. Is there any anomaly in the image?"
    assert user_text("bottle").startswith("This is a photo of a bottle for anomaly detection")


def test_layout_labels_and_padding(llm):
    tok, emb = llm.tokenizer, llm.embed_tokens
    image, prompts = _inputs(llm, 2)
    texts = [user_text("bottle", "Short."), user_text("screw")]
    answers = [
        "No, there are no anomalies in the image.",
        "Yes, there is an anomaly in the image, at the top of the image.",
    ]
    batch = build_conversation(emb, tok, image, prompts, texts, answers)
    head = [tok.bos_token_id, *_ids(tok, PROMPT_START)]
    prefix_len = len(head) + 1 + len(_ids(tok, IMAGE_END)) + K
    assert batch.prefix_length == prefix_len and batch.padding_side == "right"
    for row in range(2):
        question = _ids(tok, texts[row] + ASSISTANT_END)
        target = _ids(tok, answers[row] + ANSWER_END)
        n = prefix_len + len(question) + len(target)
        labels = batch.labels[row]
        assert (labels[: prefix_len + len(question)] == IGNORE_INDEX).all()
        assert labels[prefix_len + len(question) : n].tolist() == target
        assert (labels[n:] == IGNORE_INDEX).all() and (batch.attention_mask[row, n:] == 0).all()
        assert (batch.attention_mask[row, :n] == 1).all()
        e = batch.inputs_embeds[row]
        torch.testing.assert_close(e[: len(head)], emb(torch.tensor(head)))
        torch.testing.assert_close(e[len(head)], image[row, 0])  # image slot
        torch.testing.assert_close(e[prefix_len - K : prefix_len], prompts[row])  # prompt slots
        torch.testing.assert_close(e[prefix_len:n], emb(torch.tensor(question + target)))
        pad = emb(torch.tensor([tok.eos_token_id]))[0]
        assert all(torch.equal(v, pad) for v in e[n:])
    assert batch.attention_mask[0].sum() != batch.attention_mask[1].sum()  # padding was exercised


def test_generation_prompt_is_left_padded(llm):
    image, prompts = _inputs(llm, 2)
    texts = [user_text("bottle", "Short."), user_text("screw")]
    batch = build_conversation(llm.embed_tokens, llm.tokenizer, image, prompts, texts)
    assert batch.labels is None and batch.padding_side == "left"
    assert (batch.attention_mask[:, -1] == 1).all() and batch.attention_mask[0, 0] == 0
    single = build_conversation(llm.embed_tokens, llm.tokenizer, image[:1], prompts[:1], texts[:1])
    n = single.inputs_embeds.shape[1]
    torch.testing.assert_close(batch.inputs_embeds[0, -n:], single.inputs_embeds[0])


def test_gradients_reach_the_prompt_embeddings(llm):
    image, prompts = _inputs(llm, 1)
    prompts.requires_grad_(True)
    batch = build_conversation(llm.embed_tokens, llm.tokenizer, image, prompts, [user_text("pill")], ["No."])
    out = llm.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, labels=batch.labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and prompts.grad.abs().sum() > 0


def test_truncation_and_bad_shapes(llm):
    image, prompts = _inputs(llm, 1)
    batch = build_conversation(
        llm.embed_tokens, llm.tokenizer, image, prompts, [user_text("pill")], ["No."], max_text_tokens=3
    )
    assert batch.inputs_embeds.shape[1] == batch.prefix_length + 3
    assert (batch.labels == IGNORE_INDEX).all()  # the answer fell beyond the truncation
    with pytest.raises(ConfigError, match="user texts"):
        build_conversation(llm.embed_tokens, llm.tokenizer, image, prompts, ["a", "b"])
    with pytest.raises(ConfigError, match="image_embeds"):
        build_conversation(llm.embed_tokens, llm.tokenizer, prompts, prompts, ["a"])
