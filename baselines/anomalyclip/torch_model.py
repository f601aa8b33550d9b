"""AnomalyCLIP (ICLR'24) as released (zqhang/AnomalyCLIP@45ed4dd): the computation only, tensors in, tensors out.

Built on an open_clip ``CLIP`` model object (the real QuickGELU ViT-L/14@336 or a tiny random one); nothing in it is
modified. Spec: ``baselines_clip_family.md`` §0, §1, §7. Notation: ``B`` images, ``E`` joint embedding width, text
width ``W``, ``K`` feature layers, ``g`` the patch grid at the run size (37 at 518 px), ``N = g²`` patches, ``S`` the
input size.

Text (object-agnostic prompt learner, :class:`PromptLearner`):
    "X×n_ctx object." and "X×n_ctx damaged object."; the X embeddings (positions 1..n_ctx) are replaced by ``ctx_pos``
    / ``ctx_neg`` (n_ctx × W each). Before text blocks 1..depth−1 (0-indexed; block 0 untouched) the hidden positions
    1..t_n_ctx are overwritten by the compound prompts (depth−1 tensors of t_n_ctx × W; the same tokens in both
    sentences). As released, each sentence's copy of the compound prompts is rounded through float16 before it enters
    the float32 stream (``compound_fp16``; forward values and each copy's gradient). All learnables start
    N(0, init_std²) from a seed. T = L2(text_projection(ln_final(EOT))), rows (t_n, t_a).

Vision (frozen; :meth:`AnomalyCLIPModel.encode_image`):
    The positional embedding is resized at run time from the model's native grid to the run grid, bilinearly without
    antialias, CLS row kept (the release's ``VisionTransformer.forward``), not open_clip's bicubic load-time resize.
    DPAM dual path from block ``dpam_start`` (1-indexed; 6 = blocks 6–24): the shared
    :data:`siad.backbones.attention.PRESETS` ``["anomalyclip_dpam"]`` variant (u_l = u_{l−1} + out_proj(softmax(v vᵀ
    /√d) v), v from ln_1 of the original stream, no FFN). Global g = L2(CLS(h_last) @ proj) **without ln_post** (as
    coded; ``global_ln_post``); local f_l = L2(ln_post(u_l) @ proj) per patch (CLS dropped) at the feature layers
    (1-indexed; released: [24] only).

Heads: maps S_l = softmax_c(⟨f_l, t_c⟩ / τ) on the grid, bilinearly upsampled (align_corners=False) to S; image logits
⟨g, t_c⟩ / τ (τ = 0.07 fixed). Loss L = CE(logits, y) + λ·Σ_l [Focal(S_l, M) + Dice(S_l,a, M) + Dice(S_l,n, 1 − M)]
(λ = 4). Inference: score softmax(⟨g, T⟩/τ)[anomaly]; map Σ_l (S_l,a + 1 − S_l,n)/2 (= Σ_l S_l,a), then scipy's
``gaussian_filter`` with σ = 4 at S.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siad.backbones.attention import PRESETS, AttentionVariant, variant_features
from siad.backbones.features import apply_head, resize_positional_embedding
from siad.errors import ConfigError
from siad.methods.losses import segmentation_terms
from siad.methods.postprocess import smooth_maps
from siad.prompts.learnable import ContextVectors, DeepTextPrompts, context_prompt_tokens, encode_text_with_context
from siad.seeding import derived_seed

__all__ = [
    "POS_RESIZE_MODES",
    "STATE_TEXTS",
    "AnomalyCLIPConfig",
    "AnomalyCLIPModel",
    "LossTerms",
    "PromptLearner",
    "VisualFeatures",
    "anomaly_map",
    "dpam_variant",
    "image_logits",
    "image_scores",
    "loss_terms",
    "patch_probabilities",
    "run_positional_embedding",
    "similarity_maps",
    "smooth_maps",
]

#: The two object-agnostic state texts after the context placeholders: normal, anomalous.
STATE_TEXTS: tuple[str, str] = ("object.", "damaged object.")
#: Run-time positional-embedding resize: the release's bilinear one, or open_clip's load-time bicubic (antialiased).
POS_RESIZE_MODES: tuple[str, ...] = ("bilinear", "bicubic")


@dataclass(frozen=True)
class AnomalyCLIPConfig:
    """The hyperparameters of the computation (defaults: the release, spec §1).

    Attributes:
        n_ctx: context tokens per prompt (ctx_pos, ctx_neg).
        depth: compound-prompt depth; depth − 1 tensors go before text blocks 1..depth−1.
        t_n_ctx: tokens per compound prompt (hidden positions 1..t_n_ctx).
        dpam_start: first DPAM block, 1-indexed (6: blocks 6–24 of ViT-L/14, the release's ``DAPM_replace(20)``).
        features: feature layers, 1-indexed blocks whose V-V stream gives local features (released: (24,)).
        temperature: τ of every softmax and of the image logits (0.07, fixed).
        local_weight: λ on the summed segmentation losses (4).
        image_size: run size S in pixels (518 → 37×37 grid with patch 14).
        compound_fp16: round the compound prompts through float16 (as released).
        global_ln_post: apply ln_post to the global CLS before the projection (False as released).
        pos_resize: "bilinear" (release, at run time) or "bicubic" (open_clip's antialiased load-time resize).
        init_std: std of the N(0, std²) initialisation of all learnables.
    """

    n_ctx: int = 12
    depth: int = 9
    t_n_ctx: int = 4
    dpam_start: int = 6
    features: tuple[int, ...] = (24,)
    temperature: float = 0.07
    local_weight: float = 4.0
    image_size: int = 518
    compound_fp16: bool = True
    global_ln_post: bool = False
    pos_resize: str = "bilinear"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))
        if self.pos_resize not in POS_RESIZE_MODES:
            raise ConfigError(f"AnomalyCLIP pos_resize={self.pos_resize!r}; choose one of {POS_RESIZE_MODES}")
        if self.depth < 2:
            raise ConfigError(f"AnomalyCLIP depth={self.depth}: at least 2 (one compound prompt before text block 1)")
        if not self.features or len(set(self.features)) != len(self.features) or min(self.features) < 1:
            raise ConfigError(f"AnomalyCLIP features={list(self.features)}: distinct 1-indexed block numbers")
        for name in ("n_ctx", "t_n_ctx", "dpam_start", "image_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"AnomalyCLIP {name}={getattr(self, name)}: must be ≥ 1")


# ------------------------------------------------------------------------------------------------------ text


class PromptLearner(nn.Module):
    """The trainable tensors of AnomalyCLIP and the text features they give.

    Parameters (state-dict keys): ``ctx_pos.ctx`` [n_ctx, W], ``ctx_neg.ctx`` [n_ctx, W] and
    ``compound.prompts.{0..depth−2}`` [t_n_ctx, W] (text blocks 1..depth−1). Seeds: ctx_pos ``seed``, ctx_neg
    ``seed + 1``, compound prompt i ``seed + 2 + i``. The token ids and their frozen embeddings are non-persistent
    buffers (rebuilt from the CLIP model). The released unused ``Linear(W → 896)`` × 8 is not created.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer,
        *,
        n_ctx: int = 12,
        depth: int = 9,
        t_n_ctx: int = 4,
        compound_fp16: bool = True,
        init_std: float = 0.02,
        seed: int = 0,
    ) -> None:
        super().__init__()
        width = int(clip.ln_final.weight.shape[0])
        text_blocks = len(clip.transformer.resblocks)
        if depth - 1 >= text_blocks:
            raise ConfigError(
                f"AnomalyCLIP depth={depth} needs compound prompts before text blocks 1..{depth - 1}, but the text "
                f"tower has {text_blocks} blocks (0..{text_blocks - 1}); lower depth or use a deeper text tower"
            )
        self.n_ctx, self.depth, self.t_n_ctx, self.width = n_ctx, depth, t_n_ctx, width
        self.ctx_pos = ContextVectors(n_ctx, width, init_std=init_std, seed=derived_seed(seed, "ctx_pos"))
        self.ctx_neg = ContextVectors(n_ctx, width, init_std=init_std, seed=derived_seed(seed, "ctx_neg"))
        # the float16 rounding is applied per sentence copy in deep_prompts() (see there)
        self.compound = DeepTextPrompts(t_n_ctx, width, blocks=range(1, depth), init_std=init_std,
                                        seed=derived_seed(seed, "compound"))
        self.compound_fp16 = compound_fp16
        device = clip.token_embedding.weight.device
        tokens = context_prompt_tokens(tokenizer, STATE_TEXTS, n_ctx).to(device)
        with torch.no_grad():
            embeddings = clip.token_embedding(tokens)
        self.register_buffer("tokens", tokens, persistent=False)  # [2, L]
        self.register_buffer("token_embeddings", embeddings, persistent=False)  # [2, L, W]

    def prompt_embeddings(self) -> Tensor:
        """Token embeddings of the two sentences with the context written in, [2, L, W] (normal, anomalous)."""
        return torch.stack([self.ctx_pos(self.token_embeddings[0]), self.ctx_neg(self.token_embeddings[1])])

    def deep_prompts(self) -> dict[int, Tensor]:
        """{text block: compound tokens [2, t_n_ctx, W]} for blocks 1..depth−1: one copy per sentence, each rounded
        through float16 when ``compound_fp16`` is on.

        The release expands the tokens to both sentences and *then* calls ``.half()``, so the backward pass rounds
        each copy's gradient to float16 before the copies are summed in float32 (rounding once, after the copies'
        gradients are summed, changes the gradient by up to ~1e-3).
        """
        copies = {}
        for block, tokens in self.compound().items():
            tokens = tokens.expand(self.tokens.shape[0], *tokens.shape)
            copies[block] = tokens.half().float() if self.compound_fp16 else tokens
        return copies

    def set_values(self, ctx_pos: Tensor, ctx_neg: Tensor, compound: Tensor | Sequence[Tensor]) -> None:
        """Overwrite the learnables: ctx_pos, ctx_neg [n_ctx, W]; compound [depth−1, t_n_ctx, W] (any leading ones
        of the released shapes, e.g. [1, 1, n_ctx, W], are squeezed)."""
        with torch.no_grad():
            for target, value in ((self.ctx_pos.ctx, ctx_pos), (self.ctx_neg.ctx, ctx_neg)):
                target.copy_(torch.as_tensor(value).reshape(target.shape))
            compound = list(compound)
            if len(compound) != len(self.compound.prompts):
                raise ConfigError(
                    f"{len(compound)} compound prompts given, the learner has {len(self.compound.prompts)}")
            for target, value in zip(self.compound.prompts, compound, strict=True):
                target.copy_(torch.as_tensor(value).reshape(target.shape))

    def text_features(self, clip: nn.Module, *, normalize: bool = True) -> Tensor:
        """T = L2(text_projection(ln_final(EOT))) of the two prompts, [2, E] float32 (rows t_n, t_a); without the L2
        with ``normalize=False`` (the release's ``encode_text_learn`` output).

        Gradients flow to the learnables; the CLIP text tower is only read.
        """
        features = encode_text_with_context(clip, self.tokens, self.prompt_embeddings(), self.deep_prompts(),
                                            deep_start=1).float()
        return F.normalize(features, dim=-1) if normalize else features


# ---------------------------------------------------------------------------------------------------- vision


@dataclass(frozen=True)
class VisualFeatures:
    """The frozen visual features of a batch (they do not depend on the learnables).

    Attributes:
        global_features: g, [B, E], L2-normalised.
        local_features: f, [B, K, N, E], L2-normalised, one slice per feature layer (in ``features`` order).
    """

    global_features: Tensor
    local_features: Tensor

    def to(self, *args, **kwargs) -> VisualFeatures:
        """Both tensors moved / cast (``Tensor.to`` arguments)."""
        return VisualFeatures(self.global_features.to(*args, **kwargs), self.local_features.to(*args, **kwargs))

    def __getitem__(self, index) -> VisualFeatures:
        return VisualFeatures(self.global_features[index], self.local_features[index])


def run_positional_embedding(visual: nn.Module, image_size: int, mode: str = "bilinear") -> Tensor:
    """The visual positional embedding for inputs of ``image_size`` px, [1 + g², width] (g = image_size // patch).

    ``bilinear``: the release's run-time resize (``F.interpolate(mode="bilinear")``, align_corners False, no
    antialias; CLS row kept). ``bicubic``: what open_clip's ``resize_pos_embed`` does at load (antialiased bicubic).
    The model's own embedding when g is its native grid.
    """
    if mode not in POS_RESIZE_MODES:
        raise ConfigError(f"positional-embedding resize {mode!r}; choose one of {POS_RESIZE_MODES}")
    patch = visual.conv1.kernel_size[0]
    return resize_positional_embedding(visual.positional_embedding, image_size // patch, mode=mode,
                                       antialias=mode == "bicubic")


def dpam_variant(dpam_start: int) -> AttentionVariant:
    """The shared DPAM preset (V-V dual path, no FFN) starting at the 1-indexed block ``dpam_start``."""
    return replace(PRESETS["anomalyclip_dpam"], start_block=dpam_start - 1)


# ----------------------------------------------------------------------------------------------------- heads


def image_logits(global_features: Tensor, text: Tensor, temperature: float = 0.07) -> Tensor:
    """⟨g, t_c⟩ / τ: [B, E] × [2, E] → [B, 2] (both unit-norm)."""
    return global_features @ text.T / temperature


def image_scores(logits: Tensor) -> Tensor:
    """softmax(logits)[anomaly]: [B, 2] → [B]."""
    return logits.softmax(dim=-1)[:, 1]


def patch_probabilities(local_features: Tensor, text: Tensor, temperature: float = 0.07) -> Tensor:
    """softmax_c(⟨f, t_c⟩ / τ) per patch: [..., N, E] × [2, E] → [..., N, 2] (the release's compute_similarity)."""
    return (local_features @ text.T / temperature).softmax(dim=-1)


def similarity_maps(probs: Tensor, size: int) -> Tensor:
    """Patch probabilities [B, N, 2] on the √N grid, bilinearly upsampled (align_corners=False) → [B, 2, S, S]
    (the release's get_similarity_map, channels first)."""
    side = round(probs.shape[1] ** 0.5)
    if side * side != probs.shape[1]:
        raise ConfigError(f"{probs.shape[1]} patches do not form a square grid; drop the CLS token first")
    grid = probs.reshape(probs.shape[0], side, side, probs.shape[-1]).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)


