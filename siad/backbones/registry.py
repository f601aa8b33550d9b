"""The registry of backbone specs: every pretrained model is named here, with its source and settings.

A spec pins what makes results reproducible: the open_clip architecture, the pretrained tag, the input
size and the GELU flavour (OpenAI checkpoints need QuickGELU; open_clip only warns on a mismatch).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from siad.errors import ConfigError
from siad.registry import Registry

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone.

    Attributes:
        name: registry key used in configs.
        arch: open_clip architecture name (built-in or a JSON in ``model_configs/``).
        pretrained: open_clip pretrained tag; None builds seeded random weights (demo, tests).
        image_size: input side in pixels (positional embeddings are resized if it differs from the
            architecture's native size).
        quick_gelu: use QuickGELU activations (required by OpenAI's CLIP weights).
        checkpoint: optional local checkpoint file that replaces the tag's download.
        mean, std: input normalisation.
    """

    name: str
    arch: str
    pretrained: str | None
    image_size: int
    quick_gelu: bool = False
    checkpoint: str | None = None
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def _add(spec: BackboneSpec) -> None:
    BACKBONES.add(spec.name, spec)


# OpenAI CLIP ViT-L/14 at 336 px, as the CLIP rows of the SIAD-LLM tables use it.
_add(BackboneSpec("openai-vit-l-14-336", "ViT-L-14-336", "openai", 336, quick_gelu=True))
# Tiny random-initialised ViT of the same family (demo profile and tests).
_add(BackboneSpec("tiny-vit-demo", "tiny-ViT-demo", None, 64))


def get_backbone_spec(name: str, overrides: Mapping[str, Any] | None = None) -> BackboneSpec:
    """Look up ``name`` and apply per-run overrides (e.g. ``image_size`` or a local ``checkpoint``)."""
    spec = BACKBONES.get(name)
    if not overrides:
        return spec
    unknown = (set(overrides) - set(BackboneSpec.__dataclass_fields__)) | ({"name"} & set(overrides))
    if unknown:
        raise ConfigError(f"backbone {name!r}: unknown override(s) {sorted(unknown)}")
    return replace(spec, **overrides)
