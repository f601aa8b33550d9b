"""AnoVL (seed 002): training-free adaptation (TFA) of CLIP plus test-time adaptation (TTA).

TFA (spec ``baselines_llm_filo_anovl.md`` §3):

- Visual: the V-V dual path of :mod:`siad.backbones.attention` on every block (``start_block`` 0) of
  ViT-B-16-plus-240 LAION-400M (``laion400m_e32``, the released code's tag) at 240 px. The pixel branch
  is the LAST block's V-V patch tokens through CLIP's own ``ln_post`` + ``proj``; the image embedding
  comes from the original-path CLS (``encode_image``'s output), from the same backbone pass.
- Text: the AnoVL domain-aware contrastive-state ensemble (22 templates × 3 domains × 7 states = 462
  sentences per state; texture classes get the texture domains). Class feature = L2norm(mean of the
  *un-normalised* sentence embeddings); ``T`` = the 924 L2-normalised sentence embeddings (for TTA).
- Scores: ``p = softmax(⟨normalize(P'), [t_n, t_a]⟩)`` with NO temperature (spec §3, §5: "AnoVL ×1").
  Map: ``p_a`` on the patch grid → replicate-pad 1 → 3×3 average pool → bilinear (``align_corners=True``,
  as the released code) to the input size. Image score: ``softmax(⟨ĝ, [t_n, t_a]⟩)[abnormal]`` of the
  normalised global embedding ``ĝ``, also with no temperature (the released script applies no scale).

TTA variants (``tta``), all on the projected patch tokens only (the backbone never runs again):

- ``paper`` (default): Eq. 9–11. ``P' = softmax(P ωᵀ) T + P`` with ``ω`` (2N × C) initialised to ``T``;
  ``L_d = −mean[log(1 − S(p'_i)), log S(p'_i + δ_i)]`` over the 2M clean and noise-corrupted adapted
  tokens, ``δ ~ N(0, noise_std²)``; ``L_p = −mean_i S(p_i) · log S(p'_i)`` with the TFA map ``S(p_i)`` as
  pseudo-label (the one-sided form printed as Eq. 11); ``L = L_d + L_p``; AdamW, fresh per image.
  [choice] ``P`` = the raw projected tokens (the tokens TFA scores; the paper's ⟨·,·⟩ is a cosine, so
  only ``S`` normalises), as Eq. 9 is written; the noise is added to ``P'`` as Eq. 10 is written.
- ``code`` (released ``TextAdapter`` + ``loss_func``): ``P' = ½P + ½ tanh(ω P̂ + b) T`` with ``ω`` a
  Linear C → 2N re-initialised for every image (``nn.Linear``'s default U(±1/√C), seeded); the clean
  tokens and the noisy copy ``P + δ`` both pass the adapter; loss = entropy of the clean predictions
  + 0.5·(−log p_n(clean) − log p_a(noisy)), means over tokens; ONE AdamW per class whose moments (and
  step count) persist across the images of that class, in the order they are predicted.
- ``linear_probe`` (Table 5): the paper's Eq. 9 adapter and dual-task loss with ``ω`` randomly
  initialised (U(±1/√C), ``nn.Linear``'s default) instead of from ``T`` — the paper's text: the linear
  probe for ``ω`` gives a marginal gain "due to poor random initialization", hence the text init.
- ``none``: TFA.

The paper and linear-probe adapters of the images of a batch are independent, so they are trained together
(:meth:`AnoVL.adapt_batch`): one stacked ω ``[B, 2N, C]`` with batched matrix products and one AdamW over it —
AdamW is element-wise, so each image's slice follows exactly its own AdamW; the summed loss gives each slice
its own image's gradient. Equal to the per-image :meth:`AnoVL.adapt` within float rounding (≤ 1e-6).

``fused_dual_pass: true`` runs the V-V dual path in the fused fast mode of :mod:`siad.backbones.attention`
(one ``ln_1`` and QKV projection per block for both streams, equal within float rounding); false (default)
is the bit-identical reference mode. Either way the original stream's taps are not collected (only its CLS
feeds the image embedding), so their ``ln_post`` + ``proj`` are skipped.

Determinism: every random draw of an image (noise, the code variant's re-initialisation) comes from a
``torch.Generator`` seeded with ``self.seed`` and a SHA-256 of (class, image path) — the image's index in
its batch when the batch carries no paths — so the same inputs in the same order give identical outputs.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siad.backbones import AttentionVariant, get_backbone_spec, stage_features, variant_features
from siad.backbones.cache import FeatureCache, backbone_namespace, file_fingerprint
from siad.errors import ConfigError, NumericalError
from siad.methods import METHODS, Batch, Choice, Flag, Number, ParamRule, Text
from siad.methods.backbone_method import BACKBONE_DEFAULTS, BACKBONE_RULES, BackboneMethod
from siad.prompts import ENSEMBLES, ClassTextFeatures, encode_class_text

PROMPT_ENSEMBLES: Mapping[str, str] = {"anovl": "anovl", "cs": "anovl_cs", "base": "anovl_base"}
ATTENTIONS: tuple[str, ...] = ("vv", "v", "qkv")
TTA_MODES: tuple[str, ...] = ("paper", "code", "linear_probe", "none")
IMAGE_VIEWS: tuple[str, ...] = ("single", "augmented")

# The released MVTec script's 22 views for the image score (utils.aug): the original, 8 small rotations,
# 8 diagonal translations (normalised coordinates), a horizontal flip, a grey copy and 3 quarter turns.
VIEW_ANGLES: tuple[float, ...] = tuple(s * k * math.pi / 16 for k in (4, 3, 2, 1) for s in (-1, 1))
VIEW_SHIFTS: tuple[tuple[float, float], ...] = tuple(
    (sx * d, sy * d) for d in (0.2, 0.1) for sx, sy in ((1, 1), (-1, 1), (-1, -1), (1, -1))
)
GREY_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)  # kornia's rgb_to_grayscale


# --- scoring -----------------------------------------------------------------------------------------


def state_log_probs(tokens: Tensor, text: Tensor) -> Tensor:
    """log softmax over (normal, abnormal) of ``⟨normalize(tokens), text⟩``, no temperature.

    ``tokens`` [..., D], ``text`` [2, D] (unit rows) → [..., 2].
    """
    return (F.normalize(tokens, dim=-1) @ text.T).log_softmax(dim=-1)


def smooth_and_upsample(probs: Tensor, size: int) -> Tensor:
    """Abnormal probabilities on the patch grid [B, g, g] → replicate-pad 1, 3×3 average pool, bilinear
    (``align_corners=True``, the released code) to ``size``² → [B, size, size]."""
    x = F.pad(probs[:, None], (1, 1, 1, 1), mode="replicate")
    x = F.avg_pool2d(x, kernel_size=3, stride=1)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)[:, 0]


def _affine(images: Tensor, theta: Sequence[Sequence[float]]) -> Tensor:
    matrix = torch.tensor(theta, dtype=images.dtype, device=images.device).expand(len(images), 2, 3)
    grid = F.affine_grid(matrix, list(images.shape), align_corners=True)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def augmented_views(images: Tensor) -> Tensor:
    """The 22 views of the released MVTec script, ``[B, 3, H, W]`` → ``[B, 22, 3, H, W]`` (view 0 = input).

    Rotations and shifts resample bilinearly with reflection padding (``align_corners=True``); the grey
    view weights the (normalised) channels as kornia does; quarter turns need square images.
    """
    if images.shape[-1] != images.shape[-2]:
        raise ConfigError(f"augmented image views need square images, got {tuple(images.shape[-2:])}")
    views = [images]
    views += [_affine(images, [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
              for a in VIEW_ANGLES]
    views += [_affine(images, [[1.0, 0.0, a], [0.0, 1.0, b]]) for a, b in VIEW_SHIFTS]
    views.append(images.flip(-1))
    weights = torch.tensor(GREY_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    views.append((images * weights).sum(dim=1, keepdim=True).expand_as(images))
    views += [torch.rot90(images, k, dims=(-2, -1)) for k in (1, 2, 3)]
    return torch.stack(views, dim=1)


# --- test-time adapters ------------------------------------------------------------------------------


class PaperAdapter(nn.Module):
    """Eq. 9: ``P' = softmax(P ωᵀ) T + P`` (attention with P, ω, T as query, key, value)."""

    def __init__(self, text_tokens: Tensor, omega: Tensor) -> None:
        super().__init__()
        self.register_buffer("text_tokens", text_tokens)
        self.omega = nn.Parameter(omega.clone())

    def forward(self, tokens: Tensor) -> Tensor:
        return (tokens @ self.omega.T).softmax(dim=-1) @ self.text_tokens + tokens


