"""The registry of backbone specs: every pretrained model is named here, with its source and settings.

A spec pins what makes results reproducible: the open_clip architecture, the pretrained tag (or an
explicit checkpoint URL), the input size, the GELU flavour (OpenAI checkpoints were trained with
QuickGELU; open_clip only warns on a mismatch, and several baselines knowingly run exact GELU on them),
and the default stage taps. Tiny random-initialised stand-ins of each family (JSON configs in
``model_configs/``) let the demo profile and the tests run the same code paths offline.

Block indices (``taps``) are 0-indexed positions in ``visual.transformer.resblocks``: the tap ``i``
is the residual stream *after* block ``i`` (so the papers' 1-indexed "layer 6" is ``5``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from siad.errors import ConfigError, UnknownNameError
from siad.registry import Registry

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_CONFIGS_ADDED = False


def ensure_model_configs() -> None:
    """Make the tiny architectures in ``model_configs/`` known to open_clip (idempotent)."""
    global _CONFIGS_ADDED
    if not _CONFIGS_ADDED:
        import open_clip

        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _CONFIGS_ADDED = True


@cache
def vision_config(arch: str) -> dict[str, Any]:
    """The ``vision_cfg`` of an open_clip architecture (built-in or shipped in ``model_configs/``)."""
    import open_clip

    ensure_model_configs()
    config = open_clip.get_model_config(arch)
    if not config or "vision_cfg" not in config:
        raise UnknownNameError(
            f"open_clip has no architecture {arch!r}; use one of open_clip.list_models() or add a JSON "
            f"config to {MODEL_CONFIG_DIR}"
        )
    return dict(config["vision_cfg"])


def _side(value: int | tuple[int, int] | list[int], what: str, arch: str) -> int:
    if isinstance(value, int):
        return value
    if len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise ConfigError(f"architecture {arch!r}: non-square {what} {value} is not supported")


#: Load-time resizes of the positional embedding (see ``BackboneSpec.pos_resize``).
POS_RESIZES: tuple[str, ...] = ("open_clip", "bicubic")


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone.

    Attributes:
        name: registry key used in configs.
        arch: open_clip architecture name (built-in or a JSON in ``model_configs/``).
        pretrained: open_clip pretrained tag; None (and no ``checkpoint``) builds seeded random weights
            (demo, tests, timing at the paper architecture), whatever ``url`` says.
        image_size: input side in pixels (positional embeddings are resized when loading weights of another
            size: see ``pos_resize``).
        quick_gelu: use QuickGELU activations (what OpenAI's CLIP weights were trained with).
        checkpoint: optional local checkpoint file that replaces any download.
        checkpoint_format: ``open_clip`` (default) or ``imagebind`` for the original ``imagebind_huge.pth``,
            whose keys are mapped onto the open_clip ViT-H-14 by :mod:`siad.backbones.imagebind`.
        mean, std: input normalisation.
        taps: default stage taps, 0-indexed block indices (the stream after each listed block).
        url: explicit checkpoint URL for the ``pretrained`` tag, overriding open_clip's choice of source
            (open_clip prefers the Hugging Face hub, which is not always the same file as the URL).
        pos_resize: how loaded weights of another size get their positional embedding resized: ``open_clip``
            (its ``resize_pos_embed``: bicubic with antialias) or ``bicubic`` (bicubic without antialias, CLS row
            kept: the older open_clip that AdaCLIP and AA-CLIP vendor; the two differ by ~1e-2).
    """

    name: str
    arch: str
    pretrained: str | None
    image_size: int
    quick_gelu: bool = False
    checkpoint: str | None = None
    checkpoint_format: str = "open_clip"  # or "imagebind": the original imagebind_huge.pth (keys are mapped)
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    taps: tuple[int, ...] = ()
    url: str | None = None
    pos_resize: str = "open_clip"

    def __post_init__(self) -> None:
        if self.pos_resize not in POS_RESIZES:
            raise ConfigError(f"backbone {self.name!r}: pos_resize {self.pos_resize!r}; use one of {list(POS_RESIZES)}")
        taps = tuple(self.taps)  # configs give lists
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in taps):
            raise ConfigError(f"backbone {self.name!r}: taps must be non-negative block indices, got {list(taps)}")
        if list(taps) != sorted(set(taps)):
            raise ConfigError(f"backbone {self.name!r}: taps must be strictly increasing, got {list(taps)}")
        object.__setattr__(self, "taps", taps)
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))

    @property
    def patch_size(self) -> int:
        """Patch side in pixels, read from the open_clip config."""
        return _side(vision_config(self.arch)["patch_size"], "patch size", self.arch)

    @property
    def grid(self) -> int:
        """Patches per side at ``image_size`` (e.g. 518 // 14 = 37)."""
        return self.image_size // self.patch_size

    @property
    def n_blocks(self) -> int:
        """Number of transformer blocks of the vision tower."""
        return int(vision_config(self.arch)["layers"])

    @property
    def random_init(self) -> bool:
        """True when no weights are loaded: the model is seeded random (demo/tests)."""
        return self.pretrained is None and self.checkpoint is None


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def _add(spec: BackboneSpec) -> None:
    BACKBONES.add(spec.name, spec)


