"""AA-CLIP (CVPR'25) as released (Mwxinnn/AA-CLIP@53db195): the computation only, tensors in, tensors out.

Built on an open_clip ``CLIP`` model object (the exact-GELU ViT-L/14@336 at 518 px or a tiny random one); nothing in
it is modified. Spec: ``baselines_clip_family.md`` §0, §3, §7. Notation: ``B`` images, ``E`` joint embedding width,
``W_t`` / ``W_v`` text / vision width, ``K`` feature layers, ``g`` the patch grid (37 at 518 px), ``N = g²``, ``S`` the
input size. Text features are ``[2, E]`` per class (rows t_n, t_a), ``[B, 2, E]`` per image of a batch.

Adapters (:class:`AACLIPAdapters`, state-dict names as the release's ``AdaptedCLIP`` minus ``clipmodel``):
    residual adapter after block i < K (every token): a = LeakyReLU(W_i h) (W_i no-bias ``W × W``), a ← a·‖h‖/‖a‖,
    h ← w·a + (1 − w)·h (w = 0.1). Text: K_t = 3 of the text blocks, then ``SimpleProj`` (no-bias Linear W_t → E +
    LeakyReLU) replaces CLIP's text projection: EOT → ln_final → SimpleProj. Image: K_v = 6 of the vision blocks; per
    feature layer a ``seg_proj`` (no-bias Linear W_v → E, no activation: the release's ``--relu`` is off) and a
    ``det_proj`` of the same form. All weights xavier-uniform from per-tensor seeds.

Prompts: 3 normal × 2 templates and 5 abnormal × 2 templates around the class description (``aa_clip`` ensemble);
per state L2 each sentence, mean, L2 → t_n, t_a.

Stage 1 (text adapter; :func:`stage1_loss`): frozen visual features f_l = L2(ln_post(z_l) @ proj) + ĝ from the
surgery stream z at the feature layers (single path with the FFN from block ``surgery_start``; V-V attention across
the batch axis as released, or token-wise), ĝ = L2(ln_post(CLS) @ proj) of the unmodified model (not renormalised
after the sum). P_l = softmax_c(up(100·f_l·T)) (bilinear, align_corners=True). Seg(P, M) = Focal(P, M) + Dice(P_n,
1 − M) + Dice(P_a, M). Loss = Seg(last layer) (as released; "all": Σ_l) + 0.1·(mean_b ⟨t_n, t_a⟩)².

Stage 2 (image adapter; :func:`stage2_loss`): the standard ViT with the image adapters; F_l = L2(seg_proj_l(ln_post(
tokens_l))) (CLS dropped), det = mean over patches of L2(det_proj(ln_post(tokens_last))) (not renormalised). Loss =
CE(det·T, y) (no temperature) + Σ_l Seg(P_l).

Inference (:func:`anomaly_map`, :func:`raw_image_scores`, :func:`normalize_class`): per layer the logits L = 100·F_l·T
on the grid, m = (L_a + 1 − L_n)/2 (no softmax), kornia-style Gaussian blur on the grid (reflect border; industrial
kernel 7 σ 1, medical kernel 9 σ 1.5), bilinear upsample (align_corners=True), summed over the layers; raw score
s = (det·t_a + 1)/2. Per class (every test image of the class at once, the release's ``metrics_eval``): maps min–max
normalised jointly, scores min–max normalised, each only when its maximum ≠ 1; image score 0.5·max(map) + 0.5·s
(industrial) or max(map) (medical).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from open_clip.transformer import text_global_pool
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode

from siad.backbones.attention import PRESETS, AttentionVariant, variant_features
from siad.backbones.features import apply_head, embed_images, vision_blocks
from siad.errors import ConfigError
from siad.methods.losses import dice_loss, focal_loss
from siad.prompts.ensemble import ENSEMBLES
from siad.prompts.learnable import trimmed_length
from siad.seeding import derived_seed

__all__ = [
    "DOMAINS",
    "LOGIT_SCALE",
    "SURGERY_ATTENTION",
    "AACLIPAdapters",
    "AACLIPConfig",
    "AACLIPModel",
    "AdaptedImageFeatures",
    "SimpleAdapter",
    "SimpleProj",
    "Stage1Loss",
    "Stage2Loss",
    "adapted_image_features",
    "aaclip_sentences",
    "anomaly_map",
    "colour_jitter",
    "detection_logits",
    "encode_text_adapted",
    "gaussian_blur2d",
    "gaussian_kernel1d",
    "joint_geometric",
    "layer_anomaly_map",
    "normalize_class",
    "orthogonality_loss",
    "patch_logits",
    "raw_image_scores",
    "residual_adapt",
    "seg_loss",
    "stage1_features",
    "stage1_loss",
    "stage2_loss",
    "surgery_patch_features",
    "surgery_variant",
    "text_features_from_sentences",
    "training_probabilities",
]

#: The fixed logit scale of every patch similarity (the release's ``100.0 *``).
LOGIT_SCALE = 100.0
DOMAINS: tuple[str, ...] = ("industrial", "medical")
#: V-V attention of the stage-1 surgery: across the batch axis per token (as released) or across tokens per image.
SURGERY_ATTENTION: tuple[str, ...] = ("batch", "tokenwise")
STAGE1_LOSS_LAYERS: tuple[str, ...] = ("last", "all")


@dataclass(frozen=True)
class AACLIPConfig:
    """The hyperparameters of the computation (defaults: the release, spec §3).

    Attributes:
        text_adapter_blocks: residual adapters after text blocks 0..K_t−1 (3).
        image_adapter_blocks: residual adapters after vision blocks 0..K_v−1 (6).
        text_adapt_weight, image_adapt_weight: w of h ← w·a + (1 − w)·h (0.1 each).
        features: feature layers, 1-indexed vision blocks (6, 12, 18, 24); the last one feeds the detection head.
        surgery_start: first surgery block, 1-indexed (6: the release's ``DAPM_replace(20)`` = blocks 6–24 of 24).
        surgery_attention: ``batch`` (as released) or ``tokenwise``.
        stage1_loss_layers: ``last`` (as released: the loss is reassigned in the layer loop) or ``all`` (Σ_l).
        orthogonality_weight: weight of (mean_b ⟨t_n, t_a⟩)² (0.1).
        proj_relu: LeakyReLU after seg_proj / det_proj (the release's ``--relu``, off).
        industrial_blur, medical_blur: (kernel size, σ) of the test-time blur on the grid.
    """

    text_adapter_blocks: int = 3
    image_adapter_blocks: int = 6
    text_adapt_weight: float = 0.1
    image_adapt_weight: float = 0.1
    features: tuple[int, ...] = (6, 12, 18, 24)
    surgery_start: int = 6
    surgery_attention: str = "batch"
    stage1_loss_layers: str = "last"
    orthogonality_weight: float = 0.1
    proj_relu: bool = False
    industrial_blur: tuple[int, float] = (7, 1.0)
    medical_blur: tuple[int, float] = (9, 1.5)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))
        object.__setattr__(self, "industrial_blur", (int(self.industrial_blur[0]), float(self.industrial_blur[1])))
        object.__setattr__(self, "medical_blur", (int(self.medical_blur[0]), float(self.medical_blur[1])))
        if self.surgery_attention not in SURGERY_ATTENTION:
            raise ConfigError(f"AA-CLIP surgery_attention={self.surgery_attention!r}; choose one of "
                              f"{SURGERY_ATTENTION}")
        if self.stage1_loss_layers not in STAGE1_LOSS_LAYERS:
            raise ConfigError(f"AA-CLIP stage1_loss_layers={self.stage1_loss_layers!r}; choose one of "
                              f"{STAGE1_LOSS_LAYERS}")
        if not self.features or len(set(self.features)) != len(self.features) or min(self.features) < 1:
            raise ConfigError(f"AA-CLIP features={list(self.features)}: distinct 1-indexed block numbers")
        if self.surgery_start < 1 or self.text_adapter_blocks < 0 or self.image_adapter_blocks < 0:
            raise ConfigError("AA-CLIP surgery_start must be ≥ 1 and the adapter block counts ≥ 0")
        for name in ("industrial_blur", "medical_blur"):
            kernel, sigma = getattr(self, name)
            if kernel < 1 or not sigma > 0:
                raise ConfigError(f"AA-CLIP {name}={getattr(self, name)}: kernel size ≥ 1 and σ > 0")

    def blur(self, domain: str) -> tuple[int, float]:
        """(kernel size, σ) of ``domain``."""
        if domain not in DOMAINS:
            raise ConfigError(f"AA-CLIP domain {domain!r}; choose one of {DOMAINS}")
        return self.industrial_blur if domain == "industrial" else self.medical_blur


# ---------------------------------------------------------------------------------------------------- adapters


class SimpleAdapter(nn.Module):
    """a = LeakyReLU(W h), W a no-bias Linear ``c_in → c_out`` (key ``fc.0.weight``, as released)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c_in, c_out, bias=False), nn.LeakyReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class SimpleProj(nn.Module):
    """A no-bias Linear ``c_in → c_out``, with a LeakyReLU when ``relu`` (keys ``fc.0.weight`` / ``fc.weight``)."""

    def __init__(self, c_in: int, c_out: int, relu: bool) -> None:
        super().__init__()
        linear = nn.Linear(c_in, c_out, bias=False)
        self.fc = nn.Sequential(linear, nn.LeakyReLU()) if relu else linear

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


def residual_adapt(x: Tensor, adapter: nn.Module, weight: float) -> Tensor:
    """h ← w·a + (1 − w)·h with a = adapter(h) rescaled per token to ‖h‖ (any leading shape, last dim = width)."""
    a = adapter(x)
    a = a * x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True)
    return weight * a + (1 - weight) * x


