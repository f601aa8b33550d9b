"""Text encoding through an open_clip text tower with injected embeddings, and learnable prompt modules.

:func:`encode_text_with_context` re-runs ``model.encode_text`` step by step (token embedding →
positional embedding → causal blocks → ``ln_final`` → pooling at the EOT token (argmax of the token
ids for CLIP) → ``text_projection``) and lets a caller

- replace the token embeddings (shallow context: CoOp / AnomalyCLIP's "X×12 object.", FiLo's
  CoCoOp context), and
- overwrite hidden positions before chosen blocks (deep prompts: AnomalyCLIP's compound prompts,
  AdaCLIP's static + dynamic text prompts).

Nothing in open_clip is modified; with nothing injected the result equals ``model.encode_text``.
The modules below hold the learnable tensors and are reusable by the baselines:
:class:`ContextVectors` (shallow), :class:`DeepTextPrompts` (per-block tokens) and
:class:`MetaNetContext` (CoCoOp, image-conditioned).

Shapes: ``N`` sentences of ``L`` tokens, text width ``W``; an optional leading image axis ``B``
(token embeddings ``[B, N, L, W]``) gives one encoding per (image, sentence). Injected values are
broadcast to ``[*lead, n, W]`` with ``lead`` = ``(N,)`` or ``(B, N)``: pass ``[n, W]`` to share them,
``[B, 1, n, W]`` for per-image values.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from siad.errors import ConfigError
from siad.seeding import derived_seed

DeepPrompts = Mapping[int, torch.Tensor] | Sequence[torch.Tensor]


def _check_text_tower(model: nn.Module) -> None:
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
    missing = [name for name in needed if not hasattr(model, name)]
    if missing:
        raise ConfigError(
            f"{type(model).__name__} has no built-in CLIP text transformer (missing {missing}); context "
            "injection needs an open_clip CLIP model (e.g. ViT-B-16-plus-240, ViT-L-14-336, ViT-H-14), "
            "not a Hugging Face text tower: pick such a backbone"
        )


def inject_context(embeddings: torch.Tensor, values: torch.Tensor, start: int = 1) -> torch.Tensor:
    """Return ``embeddings`` [*lead, L, W] with positions ``start .. start+n-1`` replaced by ``values``.

    ``values`` is broadcast to ``[*lead, n, W]``. The input is not modified (gradients flow to ``values``).
    """
    n, width = values.shape[-2:]
    lead, length = embeddings.shape[:-2], embeddings.shape[-2]
    if width != embeddings.shape[-1]:
        raise ConfigError(f"context width {width} differs from the text width {embeddings.shape[-1]}")
    if start < 0 or start + n > length:
        raise ConfigError(f"context of {n} tokens at position {start} does not fit a sequence of {length} tokens")
    block = values.to(embeddings.dtype).expand(*lead, n, width)
    return torch.cat([embeddings[..., :start, :], block, embeddings[..., start + n :, :]], dim=-2)


def _deep_prompt_map(deep_prompts: DeepPrompts | None, n_blocks: int) -> dict[int, torch.Tensor]:
    """Normalise deep prompts to {block index: values}; a sequence means blocks 1, 2, ... (block 0 untouched)."""
    if deep_prompts is None:
        return {}
    mapping = dict(deep_prompts) if isinstance(deep_prompts, Mapping) else dict(enumerate(deep_prompts, start=1))
    bad = sorted(b for b in mapping if not 0 <= b < n_blocks)
    if bad:
        raise ConfigError(f"deep prompts for block(s) {bad}, but the text tower has blocks 0..{n_blocks - 1}")
    return mapping


def _run_text_blocks(
    model: nn.Module,
    tokens: torch.Tensor,
    token_embeddings: torch.Tensor | None,
    deep_prompts: DeepPrompts | None,
    deep_start: int,
    keep_hidden: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Residual stream after the last block [*lead, L, W] and, if asked, the stream entering each block."""
    _check_text_tower(model)
    length = tokens.shape[-1]
    if length > model.positional_embedding.shape[0]:
        raise ConfigError(f"{length} tokens exceed the text context length {model.positional_embedding.shape[0]}")
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens) if token_embeddings is None else token_embeddings
    if x.shape[-2] != length or x.dim() not in (3, 4):
        raise ConfigError(f"token embeddings {tuple(x.shape)} must be [N, L, W] or [B, N, L, W] with L = {length}")
    lead = x.shape[:-2]
    x = (x.to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)).reshape(-1, length, x.shape[-1])
    mask = None if model.attn_mask is None else model.attn_mask[:length, :length]
    prompts = _deep_prompt_map(deep_prompts, len(model.transformer.resblocks))
    batch_first = getattr(model.transformer, "batch_first", True)
    hidden: list[torch.Tensor] = []
    for index, block in enumerate(model.transformer.resblocks):
        if index in prompts:
            values = prompts[index].to(cast_dtype)
            x = inject_context(x, values.expand(*lead, *values.shape[-2:]).reshape(-1, *values.shape[-2:]), deep_start)
        if keep_hidden:
            hidden.append(x.reshape(*lead, length, -1))
        x = block(x, attn_mask=mask) if batch_first else block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    if keep_hidden:
        hidden.append(x.reshape(*lead, length, -1))
    return x.reshape(*lead, length, -1), hidden


