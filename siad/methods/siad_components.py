"""SIAD-LLM's own trainable modules: stage prompts, response prompts, adapter, SEM and PEM.

Everything follows the project spec `specs/siad_llm.md` (sections "Stage prompt templates", "Adapter",
"Enhanced module" and "Self-improvement"); each **[choice]** of the spec is the default here and the
cheap alternatives are constructor switches. The SIAD-LLM method class wires these pieces together
(training loop, LLM, maps); nothing here touches the LLM.

- :data:`STAGE_CASES`: the stage words of Table 6 (cases 1, 2, 3; case 3 is the default).
- :class:`StagePromptLearner`: learnable context V (normal) and W (abnormal) written between the stage
  words and each Appendix D ensemble sentence, encoded by the frozen open_clip text tower in one
  batched call → text features ``[C, n_stages, 2, D]``.
- :func:`response_text_features` / :func:`refine_text_features`: the self-improvement step 8
  (T(R + "without damaged"), T(R + "with damaged")) and the refined features L2norm(static + T_res).
- :class:`StageAdapter` (Eq. 5–6), :class:`StageEnhancement` (SEM, Eq. 7),
  :class:`PatchPromptEmbedder` (PEM, Eq. 8–11; a drop-in for AnomalyGPT's ``ConvPromptLearner``),
  :class:`BasePrompts` (the learnable base prompts alone: "w/o PEM" as a strict removal).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siad.errors import ConfigError
from siad.prompts.ensemble import ENSEMBLES, PromptEnsemble
from siad.prompts.learnable import ContextVectors, encode_text_with_context, trimmed_length
from siad.seeding import derived_seed

__all__ = [
    "STAGE_CASES",
    "RESPONSE_SUFFIXES",
    "StagePromptLearner",
    "response_prompt_tokens",
    "response_text_features",
    "refine_text_features",
    "StageAdapter",
    "StageEnhancement",
    "PatchPromptEmbedder",
    "BasePrompts",
]

# Table 6: stage words [S_k] for the four stages (blocks 8/16/24/32), per case.
STAGE_CASES: dict[int, tuple[str, str, str, str]] = {
    1: ("very small region of", "small region of", "large region of", "very large region of"),
    2: ("low level feature of", "mid level feature of", "mid level feature of", "high level feature of"),
    3: ("local feature of", "regional feature of", "regional feature of", "global feature of"),
}

# Algorithm 1 step 8: the response R becomes a (normal, abnormal) prompt pair.
RESPONSE_SUFFIXES: tuple[str, str] = ("without damaged", "with damaged")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Build modules under ``torch.manual_seed(seed)`` without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _n_tokens(tokenizer, text: str) -> int:
    """BPE tokens of ``text`` without the start/end tokens (0 for the empty string)."""
    return int((tokenizer([text])[0] != 0).sum()) - 2


def _check_frozen(model: nn.Module) -> None:
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if trainable:
        raise ConfigError(
            f"the text tower has {len(trainable)} trainable parameter(s) (e.g. {trainable[0]!r}); SIAD-LLM keeps "
            "the backbone frozen so that gradients reach only the learnable context. Load it with "
            "siad.backbones.load_openclip (which freezes it) or call model.requires_grad_(False)."
        )


def _grid_side(n_tokens: int, what: str) -> int:
    side = int(round(n_tokens**0.5))
    if side * side != n_tokens:
        raise ConfigError(f"{what}: {n_tokens} tokens do not form a square grid; pass patch tokens only (no CLS).")
    return side


def _check_stage_list(stages: Sequence[Tensor], n_stages: int, dim: int, who: str) -> None:
    if len(stages) != n_stages:
        raise ConfigError(f"{who} expects {n_stages} stage tensors, got {len(stages)}; pass one [B, N, D] per stage.")
    for i, tokens in enumerate(stages):
        if tokens.dim() != 3 or tokens.shape[-1] != dim:
            raise ConfigError(f"{who} stage {i}: expected tokens [B, N, {dim}], got {tuple(tokens.shape)}.")


# ---------------------------------------------------------------- stage prompts


class StagePromptLearner(nn.Module):
    """Learnable stage prompts: text features ``[C, n_stages, 2, D]`` for C classes (Sec. 3.3, Eq. 3–4).

    For class c, stage k and state s, every sentence of the Appendix D ensemble (7 normal states ×
    2 templates = 14 normal, 5 × 2 = 10 abnormal sentences) becomes
    ``"<stage words k> X … X <sentence>"`` (e.g. "local feature of X X X X X X X X X X X X a photo of a
    flawless bottle."); the ``n_ctx`` placeholders X carry the learnable context, V for the normal and
    W for the abnormal sentences, shared by all stages and classes. The feature of (c, k, s) is the
    L2-normalised mean of the L2-normalised sentence embeddings (the ensemble's own ``aggregate``).

    Cost: stages with identical words (case 3's and case 2's two middle stages) are encoded once; all
    classes of one call go through the text tower together, cut after their last EOT token; token ids
    are built once per class and cached.

    ``stage_prompts=False`` ("w/o SP") drops the stage words: one (normal, abnormal) pair is encoded
    and repeated for every stage, so the output keeps the shape ``[C, n_stages, 2, D]`` (a broadcast
    view whose stages are identical).

    The text tower is passed to :meth:`forward` and is not a submodule (its weights stay out of this
    module's parameters and state dict); it must be frozen. Gradients reach only ``normal_ctx.ctx`` and
    ``abnormal_ctx.ctx``.

    Args:
        tokenizer: the open_clip tokenizer of the text tower.
        width: the text tower's token-embedding width (1024 for ViT-H-14).
        stage_case: Table 6 case (1, 2 or 3; default 3).
        stage_prompts: False = "w/o SP".
        n_ctx: learnable words E per state (spec [choice]: 12).
        ensemble: registered ensemble name or a :class:`PromptEnsemble` (default Appendix D).
        init_std: std of the N(0, std²) context init (0.02 as the project's other context vectors).
        seed: seeds V (``seed``) and W (``seed + 1``).
        placeholder: the single-token word that marks the context positions.
    """

    def __init__(
        self,
        tokenizer,
        width: int,
        *,
        stage_case: int = 3,
        stage_prompts: bool = True,
        n_ctx: int = 12,
        ensemble: str | PromptEnsemble = "siad_appendix_d",
        init_std: float = 0.02,
        seed: int = 0,
        placeholder: str = "X",
    ) -> None:
        super().__init__()
        if stage_case not in STAGE_CASES:
            raise ConfigError(
                f"stage_case {stage_case!r} is unknown; SIAD-LLM Table 6 defines cases {sorted(STAGE_CASES)} "
                "(set `stage_case` in the method params)."
            )
        if n_ctx < 1 or width < 1:
            raise ConfigError(f"StagePromptLearner(width={width}, n_ctx={n_ctx}): both must be ≥ 1.")
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.stage_case = stage_case
        self.stage_prompts = stage_prompts
        self.placeholder = placeholder
        self.ensemble = ENSEMBLES.get(ensemble) if isinstance(ensemble, str) else ensemble
        self.stage_words: tuple[str, ...] = STAGE_CASES[stage_case] if stage_prompts else ("",) * 4
        self.unique_words: tuple[str, ...] = tuple(dict.fromkeys(self.stage_words))
        self.register_buffer(
            "stage_index",
            torch.tensor([self.unique_words.index(w) for w in self.stage_words], dtype=torch.long),
            persistent=False,
        )
        self.normal_ctx = ContextVectors(n_ctx, width, init_std=init_std, seed=derived_seed(seed, "normal_ctx"))
        self.abnormal_ctx = ContextVectors(n_ctx, width, init_std=init_std, seed=derived_seed(seed, "abnormal_ctx"))
        self._placeholder_id = self._single_token(placeholder)
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def n_stages(self) -> int:
        """Number of stages (4)."""
        return len(self.stage_words)

    def _single_token(self, word: str) -> int:
        ids = self.tokenizer([word])[0]
        if int((ids != 0).sum()) != 3:
            raise ConfigError(f"placeholder {word!r} is not a single token; use a short word such as 'X'.")
        return int(ids[1])

    def prompt_texts(self, cls_name: str) -> list[str]:
        """The sentences encoded for ``cls_name``: per unique stage words, the normal then the abnormal ones."""
        normal, abnormal = self.ensemble.class_sentences(cls_name)
        context = " ".join([self.placeholder] * self.n_ctx)
        return [
            f"{words} {context} {sentence}".strip() for words in self.unique_words for sentence in normal + abnormal
        ]

    def _class_tokens(self, cls_name: str) -> tuple[Tensor, Tensor]:
        """Cached (token ids [n, L], context start positions [n]) of ``prompt_texts(cls_name)``, checked."""
        if cls_name not in self._cache:
            texts = self.prompt_texts(cls_name)
            tokens = self.tokenizer(texts)
            per_stage = len(texts) // len(self.unique_words)
            starts = torch.tensor([1 + _n_tokens(self.tokenizer, w) for w in self.unique_words]).repeat_interleave(
                per_stage
            )
            positions = starts[:, None] + torch.arange(self.n_ctx)
            if int(positions.max()) >= tokens.shape[1] or bool((tokens[:, -1] != 0).any()):
                raise ConfigError(
                    f"class {cls_name!r}: a stage prompt of {self.n_ctx} context tokens does not fit the text "
                    f"context of {tokens.shape[1]} tokens; use fewer context tokens (n_ctx) or a shorter class name."
                )
            if not bool((tokens.gather(1, positions) == self._placeholder_id).all()):
                raise ConfigError(
                    f"class {cls_name!r}: the context placeholders did not land right after the stage words; "
                    f"check the stage words {self.unique_words} and the placeholder {self.placeholder!r}."
                )
            self._cache[cls_name] = (tokens, starts)
        return self._cache[cls_name]

    def forward(self, model: nn.Module, class_names: Sequence[str]) -> Tensor:
        """Unit-norm stage text features ``[len(class_names), n_stages, 2, D]`` (state 0 normal, 1 abnormal).

        ``class_names`` may repeat (e.g. one per image of a batch): each distinct class is encoded once.
        """
        if not class_names:
            raise ConfigError("StagePromptLearner needs at least one class name.")
        _check_frozen(model)
        names = list(dict.fromkeys(class_names))
        built = [self._class_tokens(name) for name in names]
        if len({t.shape[0] for t, _ in built}) != 1:
            raise ConfigError(
                f"classes {names} give different numbers of ensemble sentences; StagePromptLearner needs an "
                "ensemble without per-class domains (e.g. 'siad_appendix_d')."
            )
        device = self.normal_ctx.ctx.device
        tokens = torch.cat([t for t, _ in built]).to(device)
        starts = torch.cat([s for _, s in built]).to(device)
        tokens = tokens[:, : trimmed_length(model, tokens)]
        n_normal = len(self.ensemble.class_sentences(names[0])[0])
        per_stage = tokens.shape[0] // (len(names) * len(self.unique_words))
        abnormal = (torch.arange(tokens.shape[0], device=device) % per_stage) >= n_normal
        embeddings = model.token_embedding(tokens)
        ctx = torch.where(abnormal[:, None, None], self.abnormal_ctx.ctx, self.normal_ctx.ctx)
        index = (starts[:, None] + torch.arange(self.n_ctx, device=device))[..., None].expand(-1, -1, ctx.shape[-1])
        embeddings = embeddings.scatter(1, index, ctx.to(embeddings.dtype))
        features = encode_text_with_context(model, tokens, token_embeddings=embeddings).float()
        if self.ensemble.aggregate == "normalize_then_mean":
            features = F.normalize(features, dim=-1)
        features = features.reshape(len(names), len(self.unique_words), per_stage, -1)
        states = torch.stack([features[:, :, :n_normal].mean(2), features[:, :, n_normal:].mean(2)], dim=2)
        states = F.normalize(states, dim=-1)[:, self.stage_index]  # [C_unique, n_stages, 2, D]
        order = torch.tensor([names.index(name) for name in class_names], device=device)
        return states[order]


# ---------------------------------------------------------------- self-improvement text


def response_prompt_tokens(tokenizer, responses: Sequence[str], suffix: str, context_length: int = 77) -> Tensor:
    """Token ids [B, context_length] of ``response + " " + suffix``, cutting the response, never the suffix.

    A response too long for the context keeps its first tokens (where the yes/no verdict is), then the
    suffix and the end token, so the normal and abnormal prompts of a long answer still differ (plain
    truncation would drop "with(out) damaged" and make them identical).
    """
    needed = ("encode", "sot_token_id", "eot_token_id")
    if any(not hasattr(tokenizer, name) for name in needed):
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} lacks {needed}; response prompts need open_clip's SimpleTokenizer "
            "(the tokenizer returned by siad.backbones.load_openclip)."
        )
    tail = tokenizer.encode(suffix) + [tokenizer.eot_token_id]
    room = context_length - 1 - len(tail)
    if room < 0:
        raise ConfigError(f"suffix {suffix!r} does not fit a text context of {context_length} tokens.")
    tokens = torch.zeros(len(responses), context_length, dtype=torch.long)
    for row, response in enumerate(responses):
        ids = [tokenizer.sot_token_id] + tokenizer.encode(response)[:room] + tail
        tokens[row, : len(ids)] = torch.tensor(ids)
    return tokens


@torch.no_grad()
def response_text_features(
    model: nn.Module, tokenizer, responses: Sequence[str], suffixes: tuple[str, str] = RESPONSE_SUFFIXES
) -> Tensor:
    """T_res (Algorithm 1, step 8): unit-norm features [B, 2, D] of (R + " without damaged", R + " with damaged").

    One batched, gradient-free pass of the frozen text tower over the 2B prompts (cut after the last EOT
    token). Long responses are cut as :func:`response_prompt_tokens` says.
    """
    if not responses:
        raise ConfigError("response_text_features needs at least one response text.")
    context_length = int(model.positional_embedding.shape[0])
    tokens = torch.cat([response_prompt_tokens(tokenizer, responses, s, context_length) for s in suffixes])
    tokens = tokens.to(model.positional_embedding.device)
    tokens = tokens[:, : trimmed_length(model, tokens)]
    features = F.normalize(encode_text_with_context(model, tokens).float(), dim=-1)
    return features.reshape(len(suffixes), len(responses), -1).transpose(0, 1)


def refine_text_features(static: Tensor, response: Tensor) -> Tensor:
    """Refined stage features [B, K, 2, D] = L2norm(static [B, K, 2, D] + response [B, 2, D]) (spec [choice]).

    The response pair is added to every stage's (normal, abnormal) pair of the same image.
    """
    if static.dim() != 4 or static.shape[2] != 2:
        raise ConfigError(f"static stage features must be [B, K, 2, D], got {tuple(static.shape)}.")
    expected = (static.shape[0], 2, static.shape[3])
    if tuple(response.shape) != expected:
        raise ConfigError(
            f"response features must be [B, 2, D] = {expected} to match static {tuple(static.shape)}, "
            f"got {tuple(response.shape)}; give one response per image."
        )
    return F.normalize(static + response.unsqueeze(1).to(static.dtype), dim=-1)


# ---------------------------------------------------------------- adapter, SEM, PEM


class StageAdapter(nn.Module):
    """Residual adapter per stage (Eq. 5–6): Ŝ = λ·Norm(LeakyReLU(Linear(S))) + (1−λ)·S, S L2-normalised first.

    The input S is the stage decoder's projected patch tokens (already unit norm, normalised again so
    both terms share one scale, spec [choice]). The output is *not* re-normalised (Eq. 6 as written):
    its norm is ≤ 1, so maps built on it should normalise first to get cosines.

    ``lam`` must lie in (0, 1]; λ = 0 ("w/o Adapter") means this module is not built at all.
    Linear layers keep PyTorch's default init (bias on), built under ``seed``.
    """

    def __init__(
        self, dim: int = 1024, n_stages: int = 4, *, lam: float = 0.1, negative_slope: float = 0.01, seed: int = 0
    ) -> None:
        super().__init__()
        if not 0.0 < lam <= 1.0:
            raise ConfigError(
                f"adapter_lambda={lam} is outside (0, 1]; use a value in (0, 1], or 0 for 'w/o Adapter' "
                "(then do not build a StageAdapter)."
            )
        if dim < 1 or n_stages < 1:
            raise ConfigError(f"StageAdapter(dim={dim}, n_stages={n_stages}): both must be ≥ 1.")
        self.dim, self.n_stages, self.lam, self.negative_slope = dim, n_stages, float(lam), negative_slope
        with _seeded(seed):
            self.fc = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_stages))

    def forward(self, stages: Sequence[Tensor]) -> list[Tensor]:
        """Adapted tokens, one [B, N, D] per stage."""
        _check_stage_list(stages, self.n_stages, self.dim, "StageAdapter")
        out = []
        for tokens, fc in zip(stages, self.fc, strict=True):
            unit = F.normalize(tokens, dim=-1)
            adapted = F.normalize(F.leaky_relu(fc(unit), self.negative_slope), dim=-1)
            out.append(self.lam * adapted + (1.0 - self.lam) * unit)
        return out


class StageEnhancement(nn.Module):
    """SEM (Eq. 7): S_emd,i = Ŝ_i + Conv3×3(Proj1×1(S*)) for every stage i, S* the final stage's token grid.

    Per stage: Proj = 1×1 conv D→D (channel projection; bilinear resize when stage i's grid differs
    from S*'s, which never happens for a plain ViT), Conv = 3×3 conv D→D with padding 1, weights and
    bias **zero-initialised** so the module starts as the identity (spec [choice]). S* defaults to the
    last input (Ŝ_4, the adapted final stage); pass ``final`` to use another tensor (e.g. the
    un-adapted S_4). Built under ``seed``.

    Why Ŝ_4 ([choice]; Eq. 7 says only "the feature map from the final stage of the visual encoder"): it is the
    final stage in the space of the Ŝ_i it is added to (projected into the joint text space, adapted), so Proj
    needs no channel change and λ = 0 gives S_4. The raw 1280-d block-32 tokens would need a 1280 → 1024 Proj and
    would bypass the decoder and adapter; the projected, un-adapted S_4 is the ``final`` argument. With S* = Ŝ_4,
    "w/o Adapter" also changes what SEM reads (S_4), as it changes every Ŝ_i that SEM adds to.
    """

    def __init__(self, dim: int = 1024, n_stages: int = 4, *, seed: int = 0) -> None:
        super().__init__()
        if dim < 1 or n_stages < 1:
            raise ConfigError(f"StageEnhancement(dim={dim}, n_stages={n_stages}): both must be ≥ 1.")
        self.dim, self.n_stages = dim, n_stages
        with _seeded(seed):
            self.proj = nn.ModuleList(nn.Conv2d(dim, dim, kernel_size=1) for _ in range(n_stages))
            self.conv = nn.ModuleList(nn.Conv2d(dim, dim, kernel_size=3, padding=1) for _ in range(n_stages))
        for conv in self.conv:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, stages: Sequence[Tensor], final: Tensor | None = None) -> list[Tensor]:
        """Enhanced tokens, one [B, N_i, D] per stage (N_i square)."""
        _check_stage_list(stages, self.n_stages, self.dim, "StageEnhancement")
        final = stages[-1] if final is None else final
        _check_stage_list([final], 1, self.dim, "StageEnhancement final")
        batch, n_final, _ = final.shape
        side = _grid_side(n_final, "StageEnhancement final stage")
        grid = final.transpose(1, 2).reshape(batch, self.dim, side, side)
        out = []
        for i, (tokens, proj, conv) in enumerate(zip(stages, self.proj, self.conv, strict=True)):
            target = _grid_side(tokens.shape[1], f"StageEnhancement stage {i}")
            projected = proj(grid)
            if target != side:
                projected = F.interpolate(projected, size=(target, target), mode="bilinear", align_corners=False)
            out.append(tokens + conv(projected).flatten(2).transpose(1, 2))
        return out


class PatchPromptEmbedder(nn.Module):
    """PEM (Eq. 8–11): stage maps [B, C, H, W] → [B, n_base + K, dim_out] LLM prompt embeddings.

    The maps are cut into P×P patches (224/16 = 14×14 = 196 patches); each patch (C·P·P values,
    channel-major) is flattened and L2-normalised, mapped by a 2-layer MLP (Linear → GELU → Linear,
    hidden width ``hidden``, default ``dim_out`` as in LLaVA-1.5's projector) to ``dim_out``, and the
    patch embeddings are averaged in K = grid² groups: a grid×grid partition of the patch grid,
    row-major like the position words. Patch row r belongs to group row ⌊grid·(r + ½)/n⌋ (its centre's
    cell under the position-word rule of :mod:`siad.llm.answers`): for 14 patches and grid 3 the
    groups hold rows 0–4, 5–8 and 9–13 (5, 4, 5 patches; pixels 0–79, 80–143, 144–223), same for columns.
    ``n_base`` learnable base prompts (randn, like AnomalyGPT's) come first, so at the defaults
    (C=4, P=16, grid 3, n_base 9) it returns [B, 18, dim_out] like ``ConvPromptLearner``.

    ``normalize_patches=False`` skips the per-patch L2-normalisation (the spec's Eq. 9 normalises, which
    discards each patch's overall magnitude; the switch keeps it). Built under ``seed``.
    """

    def __init__(
        self,
        dim_out: int = 4096,
        *,
        in_channels: int = 4,
        image_size: int = 224,
        patch_size: int = 16,
        grid: int = 3,
        hidden: int | None = None,
        n_base: int = 9,
        normalize_patches: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if min(dim_out, in_channels, patch_size, grid) < 1 or n_base < 0 or image_size % patch_size:
            raise ConfigError(
                f"PatchPromptEmbedder(dim_out={dim_out}, in_channels={in_channels}, image_size={image_size}, "
                f"patch_size={patch_size}, grid={grid}, n_base={n_base}): sizes must be ≥ 1 (n_base ≥ 0) and "
                "image_size a multiple of patch_size."
            )
        n_side = image_size // patch_size
        if grid > n_side:
            raise ConfigError(f"PatchPromptEmbedder: {grid}×{grid} groups need at least {grid} patches per side.")
        self.dim_out, self.in_channels, self.image_size = dim_out, in_channels, image_size
        self.patch_size, self.grid, self.n_base = patch_size, grid, n_base
        self.normalize_patches = normalize_patches
        rows = torch.clamp((grid * (2 * torch.arange(n_side) + 1)) // (2 * n_side), max=grid - 1)
        group = (rows[:, None] * grid + rows[None, :]).flatten()  # [N] group of each row-major patch
        weights = F.one_hot(group, grid * grid).T.float()
        self.register_buffer("patch_group", group, persistent=False)
        self.register_buffer("group_weights", weights / weights.sum(dim=1, keepdim=True), persistent=False)
        width = hidden or dim_out
        with _seeded(seed):
            self.mlp = nn.Sequential(
                nn.Linear(in_channels * patch_size**2, width), nn.GELU(), nn.Linear(width, dim_out)
            )
            self.base_prompts = nn.Parameter(torch.randn(n_base, dim_out))

    def forward(self, maps: Tensor) -> Tensor:
        """Embeddings [B, n_base + grid², dim_out]: base prompts, then the group tokens row-major."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if maps.dim() != 4 or tuple(maps.shape[1:]) != expected:
            raise ConfigError(
                f"PatchPromptEmbedder expects stage maps [B, {', '.join(map(str, expected))}], got "
                f"{tuple(maps.shape)}; stack the abnormal channel of each stage at size {self.image_size}."
            )
        patches = F.unfold(maps, kernel_size=self.patch_size, stride=self.patch_size).transpose(1, 2)
        if self.normalize_patches:
            patches = F.normalize(patches, dim=-1)
        tokens = torch.einsum("kn,bnd->bkd", self.group_weights.to(patches.dtype), self.mlp(patches))
        base = self.base_prompts.unsqueeze(0).expand(maps.shape[0], -1, -1)
        return torch.cat([base, tokens], dim=1)


class BasePrompts(nn.Module):
    """The ``n_base`` learnable base prompt embeddings alone: [B, n_base, dim_out] whatever the map.

    What reaches the LLM when PEM is removed strictly (``pem: false, pem_substitute: none``): the base prompts
    that PEM and AnomalyGPT's prompt learner put before their map tokens (randn, as released), and no map
    token, so the LLM answers from the image token and these prompts only. Built under ``seed``.
    """

    def __init__(self, dim_out: int = 4096, n_base: int = 9, *, seed: int = 0) -> None:
        super().__init__()
        if dim_out < 1 or n_base < 1:
            raise ConfigError(f"BasePrompts(dim_out={dim_out}, n_base={n_base}): both must be ≥ 1.")
        with _seeded(seed):
            self.base_prompts = nn.Parameter(torch.randn(n_base, dim_out))

    def forward(self, batch: int) -> Tensor:
        """The base prompts repeated for ``batch`` images: [batch, n_base, dim_out]."""
        return self.base_prompts.unsqueeze(0).expand(batch, -1, -1)