class AACLIPAdapters(nn.Module):
    """Every trainable tensor of AA-CLIP, under the release's names.

    ``text_adapter``: K_t ``SimpleAdapter(W_t, W_t)`` then ``SimpleProj(W_t, E, relu=True)`` (keys
    ``text_adapter.{i}.fc.0.weight``); ``image_adapter``: ``layer_adapters`` (K_v × ``SimpleAdapter(W_v, W_v)``),
    ``seg_proj`` (one ``SimpleProj(W_v, E)`` per feature layer) and ``det_proj`` (keys
    ``image_adapter.layer_adapters.{i}.fc.0.weight``, ``image_adapter.seg_proj.{l}.fc.weight``,
    ``image_adapter.det_proj.fc.weight`` with ``proj_relu`` off). The buffer ``text_adapted`` (persistent) says
    whether the text adapter was trained: the release encodes text with the plain CLIP when stage 1 ran no epoch.

    Every weight is xavier-uniform from ``derived_seed(seed, "aaclip", <state-dict name>)``.
    """

    def __init__(self, text_width: int, vision_width: int, embed_dim: int, *, text_blocks: int = 3,
                 image_blocks: int = 6, n_features: int = 4, proj_relu: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.text_adapter = nn.ModuleList(
            [SimpleAdapter(text_width, text_width) for _ in range(text_blocks)]
            + [SimpleProj(text_width, embed_dim, relu=True)])
        self.image_adapter = nn.ModuleDict({
            "layer_adapters": nn.ModuleList([SimpleAdapter(vision_width, vision_width) for _ in range(image_blocks)]),
            "seg_proj": nn.ModuleList([SimpleProj(vision_width, embed_dim, proj_relu) for _ in range(n_features)]),
            "det_proj": SimpleProj(vision_width, embed_dim, proj_relu),
        })
        self.register_buffer("text_adapted", torch.tensor(False))
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        """xavier-uniform every weight from its own seed (the release's ``_init_weights_``)."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                generator = torch.Generator().manual_seed(derived_seed(seed, "aaclip", name))
                value = torch.empty(param.shape, dtype=torch.float32)
                nn.init.xavier_uniform_(value, generator=generator)
                param.copy_(value)

    @property
    def text_blocks(self) -> int:
        return len(self.text_adapter) - 1

    @property
    def image_blocks(self) -> int:
        return len(self.image_adapter["layer_adapters"])

    def text_parameters(self) -> list[nn.Parameter]:
        return list(self.text_adapter.parameters())

    def image_parameters(self) -> list[nn.Parameter]:
        return list(self.image_adapter.parameters())

    def load_release_state_dicts(self, text_adapter: dict[str, Tensor] | None = None,
                                 image_adapter: dict[str, Tensor] | None = None) -> None:
        """Load the release's checkpoint entries (``text_adapter.pth["text_adapter"]``,
        ``image_adapter_*.pth["image_adapter"]``); a text adapter given marks the text as adapted."""
        if text_adapter is not None:
            self.text_adapter.load_state_dict(text_adapter)
            self.text_adapted.fill_(True)
        if image_adapter is not None:
            self.image_adapter.load_state_dict(image_adapter)


# -------------------------------------------------------------------------------------------------------- text


def aaclip_sentences(description: str) -> tuple[list[str], list[str]]:
    """The (normal, abnormal) sentences of a class description: 6 and 10 (state-major, as released)."""
    return ENSEMBLES.get("aa_clip").sentences(description)


def encode_text_adapted(clip: nn.Module, tokens: Tensor, adapters: AACLIPAdapters | None, *,
                        weight: float = 0.1, trim: bool = True, trace: dict | None = None) -> Tensor:
    """Sentence embeddings [N, E] of token ids [N, L] through the adapted text tower (un-normalised).

    token embedding + positional → causal blocks, a residual adapter after each block i < K_t → ln_final → EOT →
    SimpleProj (the release's ``AdaptedCLIP.encode_text``). ``adapters=None`` is the plain ``clip.encode_text``
    (text projection, no adapter). ``trim`` cuts the padding after the last EOT (per-token ops and the causal mask
    leave the EOT features unchanged). ``trace`` (a dict) receives, per adapted block i, ``text_block_out`` (the
    block's output h), ``text_adapter_raw`` (LeakyReLU(W_i h), before the rescaling) and ``text_mixed`` (the stream
    after the mix), each [N, L, W_t], and ``text_pooled``: ln_final(EOT) [N, W_t].
    """
    if trim:
        tokens = tokens[:, : trimmed_length(clip, tokens)]
    length = tokens.shape[-1]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
    mask = None if clip.attn_mask is None else clip.attn_mask[:length, :length]
    batch_first = getattr(clip.transformer, "batch_first", True)
    blocks = 0 if adapters is None else adapters.text_blocks
    record: dict[str, list[Tensor]] = {"text_block_out": [], "text_adapter_raw": [], "text_mixed": []}
    for index, block in enumerate(clip.transformer.resblocks):
        x = block(x, attn_mask=mask) if batch_first else block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        if index < blocks:
            raw = adapters.text_adapter[index](x)
            a = raw * x.norm(dim=-1, keepdim=True) / raw.norm(dim=-1, keepdim=True)
            record["text_block_out"].append(x)
            x = weight * a + (1 - weight) * x
            record["text_adapter_raw"].append(raw)
            record["text_mixed"].append(x)
    x = clip.ln_final(x)
    pooled = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    if trace is not None:
        trace.update(record, text_pooled=pooled)
    if adapters is not None:
        return adapters.text_adapter[-1](pooled)
    if isinstance(clip.text_projection, nn.Linear):
        return clip.text_projection(pooled)
    return pooled @ clip.text_projection


def text_features_from_sentences(embeddings: Tensor, n_normal: int) -> Tensor:
    """T [2, E] from sentence embeddings [n_normal + n_abnormal, E]: per state L2, mean, L2 (rows t_n, t_a)."""
    rows = []
    for part in (embeddings[:n_normal], embeddings[n_normal:]):
        part = part / part.norm(dim=-1, keepdim=True)
        mean = part.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------------------ vision


def surgery_variant(surgery_start: int = 6, attention: str = "batch") -> AttentionVariant:
    """The shared single-path surgery preset (V-V attention, FFN kept) from the 1-indexed ``surgery_start``."""
    if attention not in SURGERY_ATTENTION:
        raise ConfigError(f"AA-CLIP surgery attention {attention!r}; choose one of {SURGERY_ATTENTION}")
    preset = PRESETS["aaclip_surgery" if attention == "batch" else "aaclip_surgery_tokenwise"]
    return replace(preset, start_block=surgery_start - 1)


def surgery_patch_features(clip: nn.Module, images: Tensor, variant: AttentionVariant,
                           features: Sequence[int]) -> Tensor:
    """L2(ln_post(z_l) @ proj) of the surgery stream's patch tokens at the 1-indexed ``features``: [B, K, N, E].

    With ``attend_over="batch"`` the result of each image depends on the other images of the batch (as released).
    """
    feats = variant_features(clip.visual, images, variant, [f - 1 for f in features], ln_post=True, project=True,
                             run_original=False)
    return F.normalize(torch.stack(list(feats.modified.patch), dim=1), dim=-1)


def stage1_features(surgery: Tensor, global_embedding: Tensor) -> Tensor:
    """f_l = surgery features [B, K, N, E] (unit-norm) + L2(ĝ) [B, E] on every patch (the sum not renormalised)."""
    g = global_embedding / global_embedding.norm(dim=-1, keepdim=True)
    return surgery + g[:, None, None, :]


@dataclass(frozen=True)
class AdaptedImageFeatures:
    """Stage-2 image features.

    Attributes:
        seg: F_l [B, K, N, E], L2-normalised per patch.
        det: [B, E], the mean over patches of the L2-normalised det_proj tokens (not renormalised).
    """

    seg: Tensor
    det: Tensor


def adapted_image_features(clip: nn.Module, adapters: AACLIPAdapters, images: Tensor, features: Sequence[int], *,
                           weight: float = 0.1, trace: dict | None = None) -> AdaptedImageFeatures:
    """The release's ``AdaptedCLIP.forward``: the standard ViT with a residual adapter after each block i < K_v
    (all tokens, CLS included), patch tokens at the 1-indexed ``features`` → ln_post → seg_proj_l → L2; det from the
    last feature layer's tokens. Stops after the deepest feature layer. ``trace`` (a dict) receives, per adapted
    block i, ``image_block_out``, ``image_adapter_raw`` (before the rescaling) and ``image_mixed`` (each [B, 1 + N,
    W_v], CLS first) and ``image_tokens`` (ln_post of the tapped patch tokens, [B, N, W_v] per layer)."""
    visual = clip.visual
    blocks = vision_blocks(visual)
    taps = [f - 1 for f in features]
    if max(taps) >= len(blocks):
        raise ConfigError(f"AA-CLIP features {list(features)} exceed the {len(blocks)} vision blocks")
    x = embed_images(visual, images)
    layer_adapters = adapters.image_adapter["layer_adapters"]
    tapped: dict[int, Tensor] = {}
    record: dict[str, list[Tensor]] = {"image_block_out": [], "image_adapter_raw": [], "image_mixed": []}
    for index, block in enumerate(blocks[: max(taps) + 1]):
        x = block(x)
        if index < len(layer_adapters):
            raw = layer_adapters[index](x)
            a = raw * x.norm(dim=-1, keepdim=True) / raw.norm(dim=-1, keepdim=True)
            record["image_block_out"].append(x)
            x = weight * a + (1 - weight) * x
            record["image_adapter_raw"].append(raw)
            record["image_mixed"].append(x)
        if index in taps:
            tapped[index] = x[:, 1:]
    tokens = [apply_head(visual, tapped[t], ln_post=True, project=False) for t in taps]
    seg = [F.normalize(adapters.image_adapter["seg_proj"][k](t), dim=-1) for k, t in enumerate(tokens)]
    det = F.normalize(adapters.image_adapter["det_proj"](tokens[-1]), dim=-1).mean(dim=1)
    if trace is not None:
        trace.update(record, image_tokens=tokens)
    return AdaptedImageFeatures(torch.stack(seg, dim=1), det)


# ------------------------------------------------------------------------------------------------------- heads


def _per_image_text(text: Tensor, batch: int) -> Tensor:
    """[2, E] or [B, 2, E] → [B, 2, E]."""
    return text.expand(batch, *text.shape) if text.dim() == 2 else text


def patch_logits(patch: Tensor, text: Tensor, scale: float = LOGIT_SCALE) -> Tensor:
    """scale·⟨f, t_c⟩: patch [B, N, E] × text [2, E] or [B, 2, E] → [B, N, 2]."""
    text = _per_image_text(text, patch.shape[0])
    return scale * torch.matmul(patch, text.transpose(1, 2))


def _grid(logits: Tensor) -> Tensor:
    """[B, N, C] → [B, C, g, g]."""
    batch, count, channels = logits.shape
    side = round(count**0.5)
    if side * side != count:
        raise ConfigError(f"{count} patches do not form a square grid; drop the CLS token first")
    return logits.permute(0, 2, 1).reshape(batch, channels, side, side)


def training_probabilities(patch: Tensor, text: Tensor, size: int) -> Tensor:
    """P = softmax_c(up(100·f·T)) [B, 2, S, S]: logits on the grid, bilinear upsample (align_corners=True), softmax
    over the two states (the release's ``calculate_similarity_map`` in training)."""
    up = F.interpolate(_grid(patch_logits(patch, text)), size=size, mode="bilinear", align_corners=True)
    return torch.softmax(up, dim=1)


def seg_loss(probs: Tensor, masks: Tensor) -> Tensor:
    """Focal(P, M) + Dice(P_n, 1 − M) + Dice(P_a, M): probs [B, 2, S, S], masks [B, S, S] in {0, 1}."""
    target = masks.to(probs.dtype)
    return focal_loss(probs, target) + dice_loss(probs[:, 0], 1 - target) + dice_loss(probs[:, 1], target)


def orthogonality_loss(text: Tensor) -> Tensor:
    """(mean_b ⟨t_n, t_a⟩)² of per-image text features [B, 2, E] (images of one class repeat its T)."""
    return (text[:, 0] * text[:, 1]).sum(dim=1).mean() ** 2


def detection_logits(det: Tensor, text: Tensor) -> Tensor:
    """det·T without temperature: [B, E] × [2, E] or [B, 2, E] → [B, 2]."""
    text = _per_image_text(text, det.shape[0])
    return torch.matmul(det[:, None, :], text.transpose(1, 2))[:, 0]


@dataclass(frozen=True)
class Stage1Loss:
    """Stage-1 loss parts: ``seg`` [K] the per-layer segmentation losses (all computed, as released),
    ``orthogonality`` (before its weight) and ``total``."""

    seg: Tensor
    orthogonality: Tensor
    total: Tensor

    def as_floats(self) -> dict[str, float]:
        return {"seg": float(self.seg.detach()[-1]), "orthogonality": float(self.orthogonality.detach()),
                "total": float(self.total.detach())}


@dataclass(frozen=True)
class Stage2Loss:
    """Stage-2 loss parts: ``ce`` the detection CE, ``seg`` [K] per layer, ``total`` = ce + Σ seg."""

    ce: Tensor
    seg: Tensor
    total: Tensor

    def as_floats(self) -> dict[str, float]:
        return {"ce": float(self.ce.detach()), "seg": float(self.seg.detach().sum()),
                "total": float(self.total.detach())}


def _valid(mask_valid: Tensor | None, batch: int, device: torch.device) -> Tensor:
    if mask_valid is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    return mask_valid.to(device=device, dtype=torch.bool)


def stage1_loss(features: Tensor, text: Tensor, masks: Tensor, *, size: int, layers: str = "last",
                orthogonality_weight: float = 0.1, mask_valid: Tensor | None = None) -> Stage1Loss:
    """Stage-1 loss of f [B, K, N, E] (:func:`stage1_features`) and per-image text [B, 2, E].

    ``layers="last"``: Seg of the last feature layer + w·orth (as released: ``loss`` reassigned in the layer loop);
    ``"all"``: Σ_l Seg_l + w·orth. ``mask_valid`` [B] bool: the pixel terms use only images whose mask is pixel truth
    (0 when none).
    """
    if layers not in STAGE1_LOSS_LAYERS:
        raise ConfigError(f"AA-CLIP stage1 loss layers {layers!r}; choose one of {STAGE1_LOSS_LAYERS}")
    keep = _valid(mask_valid, features.shape[0], features.device)
    orth = orthogonality_loss(text)
    if bool(keep.any()):
        k_range = range(features.shape[1]) if layers == "all" else [features.shape[1] - 1]
        seg = [seg_loss(training_probabilities(features[keep, k], text[keep], size), masks[keep]) for k in k_range]
        seg = torch.stack(seg)
    else:
        seg = orth.new_zeros(1)
    total = seg.sum() + orthogonality_weight * orth
    return Stage1Loss(seg, orth, total)


def stage2_loss(features: AdaptedImageFeatures, text: Tensor, masks: Tensor, labels: Tensor, *, size: int,
                mask_valid: Tensor | None = None) -> Stage2Loss:
    """CE(det·T, y) (every image) + Σ_l Seg(P_l) (images with pixel truth only); text [B, 2, E] or [2, E]."""
    text = _per_image_text(text, features.det.shape[0])
    ce = F.cross_entropy(detection_logits(features.det, text), labels.long().to(features.det.device))
    keep = _valid(mask_valid, features.det.shape[0], features.det.device)
    if bool(keep.any()):
        seg = torch.stack([seg_loss(training_probabilities(features.seg[keep, k], text[keep], size), masks[keep])
                           for k in range(features.seg.shape[1])])
    else:
        seg = ce.new_zeros(1)
    return Stage2Loss(ce, seg, ce + seg.sum())


# --------------------------------------------------------------------------------------------------- inference


def gaussian_kernel1d(kernel_size: int, sigma: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """kornia's ``get_gaussian_kernel1d``: x = arange(k) − k // 2 (+ 0.5 for even k), exp(−x²/2σ²), normalised."""
    x = torch.arange(kernel_size, dtype=dtype) - kernel_size // 2
    if kernel_size % 2 == 0:
        x = x + 0.5
    sigma_t = torch.tensor(sigma, dtype=dtype)
    gauss = torch.exp(-x.pow(2.0) / (2 * sigma_t.pow(2.0)))
    return gauss / gauss.sum()


def _filter_axis(x: Tensor, kernel: Tensor, axis: int) -> Tensor:
    """Cross-correlate [B, C, H, W] with a 1-D kernel along ``axis`` (-1 width, -2 height), reflect padding as
    kornia's ``filter2d`` (pad (k − 1)//2 before, k//2 after)."""
    k = kernel.numel()
    before, after = (k - 1) // 2, k // 2
    if max(before, after) >= x.shape[axis]:
        raise ConfigError(f"blur kernel {k} needs a grid side > {max(before, after)} for reflect padding, got "
                          f"{x.shape[axis]}; use a smaller kernel for this backbone")
    pad = (before, after, 0, 0) if axis == -1 else (0, 0, before, after)
    x = F.pad(x, pad, mode="reflect")
    channels = x.shape[1]
    weight = kernel.to(x.dtype).to(x.device)
    weight = weight.view(1, 1, 1, k) if axis == -1 else weight.view(1, 1, k, 1)
    return F.conv2d(x, weight.expand(channels, 1, *weight.shape[-2:]), groups=channels)


def gaussian_blur2d(x: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """kornia ``gaussian_blur2d(x, (k, k), (σ, σ))`` (reflect border, separable: width pass then height pass) on
    [B, C, H, W]."""
    kernel = gaussian_kernel1d(kernel_size, sigma)
    return _filter_axis(_filter_axis(x, kernel, -1), kernel, -2)


def layer_anomaly_map(patch: Tensor, text: Tensor, size: int, blur: tuple[int, float]) -> Tensor:
    """One layer's test map [B, S, S]: L = 100·F·T on the grid, m = (L_a + 1 − L_n)/2, Gaussian blur, bilinear
    upsample (align_corners=True)."""
    grid = _grid(patch_logits(patch, text))
    m = (grid[:, 1] + 1 - grid[:, 0]) / 2
    m = gaussian_blur2d(m[:, None], *blur)
    return F.interpolate(m, size=size, mode="bilinear", align_corners=True)[:, 0]


def anomaly_map(seg: Tensor, text: Tensor, size: int, blur: tuple[int, float]) -> Tensor:
    """Σ_l of :func:`layer_anomaly_map` over the feature layers of F [B, K, N, E] → [B, S, S] (raw, before the
    per-class normalisation)."""
    return torch.stack([layer_anomaly_map(seg[:, k], text, size, blur) for k in range(seg.shape[1])], dim=1).sum(1)


def raw_image_scores(det: Tensor, text: Tensor) -> Tensor:
    """s = (det·t_a + 1)/2, [B]."""
    return (detection_logits(det, text)[:, 1] + 1) / 2


def _minmax(x: Tensor) -> Tensor:
    """The release's ``if x.max() != 1: (x − min)/(max − min)``; a constant x (where the release divides by zero)
    becomes x − min (all zeros)."""
    top, bottom = x.max(), x.min()
    if float(top) == 1.0:
        return x
    if float(top) == float(bottom):
        return x - bottom
    return (x - bottom).div_(top - bottom)  # one new tensor: a class's maps can be GBs


def normalize_class(scores: Tensor, maps: Tensor, domain: str) -> tuple[Tensor, Tensor]:
    """The release's ``metrics_eval`` on every test image of one class: raw scores [n] and summed maps [n, S, S] →
    (image scores [n], maps [n, S, S]). Maps are min–max normalised jointly and scores min–max normalised (each only
    when its maximum ≠ 1); image score 0.5·max(map) + 0.5·s (industrial) or max(map) (medical)."""
    if domain not in DOMAINS:
        raise ConfigError(f"AA-CLIP domain {domain!r}; choose one of {DOMAINS}")
    maps = _minmax(maps.float())  # float32, as the release (a float64 copy of Br35H's 3000 maps would be 6 GB)
    scores = _minmax(scores.double())
    peak = maps.flatten(1).max(dim=1).values.double()
    final = peak if domain == "medical" else peak * 0.5 + scores * 0.5
    return final.float(), maps


# ------------------------------------------------------------------------------------------------ augmentation


def colour_jitter(image: Tensor, mean: Sequence[float], std: Sequence[float], generator: torch.Generator, *,
                  strength: float = 0.5, p: float = 0.7) -> Tensor:
    """The release's three ``RandomApply([ColorJitter(x=0.5)], p=0.7)`` (brightness, contrast, saturation, in that
    order; each factor uniform in [1 − 0.5, 1 + 0.5]) on a normalised image [3, S, S]: un-normalised to [0, 1],
    jittered (torchvision's functional ops, clamped), normalised again. The release jitters the PIL image before the
    resize; here it comes after (the engine hands images already at the input size)."""
    m = torch.tensor(mean, dtype=image.dtype)[:, None, None]
    s = torch.tensor(std, dtype=image.dtype)[:, None, None]
    x = (image * s + m).clamp(0, 1)
    for op in (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation):
        if float(torch.rand(1, generator=generator)) <= p:
            factor = float(torch.empty(1).uniform_(1 - strength, 1 + strength, generator=generator))
            x = op(x, factor)
    return (x - m) / s


def joint_geometric(image: Tensor, mask: Tensor, generator: torch.Generator, *, degrees: float = math.degrees(
        math.pi / 6), translate: float = 0.15, p_rotate: float = 0.5, p_translate: float = 0.5, p_hflip: float = 0.5,
        p_vflip: float = 0.5) -> tuple[Tensor, Tensor]:
    """The release's joint transform of the normalised image [3, S, S] and mask [S, S] (stacked as 4 channels):
    RandomApply(RandomRotation(±30°), p .5), RandomApply(RandomAffine(translate .15), p .5), hflip .5, vflip .5;
    nearest interpolation, fill 0 (the normalised image's 0 = the mean colour). Parameters drawn from ``generator``
    in torchvision's order and ranges."""
    x = torch.cat([image, mask[None].to(image.dtype)], dim=0)
    if float(torch.rand(1, generator=generator)) <= p_rotate:
        angle = float(torch.empty(1).uniform_(-degrees, degrees, generator=generator))
        x = TF.rotate(x, angle, interpolation=InterpolationMode.NEAREST, expand=False, fill=0.0)
    if float(torch.rand(1, generator=generator)) <= p_translate:
        max_dx, max_dy = translate * x.shape[-1], translate * x.shape[-2]
        tx = int(round(float(torch.empty(1).uniform_(-max_dx, max_dx, generator=generator))))
        ty = int(round(float(torch.empty(1).uniform_(-max_dy, max_dy, generator=generator))))
        x = TF.affine(x, angle=0.0, translate=[tx, ty], scale=1.0, shear=[0.0, 0.0],
                      interpolation=InterpolationMode.NEAREST, fill=0.0)
    if float(torch.rand(1, generator=generator)) < p_hflip:
        x = TF.hflip(x)
    if float(torch.rand(1, generator=generator)) < p_vflip:
        x = TF.vflip(x)
    return x[:3], x[3] > 0.5


# ------------------------------------------------------------------------------------------------------- model


class AACLIPModel:
    """A frozen open_clip CLIP plus AA-CLIP's :class:`AACLIPAdapters` (the only trainable part).

    Args:
        clip: an open_clip ``CLIP`` with a ViT vision tower (default attention blocks); not modified, frozen here.
        tokenizer: its tokenizer.
        config: the hyperparameters.
        seed: seeds the adapters' initialisation.
    """

    def __init__(self, clip: nn.Module, tokenizer, config: AACLIPConfig | None = None, *, seed: int = 0) -> None:
        self.config = c = config or AACLIPConfig()
        self.clip = clip
        self.tokenizer = tokenizer
        clip.requires_grad_(False)
        visual = clip.visual
        self.n_blocks = len(vision_blocks(visual))
        text_blocks = len(clip.transformer.resblocks)
        bad = [f for f in c.features if f > self.n_blocks]
        if bad or c.surgery_start > self.n_blocks or c.image_adapter_blocks > self.n_blocks:
            raise ConfigError(f"AA-CLIP features {list(c.features)} / surgery_start {c.surgery_start} / "
                              f"image_adapter_blocks {c.image_adapter_blocks} exceed the {self.n_blocks} vision blocks")
        if c.text_adapter_blocks > text_blocks:
            raise ConfigError(f"AA-CLIP text_adapter_blocks {c.text_adapter_blocks} exceed the {text_blocks} text "
                              "blocks")
        self.image_size = int(visual.image_size[0] if isinstance(visual.image_size, (tuple, list))
                              else visual.image_size)
        self.variant = surgery_variant(c.surgery_start, c.surgery_attention)
        self.adapters = AACLIPAdapters(
            int(clip.ln_final.weight.shape[0]), int(visual.conv1.out_channels), int(visual.output_dim),
            text_blocks=c.text_adapter_blocks, image_blocks=c.image_adapter_blocks, n_features=len(c.features),
            proj_relu=c.proj_relu, seed=seed).to(next(clip.parameters()).device)
        self._tokens: dict[str, tuple[Tensor, int]] = {}

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    # -- text ------------------------------------------------------------------------------------------------

    def tokens(self, description: str) -> tuple[Tensor, int]:
        """Token ids [6 + 10, L] of a description's sentences and the number of normal ones (cached)."""
        if description not in self._tokens:
            normal, abnormal = aaclip_sentences(description)
            self._tokens[description] = (self.tokenizer(normal + abnormal).to(self.device), len(normal))
        return self._tokens[description]

    def text_features(self, description: str, *, adapted: bool | None = None, trace: dict | None = None) -> Tensor:
        """T [2, E] of one class description (differentiable in the text adapter). ``adapted=None``: through the
        text adapter once it has been trained (``adapters.text_adapted``), else the plain CLIP text tower."""
        adapted = bool(self.adapters.text_adapted) if adapted is None else adapted
        tokens, n_normal = self.tokens(description)
        embeddings = encode_text_adapted(self.clip, tokens, self.adapters if adapted else None,
                                         weight=self.config.text_adapt_weight, trace=trace)
        if trace is not None:
            trace["sentence_embeddings"] = embeddings
        return text_features_from_sentences(embeddings.float(), n_normal)

    # -- vision ----------------------------------------------------------------------------------------------

    def check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ConfigError(f"images of shape {tuple(images.shape)}; AA-CLIP runs at [B, 3, {self.image_size}, "
                              f"{self.image_size}]: resize them with the method's transform")

    def stage1_taps(self) -> tuple[int, ...]:
        """The feature layers stage 1 needs (the last only under the released loss)."""
        c = self.config
        return c.features if c.stage1_loss_layers == "all" else c.features[-1:]

    @torch.no_grad()
    def surgery_features(self, images: Tensor, features: Iterable[int] | None = None) -> Tensor:
        """Frozen surgery features [B, K, N, E] (unit-norm) at ``features`` (default: all feature layers)."""
        self.check_images(images)
        return surgery_patch_features(self.clip, images, self.variant, tuple(features or self.config.features))

    @torch.no_grad()
    def global_embedding(self, images: Tensor) -> Tensor:
        """ĝ before the L2: ln_post(CLS) @ proj of the unmodified model, [B, E]."""
        self.check_images(images)
        return self.clip.encode_image(images)

    def image_features(self, images: Tensor, *, trace: dict | None = None) -> AdaptedImageFeatures:
        """Stage-2 features (differentiable in the image adapter)."""
        self.check_images(images)
        return adapted_image_features(self.clip, self.adapters, images, self.config.features,
                                      weight=self.config.image_adapt_weight, trace=trace)

    # -- losses ----------------------------------------------------------------------------------------------

    def stage1_loss(self, features: Tensor, text: Tensor, masks: Tensor, mask_valid: Tensor | None = None
                    ) -> Stage1Loss:
        """:func:`stage1_loss` with this configuration; ``features`` at :meth:`stage1_taps`."""
        c = self.config
        return stage1_loss(features, text, masks, size=self.image_size, layers=c.stage1_loss_layers,
                           orthogonality_weight=c.orthogonality_weight, mask_valid=mask_valid)

    def stage2_loss(self, features: AdaptedImageFeatures, text: Tensor, masks: Tensor, labels: Tensor,
                    mask_valid: Tensor | None = None) -> Stage2Loss:
        return stage2_loss(features, text, masks, labels, size=self.image_size, mask_valid=mask_valid)

    # -- inference -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, images: Tensor, text: Tensor, domains: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Raw scores s [B] and summed maps [B, S, S] (float32, CPU); text [B, 2, E]; ``domains`` per image."""
        feats = self.image_features(images)
        scores = raw_image_scores(feats.det, text)
        maps = torch.empty(images.shape[0], self.image_size, self.image_size, device=feats.det.device)
        for domain in sorted(set(domains)):
            idx = torch.tensor([i for i, d in enumerate(domains) if d == domain], device=feats.det.device)
            maps[idx] = anomaly_map(feats.seg[idx], text[idx], self.image_size, self.config.blur(domain))
        return scores.float().cpu(), maps.float().cpu()