def anomaly_map(maps: Sequence[Tensor]) -> Tensor:
    """Σ_l (S_l,a + 1 − S_l,n)/2 over the layers' maps [B, 2, S, S] → [B, S, S], before smoothing (= Σ_l S_l,a,
    written as the release's test.py computes it)."""
    return torch.stack([(m[:, 1] + 1 - m[:, 0]) / 2.0 for m in maps]).sum(dim=0)


@dataclass(frozen=True)
class LossTerms:
    """The training loss and its parts (scalars). ``focal``, ``dice_anomaly`` (Dice(S_a, M)) and ``dice_normal``
    (Dice(S_n, 1 − M)) are summed over the feature layers, before λ; ``total`` = ce + λ·(focal + dice_anomaly +
    dice_normal)."""

    ce: Tensor
    focal: Tensor
    dice_anomaly: Tensor
    dice_normal: Tensor
    total: Tensor

    def as_floats(self) -> dict[str, float]:
        """The terms as Python floats (logging)."""
        return {k: float(getattr(self, k).detach()) for k in ("ce", "focal", "dice_anomaly", "dice_normal", "total")}


def loss_terms(
    logits: Tensor, maps: Sequence[Tensor], masks: Tensor, labels: Tensor, *, local_weight: float = 4.0,
    mask_valid: Tensor | None = None,
) -> LossTerms:
    """CE(logits [B, 2], labels [B]) + λ·Σ_l [Focal(S_l, M) + Dice(S_l[:, 1], M) + Dice(S_l[:, 0], 1 − M)].

    ``maps``: per layer [B, 2, S, S] probabilities; ``masks`` [B, S, S] (bool or float, binarised at 0.5). Dice is
    per image (the release's BinaryDiceLoss for B > 1; its ``gt.squeeze()`` breaks B = 1, which is computed
    per image here). ``mask_valid`` [B] bool: the images whose mask is pixel truth (None: all); the pixel terms are
    taken over those only (an anomalous image of a dataset without masks has no pixel truth; the release never
    trains on one), and are 0 when there is none.
    """
    ce = F.cross_entropy(logits, labels.long().to(logits.device))
    pixel = segmentation_terms(maps, masks, mask_valid)
    if pixel is None:
        zero = ce.new_zeros(())
        return LossTerms(ce, zero, zero, zero, ce)
    focal, dice_a, dice_n = pixel
    return LossTerms(ce, focal, dice_a, dice_n, ce + local_weight * (focal + dice_a + dice_n))


