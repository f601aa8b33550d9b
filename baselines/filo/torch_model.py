"""FiLo (ACM MM'24) as released (CASIA-IVA-Lab/FiLo@36ff29c): the computation only, tensors in, tensors out.

Built on an open_clip ``CLIP`` model object (the exact-GELU OpenAI ViT-L/14@336 at 518 px, or a tiny random one);
nothing in it is modified. Spec: ``baselines_llm_filo_anovl.md`` §2, §5, §6. Notation: ``B`` images, ``E`` joint
embedding width (768), ``W`` vision width (1024), ``g`` the patch grid (37 at 518 px), ``N = g²``, ``S`` the input size.

Image pass (:func:`frozen_taps`): the V-V dual path from block ``vv_start`` (7 of 24; the shared attention variant:
V-V attention from ``ln_1`` of the original stream, no FFN). The release's transformer returns, per tapped block, the
tokens of each stream that exists there: [L6, L12vv, L12ori, L18vv, L18ori, L24vv, L24ori]; ``[::2]`` feed the linear
heads, ``[1::2]`` the MMCI. Its blocks update their inputs **in place** (``x += x_res``, ``x_ori += x_ori_res``) and
return the tapped tensors without copying them, so as released (``aliased_taps``) every V-V tap, and the tap of the
block just before the dual path, hold the *final* V-V tokens, and an original-path tap of block l < last holds block
l+1's mid-block state h_l + attn_{l+1}(ln_1 h_l). ``aliased_taps=False`` gives each tap its own block's tokens.
Global feature: ln_post(CLS of the original stream) @ proj.

Heads (:class:`FiLoLearnables`, the release's parameter names): linear heads W → E on the ``[::2]`` taps (CLS
dropped); MMCI (:func:`mmci`): per ``[1::2]`` tap the sum of convolutions W → E with kernels 1×1, 3×3, 5×5, 7×7, 1×5,
5×1 (bias, same padding) on the g × g grid; adapter: Linear E → E/2 (no bias) → ReLU → Linear → SiLU, plus the input.

Text (FG-Des, :func:`text_features`): CoCoOp learners (12 context vectors + meta-net of the normalised global feature)
for the 7 normal states and the abnormal states ("abnormal {c} with {d}" per description d, then the 5 generic
states), each abnormal state "… at {position}." for 9 positions, state-major. Fn = L2(mean of the L2 normal features);
Fa = L2(mean of the L2 abnormal features of the chosen positions' rows (rows p::9), all rows without positions);
F = [Fn, Fa] / ‖[Fn, Fa]‖_F (the joint norm, √2 for unit rows).

Maps (:func:`anomaly_maps`): per tap P = softmax_c(up(100·L2(head(tok))·Fᵀ)) (bilinear to S, align_corners=True).
Test (:func:`smoothed_map`, :func:`image_score`): torchvision GaussianBlur(3, σ 4) of (P_a − P_n + 1)/2 per map, mean of
the maps; image score ½(⟨A, Fa⟩_F + max M) with A = L2 of the adapted global feature (no softmax, no ×100; the
paper's softmax form is ``score_form="paper"``).

Losses (:func:`stage1_terms`, :func:`stage2_loss`): stage 1 Σ over the maps of Focal(P, M) + Dice(P_a, M) + Dice(P_n,
1 − M) (the release's per-row dice at batch 1: ``dice_per_row``); stage 2 CE(⟨A, F⟩/0.07, y) through the adapter only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import Tensor, nn

from siad.backbones.attention import AttentionVariant, variant_attention, variant_features
from siad.backbones.features import vision_blocks
from siad.errors import ConfigError
from siad.methods.losses import segmentation_terms
from siad.prompts.learnable import MetaNetContext, encode_text_with_context, trimmed_length
from siad.seeding import derived_seed

__all__ = [
    "GENERIC_ABNORMAL_STATES",
    "KERNELS",
    "NORMAL_STATES",
    "POSITIONS",
    "FiLoConfig",
    "FiLoLearnables",
    "FrozenTaps",
    "MMCI",
    "StageOneTerms",
    "abnormal_prompt_texts",
    "anomaly_maps",
    "frozen_taps",
    "image_score",
    "mmci",
    "normal_prompt_texts",
    "stage1_terms",
    "stage2_loss",
    "tap_index",
    "tap_layout",
    "smoothed_map",
    "text_features",
]

#: The 7 WinCLIP normal states (FiLo's ``status_normal``).
NORMAL_STATES: tuple[str, ...] = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw",
                                  "{} without defect", "{} without damage")
#: The 5 generic abnormal states appended after the descriptions (``status_abnormal_winclip``).
GENERIC_ABNORMAL_STATES: tuple[str, ...] = ("damaged {}", "broken {}", "{} with flaw", "{} with defect",
                                            "{} with damage")
#: The 9 positions of the position-enhanced prompts, in the release's order (row-major 3×3 cells).
POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
                              "bottom right")
#: MMCI kernels in the release's summation order: name → (kernel size, the release's module list name).
KERNELS: dict[str, tuple[tuple[int, int], str]] = {
    "1x1": ((1, 1), "fc_11"), "3x3": ((3, 3), "fc_33"), "5x5": ((5, 5), "fc_55"), "7x7": ((7, 7), "fc_77"),
    "1x5": ((1, 5), "fc_15"), "5x1": ((5, 1), "fc_51"),
}
#: The order the release's ``CovLayer`` builds its kernels in (its parameter order, which its optimiser sees).
_RELEASE_BUILD_ORDER = ("3x3", "1x1", "7x7", "5x5", "5x1", "1x5")
ScoreForm = Literal["code", "paper"]


@dataclass(frozen=True)
class FiLoConfig:
    """What the computation needs from the method's parameters (defaults: the release on ViT-L/14@336 at 518)."""

    features: tuple[int, ...] = (6, 12, 18, 24)  # 1-indexed tapped blocks (``--features_list``)
    vv_start: int = 7  # first dual-path block, 1-indexed (``range(1, 19)`` on 24 blocks)
    aliased_taps: bool = True  # as released: taps aliased by the in-place updates (module docstring)
    n_ctx: int = 12
    kernels: tuple[str, ...] = tuple(KERNELS)  # MMCI kernel set (HQ-Loc ablation: multi-scale / multi-shape)
    image_size: int = 518
    logit_scale: float = 100.0
    joint_norm: bool = True  # as released: [Fn, Fa] / its Frobenius norm; False keeps unit rows
    blur_kernel: int = 3  # torchvision GaussianBlur(3, 4.0) of the test maps (test.py)
    blur_sigma: float = 4.0
    score_form: ScoreForm = "code"
    dice_per_row: bool = True  # as released: gt.squeeze() at batch 1 makes the dice per mask row
    temperature: float = 0.07  # stage 2 CE

    def __post_init__(self) -> None:
        unknown = [k for k in self.kernels if k not in KERNELS]
        if unknown or not self.kernels or len(set(self.kernels)) != len(self.kernels):
            raise ConfigError(f"filo: MMCI kernels {list(self.kernels)}; use distinct names of {list(KERNELS)}")
        if self.score_form not in ("code", "paper"):
            raise ConfigError(f"filo: score_form {self.score_form!r}; choose 'code' or 'paper'")


