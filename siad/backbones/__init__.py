"""Vision-language backbones: the spec registry, the open_clip loader, stage features and attention variants."""

from siad.backbones.attention import PRESETS, AttentionVariant, VariantFeatures, variant_attention, variant_features
from siad.backbones.features import (
    StageFeatures,
    StreamTaps,
    apply_head,
    image_embedding,
    stage_features,
    tokens_to_grid,
)
from siad.backbones.openclip import LoadedBackbone, load_openclip, resolve_checkpoint
from siad.backbones.registry import BACKBONES, BackboneSpec, get_backbone_spec

__all__ = [
    "BACKBONES",
    "PRESETS",
    "AttentionVariant",
    "BackboneSpec",
    "LoadedBackbone",
    "StageFeatures",
    "StreamTaps",
    "VariantFeatures",
    "apply_head",
    "get_backbone_spec",
    "image_embedding",
    "load_openclip",
    "resolve_checkpoint",
    "stage_features",
    "tokens_to_grid",
    "variant_attention",
    "variant_features",
]