L14_TAPS = (5, 11, 17, 23)  # layers 6/12/18/24 (1-indexed) of ViT-L/14
B16_PLUS_TAPS = (2, 5, 8, 11)  # AnoVL's `--features_list 3 6 9 12`
H14_TAPS = (7, 15, 23, 31)  # ImageBind/AnomalyGPT: after blocks 8/16/24/32

# OpenAI CLIP ViT-L/14 at its native 336 px with QuickGELU: the CLIP rows of the SIAD-LLM tables.
_add(BackboneSpec("openai-vit-l-14-336", "ViT-L-14-336", "openai", 336, quick_gelu=True, taps=L14_TAPS))
# The same weights at 518 px (37x37 grid). FiLo, AdaCLIP and AA-CLIP build the model from a config without
# quick_gelu, so they run *exact* GELU on OpenAI weights (spec: reproduce this); AnomalyCLIP keeps QuickGELU.
# AA-CLIP's loader resizes the positional embedding 24 -> 37 as open_clip does (bicubic with antialias) ...
_add(BackboneSpec("openai-vit-l-14-336-518-gelu", "ViT-L-14-336", "openai", 518, quick_gelu=False, taps=L14_TAPS))
# ... AdaCLIP's vendored open_clip without antialias (the two tables differ by ~1e-2).
_add(BackboneSpec("openai-vit-l-14-336-518-gelu-noantialias", "ViT-L-14-336", "openai", 518, quick_gelu=False,
                  taps=L14_TAPS, pos_resize="bicubic"))
# QuickGELU at 518 with open_clip's bicubic load-time resize. AnomalyCLIP does NOT use this entry: it builds
# `openai-vit-l-14-336` at 336 and resizes the positional embedding bilinearly at run time, as its release does.
_add(BackboneSpec("openai-vit-l-14-336-518-quickgelu", "ViT-L-14-336", "openai", 518, quick_gelu=True, taps=L14_TAPS))
# AnoVL (and WinCLIP): ViT-B-16-plus-240, LAION-400M. The released AnoVL code uses `laion400m_e32`
# (test_zero_shot.sh); the paper says e31. open_clip 3.3's cfg for this tag points its `hf_hub` at the
# *e31* timm repo and prefers the hub, so the e32 release URL is pinned explicitly (sha256 prefix in the
# file name, checked by open_clip).
_add(
    BackboneSpec(
        "laion400m-vit-b-16-plus-240",
        "ViT-B-16-plus-240",
        "laion400m_e32",
        240,
        taps=B16_PLUS_TAPS,
        url="https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights/"
        "vit_b_16_plus_240-laion400m_e32-699c4b84.pt",
    )
)
# ImageBind-Huge vision tower substitute (AnomalyGPT, SIAD-LLM): ImageBind froze these OpenCLIP ViT-H/14
# weights (spec §1 "Substitute"); exact GELU, 224 px, 16x16 grid, taps after blocks 8/16/24/32.
_add(BackboneSpec("imagebind-huge", "ViT-H-14", "laion2b_s32b_b79k", 224, taps=H14_TAPS))

