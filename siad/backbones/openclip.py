"""Build open_clip vision-language backbones from the registry, with or without pretrained weights.

The paper profile loads real weights (downloaded once into a cache); the demo profile builds the same
architecture family from a small config shipped in ``model_configs/`` with seeded random weights. A
missing checkpoint while offline stops with :class:`MissingWeightsError` naming the tag or URL and the
cache. Weights come from, in order: a local ``checkpoint`` file, an explicit ``url`` (downloaded with
open_clip's URL downloader, which checks the sha256 prefix in release file names), or open_clip's own
source for the ``pretrained`` tag (the Hugging Face hub when it has one).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from siad.backbones.registry import MODEL_CONFIG_DIR, BackboneSpec, ensure_model_configs
from siad.errors import ConfigError, MissingWeightsError, UnknownNameError
from siad.files import exclusive_lock

__all__ = ["MODEL_CONFIG_DIR", "LoadedBackbone", "load_openclip", "resolve_checkpoint", "weights_cache_dir"]

ensure_model_configs()


@dataclass
class LoadedBackbone:
    """A frozen open_clip model with its tokenizer and the spec it was built from."""

    spec: BackboneSpec
    model: nn.Module
    tokenizer: open_clip.tokenizer.SimpleTokenizer

    @property
    def random_init(self) -> bool:
        """True when the weights are random (demo/tests): stated on every output."""
        return self.spec.random_init


def weights_cache_dir(cache_dir: str | os.PathLike | None, *, url: bool = False) -> Path:
    """The folder open_clip downloads into: ``cache_dir``, else ``~/.cache/clip`` for URL downloads or the
    Hugging Face hub cache for hub downloads (open_clip's defaults)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if url:
        return Path("~/.cache/clip").expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def download_lock(folder: Path) -> AbstractContextManager[None]:
    """One download into ``folder`` at a time (:func:`~siad.files.exclusive_lock`): open_clip's URL downloader writes
    the weights file in place, so a second job starting meanwhile would read, or download again over, a half-written
    file. Jobs that find the file complete pass after the lock with no network access."""
    return exclusive_lock(Path(folder) / ".siad-download.lock")


def _download_url(spec: BackboneSpec, cache_dir: str | os.PathLike | None) -> str:
    """Fetch ``spec.url`` into the cache (a cached file is reused without network access)."""
    assert spec.url is not None
    try:
        with download_lock(weights_cache_dir(cache_dir, url=True)):
            return open_clip.pretrained.download_pretrained_from_url(
                spec.url, cache_dir=None if cache_dir is None else str(cache_dir)
            )
    except Exception as err:  # URLError, timeouts, checksum mismatch: the user's fix is the same
        where = weights_cache_dir(cache_dir, url=True)
        raise MissingWeightsError(
            f"backbone {spec.name!r}: checkpoint {spec.url} ({spec.arch} / {spec.pretrained}) is not in the "
            f"cache {where} and could not be downloaded ({type(err).__name__}: {err}). Run once with internet "
            f"access, or download that file into {where} yourself (keep its file name: open_clip checks the "
            "sha256 prefix in it), or set `checkpoint: /path/to/file` for this backbone in the config."
        ) from err


def resolve_checkpoint(spec: BackboneSpec, cache_dir: str | os.PathLike | None = None) -> str | None:
    """Return a local checkpoint path for ``spec`` (downloading it if allowed), or None for random init.

    Source order: ``spec.checkpoint`` (a local file); no ``pretrained`` tag means random weights (``url`` is
    then ignored, so ``{"pretrained": None}`` always gives a random model); ``spec.url`` (an explicit URL for
    the tag, overriding open_clip's hub-first choice); else the tag through open_clip.

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
    if spec.url is not None:
        return _download_url(spec, cache_dir)
    pretrained_cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
    if not pretrained_cfg:
        tags = open_clip.list_pretrained_tags_by_model(spec.arch)
        raise UnknownNameError(f"open_clip has no pretrained tag {spec.pretrained!r} for {spec.arch}; known: {tags}")
    folder = None if cache_dir is None else str(cache_dir)
    try:
        with download_lock(weights_cache_dir(cache_dir, url=not pretrained_cfg.get("hf_hub"))):
            return open_clip.download_pretrained(pretrained_cfg, cache_dir=folder)
    except Exception as err:  # network, hub and offline errors all mean the same thing to the user
        where = weights_cache_dir(cache_dir)
        source = pretrained_cfg.get("hf_hub") or pretrained_cfg.get("url")
        raise MissingWeightsError(
            f"backbone {spec.name!r}: pretrained weights {spec.arch} / {spec.pretrained} are not in the cache "
            f"{where} and could not be downloaded ({type(err).__name__}: {err}). Run once with internet "
            f"access (source: {source}), or download the checkpoint yourself and set "
            f"`checkpoint: /path/to/file` for this backbone in the config."
        ) from err


def _native_size(arch: str) -> int | None:
    ensure_model_configs()
    vision = (open_clip.get_model_config(arch) or {}).get("vision_cfg", {})
    size = vision.get("image_size")
    return int(size[0] if isinstance(size, (list, tuple)) else size) if size is not None else None


def set_image_size(visual: nn.Module, image_size: int, *, mode: str = "bicubic", antialias: bool = False) -> None:
    """Resize a built ViT's positional embedding to ``image_size`` in place (CLS row kept, ``F.interpolate`` with
    ``mode`` / ``antialias``, align_corners False) and update its ``image_size`` / ``grid_size``: the load-time
    resize of the older open_clip that AdaCLIP and AA-CLIP vendor (open_clip's own uses antialias)."""
    from siad.backbones.features import resize_positional_embedding

    patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
    grid = image_size // patch
    with torch.no_grad():
        resized = resize_positional_embedding(visual.positional_embedding.data, grid, mode=mode, antialias=antialias)
    visual.positional_embedding = nn.Parameter(resized, requires_grad=visual.positional_embedding.requires_grad)
    visual.image_size = (image_size, image_size)
    visual.grid_size = (grid, grid)


def load_openclip(
    spec: BackboneSpec,
    *,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedBackbone:
    """Build ``spec``'s model in eval mode with frozen weights (random init is seeded by ``seed``).

    Raises:
        ConfigError: the spec's taps name blocks the architecture does not have.
        UnknownNameError, MissingWeightsError: see :func:`resolve_checkpoint`.
    """
    if spec.taps and spec.taps[-1] >= spec.n_blocks:
        raise ConfigError(
            f"backbone {spec.name!r}: taps {list(spec.taps)} exceed the {spec.n_blocks} blocks of {spec.arch} "
            "(taps are 0-indexed block indices); fix `taps` for this backbone"
        )
    if spec.checkpoint_format not in ("open_clip", "imagebind"):
        raise ConfigError(f"backbone {spec.name!r}: checkpoint_format must be 'open_clip' or 'imagebind'")
    checkpoint = resolve_checkpoint(spec, cache_dir)
    imagebind = spec.checkpoint_format == "imagebind" and checkpoint is not None
    torch.manual_seed(seed)
    native = _native_size(spec.arch)
    resize_here = (spec.pos_resize == "bicubic" and checkpoint is not None and not imagebind
                   and native != spec.image_size)
    model = open_clip.create_model(
        spec.arch,
        pretrained=None if imagebind else checkpoint,
        force_quick_gelu=spec.quick_gelu,
        force_image_size=native if resize_here else spec.image_size,
        device=device,
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    if resize_here:
        set_image_size(model.visual, spec.image_size, mode="bicubic", antialias=False)
    if imagebind:
        from siad.backbones.imagebind import load_imagebind_into_openclip

        load_imagebind_into_openclip(model, checkpoint, strict=True)
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(spec.arch)
    return LoadedBackbone(spec=spec, model=model, tokenizer=tokenizer)
