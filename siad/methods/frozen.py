"""Frozen backbone passes that several methods share, computed once per image content.

AdaCLIP's dynamic prompts start from the unprompted image embedding g₀ = ln_post(CLS) @ proj, and AA-CLIP's
stage-1 features add its L2 normalisation ĝ: on the same backbone (the exact-GELU OpenAI ViT-L/14@336 at 518) it is
the same pass. :class:`ImageEmbeddings` computes it with open_clip's own ``encode_image`` (not normalised) and, when
a feature-cache folder is configured, stores it under a method-neutral namespace (feature ``image_embedding``), so
a second method, variant, setting or seed reads it instead of running the ViT again.

Cache keys are image *contents* (:func:`content_keys`, :func:`batch_content_keys`): a training item's
``image_sha256``, the file's SHA-256 at evaluation, else a SHA-256 of the input tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from siad.backbones.cache import FeatureCache, backbone_namespace
from siad.backbones.openclip import LoadedBackbone
from siad.files import file_fingerprint
from siad.methods.base import Choice, Flag, ParamRule, Text

__all__ = [
    "CACHE_DEFAULTS", "CACHE_DTYPES", "CACHE_RULES", "ImageEmbeddings", "batch_content_keys", "cached_rows",
    "content_keys",
]

#: Storage dtypes of a method's frozen-feature cache (float16 halves it; the values used are what was stored).
CACHE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
#: The engineering parameters every method with frozen passes shares (not in any release).
CACHE_DEFAULTS: dict[str, Any] = {
    "feature_cache": None,  # folder of the frozen-feature cache (None: frozen features kept in memory for one fit)
    "feature_cache_dtype": "float32",
    "progress": True,
}
CACHE_RULES: dict[str, ParamRule] = {
    "feature_cache": Text(),
    "feature_cache_dtype": Choice(CACHE_DTYPES),
    "progress": Flag(),
}


def content_keys(images: Tensor, sha256s: Sequence[str] | None = None) -> list[str]:
    """One cache key per image of [B, 3, S, S]: ``sha256/<hex>`` of the image file when known (``sha256s[i]``, a
    training item's ``image_sha256``), else ``tensor-sha256/<hex>`` of the input tensor's float32 bytes."""
    keys = []
    for i, image in enumerate(images):
        known = sha256s[i] if sha256s is not None else ""
        if known:
            keys.append(f"sha256/{known}")
        else:
            data = image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
            keys.append(f"tensor-sha256/{hashlib.sha256(data).hexdigest()}")
    return keys


def batch_content_keys(batch: Mapping[str, Any]) -> list[str]:
    """Content keys of an evaluation batch: the files' SHA-256 (``image_file``) when the engine gave the paths, else
    :func:`content_keys` of the batch (``image_sha256`` when present)."""
    files = batch.get("image_file")
    if files:
        return [f"sha256/{file_fingerprint(f, content=True).removeprefix('sha256=')}" for f in files]
    return content_keys(batch["image"], batch.get("image_sha256"))


def cached_rows(cache: FeatureCache, keys: Sequence[str], compute: Callable[[list[int]], dict[str, Tensor]]
                ) -> dict[str, Tensor]:
    """``cache.get_or_compute`` for per-image keys that may repeat (the same image twice in a batch, which the cache
    refuses in one call): each distinct key is read or computed once, ``compute(positions into keys)`` for the
    missing ones, and the rows come back in ``keys`` order as float32."""
    unique = list(dict.fromkeys(keys))
    first = [list(keys).index(k) for k in unique]
    cached = cache.get_or_compute(unique, lambda positions: compute([first[i] for i in positions]))
    where = torch.tensor([unique.index(k) for k in keys])
    return {name: tensor.float()[where] for name, tensor in cached.items()}


class ImageEmbeddings:
    """The unmodified backbone's image embedding ln_post(CLS) @ proj [B, E] (float32, CPU, not normalised).

    Args:
        backbone: the loaded backbone (frozen; run at its built size).
        weights_seed: the seed of random stand-in weights (part of the cache namespace).
        cache_dir: feature-cache folder, or None (computed every call).
        store_dtype: storage dtype of the cache; the values returned are always what was stored, so a run
            with or without a cache gives the same numbers.
    """

    FEATURE = "image_embedding"

    def __init__(self, backbone: LoadedBackbone, weights_seed: int, cache_dir: str | Path | None = None,
                 store_dtype: torch.dtype = torch.float32) -> None:
        self.backbone = backbone
        self.store_dtype = store_dtype
        self._cache: FeatureCache | None = None
        if cache_dir is not None:
            namespace = backbone_namespace(backbone.spec, taps=[], seed=weights_seed, feature=self.FEATURE,
                                           code_modules=(__name__,))
            self._cache = FeatureCache(Path(cache_dir), namespace, store_dtype=store_dtype)

    @torch.no_grad()
    def compute(self, images: Tensor) -> Tensor:
        """open_clip ``encode_image`` of images [B, 3, S, S] on the backbone's device, stored form, on the CPU."""
        model = self.backbone.model
        device = next(model.parameters()).device
        out = model.encode_image(images.to(device)).float()
        return out.to("cpu").to(self.store_dtype).to(torch.float32)

    def __call__(self, images: Tensor, keys: Sequence[str] | None = None) -> Tensor:
        """[B, E] for images [B, 3, S, S]; read from / written to the cache when one is set and ``keys`` given."""
        if self._cache is None or not keys:
            return self.compute(images)
        return cached_rows(self._cache, keys, lambda positions: {"embedding": self.compute(images[positions])})[
            "embedding"]
