"""Segmentation losses shared by the methods (AnomalyGPT, SIAD-LLM, AnomalyCLIP, ...).

The definitions are those of the CLIP-family releases (spec ``baselines_clip_family.md`` §0), identical in
AnomalyCLIP, AdaCLIP and AA-CLIP and in AnomalyGPT:

- :func:`focal_loss`: on *probabilities* ``P`` [B, 2, H, W] against a mask M ∈ {0, 1}; the one-hot target is
  clamped to [1e-5, 1 − 1e-5]; p_t = Σ_c onehot·P + 1e-5; loss = mean over pixels of −(1 − p_t)^γ·log p_t
  (γ = 2, α = 1).
- :func:`dice_loss`: per image d = (2Σpg + 1)/(Σp + Σg + 1); loss = 1 − mean_b d (finite on empty masks).
  ``per_image=False`` keeps AnomalyGPT's released squeeze bug as a documented switch.
- :func:`binarize_target`: the float {0, 1} mask ``target > threshold`` both losses start from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from siad.errors import ConfigError

__all__ = ["binarize_target", "dice_loss", "focal_loss", "segmentation_terms"]


def binarize_target(target: Tensor, threshold: float = 0.5) -> Tensor:
    """Float {0, 1} mask: ``target > threshold`` (AnomalyGPT's soft synthetic labels use 0.3)."""
    return (target > threshold).to(torch.float32)


def _check_map_pair(name: str, pred: Tensor, pred_shape: tuple[int, ...], target: Tensor) -> None:
    if tuple(pred.shape) != pred_shape or target.dim() != 3:
        raise ConfigError(f"{name}: shapes do not match, got {tuple(pred.shape)} and target {tuple(target.shape)}.")


def focal_loss(
    probs: Tensor, target: Tensor, *, gamma: float = 2.0, eps: float = 1e-5, threshold: float = 0.5
) -> Tensor:
    """Focal loss on probabilities [B, 2, H, W] against a mask [B, H, W] (spec §0, α=1).

    One-hot target clamped to [eps, 1−eps]; p_t = Σ_c onehot·P + eps; loss = mean over all pixels of
    −(1−p_t)^γ·log p_t. The target is binarised at ``threshold`` first.
    """
    b, h, w = target.shape if target.dim() == 3 else (-1, -1, -1)
    _check_map_pair("focal_loss (probs [B,2,H,W], target [B,H,W])", probs, (b, 2, h, w), target)
    labels = binarize_target(target, threshold).long()
    onehot = F.one_hot(labels, num_classes=2).permute(0, 3, 1, 2).to(probs.dtype)
    onehot = onehot.clamp(eps, 1.0 - eps)
    p_t = (onehot * probs).sum(dim=1) + eps
    return (-((1.0 - p_t) ** gamma) * torch.log(p_t)).mean()


def dice_loss(
    prob_abnormal: Tensor, target: Tensor, *, per_image: bool = True, threshold: float = 0.5, smooth: float = 1.0
) -> Tensor:
    """Dice loss 1 − mean_b (2Σpg+1)/(Σp+Σg+1) on [B, H, W] maps; finite on empty masks.

    ``per_image=True`` (default) is the method's dice: one coefficient per image. ``per_image=False``
    reproduces AnomalyGPT's released code, which squeezes the mask first: at batch size 1 every *row* becomes a
    "sample", so the loss is a per-row dice averaged over rows (spec §6); for B > 1 it equals the
    per-image dice.
    """
    _check_map_pair("dice_loss (prob_abnormal [B,H,W], target [B,H,W])", prob_abnormal, tuple(target.shape), target)
    g = binarize_target(target, threshold).to(prob_abnormal.dtype)
    p = prob_abnormal
    if per_image or p.shape[0] != 1:
        p, g = p.flatten(1), g.flatten(1)
    else:  # released squeeze bug: [1, H, W] → [H, W], rows are the samples
        p, g = p[0], g[0]
    coeff = (2.0 * (p * g).sum(dim=1) + smooth) / (p.sum(dim=1) + g.sum(dim=1) + smooth)
    return 1.0 - coeff.mean()


def segmentation_terms(maps: Sequence[Tensor], masks: Tensor, mask_valid: Tensor | None = None, *,
                       per_image: bool = True) -> tuple[Tensor, Tensor, Tensor] | None:
    """The CLIP-family pixel losses summed over layers: Σ_l Focal(P_l, M), Σ_l Dice(P_l[:, 1], M) and
    Σ_l Dice(P_l[:, 0], 1 − M), from per-layer probabilities P_l [B, 2, H, W] and masks [B, H, W].

    ``mask_valid`` [B] bool: the images whose mask is pixel truth (None: all); the terms are taken over those only
    (an anomalous image of a dataset without masks has none). Returns None when no image has pixel truth.
    ``per_image`` is passed to :func:`dice_loss`.
    """
    target = masks.to(maps[0].dtype)
    if mask_valid is not None:
        keep = mask_valid.to(torch.bool).to(target.device)
        maps, target = [m[keep] for m in maps], target[keep]
    if target.shape[0] == 0:
        return None
    focal = torch.stack([focal_loss(m, target) for m in maps]).sum()
    dice_a = torch.stack([dice_loss(m[:, 1], target, per_image=per_image) for m in maps]).sum()
    dice_n = torch.stack([dice_loss(m[:, 0], 1 - target, per_image=per_image) for m in maps]).sum()
    return focal, dice_a, dice_n
