"""Answer generation and the LLM's continuous score P("Yes").

``generate_answers`` decodes a left-padded conversation batch with ``model.generate(inputs_embeds=...)``:
greedy with KV cache by default (reproducible; AnomalyGPT samples with top_p 0.1/0.01, available as
``do_sample=True``), stopping a row once its text contains the separator "###" (AnomalyGPT stops on the
token that starts "###" and drops it; here the text is cut at the separator, which gives the same string
for any tokenizer). ``yes_probability`` reads the logits at the answer's first position and returns
softmax over the two ids of "Yes" and "No" → P("Yes"), so the LLM judgement also gets an AUROC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from siad.errors import ConfigError
from siad.llm.conversation import ConversationBatch

__all__ = [
    "SEPARATOR",
    "GenerationConfig",
    "answer_token_ids",
    "clean_answer",
    "generate_answers",
    "generate_judgements",
    "yes_probability",
]

SEPARATOR = "###"


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; the defaults are the suite's greedy, cached, ≤ 64-token decoding."""

    max_new_tokens: int = 64
    do_sample: bool = False
    top_p: float = 0.1
    temperature: float = 1.0
    use_cache: bool = True
    seed: int = 0


class _StopAtSeparator:
    """Per-row stopping criterion: a row is done once its generated text contains the separator."""

    def __init__(self, tokenizer: Any, prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_length :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return torch.tensor([SEPARATOR in t for t in texts], dtype=torch.bool, device=input_ids.device)


def _check_left_padded(batch: ConversationBatch) -> None:
    if batch.labels is not None or batch.padding_side != "left":
        raise ConfigError(
            "generation needs a left-padded prompt without answers: build_conversation(..., answers=None)."
        )


def clean_answer(text: str) -> str:
    """Cut a generated text at the separator and strip whitespace."""
    return text.split(SEPARATOR, 1)[0].strip()


def _generate(
    model: nn.Module, tokenizer: Any, batch: ConversationBatch, config: GenerationConfig, *, first_logits: bool
) -> Any:
    """``model.generate`` on a left-padded prompt batch, seeded; returns the ``generate`` output."""
    from transformers import StoppingCriteriaList

    _check_left_padded(batch)
    kwargs: dict[str, Any] = {"do_sample": config.do_sample}
    if config.do_sample:
        kwargs.update(top_p=config.top_p, temperature=config.temperature, top_k=0)
    if first_logits:
        kwargs.update(output_logits=True, return_dict_in_generate=True)
    with torch.random.fork_rng(devices=[batch.inputs_embeds.device] if batch.inputs_embeds.is_cuda else []):
        torch.manual_seed(config.seed)
        return model.generate(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            max_new_tokens=config.max_new_tokens,
            use_cache=config.use_cache,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([_StopAtSeparator(tokenizer, 0)]),
            **kwargs,
        )


@torch.no_grad()
def generate_answers(
    model: nn.Module, tokenizer: Any, batch: ConversationBatch, config: GenerationConfig | None = None
) -> list[str]:
    """Decode one answer per row of a left-padded generation batch (see the module docstring)."""
    out = _generate(model, tokenizer, batch, config or GenerationConfig(), first_logits=False)
    # With inputs_embeds only, decoder-only generate returns just the new tokens.
    return [clean_answer(t) for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


@torch.no_grad()
def generate_judgements(
    model: nn.Module, tokenizer: Any, batch: ConversationBatch, config: GenerationConfig | None = None
) -> tuple[list[str], torch.Tensor]:
    """Answers and P("Yes") [B] from ONE batched generation: P("Yes") is read from the raw logits of the first
    generated position (the same number as :func:`yes_probability`, without its extra forward pass)."""
    out = _generate(model, tokenizer, batch, config or GenerationConfig(), first_logits=True)
    answers = [clean_answer(t) for t in tokenizer.batch_decode(out.sequences, skip_special_tokens=True)]
    yes_id, no_id = answer_token_ids(tokenizer)
    pair = out.logits[0][:, [yes_id, no_id]].float()
    return answers, pair.softmax(dim=-1)[:, 0]


def answer_token_ids(tokenizer: Any) -> tuple[int, int]:
    """Ids of the first token of "Yes" and of "No" as an answer starts (LLaMA: ▁Yes, ▁No)."""
    yes = tokenizer("Yes", add_special_tokens=False)["input_ids"]
    no = tokenizer("No", add_special_tokens=False)["input_ids"]
    if not yes or not no or yes[0] == no[0]:
        raise ConfigError(f"tokenizer cannot tell 'Yes' {yes} from 'No' {no} at the first token; use another one.")
    return yes[0], no[0]


@torch.no_grad()
def yes_probability(model: nn.Module, tokenizer: Any, batch: ConversationBatch) -> torch.Tensor:
    """P("Yes") = softmax over the logits of ("Yes", "No") at each row's first answer position → [B] in [0, 1].

    Works for either padding side: the position read is the row's last attended prompt token.
    """
    if batch.labels is not None:
        raise ConfigError("yes_probability needs a prompt without answers: build_conversation(..., answers=None).")
    yes_id, no_id = answer_token_ids(tokenizer)
    mask = batch.attention_mask
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: positions start at 0 on each row
    logits = model(
        inputs_embeds=batch.inputs_embeds, attention_mask=mask, position_ids=position_ids, use_cache=False
    ).logits
    positions = torch.arange(mask.shape[1], device=logits.device)
    last = (mask.to(logits.device) * positions).argmax(dim=1)
    pair = logits[torch.arange(logits.shape[0], device=logits.device), last][:, [yes_id, no_id]].float()
    return pair.softmax(dim=-1)[:, 0]