class CodeAdapter(nn.Module):
    """The released ``TextAdapter``: ``P' = ½P + ½ tanh(ω P̂ + b) T`` (ω: Linear C → 2N)."""

    def __init__(self, text_tokens: Tensor) -> None:
        super().__init__()
        self.register_buffer("text_tokens", text_tokens)
        count, width = text_tokens.shape
        # Filled by reset(); created empty so that building the adapter never draws from the global RNG.
        self.weight = nn.Parameter(text_tokens.new_empty(count, width))
        self.bias = nn.Parameter(text_tokens.new_empty(count))

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """Re-initialise in place (the optimiser keeps its state), U(±1/√C) like ``nn.Linear``."""
        for param in (self.weight, self.bias):
            param.copy_(_uniform_like(param, 1.0 / math.sqrt(self.weight.shape[1]), generator))

    def forward(self, tokens: Tensor) -> Tensor:
        mixed = torch.tanh(F.linear(F.normalize(tokens, dim=-1), self.weight, self.bias)) @ self.text_tokens
        return 0.5 * tokens + 0.5 * mixed


def _uniform_like(param: Tensor, bound: float, generator: torch.Generator) -> Tensor:
    values = torch.rand(param.shape, generator=generator, dtype=param.dtype) * (2 * bound) - bound
    return values.to(param.device)


