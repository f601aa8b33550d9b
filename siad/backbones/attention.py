"""Training-free attention variants of a frozen CLIP ViT, as one parameterised mechanism.

The zero-shot localisation methods read "local-aware" patch tokens from a second residual stream whose
attention differs from CLIP's query-key attention:

- **V-V dual path** (AnoVL Eq. 7, FiLo, AnomalyCLIP's DPAM). From block ``start_block`` on, a second
  stream ``u`` runs beside the unmodified stream ``h``::

      u_l = u_{l-1} + out_proj(softmax(v vᵀ · scale) v),   v = V-projection of ln_1(h_{l-1})

  per head, where ``v`` comes from ``ln_1`` of the ORIGINAL stream (AnoVL's and AnomalyCLIP's code feed
  ``ln_1(x_ori)`` to the swapped attention), and the MLP is skipped. ``u`` starts as a copy of ``h`` at
  the input of ``start_block`` (AnomalyCLIP: u₅ = h₅ for DPAM on blocks 6–24; AnoVL's code adds the first
  V-V residual onto the block input itself). ``h`` is computed by calling the model's own blocks, so it
  is bit-identical to the unmodified model; the image embedding comes from it (AnoVL/FiLo keep the
  original-path CLS).
- **Single-path surgery** (AA-CLIP's ``clip_surgery``, blocks 6–24): the stream itself takes the V-V
  attention from its own ``ln_1`` and keeps the MLP (``path="single", with_mlp=True``). As released,
  AA-CLIP's attention receives sequence-first tensors without a transpose and so attends across the
  batch axis for each token (``attend_over="batch"``; with one image this is exactly ``out_proj(v)``);
  ``attend_over="tokens"`` is the token-wise variant.

``kind`` selects the attention of the second stream: ``"vv"`` (value-value), ``"v"`` (plain values,
``out_proj(v)``: AnoVL Table 3's "V (last layer)" row when started at the last block, MaskCLIP-style) or
``"qkv"`` (CLIP's own attention: with ``with_mlp=True`` the second stream equals the original, the
identity variant). ``heads`` and ``scale`` default to the block's (scale = 1/sqrt(head_dim)).

Nothing here modifies the model: :func:`variant_features` is a function of ``(visual, images, variant)``
that reads the block weights. Every tap holds that block's own tokens (no tensor is updated in place;
AnoVL's released code returns aliased V-V taps that all equal the final tokens, spec §6).

Two execution modes of the dual path (``variant_features(..., fused_dual_pass=...)``):

- **reference** (default): the original stream is the model's own blocks (bit-identical to ``encode_image``
  and :func:`~siad.backbones.features.stage_features`); the second stream recomputes ``ln_1`` and the V
  projection of the original stream and runs its own ``out_proj``.
- **fused** (a fast mode): each block from ``start_block`` on is written out once for both streams — one
  ``ln_1``, one packed QKV projection, the original and the variant attention, both ``out_proj`` in one
  matrix multiply on the tokens of both streams concatenated — and, where nothing reads the original
  stream's last-block patch tokens (no original tap there), its last block is computed for the CLS row only
  (all the image embedding reads; keys and values still come from every token). Equal to the reference mode
  within float32 rounding (~1e-6 relative), not bit-identical: the original attention runs through
  ``scaled_dot_product_attention`` instead of ``nn.MultiheadAttention``'s fused kernel.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn

from siad.backbones.features import (
    StreamTaps,
    collect_taps,
    embed_images,
    image_embedding,
    normalize_taps,
    vision_blocks,
)
from siad.errors import ConfigError

__all__ = ["PRESETS", "AttentionVariant", "VariantFeatures", "variant_attention", "variant_features"]

AttentionKind = Literal["vv", "v", "qkv"]
PathMode = Literal["dual", "single"]
AttendOver = Literal["tokens", "batch"]


@dataclass(frozen=True)
class AttentionVariant:
    """One attention variant.

    Attributes:
        start_block: first modified block, 0-indexed (negative from the end: -1 = the last block).
        kind: ``"vv"``, ``"v"`` or ``"qkv"`` (see the module docstring).
        path: ``"dual"`` (second stream fed from the original stream) or ``"single"`` (the stream feeds
            itself: surgery).
        with_mlp: apply the block's MLP to the modified stream (False for AnoVL/FiLo/DPAM).
        heads: attention heads; None = the block's.
        scale: logit scale; None = 1/sqrt(width / heads).
        attend_over: ``"tokens"`` (per image) or ``"batch"`` (per token across the batch: AA-CLIP as released).
    """

    start_block: int
    kind: AttentionKind = "vv"
    path: PathMode = "dual"
    with_mlp: bool = False
    heads: int | None = None
    scale: float | None = None
    attend_over: AttendOver = "tokens"

    def __post_init__(self) -> None:
        choices = {"kind": ("vv", "v", "qkv"), "path": ("dual", "single"), "attend_over": ("tokens", "batch")}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ConfigError(f"attention variant: {field}={getattr(self, field)!r}; choose one of {allowed}")
        if self.heads is not None and self.heads < 1:
            raise ConfigError(f"attention variant: heads={self.heads}; use a positive count or None")
        if self.scale is not None and not self.scale > 0:
            raise ConfigError(f"attention variant: scale={self.scale}; use a positive number or None")

    def resolve_start(self, n_blocks: int) -> int:
        """``start_block`` as a non-negative index of an ``n_blocks`` transformer."""
        if not -n_blocks <= self.start_block < n_blocks:
            raise ConfigError(
                f"attention variant starts at block {self.start_block}, but the backbone has {n_blocks} blocks "
                f"(0-indexed); pick a start in -{n_blocks}..{n_blocks - 1} or a deeper backbone"
            )
        return self.start_block % n_blocks


# The methods' settings, for the paper architectures (0-indexed blocks).
PRESETS: dict[str, AttentionVariant] = {
    # AnoVL TFA: `range(1, 13)` on 12 blocks = V-V dual path on every block, no MLP.
    "anovl": AttentionVariant(start_block=0),
    # AnoVL Table 3 rows "V-V attention (last layer)" and "V (last layer)".
    "anovl_vv_last": AttentionVariant(start_block=-1),
    "anovl_v_last": AttentionVariant(start_block=-1, kind="v"),
    # FiLo: `range(1, 19)` on 24 blocks = blocks 7-24.
    "filo": AttentionVariant(start_block=6),
    # AnomalyCLIP DPAM: `DAPM_replace(20)` = blocks 6-24, 16 heads, scale 1/8.
    "anomalyclip_dpam": AttentionVariant(start_block=5),
    # AA-CLIP stage-1 `clip_surgery` (DAPM_replace(20)): single path with MLP; as released and token-wise.
    "aaclip_surgery": AttentionVariant(start_block=5, path="single", with_mlp=True, attend_over="batch"),
    "aaclip_surgery_tokenwise": AttentionVariant(start_block=5, path="single", with_mlp=True),
}


@dataclass(frozen=True)
class VariantFeatures:
    """Per-tap tokens of both streams.

    Attributes:
        original: the unmodified stream at the taps (bit-identical to :func:`stage_features` in the reference
            mode, equal within float rounding in the fused mode); None when a single-path run was asked not to
            compute it or the caller asked for no original taps (``original_taps=False``).
        modified: the variant's stream at the taps. Taps before ``start_block`` hold the original stream's
            tokens (the second stream is a copy of it up to there; views of the same, never-mutated tensors).
        image_embedding: ``encode_image``'s output from the original stream (None without it).
        start_block: the resolved first modified block.
    """

    original: StreamTaps | None
    modified: StreamTaps
    image_embedding: Tensor | None
    start_block: int


def _check_attention(attn: nn.Module) -> nn.MultiheadAttention:
    if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim or attn.bias_k is not None:
        raise ConfigError(
            f"attention module {type(attn).__name__} is not a plain nn.MultiheadAttention with a packed in_proj; "
            "attention variants support open_clip's default ResidualAttentionBlock (block_type 'default')"
        )
    return attn


def _split_heads(x: Tensor, heads: int) -> Tensor:
    batch, length, width = x.shape
    return x.reshape(batch, length, heads, width // heads).transpose(1, 2)


def variant_attention(block: nn.Module, x: Tensor, variant: AttentionVariant) -> Tensor:
    """The variant's attention output for ``x`` (= ``ln_1`` of its source stream), ``[B, L, D]``,
    including ``out_proj`` (before the block's LayerScale ``ls_1``)."""
    attn = _check_attention(block.attn)
    width = attn.embed_dim
    heads = variant.heads or attn.num_heads
    if width % heads:
        raise ConfigError(f"attention variant: width {width} is not divisible by heads={heads}")
    scale = variant.scale if variant.scale is not None else (width // heads) ** -0.5
    if variant.attend_over == "batch":
        x = x.transpose(0, 1)
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    if variant.kind == "qkv":
        query, key, value = (_split_heads(t, heads) for t in F.linear(x, weight, bias).chunk(3, dim=-1))
        mixed = F.scaled_dot_product_attention(query, key, value, scale=scale)
    else:
        value = _split_heads(F.linear(x, weight[2 * width :], None if bias is None else bias[2 * width :]), heads)
        mixed = value if variant.kind == "v" else F.scaled_dot_product_attention(value, value, value, scale=scale)
    mixed = mixed.transpose(1, 2).reshape(x.shape)
    out = attn.out_proj(mixed)
    return out.transpose(0, 1) if variant.attend_over == "batch" else out


def _modified_step(block: nn.Module, stream: Tensor, source: Tensor, variant: AttentionVariant) -> Tensor:
    stream = stream + block.ls_1(variant_attention(block, block.ln_1(source), variant))
    if variant.with_mlp:
        stream = stream + block.ls_2(block.mlp(block.ln_2(stream)))
    return stream


def _check_fusable(block: nn.Module, variant: AttentionVariant) -> nn.MultiheadAttention:
    """The fused pass writes the block's forward out by hand: only open_clip's own default block qualifies."""
    if variant.path != "dual" or variant.attend_over != "tokens":
        raise ConfigError(
            f"fused_dual_pass needs a dual-path variant attending over tokens (got path={variant.path!r}, "
            f"attend_over={variant.attend_over!r}); use fused_dual_pass=False for this variant"
        )
    if type(block).forward is not ResidualAttentionBlock.forward or hasattr(block, "ln_1_kv"):
        raise ConfigError(
            f"fused_dual_pass: block {type(block).__name__} is not open_clip's default ResidualAttentionBlock; "
            "use fused_dual_pass=False"
        )
    return _check_attention(block.attn)


def _heads_attention(query: Tensor, key: Tensor, value: Tensor, heads: int, scale: float | None) -> Tensor:
    """Multi-head scaled dot-product attention: queries ``[B, Lq, D]`` on keys/values ``[B, L, D]`` → ``[B, Lq, D]``."""
    mixed = F.scaled_dot_product_attention(_split_heads(query, heads), _split_heads(key, heads),
                                           _split_heads(value, heads), scale=scale)
    return mixed.transpose(1, 2).reshape(query.shape)


def _fused_step(block: nn.Module, original: Tensor, modified: Tensor, variant: AttentionVariant, *,
                cls_only: bool) -> tuple[Tensor, Tensor]:
    """One block of both streams of the dual path with shared work (module docstring, fused mode).

    Args:
        block: an open_clip ``ResidualAttentionBlock`` (checked by :func:`_check_fusable`).
        original: the original stream ``h`` at the block input, ``[B, L, D]``.
        modified: the second stream ``u`` at the block input, ``[B, L, D]``.
        variant: the dual-path variant (its kind, heads, scale, with_mlp).
        cls_only: compute the original stream's output for the CLS row only (``[B, 1, D]``).

    Returns:
        ``(h', u')``: ``[B, L, D]`` (``[B, 1, D]`` for ``h'`` with ``cls_only``) and ``[B, L, D]``.
    """
    attn = _check_fusable(block, variant)
    width, heads = attn.embed_dim, attn.num_heads
    variant_heads = variant.heads or heads
    if width % variant_heads:
        raise ConfigError(f"attention variant: width {width} is not divisible by heads={variant_heads}")
    scale = variant.scale if variant.scale is not None else (width // variant_heads) ** -0.5
    normed = block.ln_1(original)
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    if cls_only and variant.kind != "qkv":  # the CLS query only; keys and values of every token
        query = F.linear(normed[:, :1], weight[:width], None if bias is None else bias[:width])
        key, value = F.linear(normed, weight[width:], None if bias is None else bias[width:]).chunk(2, dim=-1)
    else:
        query, key, value = F.linear(normed, weight, bias).chunk(3, dim=-1)
    if cls_only and variant.kind == "qkv":
        query_cls = query[:, :1]
    else:
        query_cls = query
    mixed_original = _heads_attention(query_cls, key, value, heads, None)
    if variant.kind == "vv":
        mixed_variant = _heads_attention(value, value, value, variant_heads, scale)
    elif variant.kind == "v":
        mixed_variant = value
    else:
        mixed_variant = _heads_attention(query, key, value, variant_heads, scale)
    # both out_proj in one matrix multiply, on the tokens of both streams side by side
    projected = attn.out_proj(torch.cat([mixed_original, mixed_variant], dim=1))
    original_update, variant_update = projected.split([mixed_original.shape[1], mixed_variant.shape[1]], dim=1)
    stream = original[:, :1] if cls_only else original
    stream = stream + block.ls_1(original_update)
    stream = stream + block.ls_2(block.mlp(block.ln_2(stream)))
    modified = modified + block.ls_1(variant_update)
    if variant.with_mlp:
        modified = modified + block.ls_2(block.mlp(block.ln_2(modified)))
    return stream, modified


def _pools_the_cls_token(visual: nn.Module) -> bool:
    """Whether the image embedding reads only the CLS row of the final stream (``pool_type 'tok'``, no attention
    pooling), so the last block may be computed for that row alone."""
    return getattr(visual, "attn_pool", None) is None and getattr(visual, "pool_type", None) == "tok"


def variant_features(
    visual: nn.Module,
    images: Tensor,
    variant: AttentionVariant,
    taps: Iterable[int],
    *,
    ln_post: bool = False,
    project: bool = False,
    run_original: bool = True,
    original_taps: bool = True,
    fused_dual_pass: bool = False,
    positional_embedding: Tensor | None = None,
) -> VariantFeatures:
    """Run the original stream and the variant's stream in one pass; return both at ``taps``.

    Args:
        visual: an open_clip ``VisionTransformer`` (``model.visual``); not modified.
        images: ``[B, 3, H, W]`` at the model's image size.
        variant: the attention variant (e.g. ``PRESETS["anovl"]``).
        taps: 0-indexed block indices (negative from the end).
        ln_post, project: pass all tapped tokens through ``ln_post`` / ``proj`` (AnoVL's pixel branch
            uses both on the last V-V tokens).
        run_original: single path only: False skips the original stream after ``start_block`` (no
            ``original`` taps beyond it, no image embedding). The dual path always needs it.
        original_taps: False returns no ``original`` taps (None) and so skips their ``ln_post`` / ``proj``;
            the original stream still runs where the second stream or the image embedding needs it. The
            modified taps and the image embedding are bit-identical either way.
        fused_dual_pass: dual path only: the fused fast mode (module docstring; equal within float rounding,
            not bit-identical); False (default) is the bit-identical reference mode.
        positional_embedding: replaces the model's own positional embedding (``[1 + N, D]``, e.g. AnomalyCLIP's
            run-time bilinear resize, :func:`siad.backbones.features.resize_positional_embedding`); None keeps it.
    """
    if variant.path == "dual" and not run_original:
        raise ConfigError("a dual-path attention variant reads the original stream: run_original must be True")
    blocks = vision_blocks(visual)
    taps = normalize_taps(taps, len(blocks))
    start = variant.resolve_start(len(blocks))
    wanted = set(taps)
    last = len(blocks) - 1
    # fused mode: the last block's original patch tokens are read by nobody unless they are an original tap
    cls_only_last = fused_dual_pass and not (original_taps and last in wanted) and _pools_the_cls_token(visual)
    original: Tensor | None = embed_images(visual, images, positional_embedding)
    modified: Tensor | None = None
    tapped_original: dict[int, Tensor] = {}
    tapped_modified: dict[int, Tensor] = {}
    for index, block in enumerate(blocks):
        if fused_dual_pass and index >= start:
            modified = original if modified is None else modified
            original, modified = _fused_step(block, original, modified, variant,
                                             cls_only=cls_only_last and index == last)
        else:
            if index >= start:
                modified = original if modified is None else modified
                source = original if variant.path == "dual" else modified
                modified = _modified_step(block, modified, source, variant)
            if original is not None and (index < start or run_original):
                original = block(original)
            else:
                original = None
        if index in wanted:
            tapped_modified[index] = modified if modified is not None else original
            if original is not None and original_taps:
                tapped_original[index] = original
    head = {"ln_post": ln_post, "project": project}
    return VariantFeatures(
        original=collect_taps(visual, taps, tapped_original, **head) if run_original and original_taps else None,
        modified=collect_taps(visual, taps, tapped_modified, **head),
        image_embedding=image_embedding(visual, original) if original is not None else None,
        start_block=start,
    )
