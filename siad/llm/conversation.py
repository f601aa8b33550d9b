"""The AnomalyGPT conversation as LM input embeddings, with teacher-forcing labels.

Sequence (pieces tokenized separately, without special tokens, as AnomalyGPT's ``prompt_wrap``)::

    [BOS] "### Human: <Img>" [image embedding] "</Img> " [K prompt embeddings]
    "{user text}\\n### Assistant:" [answer "\\n###"]

The user text is ``{class description} Is there any anomaly in the image?``; with no description the SIAD
Appendix F fallback description is used. Labels are -100 over everything up to and including
"### Assistant:" (the image and prompt embedding slots included) and the token ids of ``answer + "\\n###"``
after it. Text beyond ``max_text_tokens`` (user text + answer) is truncated, as AnomalyGPT's
``max_tgt_len`` (1024). Padding uses the EOS embedding (pad = EOS), attention 0 and label -100: right
padding for training (AnomalyGPT), left padding for generation (so every row's last position is its last
prompt token and batched decoding can append in lock-step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from siad.errors import ConfigError

__all__ = [
    "ANSWER_END",
    "ASSISTANT_END",
    "FALLBACK_DESCRIPTION",
    "IGNORE_INDEX",
    "IMAGE_END",
    "PROMPT_START",
    "QUESTION",
    "ConversationBatch",
    "build_conversation",
    "fallback_description",
    "user_text",
]

PROMPT_START = "### Human: <Img>"
IMAGE_END = "</Img> "
ASSISTANT_END = "\n### Assistant:"
ANSWER_END = "\n###"
QUESTION = " Is there any anomaly in the image?"
FALLBACK_DESCRIPTION = (
    "This is a photo of a {} for anomaly detection, which should be without any damage, flaw, defect, scratch, "
    "hole or broken part."
)
IGNORE_INDEX = -100


@dataclass
class ConversationBatch:
    """LM inputs of a batch: ``inputs_embeds`` [B,T,D], ``attention_mask`` [B,T], ``labels`` [B,T] (or None).

    ``prefix_length`` is the number of positions before the user text (BOS, start marker, image slot,
    ``</Img> ``, prompt slots), identical for every row; ``padding_side`` says where padding sits.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    prefix_length: int
    padding_side: Literal["left", "right"]


def fallback_description(class_name: str) -> str:
    """SIAD Appendix F description for a class without its own (``_`` in the name becomes a space)."""
    return FALLBACK_DESCRIPTION.format(class_name.replace("_", " "))


def user_text(class_name: str, description: str | None = None) -> str:
    """The human turn's text: the class description (or the fallback) followed by the question."""
    return (description if description else fallback_description(class_name)) + QUESTION


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _embed(embed_tokens: nn.Embedding, ids: list[int], device: torch.device) -> torch.Tensor:
    return embed_tokens(torch.tensor(ids, dtype=torch.long, device=device))


def _check_shapes(image_embeds: torch.Tensor, prompt_embeds: torch.Tensor, n_texts: int, dim: int) -> None:
    if image_embeds.ndim != 3 or image_embeds.shape[1] != 1 or image_embeds.shape[2] != dim:
        raise ConfigError(f"image_embeds must be [B,1,{dim}], got {tuple(image_embeds.shape)}.")
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != image_embeds.shape[0] or prompt_embeds.shape[2] != dim:
        raise ConfigError(
            f"prompt_embeds must be [B,K,{dim}] with B={image_embeds.shape[0]}, got {tuple(prompt_embeds.shape)}."
        )
    if n_texts != image_embeds.shape[0]:
        raise ConfigError(f"{n_texts} user texts for a batch of {image_embeds.shape[0]} images; give one per image.")


def build_conversation(
    embed_tokens: nn.Embedding,
    tokenizer: Any,
    image_embeds: torch.Tensor,
    prompt_embeds: torch.Tensor,
    user_texts: Sequence[str],
    answers: Sequence[str] | None = None,
    padding_side: Literal["left", "right"] | None = None,
    max_text_tokens: int = 1024,
) -> ConversationBatch:
    """Assemble the batch. ``answers`` given → labels (training); else a generation prompt.

    ``padding_side`` defaults to right with answers, left without. ``image_embeds`` [B,1,D] are the projected
    image tokens, ``prompt_embeds`` [B,K,D] the (base + map) prompt embeddings; gradients flow through both.
    """
    dim = embed_tokens.embedding_dim
    _check_shapes(image_embeds, prompt_embeds, len(user_texts), dim)
    if answers is not None and len(answers) != len(user_texts):
        raise ConfigError(f"{len(answers)} answers for {len(user_texts)} user texts; give one per image.")
    side = padding_side or ("right" if answers is not None else "left")
    device = image_embeds.device
    batch = image_embeds.shape[0]
    head = _embed(embed_tokens, [tokenizer.bos_token_id, *_ids(tokenizer, PROMPT_START)], device)
    middle = _embed(embed_tokens, _ids(tokenizer, IMAGE_END), device)
    prefix = [
        torch.cat([head, image_embeds[b].to(head.dtype), middle, prompt_embeds[b].to(head.dtype)]) for b in range(batch)
    ]
    prefix_length = prefix[0].shape[0]
    rows, labels = [], []
    for b in range(batch):
        question = _ids(tokenizer, user_texts[b] + ASSISTANT_END)
        target = _ids(tokenizer, answers[b] + ANSWER_END) if answers is not None else []
        text = (question + target)[:max_text_tokens]
        rows.append(torch.cat([prefix[b], _embed(embed_tokens, text, device)]))
        labels.append([IGNORE_INDEX] * (prefix_length + len(question)) + target)
    return _pad(rows, labels if answers is not None else None, embed_tokens, tokenizer, prefix_length, side)


def _pad(
    rows: list[torch.Tensor],
    labels: list[list[int]] | None,
    embed_tokens: nn.Embedding,
    tokenizer: Any,
    prefix_length: int,
    side: Literal["left", "right"],
) -> ConversationBatch:
    if side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', got {side!r}.")
    device = rows[0].device
    length = max(r.shape[0] for r in rows)
    pad_vec = _embed(embed_tokens, [tokenizer.pad_token_id], device)[0]
    embeds, masks, label_rows = [], [], []
    for i, row in enumerate(rows):
        n_pad = length - row.shape[0]
        pad = pad_vec.expand(n_pad, -1)
        ones, zeros = torch.ones(row.shape[0], dtype=torch.long), torch.zeros(n_pad, dtype=torch.long)
        if side == "right":
            embeds.append(torch.cat([row, pad]))
            masks.append(torch.cat([ones, zeros]))
        else:
            embeds.append(torch.cat([pad, row]))
            masks.append(torch.cat([zeros, ones]))
        if labels is not None:
            row_labels = labels[i][: row.shape[0]]
            fill = [IGNORE_INDEX] * n_pad
            label_rows.append(row_labels + fill if side == "right" else fill + row_labels)
    return ConversationBatch(
        inputs_embeds=torch.stack(embeds),
        attention_mask=torch.stack(masks).to(device),
        labels=None if labels is None else torch.tensor(label_rows, dtype=torch.long, device=device),
        prefix_length=prefix_length,
        padding_side=side,
    )
