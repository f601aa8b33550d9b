"""Vision-language backbones: the spec registry and the open_clip loader."""

from siad.backbones.openclip import LoadedBackbone, load_openclip, resolve_checkpoint
from siad.backbones.registry import BACKBONES, BackboneSpec, get_backbone_spec

__all__ = ["BACKBONES", "BackboneSpec", "LoadedBackbone", "get_backbone_spec", "load_openclip", "resolve_checkpoint"]
