"""Stage features of an open_clip vision transformer: tokens at any set of blocks, in one pass.

Every method of the suite reads intermediate tokens of a frozen ViT (AnoVL, FiLo, AnomalyCLIP, AdaCLIP,
AA-CLIP at 4 taps; AnomalyGPT/SIAD-LLM after blocks 8/16/24/32 of ImageBind-H). This module runs the
blocks of ``visual.transformer.resblocks`` itself, exactly as open_clip's ``VisionTransformer.forward``
does (same modules, same order, batch-first), and returns for each requested block:

- the CLS token separately (``[B, D]``) and the patch tokens (``[B, N, D]``, row-major grid order),
- optionally through ``ln_post`` and/or the visual projection (``proj``),

plus the final image embedding (what ``model.encode_image`` returns, unnormalised) from the same pass, so
callers never run the backbone twice. A tap ``i`` is the residual stream *after* block ``i`` (0-indexed).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siad.errors import ConfigError

__all__ = [
    "StageFeatures",
    "StreamTaps",
    "apply_head",
    "check_images",
    "collect_taps",
    "embed_images",
    "image_embedding",
    "normalize_taps",
    "resize_positional_embedding",
    "split_tokens",
    "stage_features",
    "tokens_to_grid",
    "vision_blocks",
]


@dataclass(frozen=True)
class StreamTaps:
    """Tokens of one residual stream at a set of blocks.

    Attributes:
        blocks: 0-indexed block indices, in the order requested.
        cls: per block, the CLS token ``[B, D]``.
        patch: per block, the patch tokens ``[B, N, D]`` (N = grid², row-major).
    """

    blocks: tuple[int, ...]
    cls: tuple[Tensor, ...]
    patch: tuple[Tensor, ...]

    def _position(self, block: int) -> int:
        if block not in self.blocks:
            raise KeyError(f"block {block} was not tapped; tapped blocks: {list(self.blocks)}")
        return self.blocks.index(block)

    def cls_at(self, block: int) -> Tensor:
        """CLS token ``[B, D]`` after ``block``."""
        return self.cls[self._position(block)]

    def patch_at(self, block: int) -> Tensor:
        """Patch tokens ``[B, N, D]`` after ``block``."""
        return self.patch[self._position(block)]


@dataclass(frozen=True)
class StageFeatures:
    """Tapped tokens plus the final image embedding of the same forward pass.

    Attributes:
        taps: the tokens at the requested blocks.
        image_embedding: ``[B, E]``, equal to ``model.encode_image(images)`` (not normalised); None when
            the pass stopped early at the last tap.
    """

    taps: StreamTaps
    image_embedding: Tensor | None


def vision_blocks(visual: nn.Module) -> nn.ModuleList:
    """The transformer blocks of an open_clip ``VisionTransformer`` (checked to be batch-first)."""
    transformer = getattr(visual, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if not isinstance(blocks, nn.ModuleList) or not hasattr(visual, "_embeds") or not hasattr(visual, "_pool"):
        raise ConfigError(
            f"{type(visual).__name__} is not an open_clip VisionTransformer (no transformer.resblocks); stage "
            "features need a ViT backbone: pick a ViT entry of siad.backbones.BACKBONES"
        )
    if not getattr(transformer, "batch_first", True):
        raise ConfigError(
            f"{type(visual).__name__}: the vision transformer is sequence-first; build it with open_clip >= 3 "
            "(batch-first blocks)"
        )
    return blocks


def normalize_taps(taps: Iterable[int], n_blocks: int) -> tuple[int, ...]:
    """Check block indices against ``n_blocks``; negative indices count from the end (-1 = last block)."""
    resolved = []
    for tap in taps:
        if not isinstance(tap, int) or isinstance(tap, bool) or not -n_blocks <= tap < n_blocks:
            raise ConfigError(
                f"tap {tap!r} is not a block index of a {n_blocks}-block transformer; use 0..{n_blocks - 1} "
                "(0-indexed: the papers' layer 6 is 5) or a negative index from the end"
            )
        resolved.append(tap % n_blocks)
    if not resolved:
        raise ConfigError("no taps given: name at least one block index")
    return tuple(resolved)


def check_images(visual: nn.Module, images: Tensor) -> None:
    """Refuse inputs whose size does not match the model's positional embedding (built for one size)."""
    expected = tuple(getattr(visual, "image_size", images.shape[-2:]))
    if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != expected:
        raise ConfigError(
            f"images of shape {tuple(images.shape)} do not fit the backbone: expected [B, 3, {expected[0]}, "
            f"{expected[1]}]; resize the inputs or build the backbone with that `image_size`"
        )


def resize_positional_embedding(
    positional_embedding: Tensor, grid: int, *, mode: str = "bilinear", antialias: bool = False
) -> Tensor:
    """A ViT positional embedding ``[1 + g², D]`` resized to ``[1 + grid², D]``: the CLS row kept, the patch rows
    resized as a ``g×g`` image with ``F.interpolate(mode, align_corners=False)``.

    ``mode="bilinear"`` without antialias is AnomalyCLIP's run-time resize (its ``VisionTransformer.forward``);
    ``mode="bicubic", antialias=True`` is what open_clip's ``resize_pos_embed`` does when weights are loaded at
    another ``image_size``.
    """
    side = round((positional_embedding.shape[0] - 1) ** 0.5)
    if positional_embedding.ndim != 2 or side * side + 1 != positional_embedding.shape[0]:
        raise ConfigError(
            f"positional embedding of shape {tuple(positional_embedding.shape)} is not [1 + g², D] (CLS + square grid)"
        )
    if side == grid:
        return positional_embedding
    width = positional_embedding.shape[1]
    patches = positional_embedding[1:].reshape(1, side, side, width).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode=mode, align_corners=False, antialias=antialias)
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, width)
    return torch.cat([positional_embedding[:1], patches], dim=0)


