"""Build open_clip vision-language backbones from the registry, with or without pretrained weights.

The paper profile loads real weights (downloaded once into a cache); the demo profile builds the same
architecture family from a small config shipped in ``model_configs/`` with seeded random weights. A
missing checkpoint while offline stops with :class:`MissingWeightsError` naming the tag and the cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from siad.backbones.registry import BackboneSpec
from siad.errors import MissingWeightsError, UnknownNameError

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass
class LoadedBackbone:
    """A frozen open_clip model with its tokenizer and the spec it was built from."""

    spec: BackboneSpec
    model: nn.Module
    tokenizer: open_clip.tokenizer.SimpleTokenizer

    @property
    def random_init(self) -> bool:
        """True when the weights are random (demo/tests): stated on every output."""
        return self.spec.pretrained is None and self.spec.checkpoint is None


def weights_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The folder open_clip downloads into (``cache_dir`` or the Hugging Face hub cache)."""
    if cache_dir is not None:
        return Path(cache_dir)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_checkpoint(spec: BackboneSpec, cache_dir: str | os.PathLike | None = None) -> str | None:
    """Return a local checkpoint path for ``spec`` (downloading it if allowed), or None for random init.

    Raises:
        UnknownNameError: the architecture has no such pretrained tag in open_clip.
        MissingWeightsError: the weights are neither cached nor downloadable (offline).
    """
    if spec.checkpoint is not None:
        path = Path(spec.checkpoint).expanduser()
        if not path.is_file():
            raise MissingWeightsError(
                f"backbone {spec.name!r}: checkpoint file {path} does not exist; fix `checkpoint` in the "
                "backbone config or remove it to download the tag automatically"
            )
        return str(path)
    if spec.pretrained is None:
        return None
    pretrained_cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
    if not pretrained_cfg:
        tags = open_clip.list_pretrained_tags_by_model(spec.arch)
        raise UnknownNameError(f"open_clip has no pretrained tag {spec.pretrained!r} for {spec.arch}; known: {tags}")
    try:
        return open_clip.download_pretrained(pretrained_cfg, cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as err:  # network, hub and offline errors all mean the same thing to the user
        where = weights_cache_dir(cache_dir)
        source = pretrained_cfg.get("hf_hub") or pretrained_cfg.get("url")
        raise MissingWeightsError(
            f"backbone {spec.name!r}: pretrained weights {spec.arch} / {spec.pretrained} are not in the cache "
            f"{where} and could not be downloaded ({type(err).__name__}: {err}). Run once with internet "
            f"access (source: {source}), or download the checkpoint yourself and set "
            f"`checkpoint: /path/to/file` for this backbone in the config."
        ) from err


def load_openclip(
    spec: BackboneSpec,
    *,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedBackbone:
    """Build ``spec``'s model in eval mode with frozen weights (random init is seeded by ``seed``)."""
    checkpoint = resolve_checkpoint(spec, cache_dir)
    torch.manual_seed(seed)
    model = open_clip.create_model(
        spec.arch,
        pretrained=checkpoint,
        force_quick_gelu=spec.quick_gelu,
        force_image_size=spec.image_size,
        device=device,
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(spec.arch)
    return LoadedBackbone(spec=spec, model=model, tokenizer=tokenizer)