def paper_loss(adapter: PaperAdapter, tokens: Tensor, text: Tensor, pseudo: Tensor, noise: Tensor) -> Tensor:
    """Eq. 10 + Eq. 11: ``L_d + L_p`` for raw tokens [M, C], class text [2, C], pseudo-labels [M]."""
    adapted = adapter(tokens)
    clean = state_log_probs(adapted, text)
    noisy = state_log_probs(adapted + noise, text)
    discriminative = -torch.cat([clean[:, 0], noisy[:, 1]]).mean()  # log(1 − S) = log p_n
    pseudo_label = -(pseudo * clean[:, 1]).mean()
    return discriminative + pseudo_label


class BatchedPaperAdapter(nn.Module):
    """Eq. 9 for B independent images at once: ``P'_b = softmax(P_b ω_bᵀ) T_b + P_b`` with a stacked ω.

    ``text_tokens`` and ``omega`` are ``[B, 2N, C]`` (one class's sentence tokens and initial ω per image).
    """

    def __init__(self, text_tokens: Tensor, omega: Tensor) -> None:
        super().__init__()
        self.register_buffer("text_tokens", text_tokens)
        self.omega = nn.Parameter(omega.clone())

    def forward(self, tokens: Tensor) -> Tensor:
        """Raw tokens ``[B, M, C]`` → adapted tokens ``[B, M, C]``."""
        return torch.bmm(torch.bmm(tokens, self.omega.transpose(1, 2)).softmax(dim=-1), self.text_tokens) + tokens