# Tiny random-initialised stand-ins (demo profile and tests): same code paths, seconds on a CPU.
# tiny-vit-demo: the CLIP baseline's demo model (4 blocks, width 64, patch 8, 64 px: 8x8 grid); its taps
# are every block, the ViT-L/14 taps 6/12/18/24 scaled to 4 blocks.
_add(BackboneSpec("tiny-vit-demo", "tiny-ViT-demo", None, 64, taps=(0, 1, 2, 3)))
# tiny-vit-l14-demo: ViT-L/14-shaped stand-in for the 518-px CLIP-family entries (8 blocks, patch 14,
# 112 px: 8x8 grid), taps 6/12/18/24 of 24 scaled to 2/4/6/8 of 8.
_add(BackboneSpec("tiny-vit-l14-demo", "tiny-ViT-L-14-demo", None, 112, taps=(1, 3, 5, 7)))
# tiny-vit-l14-quickgelu-demo: AnomalyCLIP's demo stand-in for the QuickGELU OpenAI ViT-L/14@336 (built at its native
# size, run larger with AnomalyCLIP's run-time bilinear resize of the positional embedding): 8 blocks, patch 14,
# built at 56 px (4x4 grid) and run at 112 px (8x8 grid); a 12-block text tower so the 8 compound prompts of depth 9
# run as in the paper. Taps 6/12/18/24 of 24 scaled to 2/4/6/8 of 8.
_add(BackboneSpec("tiny-vit-l14-quickgelu-demo", "tiny-ViT-L-14-quickgelu-demo", None, 56, quick_gelu=True,
                  taps=(1, 3, 5, 7)))
# tiny-vit-l14-gelu-demo: AdaCLIP's and AA-CLIP's demo stand-in for the exact-GELU OpenAI ViT-L/14@336 run at 518
# (8 blocks, patch 14, 112 px: 8x8 grid); a 12-block text tower so text prompts / adapters before text blocks 1..3
# run as in the paper. Taps 6/12/18/24 of 24 scaled to 2/4/6/8 of 8.
_add(BackboneSpec("tiny-vit-l14-gelu-demo", "tiny-ViT-L-14-gelu-demo", None, 112, taps=(1, 3, 5, 7)))
# tiny-vit-b16plus-demo: ViT-B/16+-shaped stand-in for AnoVL (12 blocks so "V-V on all 12 blocks" runs as
# in the paper; width 48, patch 16, 112 px: 7x7 grid, odd like the real 15x15); AnoVL's taps 3/6/9/12.
_add(BackboneSpec("tiny-vit-b16plus-demo", "tiny-ViT-B-16-plus-demo", None, 112, taps=B16_PLUS_TAPS))
# tiny-vit-h14-demo: ViT-H/14-shaped stand-in for ImageBind-Huge (8 blocks, patch 14, 112 px: 8x8 grid);
# taps after blocks 2/4/6/8, the 8/16/24/32 of 32 scaled to 8 blocks.
_add(BackboneSpec("tiny-vit-h14-demo", "tiny-ViT-H-14-demo", None, 112, taps=(1, 3, 5, 7)))


def text_layers(arch: str) -> int:
    """Blocks of the text tower of an open_clip architecture (read from its config, nothing built)."""
    import open_clip

    ensure_model_configs()
    return int((open_clip.get_model_config(arch) or {}).get("text_cfg", {}).get("layers", 0))


def get_backbone_spec(name: str, overrides: Mapping[str, Any] | None = None) -> BackboneSpec:
    """Look up ``name`` and apply per-run overrides (e.g. ``image_size``, ``taps`` or a local ``checkpoint``)."""
    spec = BACKBONES.get(name)
    if not overrides:
        return spec
    unknown = (set(overrides) - set(BackboneSpec.__dataclass_fields__)) | ({"name"} & set(overrides))
    if unknown:
        raise ConfigError(f"backbone {name!r}: unknown override(s) {sorted(unknown)}")
    return replace(spec, **overrides)