# ----------------------------------------------------------------------------------------------------- model


class AnomalyCLIPModel:
    """A frozen open_clip CLIP plus AnomalyCLIP's :class:`PromptLearner` (the only trainable part).

    Args:
        clip: an open_clip ``CLIP`` (ViT vision tower with the default attention blocks; not modified, frozen here).
        tokenizer: its tokenizer (context length of the text tower).
        config: the hyperparameters.
        seed: seeds the learnables' initialisation.
    """

    def __init__(self, clip: nn.Module, tokenizer, config: AnomalyCLIPConfig | None = None, *, seed: int = 0) -> None:
        self.config = config or AnomalyCLIPConfig()
        self.clip = clip
        clip.requires_grad_(False)
        self.n_blocks = len(clip.visual.transformer.resblocks)
        c = self.config
        bad = [f for f in c.features if f > self.n_blocks]
        if bad or c.dpam_start > self.n_blocks:
            raise ConfigError(
                f"AnomalyCLIP features {list(c.features)} / dpam_start {c.dpam_start} (1-indexed) exceed the "
                f"{self.n_blocks} blocks of the vision tower"
            )
        self.variant = dpam_variant(c.dpam_start)
        self.prompt_learner = PromptLearner(clip, tokenizer, n_ctx=c.n_ctx, depth=c.depth, t_n_ctx=c.t_n_ctx,
                                            compound_fp16=c.compound_fp16, init_std=c.init_std, seed=seed)

    # -- text ------------------------------------------------------------------------------------------------

    def text_features(self, *, normalize: bool = True) -> Tensor:
        """T [2, E] (t_n, t_a), L2-normalised (unless ``normalize=False``); differentiable in the learnables."""
        return self.prompt_learner.text_features(self.clip, normalize=normalize)

    # -- vision ----------------------------------------------------------------------------------------------

    def positional_embedding(self) -> Tensor:
        """The run-size positional embedding [1 + g², width] (see :func:`run_positional_embedding`)."""
        return run_positional_embedding(self.clip.visual, self.config.image_size, self.config.pos_resize)

    @torch.no_grad()
    def encode_image(self, images: Tensor, *, normalize: bool = True) -> VisualFeatures:
        """Frozen features of images [B, 3, S, S] (normalised, S = ``image_size``): g [B, E], f [B, K, N, E];
        ``normalize=False`` gives them before the L2 (CLS @ proj and ln_post(u) @ proj, the release's
        ``encode_image`` outputs)."""
        c = self.config
        if images.ndim != 4 or tuple(images.shape[-2:]) != (c.image_size, c.image_size):
            raise ConfigError(f"images of shape {tuple(images.shape)}; AnomalyCLIP runs at [B, 3, {c.image_size}, "
                              f"{c.image_size}]: resize them with the method's transform")
        visual = self.clip.visual
        last = self.n_blocks - 1
        taps = sorted({f - 1 for f in c.features} | {last})
        feats = variant_features(visual, images, self.variant, taps, positional_embedding=self.positional_embedding())
        cls = apply_head(visual, feats.original.cls_at(last), ln_post=c.global_ln_post, project=True)
        local = [apply_head(visual, feats.modified.patch_at(f - 1), ln_post=True, project=True) for f in c.features]
        local = torch.stack(local, dim=1)
        if not normalize:
            return VisualFeatures(cls, local)
        return VisualFeatures(F.normalize(cls, dim=-1), F.normalize(local, dim=-1))

    # -- heads -----------------------------------------------------------------------------------------------

    def image_logits(self, features: VisualFeatures, text: Tensor) -> Tensor:
        """⟨g, t_c⟩ / τ, [B, 2]."""
        return image_logits(features.global_features, text, self.config.temperature)

    def patch_probabilities(self, features: VisualFeatures, text: Tensor) -> list[Tensor]:
        """Per feature layer, softmax_c(⟨f, t_c⟩/τ) [B, N, 2]."""
        return [patch_probabilities(features.local_features[:, k], text, self.config.temperature)
                for k in range(features.local_features.shape[1])]

    def similarity_maps(self, features: VisualFeatures, text: Tensor) -> list[Tensor]:
        """Per feature layer, S_l [B, 2, S, S] (upsampled probabilities)."""
        return [similarity_maps(p, self.config.image_size) for p in self.patch_probabilities(features, text)]

    def loss(self, features: VisualFeatures, masks: Tensor, labels: Tensor, text: Tensor | None = None, *,
             mask_valid: Tensor | None = None) -> LossTerms:
        """The training loss of a batch (text recomputed from the learnables unless given; ``mask_valid``: see
        :func:`loss_terms`)."""
        text = self.text_features() if text is None else text
        return loss_terms(self.image_logits(features, text), self.similarity_maps(features, text), masks, labels,
                          local_weight=self.config.local_weight, mask_valid=mask_valid)

    @torch.no_grad()
    def raw_maps(self, features: VisualFeatures, text: Tensor) -> Tensor:
        """The anomaly map before smoothing, [B, S, S] (summed over the feature layers)."""
        return anomaly_map(self.similarity_maps(features, text))

    @torch.no_grad()
    def predict(self, features: VisualFeatures, text: Tensor, sigma: float = 4.0) -> tuple[Tensor, Tensor]:
        """Image scores [B] and smoothed anomaly maps [B, S, S] (float32, on the CPU)."""
        scores = image_scores(self.image_logits(features, text))
        return scores.float().cpu(), smooth_maps(self.raw_maps(features, text), sigma)