def batched_paper_loss(adapter: BatchedPaperAdapter, tokens: Tensor, text: Tensor, pseudo: Tensor,
                       noise: Tensor) -> Tensor:
    """:func:`paper_loss` per image of a batch: tokens [B, M, C], class text [B, 2, C], pseudo-labels [B, M],
    noise [B, M, C] → the B losses [B]."""
    adapted = adapter(tokens)
    unit = F.normalize(adapted, dim=-1)
    clean = torch.bmm(unit, text.transpose(1, 2)).log_softmax(dim=-1)
    noisy = torch.bmm(F.normalize(adapted + noise, dim=-1), text.transpose(1, 2)).log_softmax(dim=-1)
    discriminative = -torch.cat([clean[..., 0], noisy[..., 1]], dim=1).mean(dim=1)
    pseudo_label = -(pseudo * clean[..., 1]).mean(dim=1)
    return discriminative + pseudo_label


def code_loss(adapter: CodeAdapter, tokens: Tensor, text: Tensor, pseudo: Tensor, noise: Tensor) -> Tensor:
    """Released ``loss_func``: entropy(clean) + 0.5·(−log p_n(clean) − log p_a(noisy)), token means."""
    del pseudo  # the released loss uses no TFA pseudo-labels
    log_probs = state_log_probs(adapter(torch.stack([tokens, tokens + noise])), text)
    clean, noisy = log_probs[0], log_probs[1]
    entropy = -(clean.exp() * clean).sum(dim=-1).mean()
    hard = -(clean[:, 0] + noisy[:, 1]).mean()
    return entropy + 0.5 * hard


@dataclass(frozen=True)
class TTAResult:
    """Adapted tokens [M, C] and the loss before each optimiser step."""

    tokens: Tensor
    losses: tuple[float, ...]


def stable_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and a SHA-256 of ``parts`` (stable across runs, unlike ``hash``)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return (seed * 1_000_003 + int.from_bytes(digest[:8], "little")) % (2**63)


# --- the method --------------------------------------------------------------------------------------



