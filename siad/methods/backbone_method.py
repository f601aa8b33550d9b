"""The base of methods built on one open_clip backbone from the registry.

It owns what every such method shares: the backbone parameters of the config, loading (pretrained,
local checkpoint or random weights), the image transform and the demo stamp, so a baseline module
only adds its own computation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from PIL import Image
from torchvision import transforms

from siad.backbones import BACKBONES, BackboneSpec, LoadedBackbone, get_backbone_spec, load_openclip
from siad.methods.base import Choice, Flag, Method, Number, ParamRule, Registered, Text

BACKBONE_DEFAULTS: dict[str, Any] = {
    "backbone": None,  # registry name (siad/backbones/registry.py); each method sets its paper default
    "image_size": None,  # None = the backbone spec's size
    "checkpoint": None,  # optional local checkpoint replacing the tag download
    "checkpoint_format": None,  # None = the spec's; "imagebind" reads the original imagebind_huge.pth
    "weights_dir": None,  # open_clip download cache (None = open_clip's default)
    "random_init": False,  # build the architecture with random weights (speed benchmark, tests)
}
BACKBONE_RULES: dict[str, ParamRule] = {
    "backbone": Registered(BACKBONES),  # checked against siad/backbones/registry.py: a lookup, nothing loaded
    "image_size": Number(low=16, integer=True, optional=True),
    "checkpoint": Text(),
    "checkpoint_format": Choice((None, "open_clip", "imagebind")),
    "weights_dir": Text(),
    "random_init": Flag(),
}


def image_transform(
    size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Callable[[Image.Image], torch.Tensor]:
    """Squash-resize to ``size``² (bicubic, so maps align with full-image masks) and normalise."""
    return transforms.Compose(
        [
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


class BackboneMethod(Method):
    """A :class:`Method` whose images go through one registry backbone (``self.backbone``)."""

    defaults: ClassVar[Mapping[str, Any]] = BACKBONE_DEFAULTS
    param_rules: ClassVar[Mapping[str, ParamRule]] = BACKBONE_RULES

    def __init__(self, params: Mapping[str, Any] | None = None, *, device: str = "cpu", seed: int = 0,
                 weights_seed: int | None = None) -> None:
        # validates every parameter before any download
        super().__init__(params, device=device, seed=seed, weights_seed=weights_seed)
        self.backbone: LoadedBackbone = load_openclip(
            self.backbone_spec(), cache_dir=self.params["weights_dir"], device=device, seed=self.weights_seed
        )
        spec = self.backbone.spec
        self._transform = image_transform(spec.image_size, spec.mean, spec.std)

    #: The parameters that override the registry spec of the backbone. A method that runs the backbone at another
    #: size than it is built at (AnomalyCLIP: built at 336 px, run at 518 px) leaves ``image_size`` out.
    backbone_overrides: ClassVar[tuple[str, ...]] = ("image_size", "checkpoint", "checkpoint_format")

    def backbone_spec(self) -> BackboneSpec:
        """The registry spec with this run's overrides (input size, local checkpoint, random weights)."""
        overrides = {k: self.params[k] for k in self.backbone_overrides if self.params[k] is not None}
        if self.params["random_init"]:
            overrides.update(pretrained=None, checkpoint=None)
        return get_backbone_spec(self.params["backbone"], overrides)

    @property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return self._transform

    @property
    def input_size(self) -> int:
        return self.backbone.spec.image_size

    @property
    def random_init(self) -> bool:
        return self.backbone.random_init