# ----------------------------------------------------------------------------------------------- image pass


def tap_layout(features: Sequence[int], vv_start: int) -> list[tuple[int, str]]:
    """The release's tap list: per tapped block (1-indexed) ``(block, "vv")`` then ``(block, "ori")`` when the block
    runs the dual path, else ``(block, "single")``. ``[::2]`` go to the linear heads, ``[1::2]`` to MMCI."""
    layout: list[tuple[int, str]] = []
    for block in sorted(features):
        layout.extend([(block, "vv"), (block, "ori")] if block >= vv_start else [(block, "single")])
    return layout


@dataclass(frozen=True)
class FrozenTaps:
    """The frozen image pass: ``global_features`` [B, E] (ln_post(CLS) @ proj, not normalised) and ``tokens``
    [B, T, N, W]: the distinct patch-token tensors (CLS dropped) of the release's tap list, ``index[i]`` naming the
    tensor of tap i (aliased taps share one)."""

    global_features: Tensor
    tokens: Tensor
    index: tuple[int, ...]

    def tap(self, i: int) -> Tensor:
        """Patch tokens [B, N, W] of tap ``i`` of the release's list."""
        return self.tokens[:, self.index[i]]

    def linear_inputs(self) -> list[Tensor]:
        return [self.tap(i) for i in range(0, len(self.index), 2)]

    def conv_inputs(self) -> list[Tensor]:
        return [self.tap(i) for i in range(1, len(self.index), 2)]