@METHODS.register("anovl")
class AnoVL(BackboneMethod):
    """AnoVL: V-V attention tokens, domain-aware contrastive-state prompts, optional test-time adapter."""

    training_free: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {
        **BACKBONE_DEFAULTS,
        "backbone": "laion400m-vit-b-16-plus-240",  # at its own 240 px
        "attention": "vv",  # "vv" | "v" | "qkv" (Table 3; qkv = plain CLIP patch tokens)
        "start_block": 0,  # first block of the second stream (0 = all blocks; -1 = last block only)
        "prompts": "anovl",  # "anovl" (CS + DA) | "cs" | "base" (Table 4)
        "tta": "paper",  # "paper" | "code" | "linear_probe" | "none" (= TFA)
        "tta_steps": 5,
        "tta_lr": 1e-3,
        "tta_weight_decay": 0.01,  # AdamW's default, as the released code
        "noise_std": 0.055,  # 0.05 · 1.1 of the released code
        "noise_per_step": True,  # fresh δ at every TTA step (released code); False: one δ per image
        "image_views": "single",  # "single" | "augmented" (22 views of the released MVTec script)
        "text_batch_size": 256,  # sentences per text-encoder batch (924 per class)
        "feature_cache": None,  # folder of the frozen-feature cache (None: always run the backbone)
        "fused_dual_pass": False,  # True: fused fast V-V pass (equal within float rounding); False: bit-identical
    }
    param_rules: ClassVar[Mapping[str, ParamRule]] = {
        **BACKBONE_RULES,
        "attention": Choice(ATTENTIONS),
        "start_block": Number(integer=True),
        "prompts": Choice(tuple(PROMPT_ENSEMBLES)),
        "tta": Choice(TTA_MODES),
        "tta_steps": Number(low=0, integer=True),
        "tta_lr": Number(low=0, low_open=True),
        "tta_weight_decay": Number(low=0),
        "noise_std": Number(low=0),
        "noise_per_step": Flag(),
        "image_views": Choice(IMAGE_VIEWS),
        "text_batch_size": Number(low=1, integer=True),
        "feature_cache": Text(),
        "fused_dual_pass": Flag(),
    }

    def __init__(self, params: Mapping[str, Any] | None = None, *, device: str = "cpu", seed: int = 0,
                 weights_seed: int | None = None) -> None:
        super().__init__(params, device=device, seed=seed, weights_seed=weights_seed)
        self.variant = AttentionVariant(start_block=self.params["start_block"], kind="vv"
                                        if self.params["attention"] == "qkv" else self.params["attention"])
        self.ensemble = ENSEMBLES.get(PROMPT_ENSEMBLES[self.params["prompts"]])
        self._text: dict[str, ClassTextFeatures] = {}
        self._cache: FeatureCache | None = None
        self._code_state: dict[str, tuple[CodeAdapter, torch.optim.Optimizer]] = {}

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> None:
        """The rules and the backbone name, then ``start_block`` against the backbone's blocks (read from its
        architecture config, nothing loaded) and the qkv / start_block combination."""
        super().validate_params(params)
        try:
            AttentionVariant(start_block=params["start_block"]).resolve_start(
                get_backbone_spec(params["backbone"]).n_blocks)
        except ConfigError as err:
            raise cls.param_error("start_block", params["start_block"], str(err)) from None
        if params["attention"] == "qkv" and params["start_block"] != 0:
            raise cls.param_error("start_block", params["start_block"],
                                  "attention 'qkv' reads the plain CLIP tokens; leave start_block at 0")

    # -- text -----------------------------------------------------------------------------------------

    def class_text(self, cls_name: str) -> ClassTextFeatures:
        """The encoded ensemble of a class (features [2, D], sentence features T [2N, D]), cached."""
        if cls_name not in self._text:
            self._text[cls_name] = encode_class_text(
                self.backbone.model, self.backbone.tokenizer, self.ensemble, cls_name,
                batch_size=self.params["text_batch_size"],
            )
        return self._text[cls_name]

    # -- image ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """One backbone pass: normalised global embedding [B, D] (original-path CLS) and the pixel-branch
        tokens [B, N, D] (last block's second-stream tokens, or plain tokens for ``qkv``, through
        ``ln_post`` + ``proj``; NOT normalised: the TTA adapters take them raw). ``fused_dual_pass`` selects the
        fused fast mode of the V-V pass (no effect on ``qkv``, which runs the plain model)."""
        visual = self.backbone.model.visual
        if self.params["attention"] == "qkv":
            out = stage_features(visual, images, [-1], ln_post=True, project=True)
            embedding, patches = out.image_embedding, out.taps.patch[0]
        else:
            feats = variant_features(visual, images, self.variant, [-1], ln_post=True, project=True,
                                     original_taps=False, fused_dual_pass=self.params["fused_dual_pass"])
            embedding, patches = feats.image_embedding, feats.modified.patch[0]
        return F.normalize(embedding, dim=-1), patches

    def visual_features(self, images: Tensor, files: Sequence[str] | None) -> tuple[Tensor, Tensor]:
        """:meth:`encode_image`, read from the feature cache when one is configured and the image files
        are known: variants that share the visual path (TTA modes, prompt ablations) reuse the features."""
        if self.params["feature_cache"] is None or not files:
            return self.encode_image(images)
        if self._cache is None:
            namespace = backbone_namespace(self.backbone.spec, taps=(), seed=self.weights_seed,
                                           feature="anovl_pixel_branch",
                                           attention=self.params["attention"], start_block=self.params["start_block"],
                                           **({"fused_dual_pass": True} if self.params["fused_dual_pass"]
                                              and self.params["attention"] != "qkv" else {}),
                                           code_modules=(type(self).encode_image.__module__,))
            self._cache = FeatureCache(Path(self.params["feature_cache"]), namespace)

        def compute(positions: Sequence[int]) -> dict[str, Tensor]:
            global_features, tokens = self.encode_image(images[list(positions)])
            return {"global": global_features, "tokens": tokens}

        # content, not size and mtime: an image edited in place must never be served its old features
        fingerprints = [file_fingerprint(f, content=True) for f in files]
        cached = self._cache.get_or_compute(list(files), compute, fingerprints=fingerprints)
        return cached["global"].to(self.device), cached["tokens"].to(self.device)

    @torch.no_grad()
    def image_scores(self, images: Tensor, global_features: Tensor, text: Tensor) -> Tensor:
        """Abnormal softmax (no temperature) of the global embedding against [t_n, t_a] per image [B];
        with ``image_views: augmented`` the mean over the 22 views (extra views: original stream only)."""
        if self.params["image_views"] == "augmented":
            views = augmented_views(images)[:, 1:]
            extra = self.backbone.model.encode_image(views.flatten(0, 1), normalize=True)
            global_features = torch.cat([global_features[:, None], extra.view(*views.shape[:2], -1)], dim=1)
            return torch.einsum("bvd,bkd->bvk", global_features, text).softmax(dim=-1)[..., 1].mean(dim=1)
        return torch.einsum("bd,bkd->bk", global_features, text).softmax(dim=-1)[:, 1]

    # -- test-time adaptation -------------------------------------------------------------------------

    def adapt(self, tokens: Tensor, cls_name: str, image_key: object) -> TTAResult:
        """Run the configured TTA on one image's raw tokens [M, C]; returns the adapted tokens."""
        text = self.class_text(cls_name)
        class_features = text.features.to(tokens)
        sentences = text.sentence_features.to(tokens)
        generator = torch.Generator().manual_seed(stable_seed(self.seed, cls_name, image_key))
        adapter, optimizer, loss_fn = self._adapter(cls_name, sentences, generator)
        with torch.no_grad():
            pseudo = state_log_probs(tokens, class_features)[:, 1].exp()
        losses = []
        noise = None
        with torch.enable_grad():
            for _ in range(self.params["tta_steps"]):
                if noise is None or self.params["noise_per_step"]:
                    noise = torch.randn(tokens.shape, generator=generator).to(tokens) * self.params["noise_std"]
                loss = loss_fn(adapter, tokens, class_features, pseudo, noise)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
        with torch.no_grad():
            adapted = adapter(tokens)
        if not torch.isfinite(adapted).all():
            raise NumericalError(
                f"method anovl: TTA ({self.params['tta']}) produced non-finite tokens for class {cls_name!r}; "
                "lower tta_lr or noise_std"
            )
        return TTAResult(adapted, tuple(losses))

    def adapt_batch(self, tokens: Tensor, cls_names: Sequence[str], image_keys: Sequence[object]) -> list[TTAResult]:
        """The configured TTA on the raw tokens ``[B, M, C]`` of B images (classes ``cls_names``, keys for their
        random draws ``image_keys``): one :class:`TTAResult` per image, equal to :meth:`adapt` per image.

        ``paper`` and ``linear_probe`` train the B independent adapters together (module docstring); ``code``
        runs image after image, since its per-class optimiser carries state from one image to the next.
        """
        if self.params["tta"] == "code":
            return [self.adapt(tokens[i], cls_names[i], image_keys[i]) for i in range(len(cls_names))]
        texts = [self.class_text(c) for c in cls_names]
        class_features = torch.stack([t.features for t in texts]).to(tokens)  # [B, 2, C]
        sentences = torch.stack([t.sentence_features for t in texts]).to(tokens)  # [B, 2N, C]
        generators = [torch.Generator().manual_seed(stable_seed(self.seed, c, k)) for c, k in zip(cls_names, image_keys,
                                                                                                  strict=True)]
        if self.params["tta"] == "paper":
            omega = sentences
        else:  # linear_probe: each image's own draw, as _adapter makes it
            bound = 1.0 / math.sqrt(sentences.shape[-1])
            omega = torch.stack([_uniform_like(sentences[i], bound, g) for i, g in enumerate(generators)])
        adapter = BatchedPaperAdapter(sentences, omega)
        optimizer = self._optimizer(adapter)
        with torch.no_grad():
            logits = torch.bmm(F.normalize(tokens, dim=-1), class_features.transpose(1, 2))
            pseudo = logits.log_softmax(dim=-1)[..., 1].exp()  # [B, M]
        losses: list[list[float]] = [[] for _ in cls_names]
        noise = None
        with torch.enable_grad():
            for _ in range(self.params["tta_steps"]):
                if noise is None or self.params["noise_per_step"]:
                    noise = torch.stack([torch.randn(tokens.shape[1:], generator=g) for g in generators]).to(tokens)
                    noise = noise * self.params["noise_std"]
                per_image = batched_paper_loss(adapter, tokens, class_features, pseudo, noise)
                optimizer.zero_grad()
                per_image.sum().backward()  # image b's loss reaches only its own slice ω_b
                optimizer.step()
                for image_losses, value in zip(losses, per_image.detach().tolist(), strict=True):
                    image_losses.append(value)
        with torch.no_grad():
            adapted = adapter(tokens)
        for i, cls_name in enumerate(cls_names):
            if not torch.isfinite(adapted[i]).all():
                raise NumericalError(
                    f"method anovl: TTA ({self.params['tta']}) produced non-finite tokens for class {cls_name!r}; "
                    "lower tta_lr or noise_std"
                )
        return [TTAResult(adapted[i], tuple(image_losses)) for i, image_losses in enumerate(losses)]

    def _optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(module.parameters(), lr=self.params["tta_lr"],
                                 weight_decay=self.params["tta_weight_decay"])

    def _adapter(
        self, cls_name: str, sentences: Tensor, generator: torch.Generator
    ) -> tuple[nn.Module, torch.optim.Optimizer, Callable[..., Tensor]]:
        """The adapter, its optimiser and its loss for one image (code variant: the class's persistent pair)."""
        mode = self.params["tta"]
        if mode == "code":
            if cls_name not in self._code_state:
                adapter = CodeAdapter(sentences)
                self._code_state[cls_name] = (adapter, self._optimizer(adapter))
            adapter, optimizer = self._code_state[cls_name]
            adapter.reset(generator)
            return adapter, optimizer, code_loss
        if mode == "paper":
            omega = sentences
        else:  # linear_probe: nn.Linear's default init instead of the text tokens
            omega = _uniform_like(sentences, 1.0 / math.sqrt(sentences.shape[1]), generator)
        adapter = PaperAdapter(sentences, omega)
        return adapter, self._optimizer(adapter), paper_loss

    # -- prediction -----------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["image"].to(self.device)
        names = list(batch["cls_name"])
        keys = list(batch.get("img_path") or [f"#{i}" for i in range(len(names))])
        global_features, tokens = self.visual_features(images, batch.get("image_file"))
        text = torch.stack([self.class_text(c).features for c in names]).to(tokens)  # [B, 2, D]
        scores = self.image_scores(images, global_features, text)
        if self.params["tta"] != "none":
            tokens = torch.stack([result.tokens for result in self.adapt_batch(tokens, names, keys)])
        probs = (torch.einsum("bnd,bkd->bnk", F.normalize(tokens, dim=-1), text)).softmax(dim=-1)[..., 1]
        grid = round(probs.shape[1] ** 0.5)
        maps = smooth_and_upsample(probs.reshape(-1, grid, grid), images.shape[-1])
        return scores, maps
