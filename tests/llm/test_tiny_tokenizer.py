import json

import pytest

from siad.llm.tiny_tokenizer import TINY_TOKENIZER_PATH, build_tiny_tokenizer_json, load_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer()


def test_committed_file_equals_regenerated():
    assert json.loads(TINY_TOKENIZER_PATH.read_text()) == json.loads(build_tiny_tokenizer_json())
    assert TINY_TOKENIZER_PATH.stat().st_size < 200_000


def test_llama_special_ids(tokenizer):
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer("Yes", add_special_tokens=True)["input_ids"][0] != 1  # BOS is added by the conversation


@pytest.mark.parametrize(
    "text",
    ["### Human: <Img>", "</Img> ", "\n### Assistant:", "\n###", "Yes, there is an anomaly at the bottom right.",
     "This is a photo of a metal nut for anomaly detection.", "ünïcode ✓ 42"],
)  # fmt: skip
def test_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("word", ["Yes", "No", "###", " Human", " Assistant", " top", " left", " center", " anomaly"])
def test_conversation_words_are_single_tokens(tokenizer, word):
    """Byte-level BPE: a word inside a sentence carries its leading space."""
    assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1
