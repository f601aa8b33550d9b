"""Zero-shot CLIP, the "CLIP" row of the SIAD-LLM tables.

Text side: the compositional prompt ensemble of SIAD-LLM Appendix D (7 normal and 5 abnormal state
phrases × 2 templates), averaged per state into one (normal, abnormal) feature pair per class.
Image score: softmax over (normal, abnormal) of ``logit_scale · cos(global image embedding, text)``.
Pixel map: the same softmax on every projected last-layer patch token (``ln_post`` + ``proj``), the
abnormal probability on the patch grid upsampled bilinearly to the input size.
Paper profile: OpenAI ViT-L/14 at 336 px with QuickGELU (the weights were trained with it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from siad.backbones import get_backbone_spec, load_openclip
from siad.methods import METHODS, Batch, Method
from siad.prompts import ENSEMBLES, encode_state_features


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


@METHODS.register("clip")
class ZeroShotCLIP(Method):
    """Training-free CLIP with a prompt ensemble (image score from CLS, map from patch tokens)."""

    training_free: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {
        "backbone": "openai-vit-l-14-336",
        "image_size": None,  # None = the backbone spec's size
        "checkpoint": None,  # optional local checkpoint replacing the tag download
        "ensemble": "siad_appendix_d",
        "logit_scale": 100.0,
        "weights_dir": None,  # open_clip download cache (None = Hugging Face default)
        "random_init": False,  # build the architecture with random weights (speed benchmark, tests)
    }

    def __init__(self, params=None, *, device: str = "cpu", seed: int = 0) -> None:
        super().__init__(params, device=device, seed=seed)
        overrides = {k: self.params[k] for k in ("image_size", "checkpoint") if self.params[k] is not None}
        if self.params["random_init"]:
            overrides.update(pretrained=None, checkpoint=None)
        spec = get_backbone_spec(self.params["backbone"], overrides)
        self.backbone = load_openclip(spec, cache_dir=self.params["weights_dir"], device=device, seed=seed)
        self.ensemble = ENSEMBLES.get(self.params["ensemble"])
        self._input_size = spec.image_size
        self._transform = image_transform(spec.image_size, spec.mean, spec.std)
        self._text_features: dict[str, torch.Tensor] = {}

    @property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return self._transform

    @property
    def input_size(self) -> int:
        return self._input_size

    @property
    def random_init(self) -> bool:
        return self.backbone.random_init

    def text_features(self, cls_name: str) -> torch.Tensor:
        """(normal, abnormal) text features [2, D] of a class, computed once."""
        if cls_name not in self._text_features:
            self._text_features[cls_name] = encode_state_features(
                self.backbone.model, self.backbone.tokenizer, self.ensemble, cls_name
            )
        return self._text_features[cls_name]

    @torch.no_grad()
    def predict(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["image"].to(self.device)
        global_features, patch_features = self.encode_image(images)
        text = torch.stack([self.text_features(c) for c in batch["cls_name"]])  # [B, 2, D]
        scale = self.params["logit_scale"]
        image_probs = (scale * torch.einsum("bd,bkd->bk", global_features, text)).softmax(dim=-1)
        patch_probs = (scale * torch.einsum("bnd,bkd->bnk", patch_features, text)).softmax(dim=-1)
        grid = int(round(patch_probs.shape[1] ** 0.5))
        maps = patch_probs[..., 1].reshape(-1, 1, grid, grid)
        maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return image_probs[:, 1], maps[:, 0]

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised global embedding [B, D] and projected patch tokens [B, N, D]."""
        visual = self.backbone.model.visual
        out = visual.forward_intermediates(
            images, indices=[len(visual.transformer.resblocks) - 1], normalize_intermediates=True, output_fmt="NLC"
        )
        patches = out["image_intermediates"][-1] @ visual.proj
        return F.normalize(out["image_features"], dim=-1), F.normalize(patches, dim=-1)
