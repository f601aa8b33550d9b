"""AdaCLIP (ECCV'24) as released (caoyunkang/AdaCLIP@e27ee32): the computation only, tensors in, tensors out.

Built on an open_clip ``CLIP`` model object (the exact-GELU OpenAI ViT-L/14@336 run at 518, or a tiny random one);
nothing in it is modified. Spec: ``baselines_clip_family.md`` §0, §2. Notation: ``B`` images, ``E`` joint embedding
width, ``Wv`` / ``Wt`` vision / text widths, ``L`` prompt length, ``J`` prompt depth, ``K`` feature layers, ``g`` the
patch grid (37 at 518 px), ``N = g²`` patches, ``S`` the input size.

Trainable (:class:`AdaCLIPLearnables`; parameter names are the release's, so its checkpoints load):
    static prompts S_t (J × [L, Wt]) and S_v (J × [L, Wv]), N(0, 0.02²); dynamic prompt generators (L Linears E → Wv
    and L Linears E → Wt); per-layer patch projections (K Linears Wv → E); the CLS projection (Linear E → E).

Dynamic prompts: g₀ = ln_post(CLS) @ proj of the frozen, unprompted ViT (no gradient); D_v = stack_l Lin_l(g₀)
[B, L, Wv], D_t likewise [B, L, Wt]. The same dynamic prompts serve every prompted layer.

Vision (:func:`prompted_visual_tokens`): before block 0 the visual prompts D_v + S_v[0] are *appended* to the
sequence (1 + N + L tokens); before blocks 1..J−1 the last L tokens are replaced by D_v + S_v[i]; later blocks carry
them as ordinary tokens. The taps are the stream minus the last L tokens; the global feature is ln_post(CLS) @ proj
of the final stream. As released, every prompt is rounded through float16 before it enters the float32 stream
(``prompt_fp16``).

Text (:func:`text_features`): the class sentences (7 normal / 5 abnormal states × 4 templates); before text blocks
1..J−1 the hidden positions 1..L are overwritten by D_t + S_t[i] (block 0 untouched, S_t[0] unused). The dynamic
part makes T image-dependent: the release broadcasts it over the sentences, which only works at batch 1; here T is
computed per image, which equals the release at batch 1. Per state: L2 each sentence's EOT @ text_projection, mean,
L2 again → T [E, 2] (columns normal, anomalous).

Heads: F_l = L2(Lin_l(tap_l[:, 1:])) (no ln_post); g = L2(Lin_cls(global)); A_l = 100·F_l·T [B, N, 2].
HSF (:func:`hybrid_semantic_fusion`, the code's version): p = softmax(mean_l A_l)[anomaly]; the top-k patches
(k = min(N, 5·K_c)); k-means (K_c = 20 clusters, sklearn, n_init "auto", a fixed ``random_state``) on the tokens
concatenated across the layers; per cluster the mean of its tokens pooled over the layers; c = L2(mean of the
centres); ĝ = L2(α·c + (1 − α)·g) (α = 0.2). Score = softmax(100·ĝ·T). Maps: A_l → [B, 2, g, g] → bilinear
(align_corners=True) to S. Training: softmax per layer. Test: the mean of the logit maps, then softmax,
(P_a + 1 − P_n)/2, scipy gaussian σ = 4 (:func:`siad.methods.postprocess.smooth_maps`).
Loss: Focal(score, y) + Σ_l [Focal(P_l, M) + Dice(P_l[a], M) + Dice(P_l[n], 1 − M)]; at batch 1 the release's dice
is taken per mask row (``dice_per_row``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siad.backbones.features import embed_images, image_embedding, vision_blocks
from siad.errors import ConfigError
from siad.methods.losses import focal_loss, segmentation_terms
from siad.prompts.learnable import encode_text_with_context, trimmed_length
from siad.seeding import derived_seed

__all__ = [
    "PROMPT_BRANCHES",
    "PROMPT_TYPES",
    "AdaCLIPConfig",
    "AdaCLIPLearnables",
    "AdaCLIPModel",
    "Forward",
    "HSFResult",
    "LossTerms",
    "class_features",
    "cluster_centre",
    "dynamic_prompts",
    "hybrid_semantic_fusion",
    "layer_logits",
    "loss_terms",
    "prompted_visual_tokens",
    "inference_map",
    "train_maps",
    "upsample_logits",
]

#: Prompt types: static (S), dynamic (D) or both (SD, the release's configuration).
PROMPT_TYPES: tuple[str, ...] = ("S", "D", "SD")
#: Prompted branches: vision (V), language (L) or both (VL, the release's configuration).
PROMPT_BRANCHES: tuple[str, ...] = ("V", "L", "VL")


@dataclass(frozen=True)
class AdaCLIPConfig:
    """The hyperparameters of the computation (defaults: the release, spec §2).

    Attributes:
        features: 1-indexed blocks whose outputs are the patch features (the release: n_layers/4 · (1, 2, 3, 4)).
        prompt_depth: J, the prompted blocks 0..J−1 (vision) and 1..J−1 (text).
        prompt_length: L, the prompt tokens per prompted block.
        prompt_type: "S", "D" or "SD".
        prompt_branch: "V", "L" or "VL".
        use_hsf: hybrid semantic fusion of the global feature (off: ĝ = g).
        k_clusters: K_c of the HSF k-means; the HSF takes the top 5·K_c patches.
        hsf_alpha: α, the weight of the cluster centre in ĝ (the release's 0.2).
        hsf_random_state: the k-means ``random_state`` (the release leaves it unseeded; fixed here so that a score
            depends only on the image and the weights, not on the training seed or the order of evaluation).
        logit_scale: the fixed 100 of the similarities.
        prompt_fp16: as released, prompts pass through float16 before they enter the float32 streams.
        dice_per_row: as released, the dice of a batch of one image is taken per mask row (see :func:`loss_terms`).
        image_size: S, the input size (maps are upsampled to it).
    """

    features: tuple[int, ...] = (6, 12, 18, 24)
    prompt_depth: int = 4
    prompt_length: int = 5
    prompt_type: str = "SD"
    prompt_branch: str = "VL"
    use_hsf: bool = True
    k_clusters: int = 20
    hsf_alpha: float = 0.2
    hsf_random_state: int = 0
    logit_scale: float = 100.0
    prompt_fp16: bool = True
    dice_per_row: bool = True
    image_size: int = 518

    def __post_init__(self) -> None:
        if self.prompt_type not in PROMPT_TYPES:
            raise ConfigError(f"adaclip: prompt_type {self.prompt_type!r}; use one of {list(PROMPT_TYPES)}")
        if self.prompt_branch not in PROMPT_BRANCHES:
            raise ConfigError(f"adaclip: prompt_branch {self.prompt_branch!r}; use one of {list(PROMPT_BRANCHES)}")
        if self.prompt_depth < 1 or self.prompt_length < 1 or self.k_clusters < 1 or not self.features:
            raise ConfigError("adaclip: prompt_depth, prompt_length and k_clusters must be ≥ 1 and features non-empty")

    @property
    def visual_prompts(self) -> bool:
        return "V" in self.prompt_branch

    @property
    def text_prompts(self) -> bool:
        return "L" in self.prompt_branch

    @property
    def static(self) -> bool:
        return "S" in self.prompt_type

    @property
    def dynamic(self) -> bool:
        return "D" in self.prompt_type


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Module construction under a fixed global seed (nn.Linear's default init draws from it), state restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _StaticPrompts(nn.Module):
    """J learnable [L, W] prompts (the release's ``PromptLayer.static_prompts``), N(0, 0.02²)."""

    def __init__(self, depth: int, length: int, width: int) -> None:
        super().__init__()
        self.static_prompts = nn.ParameterList([nn.Parameter(torch.empty(length, width)) for _ in range(depth)])
        for prompt in self.static_prompts:
            nn.init.normal_(prompt, std=0.02)


class _Heads(nn.Module):
    """Parallel Linear heads (the release's ``ProjectLayer.head``)."""

    def __init__(self, in_dim: int, out_dim: int, count: int) -> None:
        super().__init__()
        self.head = nn.ModuleList([nn.Linear(in_dim, out_dim) for _ in range(count)])


class AdaCLIPLearnables(nn.Module):
    """Every trainable tensor of AdaCLIP, under the release's parameter names.

    ``text_prompter.static_prompts.{j}`` [L, Wt], ``visual_prompter.static_prompts.{j}`` [L, Wv] (static types),
    ``dynamic_visual_prompt_generator.head.{l}`` Linear(E, Wv) and ``dynamic_text_prompt_generator.head.{l}``
    Linear(E, Wt) (dynamic types), ``patch_token_layer.head.{k}`` Linear(Wv, E), ``cls_token_layer.head.0``
    Linear(E, E). The release creates the static prompts even for a branch it does not prompt only when that branch
    is enabled; so does this module. Each component is initialised from its own seed derived from ``seed``.
    """

    def __init__(self, config: AdaCLIPConfig, *, embed_dim: int, vision_width: int, text_width: int,
                 seed: int = 0) -> None:
        super().__init__()
        c = self.config = config
        depth, length = c.prompt_depth, c.prompt_length

        def build(name: str, factory):
            with _seeded(derived_seed(seed, "adaclip", name)):
                return factory()

        if c.text_prompts and c.static:
            self.text_prompter = build("text_prompter", lambda: _StaticPrompts(depth, length, text_width))
        if c.visual_prompts and c.static:
            self.visual_prompter = build("visual_prompter", lambda: _StaticPrompts(depth, length, vision_width))
        self.patch_token_layer = build("patch_token_layer", lambda: _Heads(vision_width, embed_dim, len(c.features)))
        self.cls_token_layer = build("cls_token_layer", lambda: _Heads(embed_dim, embed_dim, 1))
        if c.dynamic:
            self.dynamic_visual_prompt_generator = build(
                "dynamic_visual_prompt_generator", lambda: _Heads(embed_dim, vision_width, length))
            self.dynamic_text_prompt_generator = build(
                "dynamic_text_prompt_generator", lambda: _Heads(embed_dim, text_width, length))

    def static_prompts(self, branch: str) -> Sequence[Tensor] | None:
        """The J static prompts of ``branch`` ("text" / "visual"), or None when not learned."""
        module = getattr(self, f"{branch}_prompter", None)
        return None if module is None else list(module.static_prompts)


# ----------------------------------------------------------------------------------------------- prompts


def dynamic_prompts(generator: _Heads, global_features: Tensor) -> Tensor:
    """[B, L, W]: the L Linear heads of ``generator`` applied to g₀ [B, E], stacked along dim 1."""
    return torch.stack([head(global_features) for head in generator.head], dim=1)


def _round(x: Tensor, fp16: bool) -> Tensor:
    return x.half().float() if fp16 else x


def layer_prompts(static: Sequence[Tensor] | None, dynamic: Tensor | None, depth: int, batch: int,
                  fp16: bool) -> list[Tensor]:
    """The prompts of blocks 0..J−1, each [B, L, W]: D + S[j] (SD), S[j] expanded (S) or D (D), float16-rounded
    when ``fp16`` (the release's ``.half()``)."""
    prompts = []
    for j in range(depth):
        if static is not None and dynamic is not None:
            value = dynamic + static[j].unsqueeze(0)
        elif static is not None:
            value = static[j].unsqueeze(0).expand(batch, -1, -1)
        elif dynamic is not None:
            value = dynamic
        else:
            raise ConfigError("adaclip: a prompted branch needs static or dynamic prompts")
        prompts.append(_round(value, fp16))
    return prompts


def prompted_visual_tokens(clip: nn.Module, images: Tensor, prompts: Sequence[Tensor] | None,
                           taps: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
    """The vision tower with AdaCLIP's visual prompts.

    Args:
        clip: open_clip CLIP (its vision tower is run block by block; nothing modified).
        images: [B, 3, S, S] normalised images at the size the tower was built for.
        prompts: per prompted block j (0..J−1) the [B, L, Wv] tokens: appended before block 0, replacing the last L
            tokens before blocks 1..J−1; None runs the plain tower.
        taps: 0-indexed blocks whose outputs are returned.

    Returns:
        global [B, E] (ln_post(CLS) @ proj of the final stream, prompt tokens present as in the release) and per tap
        the stream without the prompt tokens [B, 1 + N, Wv].
    """
    visual = clip.visual
    x = embed_images(visual, images)
    length = prompts[0].shape[1] if prompts else 0
    out = []
    for index, block in enumerate(vision_blocks(visual)):
        if prompts and index < len(prompts):
            kept = x if index == 0 else x[:, : x.shape[1] - length]
            x = torch.cat([kept, prompts[index].to(x.dtype)], dim=1)
        x = block(x)
        if index in taps:
            out.append(x[:, : x.shape[1] - length] if length else x)
    return image_embedding(visual, x), out


def class_features(clip: nn.Module, tokens: Sequence[Tensor], deep_prompts: dict[int, Tensor] | None = None,
                   *, prompt_fp16: bool = False) -> Tensor:
    """T [B, E, 2] (or [E, 2] without deep prompts): per state (token ids [n_s, 77] of its sentences), L2 each
    sentence's feature, mean, L2 again; then the release's second L2 over E.

    ``deep_prompts`` {text block: [B, L, Wt]} overwrite hidden positions 1..L before those blocks, one prompt set
    per image: all images' sentences run in one batched pass. ``prompt_fp16``: as released, each sentence's copy of
    the prompts is rounded through float16 (forward values and, per copy, their gradients).
    """
    columns = []
    for ids in tokens:
        ids = ids[:, : trimmed_length(clip, ids)]  # the causal mask keeps the EOT features of the padding-free pass
        if deep_prompts:
            batch = next(iter(deep_prompts.values())).shape[0]
            embedded = clip.token_embedding(ids).unsqueeze(0).expand(batch, -1, -1, -1)
            deep = {j: _round(v.unsqueeze(1).expand(-1, ids.shape[0], -1, -1), prompt_fp16)  # [B, n_s, L, Wt]
                    for j, v in deep_prompts.items()}
            features = encode_text_with_context(clip, ids, embedded, deep, deep_start=1)  # [B, n_s, E]
        else:
            features = encode_text_with_context(clip, ids)  # [n_s, E]
        features = F.normalize(features, dim=-1).mean(dim=-2)
        columns.append(F.normalize(features, dim=-1))
    return F.normalize(torch.stack(columns, dim=-1), dim=-2)


# ----------------------------------------------------------------------------------------------- heads


def layer_logits(patch_features: Sequence[Tensor], text: Tensor, logit_scale: float = 100.0) -> list[Tensor]:
    """A_l = scale · F_l · T: [B, N, 2] per layer, from F_l [B, N, E] and T [B, E, 2]."""
    return [logit_scale * f @ text for f in patch_features]


@dataclass(frozen=True)
class HSFResult:
    """The hybrid semantic fusion of one batch: top-k patch indices [B, k], cluster labels [B, k] (int64, numpy),
    the normalised mean cluster centre c [B, E]."""

    top_indices: Tensor
    labels: np.ndarray
    centre: Tensor


def cluster_centre(selected: Sequence[Tensor], labels: np.ndarray, k_clusters: int) -> Tensor:
    """Mean over the clusters of each cluster's tokens pooled over the layers: [E] from per-layer [k, E] tokens and
    their cluster labels [k] (not normalised). An empty cluster (only possible with duplicate tokens) is left out,
    where the release would average an empty set into NaN."""
    labels_t = torch.as_tensor(labels, device=selected[0].device)
    centres = []
    for cluster in range(k_clusters):
        members = torch.cat([tokens[labels_t == cluster] for tokens in selected], dim=0)
        if members.shape[0]:
            centres.append(members.mean(dim=0))
    return torch.stack(centres).mean(dim=0)


def hybrid_semantic_fusion(patch_features: Sequence[Tensor], logits: Sequence[Tensor], k_clusters: int,
                           random_state: int) -> HSFResult:
    """The code's HSF: top-k patches by softmax(mean_l A_l)[anomaly], k-means on their layer-concatenated tokens.

    ``patch_features`` F_l [B, N, E], ``logits`` A_l [B, N, 2]; k = min(N, 5·k_clusters). sklearn ``KMeans(
    k_clusters, n_init="auto", random_state=random_state)`` on the CPU (no gradient through the clustering;
    gradients flow through the gathered tokens). Deterministic for a fixed ``random_state``.
    """
    from sklearn.cluster import KMeans

    probs = torch.softmax(torch.stack(list(logits), dim=1).mean(dim=1), dim=2)[:, :, 1]
    k = min(probs.shape[1], 5 * k_clusters)
    if k < k_clusters:
        raise ConfigError(f"adaclip: HSF needs at least k_clusters = {k_clusters} patches, the grid has "
                          f"{probs.shape[1]}; lower k_clusters or use a larger input size")
    top = torch.topk(probs, k=k, dim=1).indices
    selected = [f.gather(1, top.unsqueeze(-1).expand(-1, -1, f.shape[-1])) for f in patch_features]
    stacked = torch.cat(selected, dim=2)
    labels, centres = [], []
    for b in range(stacked.shape[0]):
        kmeans = KMeans(n_clusters=k_clusters, n_init="auto", random_state=random_state)
        assigned = kmeans.fit_predict(stacked[b].detach().to("cpu", torch.float32).numpy())
        labels.append(assigned)
        centres.append(cluster_centre([s[b] for s in selected], assigned, k_clusters))
    return HSFResult(top, np.stack(labels).astype(np.int64), F.normalize(torch.stack(centres), dim=1))


def upsample_logits(logits: Tensor, size: int) -> Tensor:
    """[B, N, 2] → [B, 2, g, g] → bilinear (align_corners=True) to [B, 2, S, S]."""
    b, n, _ = logits.shape
    side = round(n**0.5)
    grid = logits.permute(0, 2, 1).reshape(b, 2, side, side)
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=True)


def train_maps(logits: Sequence[Tensor], size: int) -> list[Tensor]:
    """Training maps P_l [B, 2, S, S]: softmax over the classes of each layer's upsampled logits."""
    return [torch.softmax(upsample_logits(a, size), dim=1) for a in logits]


def inference_map(logits: Sequence[Tensor], size: int) -> Tensor:
    """The test map [B, S, S] before smoothing: the mean of the upsampled logit maps, softmax, (P_a + 1 − P_n)/2."""
    mean = torch.stack([upsample_logits(a, size) for a in logits], dim=1).mean(dim=1)
    probs = torch.softmax(mean, dim=1)
    return (probs[:, 1] + 1 - probs[:, 0]) / 2.0


@dataclass(frozen=True)
class LossTerms:
    """The training loss and its parts: ``score_focal`` Focal(score, y); per-layer sums of ``focal``,
    ``dice_anomaly`` (Dice(P_a, M)) and ``dice_normal`` (Dice(P_n, 1 − M)); ``total`` their sum."""

    score_focal: Tensor
    focal: Tensor
    dice_anomaly: Tensor
    dice_normal: Tensor
    total: Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("score_focal", "focal", "dice_anomaly", "dice_normal",
                                                                "total")}


def loss_terms(scores: Tensor, maps: Sequence[Tensor], masks: Tensor, labels: Tensor,
               mask_valid: Tensor | None = None, *, dice_per_row: bool = True) -> LossTerms:
    """Focal(score [B, 2], y [B]) + Σ_l [Focal(P_l, M) + Dice(P_l[:, 1], M) + Dice(P_l[:, 0], 1 − M)].

    The score focal is the release's FocalLoss on B "pixels" (probabilities [B, 2]). ``dice_per_row`` (as released):
    for a batch of one image the release's ``gt.squeeze()`` makes the mask [S, S], so its dice takes the S rows as
    the batch (per-row coefficients, averaged); False, or any larger batch, gives one coefficient per image.
    ``mask_valid`` [B] bool: the images whose mask is pixel truth (None: all); the pixel terms are taken over those
    only (0 when none).
    """
    score_focal = focal_loss(scores.reshape(-1, 2, 1, 1), labels.to(scores.dtype).reshape(-1, 1, 1))
    per_image = not (dice_per_row and masks.shape[0] == 1)  # the release's squeeze acts on a batch of one
    pixel = segmentation_terms(maps, masks, mask_valid, per_image=per_image)
    if pixel is None:
        zero = score_focal.new_zeros(())
        return LossTerms(score_focal, zero, zero, zero, score_focal)
    focal, dice_a, dice_n = pixel
    return LossTerms(score_focal, focal, dice_a, dice_n, score_focal + focal + dice_a + dice_n)


# ----------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Forward:
    """One prompted forward: dynamic prompts D_v [B, L, Wv] / D_t [B, L, Wt] (None without), the text features
    T [B, E, 2], the prompted global [B, E], per-layer taps [B, 1 + N, Wv], F_l [B, N, E], g [B, E], A_l [B, N, 2],
    the HSF result (None without HSF), ĝ [B, E] and the class probabilities [B, 2]."""

    dynamic_visual: Tensor | None
    dynamic_text: Tensor | None
    text: Tensor
    global_features: Tensor
    taps: list[Tensor]
    patch_features: list[Tensor]
    cls_features: Tensor
    logits: list[Tensor]
    hsf: HSFResult | None
    fused: Tensor
    scores: Tensor


class AdaCLIPModel(nn.Module):
    """A frozen open_clip CLIP plus :class:`AdaCLIPLearnables` (the only trainable part).

    Args:
        clip: an open_clip ``CLIP`` built at the run size (not modified; frozen here).
        tokenizer: its tokenizer.
        config: the hyperparameters.
        seed: seeds the learnables' initialisation.
    """

    def __init__(self, clip: nn.Module, tokenizer, config: AdaCLIPConfig | None = None, *, seed: int = 0) -> None:
        super().__init__()
        self.config = c = config or AdaCLIPConfig()
        self.clip = clip
        clip.requires_grad_(False)
        self.tokenizer = tokenizer
        n_blocks = len(vision_blocks(clip.visual))
        bad = [f for f in c.features if not 1 <= f <= n_blocks]
        if bad:
            raise ConfigError(f"adaclip: feature layers {bad} are not blocks 1..{n_blocks} of the backbone")
        if c.prompt_depth > min(n_blocks, len(clip.transformer.resblocks)):
            raise ConfigError(f"adaclip: prompt_depth {c.prompt_depth} exceeds the backbone's blocks")
        embed_dim = int(clip.visual.output_dim)
        self.learnables = AdaCLIPLearnables(
            c, embed_dim=embed_dim, vision_width=int(clip.visual.conv1.out_channels),
            text_width=int(clip.token_embedding.embedding_dim), seed=seed)
        self._taps = tuple(f - 1 for f in c.features)
        self._tokens: dict[str, list[Tensor]] = {}
        self._fixed_text: dict[str, Tensor] = {}

    # -- text --------------------------------------------------------------------------------------------------

    def sentence_tokens(self, name: str) -> list[Tensor]:
        """Token ids [n_s, 77] of the normal and abnormal sentences of a prompt class name (cached)."""
        if name not in self._tokens:
            from siad.prompts.ensemble import ENSEMBLES

            normal, abnormal = ENSEMBLES.get("adaclip").class_sentences(name)
            device = self.clip.token_embedding.weight.device
            self._tokens[name] = [self.tokenizer(normal).to(device), self.tokenizer(abnormal).to(device)]
        return self._tokens[name]

    def text_features(self, names: Sequence[str], dynamic_text: Tensor | None) -> Tensor:
        """T [B, E, 2] for the images' prompt class names; prompted per image when the text branch is (the images of
        one class name share one batched pass)."""
        c = self.config
        if not c.text_prompts:
            for name in set(names) - set(self._fixed_text):
                with torch.no_grad():
                    self._fixed_text[name] = class_features(self.clip, self.sentence_tokens(name))
            return torch.stack([self._fixed_text[name] for name in names])
        batch = len(names)
        # rounded per sentence copy in class_features, as the release rounds after broadcasting over the sentences
        prompts = layer_prompts(self.learnables.static_prompts("text"), dynamic_text, c.prompt_depth, batch, False)
        out: list[Tensor | None] = [None] * batch
        for name in dict.fromkeys(names):
            rows = [b for b, n in enumerate(names) if n == name]
            deep = {j: prompts[j][rows] for j in range(1, c.prompt_depth)}
            if not deep:  # depth 1: no text block is prompted
                deep = None
            features = class_features(self.clip, self.sentence_tokens(name), deep, prompt_fp16=c.prompt_fp16)
            for i, b in enumerate(rows):
                out[b] = features[i] if deep else features
        return torch.stack(out)

    # -- forward -----------------------------------------------------------------------------------------------

    def forward(self, images: Tensor, names: Sequence[str], frozen_global: Tensor | None = None) -> Forward:
        """The prompted forward of images [B, 3, S, S] with per-image prompt class names.

        ``frozen_global``: g₀ [B, E] of the unprompted tower if already known (feature cache), else computed.
        """
        c, learn = self.config, self.learnables
        dyn_v = dyn_t = None
        if c.dynamic:
            if frozen_global is None:
                with torch.no_grad():
                    frozen_global = self.clip.encode_image(images)
            g0 = frozen_global.to(images.device, images.dtype)
            dyn_v = dynamic_prompts(learn.dynamic_visual_prompt_generator, g0)
            dyn_t = dynamic_prompts(learn.dynamic_text_prompt_generator, g0)
        visual = None
        if c.visual_prompts:
            visual = layer_prompts(learn.static_prompts("visual"), dyn_v, c.prompt_depth, images.shape[0],
                                   c.prompt_fp16)
        global_features, taps = prompted_visual_tokens(self.clip, images, visual, self._taps)
        text = self.text_features(names, dyn_t)
        patch = [F.normalize(head(t[:, 1:]), dim=-1) for head, t in zip(learn.patch_token_layer.head, taps,
                                                                           strict=True)]
        cls = F.normalize(learn.cls_token_layer.head[0](global_features), dim=-1)
        logits = layer_logits(patch, text, c.logit_scale)
        hsf = None
        fused = cls
        if c.use_hsf:
            hsf = hybrid_semantic_fusion(patch, logits, c.k_clusters, c.hsf_random_state)
            fused = F.normalize(c.hsf_alpha * hsf.centre + (1 - c.hsf_alpha) * cls, dim=1)
        scores = torch.softmax(c.logit_scale * (fused.unsqueeze(1) @ text).squeeze(1), dim=1)
        return Forward(dyn_v, dyn_t, text, global_features, taps, patch, cls, logits, hsf, fused, scores)

    def loss(self, images: Tensor, names: Sequence[str], masks: Tensor, labels: Tensor,
             mask_valid: Tensor | None = None, frozen_global: Tensor | None = None) -> LossTerms:
        """The training loss of a batch (masks [B, S, S], labels [B])."""
        out = self.forward(images, names, frozen_global)
        return loss_terms(out.scores, train_maps(out.logits, self.config.image_size), masks, labels, mask_valid,
                          dice_per_row=self.config.dice_per_row)

    @torch.no_grad()
    def predict(self, images: Tensor, names: Sequence[str], frozen_global: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """Scores [B] (P(anomalous) of the fused global) and maps [B, S, S] before smoothing."""
        out = self.forward(images, names, frozen_global)
        return out.scores[:, 1], inference_map(out.logits, self.config.image_size)
