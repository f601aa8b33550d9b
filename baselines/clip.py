"""Zero-shot CLIP, the "CLIP" row of the SIAD-LLM tables.

Text side: the compositional prompt ensemble of SIAD-LLM Appendix D (7 normal and 5 abnormal state
phrases × 2 templates), averaged per state into one (normal, abnormal) feature pair per class.
Image score: softmax over (normal, abnormal) of ``logit_scale · cos(global image embedding, text)``.
Pixel map: the same softmax on every projected last-layer patch token (``ln_post`` + ``proj``), the
abnormal probability on the patch grid upsampled bilinearly to the input size.
Paper profile: OpenAI ViT-L/14 at 336 px with QuickGELU (the weights were trained with it).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from siad.methods import METHODS, Batch, Number, ParamRule, Registered
from siad.methods.backbone_method import BACKBONE_DEFAULTS, BACKBONE_RULES, BackboneMethod
from siad.prompts import ENSEMBLES, encode_state_features


@METHODS.register("clip")
class ZeroShotCLIP(BackboneMethod):
    """Training-free CLIP with a prompt ensemble (image score from CLS, map from patch tokens)."""

    training_free: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {
        **BACKBONE_DEFAULTS,
        "backbone": "openai-vit-l-14-336",
        "ensemble": "siad_appendix_d",
        "logit_scale": 100.0,
    }
    param_rules: ClassVar[dict[str, ParamRule]] = {
        **BACKBONE_RULES, "ensemble": Registered(ENSEMBLES), "logit_scale": Number(low=0, low_open=True),
    }

    def __init__(self, params=None, *, device: str = "cpu", seed: int = 0,
                 weights_seed: int | None = None) -> None:
        super().__init__(params, device=device, seed=seed, weights_seed=weights_seed)
        self.ensemble = ENSEMBLES.get(self.params["ensemble"])
        self._text_features: dict[str, torch.Tensor] = {}

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