def encode_text_with_context(
    model: nn.Module,
    tokens: torch.Tensor,
    token_embeddings: torch.Tensor | None = None,
    deep_prompts: DeepPrompts | None = None,
    *,
    deep_start: int = 1,
    normalize: bool = False,
) -> torch.Tensor:
    """``model.encode_text`` with optional injected token embeddings and deep prompts.

    Args:
        model: an open_clip ``CLIP`` model (frozen or not; gradients flow to whatever is injected).
        tokens: token ids [N, L] (``L`` may be shorter than the context length: positions are sliced).
            Pooling uses them (argmax = EOT for CLIP), so placeholders must stay in the ids.
        token_embeddings: replaces ``model.token_embedding(tokens)``; [N, L, W] or [B, N, L, W].
        deep_prompts: values written at hidden positions ``deep_start ..`` *before* the given blocks
            (0-indexed), as {block: [.., n, W]} or a sequence for blocks 1, 2, ... (block 0 untouched,
            as AnomalyCLIP and AdaCLIP do).
        deep_start: first overwritten hidden position (1 = right after the start token).
        normalize: L2-normalise the output.

    Returns:
        Text features [N, E] (or [B, N, E]).
    """
    x, _ = _run_text_blocks(model, tokens, token_embeddings, deep_prompts, deep_start, keep_hidden=False)
    lead = x.shape[:-2]
    x = model.ln_final(x).reshape(-1, *x.shape[-2:])
    flat_tokens = tokens.expand(*lead, tokens.shape[-1]).reshape(-1, tokens.shape[-1])
    pooled = text_global_pool(x, flat_tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if isinstance(model.text_projection, nn.Linear):
        pooled = model.text_projection(pooled)
    elif model.text_projection is not None:
        pooled = pooled @ model.text_projection
    pooled = pooled.reshape(*lead, -1)
    return F.normalize(pooled, dim=-1) if normalize else pooled


def text_hidden_states(
    model: nn.Module,
    tokens: torch.Tensor,
    token_embeddings: torch.Tensor | None = None,
    deep_prompts: DeepPrompts | None = None,
    *,
    deep_start: int = 1,
) -> list[torch.Tensor]:
    """The residual stream entering each text block (after its deep prompts) and after the last one.

    ``layers + 1`` tensors [*lead, L, W]; for inspecting where injected prompts act.
    """
    return _run_text_blocks(model, tokens, token_embeddings, deep_prompts, deep_start, keep_hidden=True)[1]


def trimmed_length(model: nn.Module, tokens: torch.Tensor) -> int:
    """Shortest prefix length that leaves EOT-pooled features unchanged (causal mask), else the full length."""
    pool_type = getattr(model, "text_pool_type", "argmax")
    eos_id = getattr(model, "text_eos_id", None)
    if getattr(model, "attn_mask", None) is None or pool_type not in ("argmax", "eos"):
        return tokens.shape[-1]
    if pool_type == "eos":
        if eos_id is None:
            return tokens.shape[-1]
        positions = (tokens == eos_id).int().argmax(dim=-1)
    else:
        positions = tokens.argmax(dim=-1)
    return int(positions.max()) + 1


@torch.no_grad()
def encode_sentences(
    model: nn.Module, tokenizer, sentences: Sequence[str], *, batch_size: int = 256, trim_padding: bool = True
) -> torch.Tensor:
    """Un-normalised text embeddings [S, E] of ``sentences``, encoded in batches of ``batch_size``.

    With ``trim_padding`` (default) each batch is cut after its last EOT token: under the causal mask
    the padding never reaches the EOT position, so the features are unchanged up to float rounding
    while AnoVL's 924 sentences of ~20 tokens cost about a quarter of the full 77-token pass.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be ≥ 1, got {batch_size}")
    if not sentences:
        raise ConfigError("no sentences to encode; check the prompt ensemble's state and template lists")
    device = next(model.parameters()).device
    tokens = tokenizer(list(sentences)).to(device)
    chunks = []
    for begin in range(0, len(tokens), batch_size):
        chunk = tokens[begin : begin + batch_size]
        if trim_padding:
            chunk = chunk[:, : trimmed_length(model, chunk)]
        chunks.append(encode_text_with_context(model, chunk))
    return torch.cat(chunks)


def context_prompt_tokens(tokenizer, texts: Sequence[str], n_ctx: int, placeholder: str = "X") -> torch.Tensor:
    """Token ids of ``"X X ... X <text>"`` (``n_ctx`` placeholders) for each text, checked.

    The placeholders occupy positions 1..n_ctx (after the start token), where :class:`ContextVectors`
    or :class:`MetaNetContext` writes its vectors (AnomalyCLIP: "X×12 object."; FiLo: "X×12 {state}.").

    Raises:
        ConfigError: the placeholder is not a single token, or a prompt is cut by the context length.
    """
    if n_ctx < 1:
        raise ConfigError(f"n_ctx must be ≥ 1, got {n_ctx}")
    prefix = " ".join([placeholder] * n_ctx)
    tokens = tokenizer([f"{prefix} {text}".strip() for text in texts])
    single = tokenizer([placeholder])[0]
    if int((single != 0).sum()) != 3:
        raise ConfigError(f"placeholder {placeholder!r} is not a single token; use a short word such as 'X'")
    if not bool((tokens[:, 1 : n_ctx + 1] == single[1]).all()):
        raise ConfigError(f"placeholders did not land on positions 1..{n_ctx}; check the prompt texts {list(texts)}")
    if bool((tokens[:, -1] != 0).any()):
        raise ConfigError(
            f"a prompt with {n_ctx} context tokens fills the whole context of {tokens.shape[-1]} tokens and was "
            "truncated; shorten the text or use fewer context tokens"
        )
    return tokens


def _seeded_normal(shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * std


class ContextVectors(nn.Module):
    """Shallow CoOp context: ``n_ctx`` learnable word embeddings replacing positions ``start ..``.

    Initialised N(0, ``init_std``²) from ``seed`` (AnomalyCLIP's ctx_pos / ctx_neg: 12 × 768, std 0.02).
    """

    def __init__(self, n_ctx: int, width: int, *, init_std: float = 0.02, seed: int = 0, start: int = 1) -> None:
        super().__init__()
        self.start = start
        self.ctx = nn.Parameter(_seeded_normal((n_ctx, width), init_std, seed))

    def forward(self, token_embeddings: torch.Tensor) -> torch.Tensor:
        """Token embeddings [.., L, W] with the context written in."""
        return inject_context(token_embeddings, self.ctx, self.start)


class DeepTextPrompts(nn.Module):
    """Per-block learnable text tokens written at hidden positions ``start ..`` before the given blocks.

    AnomalyCLIP: ``DeepTextPrompts(4, 768, blocks=range(1, 9))`` (compound prompts, depth 9).
    AdaCLIP: ``DeepTextPrompts(5, 768, blocks=(1, 2, 3))`` plus the image-conditioned ``offset`` D_t
    (its unused static S_t[0] is not created). Block ``i``'s tokens are drawn from ``derived_seed(seed, "deep", i)``.
    (AnomalyCLIP's release rounds each sentence's copy of the tokens through float16: done by its prompt learner
    after the copies are made, which is what its gradient needs; see ``baselines/anomalyclip``.)
    """

    def __init__(
        self,
        n_tokens: int,
        width: int,
        blocks: Sequence[int],
        *,
        init_std: float = 0.02,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.blocks = tuple(blocks)
        if not self.blocks or len(set(self.blocks)) != len(self.blocks):
            raise ConfigError(f"deep prompt blocks must be distinct and non-empty, got {self.blocks}")
        self.prompts = nn.ParameterList(
            [nn.Parameter(_seeded_normal((n_tokens, width), init_std, derived_seed(seed, "deep", i)))
             for i in range(len(self.blocks))]
        )

    def forward(self, offset: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """{block: tokens [n, W]} (or tokens + ``offset``, broadcast, e.g. [B, 1, n, W] per image)."""
        out = {}
        for block, prompt in zip(self.blocks, self.prompts, strict=True):
            out[block] = prompt if offset is None else prompt + offset
        return out


class MetaNetContext(nn.Module):
    """CoCoOp context (FiLo's prompt learners): learnable vectors shifted by a meta-net of the image.

    ``ctx`` [n_ctx, ctx_dim] ~ N(0, ``init_std``²); meta-net Linear(feature_dim → feature_dim/16) →
    ReLU → Linear(→ ctx_dim) applied to the **L2-normalised** image feature; its output is added to
    every context vector. FiLo: 12 × 768 with a 768 → 48 → 768 meta-net. Seeded by ``seed``.
    """

    def __init__(
        self,
        n_ctx: int,
        ctx_dim: int,
        feature_dim: int,
        *,
        reduction: int = 16,
        init_std: float = 0.02,
        seed: int = 0,
        start: int = 1,
    ) -> None:
        super().__init__()
        if feature_dim // reduction < 1:
            raise ConfigError(f"meta-net hidden size {feature_dim}//{reduction} is 0; lower `reduction`")
        self.start = start
        self.ctx = nn.Parameter(_seeded_normal((n_ctx, ctx_dim), init_std, seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            hidden = feature_dim // reduction
            layers = [("linear1", nn.Linear(feature_dim, hidden)), ("relu", nn.ReLU()),
                      ("linear2", nn.Linear(hidden, ctx_dim))]
            self.meta_net = nn.Sequential(OrderedDict(layers))  # CoCoOp's (and FiLo's) module names

    def context(self, image_features: torch.Tensor) -> torch.Tensor:
        """Image-conditioned context [B, n_ctx, ctx_dim] from image features [B, feature_dim]."""
        shift = self.meta_net(F.normalize(image_features, dim=-1))
        return self.ctx.unsqueeze(0) + shift.unsqueeze(1)

    def forward(self, token_embeddings: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings [N, L, W] → [B, N, L, W], each image's context written in."""
        ctx = self.context(image_features).unsqueeze(1)  # [B, 1, n_ctx, W]
        batch = ctx.shape[0]
        return inject_context(token_embeddings.expand(batch, *token_embeddings.shape), ctx, self.start)
