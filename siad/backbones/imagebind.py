"""Load the real ImageBind-Huge checkpoint (``imagebind_huge.pth``) into an open_clip ViT-H-14 model.

AnomalyGPT and SIAD-LLM use ImageBind-Huge's image encoder. ImageBind initialised and froze its image and
text towers from OpenCLIP ViT-H-14 (``laion2b_s32b_b79k``), so the suite builds that open_clip model and,
for users who have ``imagebind_huge.pth``, copies ImageBind's own weights onto it with the key mapping
below (spec ``baselines_llm_filo_anovl.md`` §1, "Substitute" and "Verification").

Mapping (ImageBind key -> open_clip key; ``{k}`` is a block index; shapes with D width, E embed dim):

* ``modality_preprocessors.vision.rgbt_stem.proj.1.weight`` [D,3,2,p,p] -> ``visual.conv1.weight``
  [D,3,p,p]: sum over the frame axis;
* ``modality_preprocessors.vision.cls_token`` [1,1,D] -> ``visual.class_embedding`` [D];
* ``modality_preprocessors.vision.pos_embedding_helper.pos_embed`` [1,N,D] -> ``visual.positional_embedding``;
* ``modality_trunks.vision.pre_transformer_layer.0.*`` -> ``visual.ln_pre.*``;
* ``modality_trunks.vision.blocks.{k}.{norm_1, attn.in_proj_*, attn.out_proj.*, norm_2, mlp.fc1, mlp.fc2}``
  -> ``visual.transformer.resblocks.{k}.{ln_1, attn.in_proj_*, attn.out_proj.*, ln_2, mlp.c_fc, mlp.c_proj}``;
* ``modality_heads.vision.0.*`` -> ``visual.ln_post.*``; ``modality_heads.vision.2.weight`` [E,D] ->
  ``visual.proj`` [D,E] (transposed);
* ``modality_preprocessors.text.token_embedding.weight`` -> ``token_embedding.weight``;
  ``modality_preprocessors.text.pos_embed`` [1,L,D] -> ``positional_embedding`` [L,D];
* ``modality_trunks.text.blocks.{k}.*`` -> ``transformer.resblocks.{k}.*`` (same block parts as vision);
* ``modality_heads.text.proj.0.*`` -> ``ln_final.*``; ``modality_heads.text.proj.1.weight`` [E,D] ->
  ``text_projection`` [D,E] (transposed);
* ``modality_postprocessors.text.1.log_logit_scale`` -> ``logit_scale`` (both store the log).

Why the stem sums: ImageBind turns an image into a 2-frame clip by repeating it and applies a bias-free
Conv3d with kernel = stride = (2, 14, 14). On identical frames that equals a Conv2d whose kernel is the sum
of the per-frame kernels. The reverse direction (:func:`openclip_to_imagebind`) splits a 2-D kernel into
equal halves per frame: the convention under which ImageBind's stem would reproduce OpenCLIP's ``conv1``.
The spec calls that convention "likely, **not verified**"; it is used here only to make a round trip
testable, and the forward direction (sum) is exact whatever ImageBind did.

Checked, not mapped: ``modality_preprocessors.text.mask`` (ImageBind's causal mask, a buffer) must be the
standard causal mask, which open_clip rebuilds itself (its ``attn_mask`` is not saved in state dicts).

Ignored, and listed in the load report: every key of the audio, depth, thermal and IMU modalities
(their preprocessors, trunks, heads and post-processors). ImageBind trained those towers to match the
frozen image tower; the image-anomaly methods here never see those modalities.

Differences that remain (documented, not hidden):

* LayerNorm eps: ImageBind uses 1e-6 in every block, the pre-LN and the heads; open_clip's ViT-H-14 uses
  1e-5. ``layer_norm_eps=1e-6`` in :func:`load_imagebind_into_openclip` reproduces ImageBind exactly; the
  default leaves open_clip's value (the spec calls the difference negligible).
* ImageBind clips the text logit scale at 100 when it applies it; open_clip does not at inference. Only
  the logits of :class:`open_clip.CLIP.forward` are affected, not the encoded features.
* The number of attention heads is not stored in a state dict: ViT-H-14 has 16 heads in both towers
  (head width 80 in vision), as ImageBind-Huge does. ImageBind uses exact GELU, so the open_clip model
  must be built without QuickGELU (checked).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor, nn

from siad.errors import MissingWeightsError, SiadError

log = logging.getLogger(__name__)

IMAGEBIND_HUGE_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
IMAGEBIND_LAYER_NORM_EPS = 1e-6
IMAGEBIND_STEM_FRAMES = 2

TEXT_MASK_KEY = "modality_preprocessors.text.mask"
IGNORED_MODALITIES = ("audio", "depth", "thermal", "imu")
_MODALITY_GROUPS = ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors")
_IGNORED_PATTERN = re.compile(rf"^(?:{'|'.join(_MODALITY_GROUPS)})\.(?:{'|'.join(IGNORED_MODALITIES)})\.")
_BLOCK = r"(?P<k>\d+)"


# ----------------------------------------------------------------------------------------------- transforms


def _identity(t: Tensor) -> Tensor:
    return t


def _transpose(t: Tensor) -> Tensor:
    return t.t().contiguous()


def _drop_batch_axis(t: Tensor) -> Tensor:
    """[1, N, D] -> [N, D]: ImageBind keeps a batch axis on its positional embeddings."""
    if t.dim() != 3 or t.shape[0] != 1:
        raise SiadError(f"ImageBind positional embedding: expected shape [1, N, D], got {tuple(t.shape)}")
    return t[0].contiguous()


def _with_batch_axis(t: Tensor) -> Tensor:
    """[N, D] -> [1, N, D]."""
    return t.unsqueeze(0).contiguous()


def _flatten_cls_token(t: Tensor) -> Tensor:
    """[1, 1, D] -> [D] (open_clip's ``class_embedding``)."""
    if t.dim() != 3 or t.shape[:2] != (1, 1):
        raise SiadError(f"ImageBind cls_token: expected shape [1, 1, D], got {tuple(t.shape)}")
    return t.reshape(-1).contiguous()


def _as_cls_token(t: Tensor) -> Tensor:
    """[D] -> [1, 1, D]."""
    return t.reshape(1, 1, -1).contiguous()


def sum_stem_frames(kernel3d: Tensor) -> Tensor:
    """The 2-D patch kernel equivalent to a Conv3d over identical frames: the sum over the frame axis."""
    if kernel3d.dim() != 5:
        shape = tuple(kernel3d.shape)
        raise SiadError(f"ImageBind vision stem: expected a Conv3d kernel [D,3,T,p,p], got shape {shape}")
    return kernel3d.sum(dim=2)


def split_stem_frames(kernel2d: Tensor) -> Tensor:
    """Spread a 2-D patch kernel equally over ImageBind's 2 frames (the unverified convention, see module doc).

    Halving is exact in floating point, so summing the frames back gives the 2-D kernel bit for bit.
    """
    frames = IMAGEBIND_STEM_FRAMES
    return (kernel2d / frames).unsqueeze(2).expand(-1, -1, frames, -1, -1).contiguous()


# -------------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class _Rule:
    """One ImageBind key (template) and its open_clip counterpart, with the tensor transform each way."""

    imagebind: str
    openclip: str
    to_openclip: Callable[[Tensor], Tensor] = _identity
    to_imagebind: Callable[[Tensor], Tensor] = _identity

    @cached_property
    def _imagebind_pattern(self) -> re.Pattern[str]:
        return _template_pattern(self.imagebind)

    @cached_property
    def _openclip_pattern(self) -> re.Pattern[str]:
        return _template_pattern(self.openclip)

    def match_imagebind(self, key: str) -> str | None:
        """The open_clip key for ImageBind ``key``, or None if this rule does not cover it."""
        m = self._imagebind_pattern.match(key)
        return None if m is None else self.openclip.format(**m.groupdict())

    def match_openclip(self, key: str) -> str | None:
        """The ImageBind key for open_clip ``key``, or None if this rule does not cover it."""
        m = self._openclip_pattern.match(key)
        return None if m is None else self.imagebind.format(**m.groupdict())


def _template_pattern(template: str) -> re.Pattern[str]:
    """A key template with ``{k}`` (block index) as an anchored regex."""
    return re.compile("^" + re.escape(template).replace(re.escape("{k}"), _BLOCK) + "$")


_BLOCK_PARTS = (  # ImageBind BlockWithMasking sub-key -> open_clip ResidualAttentionBlock sub-key
    ("norm_1.weight", "ln_1.weight"),
    ("norm_1.bias", "ln_1.bias"),
    ("attn.in_proj_weight", "attn.in_proj_weight"),
    ("attn.in_proj_bias", "attn.in_proj_bias"),
    ("attn.out_proj.weight", "attn.out_proj.weight"),
    ("attn.out_proj.bias", "attn.out_proj.bias"),
    ("norm_2.weight", "ln_2.weight"),
    ("norm_2.bias", "ln_2.bias"),
    ("mlp.fc1.weight", "mlp.c_fc.weight"),
    ("mlp.fc1.bias", "mlp.c_fc.bias"),
    ("mlp.fc2.weight", "mlp.c_proj.weight"),
    ("mlp.fc2.bias", "mlp.c_proj.bias"),
)


def _block_rules(imagebind_trunk: str, openclip_blocks: str) -> list[_Rule]:
    return [_Rule(f"{imagebind_trunk}.blocks.{{k}}.{ib}", f"{openclip_blocks}.{{k}}.{oc}") for ib, oc in _BLOCK_PARTS]


def _layer_norm_rules(imagebind: str, openclip: str) -> list[_Rule]:
    return [_Rule(f"{imagebind}.{p}", f"{openclip}.{p}") for p in ("weight", "bias")]


VISION_RULES: tuple[_Rule, ...] = (
    _Rule("modality_preprocessors.vision.rgbt_stem.proj.1.weight", "visual.conv1.weight",
          sum_stem_frames, split_stem_frames),
    _Rule("modality_preprocessors.vision.cls_token", "visual.class_embedding", _flatten_cls_token, _as_cls_token),
    _Rule("modality_preprocessors.vision.pos_embedding_helper.pos_embed", "visual.positional_embedding",
          _drop_batch_axis, _with_batch_axis),
    *_layer_norm_rules("modality_trunks.vision.pre_transformer_layer.0", "visual.ln_pre"),
    *_block_rules("modality_trunks.vision", "visual.transformer.resblocks"),
    *_layer_norm_rules("modality_heads.vision.0", "visual.ln_post"),
    _Rule("modality_heads.vision.2.weight", "visual.proj", _transpose, _transpose),
)

TEXT_RULES: tuple[_Rule, ...] = (
    _Rule("modality_preprocessors.text.token_embedding.weight", "token_embedding.weight"),
    _Rule("modality_preprocessors.text.pos_embed", "positional_embedding", _drop_batch_axis, _with_batch_axis),
    *_block_rules("modality_trunks.text", "transformer.resblocks"),
    *_layer_norm_rules("modality_heads.text.proj.0", "ln_final"),
    _Rule("modality_heads.text.proj.1.weight", "text_projection", _transpose, _transpose),
    _Rule("modality_postprocessors.text.1.log_logit_scale", "logit_scale"),
)

RULES: tuple[_Rule, ...] = VISION_RULES + TEXT_RULES


# ------------------------------------------------------------------------------------------------ mapping


@dataclass
class ImageBindLoadReport:
    """What :func:`load_imagebind_into_openclip` did.

    Attributes:
        source: the checkpoint file, or "<state dict>".
        mapped: open_clip key -> the ImageBind key it was loaded from (every loaded tensor).
        ignored: ImageBind keys of the other modalities (audio, depth, thermal, IMU), not loaded.
        checked: ImageBind keys verified but not loaded (the text causal mask).
        missing: open_clip keys the checkpoint did not provide (only possible with ``strict=False``).
        layer_norm_eps: the LayerNorm eps the model runs with after loading (None: left as built).
    """

    source: str
    mapped: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    layer_norm_eps: float | None = None

    def summary(self) -> str:
        """One line for logs."""
        return (
            f"ImageBind -> open_clip from {self.source}: {len(self.mapped)} tensors mapped, "
            f"{len(self.ignored)} other-modality tensors ignored, {len(self.checked)} checked, "
            f"{len(self.missing)} missing; LayerNorm eps {self.layer_norm_eps or 'as built'}"
        )


def is_imagebind_state_dict(state_dict: Mapping[str, object]) -> bool:
    """True when ``state_dict`` uses ImageBind's ``modality_*`` key layout (used to pick the loader)."""
    return any(key.split(".", 1)[0] in _MODALITY_GROUPS for key in state_dict)


def _preview(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_causal_mask(mask: Tensor, source: str) -> None:
    size = mask.shape[-1]
    expected = torch.full((size, size), float("-inf")).triu_(1)
    if mask.shape != expected.shape or not torch.equal(mask.float(), expected):
        raise SiadError(
            f"{source}: {TEXT_MASK_KEY} is not the standard causal mask open_clip uses; the checkpoint is not "
            "a stock ImageBind text tower and cannot be mapped (use the original imagebind_huge.pth)"
        )


def _convert(
    state_dict: Mapping[str, Tensor], source: str
) -> tuple[dict[str, Tensor], dict[str, str], list[str], list[str]]:
    """Map ImageBind keys; returns (open_clip state dict, open_clip->ImageBind key map, ignored, checked)."""
    converted: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    ignored: list[str] = []
    checked: list[str] = []
    unexpected: list[str] = []
    for key, value in state_dict.items():
        if _IGNORED_PATTERN.match(key):
            ignored.append(key)
            continue
        if key == TEXT_MASK_KEY:
            _check_causal_mask(value, source)
            checked.append(key)
            continue
        for rule in RULES:
            target = rule.match_imagebind(key)
            if target is not None:
                converted[target] = rule.to_openclip(value)
                origin[target] = key
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise SiadError(
            f"{source}: {len(unexpected)} ImageBind key(s) have no open_clip counterpart: {_preview(unexpected)}. "
            "The file is not a stock ImageBind checkpoint (a fine-tuned or re-implemented variant?); "
            f"use the original imagebind_huge.pth from {IMAGEBIND_HUGE_URL}"
        )
    return converted, origin, ignored, checked


def imagebind_to_openclip(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map an ImageBind state dict's vision and text keys onto open_clip CLIP keys.

    Other-modality keys are dropped (see the module doc); any other unknown key raises :class:`SiadError`.
    """
    return _convert(state_dict, "<state dict>")[0]


def openclip_to_imagebind(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map open_clip CLIP keys onto ImageBind's vision and text keys (the inverse of :func:`imagebind_to_openclip`).

    The 2-D patch kernel is split equally over the 2 frames: the convention the spec marks as likely
    but not verified for ImageBind's own initialisation. Adds the text causal mask buffer ImageBind saves.
    Keys without an ImageBind counterpart (e.g. open_clip's ``logit_bias``) raise :class:`SiadError`.
    """
    converted: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        for rule in RULES:
            target = rule.match_openclip(key)
            if target is not None:
                converted[target] = rule.to_imagebind(value)
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise SiadError(f"open_clip key(s) without an ImageBind counterpart: {_preview(unexpected)}")
    if "positional_embedding" in state_dict:
        context = state_dict["positional_embedding"].shape[0]
        converted[TEXT_MASK_KEY] = torch.full((context, context), float("-inf")).triu_(1)
    return converted


# ------------------------------------------------------------------------------------------------- loader


def _read_checkpoint(path: Path) -> Mapping[str, Tensor]:
    if not path.is_file():
        raise MissingWeightsError(
            f"ImageBind checkpoint {path} does not exist; download imagebind_huge.pth from {IMAGEBIND_HUGE_URL} "
            "and point the backbone's `checkpoint` setting at it"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated download, wrong format, pickled code objects
        raise SiadError(
            f"ImageBind checkpoint {path} cannot be read ({type(err).__name__}: {err}); re-download it from "
            f"{IMAGEBIND_HUGE_URL}"
        ) from err


def _unwrap(obj: object, source: str) -> Mapping[str, Tensor]:
    """Accept a plain state dict or one nested under 'model' / 'state_dict' (common re-saves)."""
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and len(obj) == 1:
                obj = inner
        if all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
            return obj
    raise SiadError(f"{source}: not a state dict of tensors (got {type(obj).__name__}); expected imagebind_huge.pth")


def _check_activation(model: nn.Module) -> None:
    quick = [name for name, m in model.named_modules() if type(m).__name__ == "QuickGELU"]
    if quick:
        raise SiadError(
            f"the open_clip model uses QuickGELU ({quick[0]}, ...) but ImageBind uses exact GELU; build the "
            "ViT-H-14 backbone with quick_gelu=False"
        )


def _check_compatible(model: nn.Module, converted: Mapping[str, Tensor], source: str, strict: bool) -> list[str]:
    """Raise on unexpected keys or shape mismatches (always) and on missing keys (strict); return the missing."""
    target = model.state_dict()
    unexpected = sorted(set(converted) - set(target))
    if unexpected:
        raise SiadError(
            f"{source}: mapped key(s) the open_clip model does not have: {_preview(unexpected)}. The model is not "
            "the ViT-H-14 family ImageBind-Huge uses (more blocks in the checkpoint than in the model?)"
        )
    mismatched = [
        f"{k} {tuple(converted[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sorted(converted)
        if converted[k].shape != target[k].shape
    ]
    if mismatched:
        raise SiadError(
            f"{source}: shape mismatch for {len(mismatched)} tensor(s): {_preview(mismatched, 4)}. Build the model "
            "as open_clip ViT-H-14 at 224 px (ImageBind's positional embedding has 257 tokens); resize after loading"
        )
    missing = sorted(set(target) - set(converted))
    if missing and strict:
        raise SiadError(
            f"{source}: the checkpoint does not provide {len(missing)} tensor(s) of the model: {_preview(missing)}. "
            "A partial load would silently mix random and pretrained weights; use the complete imagebind_huge.pth, "
            "or pass strict=False to load a single tower on purpose (the missing keys are then reported)"
        )
    return missing


def set_layer_norm_eps(model: nn.Module, eps: float) -> int:
    """Set ``eps`` on every LayerNorm of ``model``; returns how many were changed."""
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    for norm in norms:
        norm.eps = eps
    return len(norms)


def load_imagebind_into_openclip(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
    *,
    strict: bool = True,
    layer_norm_eps: float | None = None,
) -> ImageBindLoadReport:
    """Copy ImageBind-Huge's vision and text weights into an open_clip ViT-H-14 ``model`` (in place).

    Args:
        model: an open_clip ``CLIP`` of the ViT-H-14 family, built without QuickGELU at 224 px.
        path_or_state_dict: ``imagebind_huge.pth`` or its loaded state dict.
        strict: refuse checkpoints that leave model tensors unloaded (default). With False, the missing
            keys are loaded from nowhere, kept as built, listed in the report and warned about. Unexpected
            keys and shape mismatches always raise.
        layer_norm_eps: set every LayerNorm's eps (``IMAGEBIND_LAYER_NORM_EPS`` = 1e-6 reproduces ImageBind
            exactly); None keeps open_clip's 1e-5.

    Raises:
        MissingWeightsError: the file does not exist (names it and the download URL).
        SiadError: unreadable file, unknown/missing keys, shape mismatch, QuickGELU model, non-causal mask.
    """
    if isinstance(path_or_state_dict, Mapping):
        source, raw = "<state dict>", path_or_state_dict
    else:
        path = Path(path_or_state_dict).expanduser()
        source, raw = str(path), _read_checkpoint(path)
    state_dict = _unwrap(raw, source)
    _check_activation(model)
    converted, origin, ignored, checked = _convert(state_dict, source)
    missing = _check_compatible(model, converted, source, strict)
    mask = getattr(model, "attn_mask", None)
    if TEXT_MASK_KEY in checked and isinstance(mask, Tensor) and mask.shape != state_dict[TEXT_MASK_KEY].shape:
        raise SiadError(
            f"{source}: the text context length {state_dict[TEXT_MASK_KEY].shape[-1]} differs from the model's "
            f"{mask.shape[-1]}; build the model with ImageBind's context length (77)"
        )
    result = model.load_state_dict(converted, strict=strict)
    if sorted(result.missing_keys) != missing or result.unexpected_keys:
        raise SiadError(f"{source}: internal mapping check failed ({result}); please report this")
    if layer_norm_eps is not None:
        set_layer_norm_eps(model, layer_norm_eps)
    report = ImageBindLoadReport(source, origin, sorted(ignored), checked, missing, layer_norm_eps)
    if missing:
        warnings.warn(f"{report.summary()}; NOT loaded: {_preview(missing)}", stacklevel=2)
    log.info(report.summary())
    return report