_QKV = AttentionVariant(start_block=0, kind="qkv")


def _tap_sources(layout: Sequence[tuple[int, str]], n_blocks: int, vv_start: int, aliased: bool
                 ) -> list[tuple[str, int]]:
    """What each tap holds, as (stream, 0-indexed block): ``("h", l)`` the original stream after block l, ``("u", l)``
    the V-V stream after block l, ``("mid", l)`` block l+1's mid-block state of the original stream."""
    last = n_blocks - 1
    sources = []
    for block, stream in layout:
        index = block - 1
        if not aliased:
            sources.append(("u" if stream == "vv" else "h", index))
        elif stream == "vv" or (stream == "single" and block == vv_start - 1):
            sources.append(("u", last))  # the one V-V tensor, updated in place up to the last block
        elif stream == "ori" and index < last:
            sources.append(("mid", index))  # `x_ori += x_ori_res` of the next block
        else:
            sources.append(("h", index))
    return sources


def tap_index(config: FiLoConfig, n_blocks: int) -> tuple[int, ...]:
    """Tap i of the release's list → index of its tensor among the distinct ones :func:`frozen_taps` returns (in order
    of first use; static for a configuration and a block count)."""
    sources = _tap_sources(tap_layout(config.features, config.vv_start), n_blocks, config.vv_start,
                           config.aliased_taps)
    distinct = list(dict.fromkeys(sources))
    return tuple(distinct.index(s) for s in sources)


@torch.no_grad()
def frozen_taps(clip: nn.Module, images: Tensor, config: FiLoConfig) -> FrozenTaps:
    """The frozen pass of images [B, 3, S, S] (module docstring): global feature and the taps, as released or not."""
    visual = clip.visual
    blocks = vision_blocks(visual)
    n_blocks = len(blocks)
    if max(config.features) > n_blocks or not 1 <= config.vv_start <= n_blocks:
        raise ConfigError(f"filo: features {list(config.features)} / vv_start {config.vv_start} do not fit the "
                          f"backbone's {n_blocks} blocks (1-indexed)")
    layout = tap_layout(config.features, config.vv_start)
    sources = _tap_sources(layout, n_blocks, config.vv_start, config.aliased_taps)
    wanted = sorted({block for _, block in sources} | {n_blocks - 1})
    out = variant_features(visual, images, AttentionVariant(start_block=config.vv_start - 1), wanted)
    tensors: list[Tensor] = []
    for kind, block in dict.fromkeys(sources):
        if kind == "u":
            tokens = out.modified.patch_at(block)
        elif kind == "h":
            tokens = out.original.patch_at(block)
        else:  # block+1's mid-block state, over the whole stream (CLS included) as its attention sees it
            nxt = blocks[block + 1]
            full = torch.cat([out.original.cls_at(block)[:, None], out.original.patch_at(block)], dim=1)
            tokens = (full + nxt.ls_1(variant_attention(nxt, nxt.ln_1(full), _QKV)))[:, 1:]
        tensors.append(tokens)
    return FrozenTaps(out.image_embedding, torch.stack(tensors, dim=1), tap_index(config, n_blocks))


