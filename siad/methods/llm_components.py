"""AnomalyGPT's trainable pixel-level modules and its segmentation losses.

Everything here follows the project spec `specs/baselines_llm_filo_anovl.md` §1 ("Decoder", "Prompt
learner", "Loss / schedule") and the focal/dice definitions of baselines_clip_family.md §0; the
released code (CASIA-IVA-Lab/AnomalyGPT @f21c51b) is the reference where it differs from the paper.

- :class:`StageDecoder` is the released ``LinearLayer(1280, 1024, 4)``: one Linear per stage on the
  patch tokens (CLS dropped), then L2-normalisation.
- :func:`stage_anomaly_maps` turns the stage tokens and the (normal, abnormal) text features into
  per-stage two-channel probability maps: ×100 logits, bilinear upsampling of the *logits*
  (align_corners=True), then a softmax over the two channels.
- :func:`combine_stage_maps` averages the abnormal channel over the stages (**mean as released**;
  the paper says sum [paper≠code], available as ``reduce="sum"``).
- :class:`ConvPromptLearner` is the released ``PromptLearner(1, 4096)``: a 5-stage conv net maps the
  224² anomaly map to 9 LLM embeddings appended after 9 learnable base prompts.
- :func:`focal_loss` and :func:`dice_loss` are the segmentation losses (γ=2, smooth 1e-5; dice
  smooth 1). ``dice_loss(per_image=False)`` keeps the released squeeze bug as a documented switch. They live in
  :mod:`siad.methods.losses` (shared with AnomalyCLIP) and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siad.errors import ConfigError
from siad.methods.losses import binarize_target, dice_loss, focal_loss

__all__ = [
    "StageDecoder",
    "stage_anomaly_maps",
    "combine_stage_maps",
    "ConvPromptLearner",
    "focal_loss",
    "dice_loss",
    "binarize_target",
]


class StageDecoder(nn.Module):
    """Per-stage linear projection of raw ViT stage tokens into the text space (AnomalyGPT ``LinearLayer``).

    Released architecture: ``nn.Linear(width, embed_dim)`` per stage with PyTorch's default ``bias=True``
    (4 × (1280·1024 + 1024) = 5,246,976 ≈ the spec's "decoder 5.25M"; without bias it would be 5.24M).
    The L2-normalisation that the released code applies in ``openllama.py`` is done here, so the output
    is ready for :func:`stage_anomaly_maps`.

    Args:
        width: width of the tapped stage tokens (1280 for ImageBind-Huge).
        embed_dim: joint image/text embedding dimension (1024).
        n_stages: number of tapped stages (4: blocks 8/16/24/32).
        bias: Linear bias (True as released).
    """

    def __init__(self, width: int = 1280, embed_dim: int = 1024, n_stages: int = 4, *, bias: bool = True) -> None:
        super().__init__()
        if min(width, embed_dim, n_stages) < 1:
            raise ConfigError(
                f"StageDecoder(width={width}, embed_dim={embed_dim}, n_stages={n_stages}): all must be ≥ 1."
            )
        self.width = width
        self.embed_dim = embed_dim
        self.n_stages = n_stages
        self.fc = nn.ModuleList(nn.Linear(width, embed_dim, bias=bias) for _ in range(n_stages))

    def forward(self, stage_tokens: Sequence[Tensor], *, has_cls: bool = True) -> list[Tensor]:
        """Project each stage's tokens [B, L, width] to unit-norm patch embeddings [B, N, embed_dim].

        ``has_cls=True`` drops token 0 (the released taps include CLS); pass ``has_cls=False`` for taps
        that already hold only the N patch tokens (e.g. open_clip ``forward_intermediates``).
        """
        if len(stage_tokens) != self.n_stages:
            raise ConfigError(
                f"StageDecoder expects {self.n_stages} stage tensors, got {len(stage_tokens)}; "
                "tap as many stages as the decoder has (n_stages)."
            )
        out: list[Tensor] = []
        for i, (tokens, fc) in enumerate(zip(stage_tokens, self.fc, strict=True)):
            if tokens.dim() != 3 or tokens.shape[-1] != self.width:
                raise ConfigError(
                    f"StageDecoder stage {i}: expected batch-first tokens [B, L, {self.width}], "
                    f"got {tuple(tokens.shape)}; transpose LND taps to NLD first."
                )
            patches = tokens[:, 1:, :] if has_cls else tokens
            out.append(F.normalize(fc(patches), dim=-1))
        return out


def _grid_side(n_tokens: int) -> int:
    """Side of the square patch grid holding ``n_tokens`` tokens (raises when not square)."""
    side = int(round(n_tokens**0.5))
    if side * side != n_tokens:
        raise ConfigError(
            f"{n_tokens} patch tokens do not form a square grid; drop the CLS token (StageDecoder has_cls=True)."
        )
    return side


def stage_anomaly_maps(
    stage_tokens: Sequence[Tensor],
    text: Tensor,
    *,
    logit_scale: float = 100.0,
    size: int = 224,
    align_corners: bool = True,
) -> Tensor:
    """Per-stage (normal, abnormal) probability maps [B, n_stages, 2, size, size].

    For each stage: logits = ``logit_scale``·⟨p, F⟩ with p the unit patch tokens [B, N, D] and F the
    text features [B, 2, D] (or one shared [2, D]); reshape to the √N×√N grid; bilinearly upsample the
    LOGITS to ``size`` (align_corners=True as released); softmax over the 2 channels. Upsampling before
    the softmax matters: softmax then upsample gives different values.
    """
    if len(stage_tokens) == 0:
        raise ConfigError("stage_anomaly_maps got no stage tokens; pass the StageDecoder outputs.")
    batch = stage_tokens[0].shape[0]
    if text.dim() == 2:
        text = text.unsqueeze(0).expand(batch, -1, -1)
    if text.dim() != 3 or text.shape[0] != batch or text.shape[1] != 2:
        raise ConfigError(
            f"text features must be [B={batch}, 2, D] (normal, abnormal) or [2, D], got {tuple(text.shape)}."
        )
    maps = []
    for i, tokens in enumerate(stage_tokens):
        if tokens.dim() != 3 or tokens.shape[0] != batch or tokens.shape[-1] != text.shape[-1]:
            raise ConfigError(
                f"stage {i} tokens must be [B={batch}, N, D={text.shape[-1]}], got {tuple(tokens.shape)}."
            )
        side = _grid_side(tokens.shape[1])
        logits = logit_scale * tokens @ text.transpose(-2, -1)  # [B, N, 2]
        grid = logits.transpose(1, 2).reshape(batch, 2, side, side)
        up = F.interpolate(grid, size=size, mode="bilinear", align_corners=align_corners)
        maps.append(torch.softmax(up, dim=1))
    return torch.stack(maps, dim=1)


def combine_stage_maps(probs: Tensor, reduce: Literal["mean", "sum"] = "mean") -> Tensor:
    """Abnormal map [B, H, W] from the per-stage probabilities [B, n_stages, 2, H, W].

    ``"mean"`` as released (``torch.mean`` over the stages); ``"sum"`` as written in the paper
    [paper≠code]. The two differ only by the factor n_stages, which leaves AUROC unchanged but not the
    map fed to the prompt learner.
    """
    if probs.dim() != 5 or probs.shape[2] != 2:
        raise ConfigError(f"probs must be [B, n_stages, 2, H, W], got {tuple(probs.shape)}.")
    abnormal = probs[:, :, 1]
    if reduce == "mean":
        return abnormal.mean(dim=1)
    if reduce == "sum":
        return abnormal.sum(dim=1)
    raise ConfigError(f"combine_stage_maps reduce={reduce!r} is unknown; use 'mean' (released) or 'sum' (paper).")


class ConvPromptLearner(nn.Module):
    """AnomalyGPT's prompt learner: anomaly map [B, 1, 224, 224] → [B, n_base + 9, dim_out] LLM embeddings.

    Five stages of [3×3 conv (pad 1) + ReLU + MaxPool 2] with channels 1→4→16→64→256→1024 (224→7), then
    a 5×5 conv without padding 1024→dim_out (7→3). The 3×3 output gives 9 tokens in row-major order,
    appended after ``n_base`` learnable base prompts (randn, as released). Convs keep PyTorch's default
    bias and initialisation; the whole module is built under ``seed`` (global RNG state is restored).
    At dim_out=4096: 107,416,504 parameters (spec ≈107.4M).
    """

    channels: tuple[int, ...] = (1, 4, 16, 64, 256, 1024)

    def __init__(self, dim_out: int = 4096, n_base: int = 9, *, seed: int = 0) -> None:
        super().__init__()
        if dim_out < 1 or n_base < 0:
            raise ConfigError(f"ConvPromptLearner(dim_out={dim_out}, n_base={n_base}): need dim_out ≥ 1, n_base ≥ 0.")
        self.dim_out = dim_out
        self.n_base = n_base
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            for c_in, c_out in zip(self.channels[:-1], self.channels[1:], strict=True):
                layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            layers.append(nn.Conv2d(self.channels[-1], dim_out, kernel_size=5, padding=0))
            self.meta_net = nn.Sequential(*layers)
            self.base_prompts = nn.Parameter(torch.randn(n_base, dim_out))

    def forward(self, anomaly_map: Tensor) -> Tensor:
        """Embeddings [B, n_base + 9, dim_out]: base prompts, then the 3×3 conv tokens row-major."""
        if anomaly_map.dim() != 4 or tuple(anomaly_map.shape[1:]) != (1, 224, 224):
            raise ConfigError(
                f"ConvPromptLearner expects an anomaly map [B, 1, 224, 224], got {tuple(anomaly_map.shape)}; "
                "combine the stage maps at size=224 and unsqueeze the channel axis."
            )
        batch = anomaly_map.shape[0]
        grid = self.meta_net(anomaly_map)  # [B, dim_out, 3, 3]
        image_prompts = grid.flatten(2).transpose(1, 2)  # [B, 9, dim_out], row-major
        return torch.cat([self.base_prompts.unsqueeze(0).expand(batch, -1, -1), image_prompts], dim=1)
