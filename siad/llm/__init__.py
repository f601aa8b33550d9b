"""The LLM bridge of AnomalyGPT and SIAD-LLM: loading the causal LM, building the conversation, decoding
answers (and P("Yes")), and turning masks into target answers / generated answers into verdicts.
"""

from __future__ import annotations

from siad.llm.answers import (
    POSITION_WORDS,
    UNLOCATED_YES,
    ParsedAnswer,
    anomalygpt_sentence,
    parse_answer,
    patch_answer,
    patch_words,
    position_words,
    target_answer,
)
from siad.llm.conversation import ConversationBatch, build_conversation, fallback_description, user_text
from siad.llm.generation import GenerationConfig, answer_token_ids, generate_answers, yes_probability
from siad.llm.loader import LlmSpec, LoadedLlm, load_llm, merge_lora, tiny_llm_spec, vicuna_pandagpt_spec

__all__ = [
    "POSITION_WORDS",
    "UNLOCATED_YES",
    "ConversationBatch",
    "GenerationConfig",
    "LlmSpec",
    "LoadedLlm",
    "ParsedAnswer",
    "anomalygpt_sentence",
    "answer_token_ids",
    "build_conversation",
    "fallback_description",
    "generate_answers",
    "load_llm",
    "merge_lora",
    "parse_answer",
    "patch_answer",
    "patch_words",
    "position_words",
    "target_answer",
    "tiny_llm_spec",
    "user_text",
    "vicuna_pandagpt_spec",
    "yes_probability",
]