# ----------------------------------------------------------------------------------------------- learnables


class MMCI(nn.Module):
    """Multi-scale multi-shape cross-modal interaction (the release's ``CovLayer``): per tap a sum of convolutions
    ``in_dim → out_dim`` with the configured kernels (bias, same padding). Module names as released (``fc_33.0``)."""

    def __init__(self, in_dim: int, out_dim: int, count: int, kernels: Sequence[str]) -> None:
        super().__init__()
        self.kernels = tuple(k for k in KERNELS if k in kernels)  # summed in the release's order
        for name in sorted(self.kernels, key=_RELEASE_BUILD_ORDER.index):  # registered in the release's order
            size, attr = KERNELS[name]
            self.add_module(attr, nn.ModuleList(
                [nn.Conv2d(in_dim, out_dim, kernel_size=size, padding="same") for _ in range(count)]))

    def forward(self, tokens: Sequence[Tensor]) -> list[Tensor]:
        """Patch tokens [B, N, W] per tap → [B, N, E] per tap."""
        convs = [[getattr(self, KERNELS[k][1])[i] for k in self.kernels] for i in range(len(tokens))]
        return [mmci(t, c) for t, c in zip(tokens, convs, strict=True)]


def mmci(tokens: Tensor, convs: Sequence[nn.Conv2d]) -> Tensor:
    """Σ_k conv_k over the g × g grid of patch tokens [B, N, W] (row-major), in the given order → [B, N, E]."""
    batch, n, width = tokens.shape
    grid = int(round(n**0.5))
    if grid * grid != n:
        raise ConfigError(f"filo: MMCI needs a square patch grid, got {n} tokens")
    x = tokens.reshape(batch, grid, grid, width).permute(0, 3, 1, 2)
    total = convs[0](x)
    for conv in convs[1:]:
        total = total + conv(x)
    return total.permute(0, 2, 3, 1).reshape(batch, n, -1)


class _LinearHeads(nn.Module):
    """The release's ``LinearLayer``: one Linear W → E per tap (``fc.<i>``)."""

    def __init__(self, in_dim: int, out_dim: int, count: int) -> None:
        super().__init__()
        self.fc = nn.ModuleList([nn.Linear(in_dim, out_dim) for _ in range(count)])

    def forward(self, tokens: Sequence[Tensor]) -> list[Tensor]:
        return [fc(t) for fc, t in zip(self.fc, tokens, strict=True)]