def embed_images(visual: nn.Module, images: Tensor, positional_embedding: Tensor | None = None) -> Tensor:
    """Patch embedding + CLS + positional embedding + ``ln_pre``: the input of block 0, ``[B, 1 + N, D]``.

    ``positional_embedding`` (``[1 + N, D]``) replaces the model's own, e.g. one resized at run time
    (:func:`resize_positional_embedding`) for images larger than the model was built for; the images must then
    give ``N`` patches. None (default) is the model's own ``_embeds``.
    """
    if positional_embedding is None:
        check_images(visual, images)
        return visual._embeds(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ConfigError(f"images of shape {tuple(images.shape)} are not [B, 3, H, W]")
    x = visual.conv1(images)  # [B, D, gh, gw], as open_clip's VisionTransformer._embeds
    if x.shape[-2] * x.shape[-1] + 1 != positional_embedding.shape[0]:
        raise ConfigError(
            f"images of shape {tuple(images.shape)} give {x.shape[-2]}x{x.shape[-1]} patches, but the positional "
            f"embedding has {positional_embedding.shape[0] - 1} patch rows; resize it to the images' grid"
        )
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1) + positional_embedding.to(x.dtype)
    return visual.ln_pre(visual.patch_dropout(x))


def image_embedding(visual: nn.Module, stream: Tensor) -> Tensor:
    """The model's global image embedding from the final stream (pooling, ``ln_post``, ``proj``), as
    ``VisionTransformer.forward`` computes it."""
    pooled, _ = visual._pool(stream)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


def apply_head(visual: nn.Module, tokens: Tensor, *, ln_post: bool = True, project: bool = True) -> Tensor:
    """Pass tokens (any leading shape, last dim = width) through ``ln_post`` and/or the visual projection.

    This is how the zero-shot methods compare patch tokens with text features (AnoVL, AnomalyCLIP local
    features, the CLIP baseline's map).
    """
    if ln_post:
        tokens = visual.ln_post(tokens)
    if project:
        if visual.proj is None:
            raise ConfigError(f"{type(visual).__name__} has no projection (proj is None); call with project=False")
        tokens = tokens @ visual.proj
    return tokens


def split_tokens(
    visual: nn.Module, stream: Tensor, *, ln_post: bool = False, project: bool = False
) -> tuple[Tensor, Tensor]:
    """Split a ``[B, 1 + N, D]`` stream into (CLS ``[B, D']``, patches ``[B, N, D']``) after the head options."""
    stream = apply_head(visual, stream, ln_post=ln_post, project=project)
    return stream[:, 0], stream[:, 1:]


def collect_taps(
    visual: nn.Module, blocks: Sequence[int], streams: dict[int, Tensor], *, ln_post: bool, project: bool
) -> StreamTaps:
    """Build a :class:`StreamTaps` from the stream tensors recorded per block."""
    parts = [split_tokens(visual, streams[block], ln_post=ln_post, project=project) for block in blocks]
    return StreamTaps(tuple(blocks), tuple(c for c, _ in parts), tuple(p for _, p in parts))


def stage_features(
    visual: nn.Module,
    images: Tensor,
    taps: Iterable[int],
    *,
    ln_post: bool = False,
    project: bool = False,
    with_image_embedding: bool = True,
    positional_embedding: Tensor | None = None,
) -> StageFeatures:
    """Tokens after each block in ``taps`` and the final image embedding, from one forward pass.

    Args:
        visual: an open_clip ``VisionTransformer`` (``model.visual``).
        images: ``[B, 3, H, W]``, normalised, at the model's image size.
        taps: 0-indexed block indices (negative from the end); returned in this order.
        ln_post, project: pass the tapped tokens (CLS and patches) through ``ln_post`` / ``proj``.
            Raw tokens by default (AnomalyGPT's taps are raw residual tokens).
        with_image_embedding: run all blocks and return ``encode_image``'s output; False stops after the
            last tap (cheaper when only early blocks are needed) and returns None for it.
        positional_embedding: replaces the model's own (see :func:`embed_images`); None keeps it.
    """
    blocks = vision_blocks(visual)
    taps = normalize_taps(taps, len(blocks))
    last = len(blocks) - 1 if with_image_embedding else max(taps)
    wanted = set(taps)
    stream = embed_images(visual, images, positional_embedding)
    recorded: dict[int, Tensor] = {}
    for index, block in enumerate(blocks[: last + 1]):
        stream = block(stream)
        if index in wanted:
            recorded[index] = stream
    embedding = image_embedding(visual, stream) if with_image_embedding else None
    return StageFeatures(collect_taps(visual, taps, recorded, ln_post=ln_post, project=project), embedding)


def tokens_to_grid(patch: Tensor, grid: int | tuple[int, int] | None = None) -> Tensor:
    """Reshape patch tokens ``[B, N, D]`` (row-major) to a feature map ``[B, D, H, W]``.

    ``grid`` is the number of patches per side (or ``(H, W)``); None infers a square grid.
    """
    if patch.ndim != 3:
        raise ConfigError(f"patch tokens must be [B, N, D], got shape {tuple(patch.shape)}")
    batch, count, dim = patch.shape
    if grid is None:
        side = round(count**0.5)
        grid = (side, side)
    elif isinstance(grid, int):
        grid = (grid, grid)
    if grid[0] * grid[1] != count:
        raise ConfigError(
            f"{count} patch tokens do not form a {grid[0]}x{grid[1]} grid; pass the backbone's grid "
            "(BackboneSpec.grid) and drop the CLS token first"
        )
    return patch.reshape(batch, grid[0], grid[1], dim).permute(0, 3, 1, 2)