class Adapter(nn.Module):
    """The release's ``Adapter``: x + SiLU(W₂ ReLU(W₁ x)) with no-bias W₁: E → E/2, W₂: E/2 → E (``fc.0``, ``fc.2``)."""

    def __init__(self, dim: int, reduction: int = 2) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(),
                                nn.Linear(dim // reduction, dim, bias=False), nn.SiLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + x


class FiLoLearnables(nn.Module):
    """Every trained tensor, under the release's names (``normal_prompt_learner``, ``abnormal_prompt_learner``,
    ``decoder_cov``, ``decoder_linear``, ``adapter``), so its checkpoints' ``filo`` dict loads. Seeded per module from
    ``seed`` (the release draws from the global generator; its init is not reproduced)."""

    STAGE1 = ("normal_prompt_learner", "abnormal_prompt_learner", "decoder_cov", "decoder_linear")
    STAGE2 = ("adapter",)

    def __init__(self, config: FiLoConfig, *, embed_dim: int, vision_width: int, text_width: int,
                 seed: int = 0) -> None:
        super().__init__()
        layout = tap_layout(config.features, config.vv_start)
        n_linear, n_conv = len(layout[::2]), len(layout[1::2])
        self.normal_prompt_learner = MetaNetContext(config.n_ctx, text_width, embed_dim,
                                                    seed=derived_seed(seed, "filo", "normal"))
        self.abnormal_prompt_learner = MetaNetContext(config.n_ctx, text_width, embed_dim,
                                                      seed=derived_seed(seed, "filo", "abnormal"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(seed, "filo", "heads"))
            self.decoder_cov = MMCI(vision_width, embed_dim, n_conv, config.kernels)
            self.decoder_linear = _LinearHeads(vision_width, embed_dim, n_linear)
            self.adapter = Adapter(embed_dim)

    def stage_parameters(self, stage: int) -> list[nn.Parameter]:
        """The tensors stage 1 (prompt learners + heads) or stage 2 (adapter) trains."""
        names = self.STAGE1 if stage == 1 else self.STAGE2
        return [p for name in names for p in getattr(self, name).parameters()]


# ----------------------------------------------------------------------------------------------- text


def normal_prompt_texts(word: str) -> list[str]:
    """The 7 normal state texts for the class word (the context placeholders are added at tokenisation)."""
    return [s.format(word) + "." for s in NORMAL_STATES]


def abnormal_prompt_texts(word: str, descriptions: Sequence[str], positions: Sequence[str] = POSITIONS
                          ) -> list[str]:
    """The abnormal texts, state-major: ("abnormal {word} with {d}" for each description, then the 5 generic
    states) × " at {position}." for each position."""
    states = [f"abnormal {word} with {d}" for d in descriptions] + [s.format(word) for s in GENERIC_ABNORMAL_STATES]
    return [f"{state} at {position}." for state in states for position in positions]


def _encode_learned(clip: nn.Module, learner: MetaNetContext, ids: Tensor, image_features: Tensor) -> Tensor:
    """L2 text features [B, n, E] of prompts ``ids`` [n, 77] with the learner's context for each image."""
    ids = ids[:, : trimmed_length(clip, ids)]  # the causal mask keeps the EOT features of the padding-free pass
    embedded = learner(clip.token_embedding(ids), image_features)  # [B, n, L, W]
    return F.normalize(encode_text_with_context(clip, ids, embedded), dim=-1)


def position_rows(n_rows: int, positions: Sequence[str] | None) -> list[int]:
    """Rows of the state-major abnormal prompts for ``positions`` (each position's rows p::9, positions in order);
    all rows for None or an empty list (the release's test path with no detected cell)."""
    if not positions:
        return list(range(n_rows))
    return [r for p in positions for r in range(POSITIONS.index(p), n_rows, len(POSITIONS))]


def text_features(clip: nn.Module, learners: FiLoLearnables, normal_ids: Tensor, abnormal_ids: Tensor,
                  image_features: Tensor, *, joint_norm: bool = True) -> Tensor:
    """F [B, 2, E]: (Fn, Fa) per image from its L2 global feature [B, E] (module docstring). ``abnormal_ids`` are
    the rows to average (select them with :func:`position_rows` before encoding)."""
    normal = _encode_learned(clip, learners.normal_prompt_learner, normal_ids, image_features)
    abnormal = _encode_learned(clip, learners.abnormal_prompt_learner, abnormal_ids, image_features)
    pair = torch.stack([F.normalize(normal.mean(dim=1), dim=-1), F.normalize(abnormal.mean(dim=1), dim=-1)], dim=1)
    if joint_norm:
        pair = pair / pair.flatten(1).norm(dim=-1)[:, None, None]
    return pair


# ----------------------------------------------------------------------------------------------- maps and scores


def anomaly_maps(learners: FiLoLearnables, taps: FrozenTaps, text: Tensor, config: FiLoConfig) -> list[Tensor]:
    """P per tap [B, 2, S, S]: the linear-head taps first, then the MMCI taps (the release's order)."""
    tokens = learners.decoder_linear(taps.linear_inputs()) + learners.decoder_cov(taps.conv_inputs())
    maps = []
    for tok in tokens:
        logits = config.logit_scale * F.normalize(tok, dim=-1) @ text.transpose(1, 2)  # [B, N, 2]
        batch, n, _ = logits.shape
        grid = int(round(n**0.5))
        logits = logits.permute(0, 2, 1).reshape(batch, 2, grid, grid)
        up = F.interpolate(logits, size=config.image_size, mode="bilinear", align_corners=True)
        maps.append(up.softmax(dim=1))
    return maps


def smoothed_map(maps: Sequence[Tensor], config: FiLoConfig) -> Tensor:
    """M [B, S, S]: the mean over the maps of torchvision's GaussianBlur(kernel, σ) of (P_a − P_n + 1)/2 (test.py)."""
    k, s = config.blur_kernel, config.blur_sigma
    blurred = [TF.gaussian_blur((m[:, 1] - m[:, 0] + 1) / 2, [k, k], [s, s]) for m in maps]
    return torch.stack(blurred).mean(dim=0)


def image_score(adapted_global: Tensor, text: Tensor, test_maps: Tensor, config: FiLoConfig) -> Tensor:
    """Scores [B]: ``code`` ½(⟨A, F_a⟩ + max M) with F as :func:`text_features` gives it (/√2) — the release; ``paper``
    softmax_c(100⟨A, F̂_c⟩)[abnormal] + max M with unit-norm F̂ (the paper's formula, its scale a [choice])."""
    a = F.normalize(adapted_global, dim=-1)
    peak = test_maps.flatten(1).max(dim=1).values
    if config.score_form == "paper":
        probs = (config.logit_scale * (a[:, None] * F.normalize(text, dim=-1)).sum(-1)).softmax(dim=-1)
        return probs[:, 1] + peak
    return ((a * text[:, 1]).sum(-1) + peak) / 2


# ----------------------------------------------------------------------------------------------- losses


@dataclass
class StageOneTerms:
    """Stage-1 loss: Σ over the maps of focal, dice(P_a, M) and dice(P_n, 1 − M) (None when no image has a mask)."""

    focal: Tensor | None
    dice_abnormal: Tensor | None
    dice_normal: Tensor | None
    total: Tensor = field(init=False)

    def __post_init__(self) -> None:
        parts = [t for t in (self.focal, self.dice_abnormal, self.dice_normal) if t is not None]
        self.total = torch.stack(parts).sum() if parts else torch.zeros(())

    def as_floats(self) -> dict[str, float]:
        def value(t: Tensor | None) -> float:
            return 0.0 if t is None else float(t.detach())

        return {"focal": value(self.focal), "dice_abnormal": value(self.dice_abnormal),
                "dice_normal": value(self.dice_normal), "total": value(self.total)}


def stage1_terms(maps: Sequence[Tensor], masks: Tensor, mask_valid: Tensor | None = None, *,
                 dice_per_row: bool = True) -> StageOneTerms:
    """The stage-1 pixel loss of maps [B, 2, S, S] per tap against masks [B, S, S] (:func:`segmentation_terms`)."""
    terms = segmentation_terms(maps, masks, mask_valid, per_image=not dice_per_row)
    return StageOneTerms(*(terms if terms is not None else (None, None, None)))


def stage2_loss(adapted_global: Tensor, text: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """CE(⟨A, F_c⟩ / τ, y) with A the L2 adapted global feature [B, E] and F [B, 2, E] (no gradient needed)."""
    logits = (F.normalize(adapted_global, dim=-1)[:, None] * text).sum(-1) / temperature
    return F.cross_entropy(logits, labels.long())


def state_dict_names(learners: FiLoLearnables) -> Mapping[str, tuple[int, ...]]:
    """Name → shape of every learnable (what a checkpoint must hold)."""
    return {k: tuple(v.shape) for k, v in learners.state_dict().items()}
