"""Grounding DINO for FiLo's HQ-Loc, run through transformers' ``GroundingDinoForObjectDetection``.

What: the open-set detector FiLo's ``test.py`` (CASIA-IVA-Lab/FiLo@36ff29c) runs on every test image with a caption
of anomaly words, returning per query a sigmoid score for each of the 256 text-token positions and a box. The box
logic that follows is in :mod:`baselines.filo.hqloc`. Spec: ``baselines_llm_filo_anovl.md`` §2.

Why transformers and not the release's vendored IDEA code: the IDEA package needs a compiled ``_C`` op (or its slow
fallback), pins old transformers internals (``BertModelWarper`` reads ``get_extended_attention_mask``), and loads
its checkpoint with ``strict=False``. transformers ships the same architecture (converted from IDEA's Swin-T OGC
model, hub ``IDEA-Research/grounding-dino-tiny``); this module feeds it exactly the release's inputs and loads
FiLo's fine-tuned weights by an explicit key mapping that fails loudly.

Profiles (:class:`GroundingSpec`):

- ``tiny-random``: seeded random tiny detector (Swin 16-32-64-128, patch 2, one block per stage, so a 64-px image
  still gives a 2×2 extra level; one-layer BERT of width 32; d_model 32; one encoder and one decoder layer; 30
  queries; max_text_len 256; ~0.01-0.04 s per 64-112 px image on 2 CPU threads) with a small BERT tokenizer whose
  vocabulary holds the caption words at BERT's special-token ids ([CLS] 101, [SEP] 102, "." 1012, "?" 1029, which the
  model's sub-sentence masks look for). Demo and tests; its boxes are noise.
- ``base``: ``from_pretrained(base_repo)`` — the pretrained, not fine-tuned, detector.
- ``filo-finetuned`` (the paper): ``base_repo``'s config and tokenizer + FiLo's fine-tuned weights, hub
  ``FantasticGNU/FiLo`` ``grounding_train_on_{mvtec,visa}.pth`` (the release tests MVTec with the VisA-trained file
  and vice versa) or a local ``checkpoint``.

Checkpoint layouts (:func:`detect_layout`, :func:`to_transformers`). FiLo's README says the detector was fine-tuned
with MMDetection, while ``test.py`` loads the file into IDEA's model (after stripping ``module.``) — so the file may
hold either layout; both are mapped, and an already-converted transformers state dict is accepted as is:

- IDEA (``backbone.0.*``, ``transformer.*``, ``bert.*``, ``feat_map``, ``input_proj``, ``bbox_embed``): names follow
  transformers' own conversion of IDEA's checkpoint; fused ``qkv`` / ``in_proj`` tensors are split into q, k, v.
- MMDetection 3.x (``backbone.stages.*``, ``language_model.language_backbone.body.model.*``, ``neck.*``,
  ``encoder.*``, ``decoder.*``, ``bbox_head.{reg,cls}_branches.*``, ``query_embedding``, ``memory_trans_*``,
  ``text_feat_map``, ``level_embed``): the inverse of MMDetection's ``tools/model_converters/groundingdino_to_mmdet.py``
  (mmdet 3.3.0), including the un-permutation of the Swin patch-merging weights (mmdet's ``nn.Unfold`` order).
  ``reg_branches.{n_dec}`` is the encoder-output box head. Box heads of different decoder layers may differ after an
  MMDetection fine-tune (mmdet does not share them); the model is then built with ``decoder_bbox_embed_share=False``.
  A learnable ``cls_branches.*.log_scale`` / ``bias`` (mmdet's ``ContrastiveEmbed``) is honoured by swapping in
  :class:`ScaledContrastiveEmbedding`; with a bias but no log_scale, the ``'auto'`` 1/√d scaling of every mmdet config
  that has a bias is assumed (``contrastive_scale`` overrides).
- Dropped on purpose (derived or unused): Swin ``relative_position_index`` buffers, BERT ``pooler`` and
  ``position_ids``, mmdet ``dn_query_generator`` (training-only denoising queries). Left as the model builds them:
  transformers' final Swin ``layernorm`` (never read) and derived buffers. Everything else must match:
  :func:`load_converted_state` raises :class:`~siad.errors.DataError` listing missing, unexpected and mis-shaped keys
  and tied heads that would receive different tensors (no ``strict=False``). transformers 4.x Swin names
  (``attention.self.query`` …) are used when the installed model has them.

Verified offline (scratch scripts, not part of the tests): IDEA models built from the release's vendored code
(transformers 4.45) — a tiny one and one with Swin-T OGC's real backbone and transformer (6 + 6 layers, 900 queries,
d_model 256; tiny BERT) — give the same outputs through this mapping in transformers 5.24 (and 4.45): max |Δ logit|
≈ 6e-5 on logits up to ~30, |Δ box| < 5e-7, identical −inf pattern. The mmdet path was checked by feeding the output
of MMDetection 3.3.0's own IDEA→mmdet converter (which hard-codes the encoder box head as ``reg_branches.6``, i.e.
6 decoder layers) through :func:`mmdet_to_transformers`: identical tensors. Known numerical difference from the
release: IDEA's inverse sigmoid of the reference boxes clamps at 1e-3, transformers' at 1e-5, so a box coordinate
within 1e-3 of 0 or 1 is refined slightly differently.

**Not verifiable offline**: the real content of FiLo's ``.pth`` (its layout, wrappers, whether it carries
``log_scale`` / ``bias`` or keys of a newer mmdet) and MMDetection's own module tree (mmcv cannot be built here) — the
mmdet names come from the official converter and mmdet's sources. Note that ``test.py`` hands the loaded object
itself to ``clean_state_dict`` and loads with ``strict=False``: a wrapped file (``{'state_dict': …}``,
``{'model': …}``) or an mmdet-layout file would have loaded *nothing* there and the release would have run a random
detector (it only prints ``load_res``). The loaded model carries ``filo_checkpoint_layout`` for the run log.

Inputs (:func:`preprocess_image`, :func:`normalise_caption`), as ``load_image`` / ``get_grounding_output``: the
original image file (not the CLIP tensor), RGB, shorter side to ``size`` (518) with the longer side capped at
``max_size`` (1333) by IDEA's ``RandomResize`` rounding, PIL bilinear, ImageNet mean/std; the caption lower-cased,
stripped and ended with ".". Outputs (:class:`Detection`): ``logits`` [nq, 256] = ``pred_logits.sigmoid()`` (on
CPU, as released), ``boxes`` [nq, 4] normalised cx, cy, w, h, and the caption's token ids.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import tempfile
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor, nn

from baselines.filo.hqloc import GENERIC_WORDS, HqLocResult, hq_localise, selected_token_ids
from siad.errors import ConfigError, DataError, MissingWeightsError

__all__ = [
    "BASE_REPO",
    "Detection",
    "FILO_GROUNDING_FILES",
    "FILO_REPO",
    "GroundingSpec",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ScaledContrastiveEmbedding",
    "detect",
    "detect_batch",
    "detect_layout",
    "filo_grounding_spec",
    "idea_to_mmdet",
    "idea_to_transformers",
    "install_contrastive_extras",
    "load_converted_state",
    "load_grounding_dino",
    "localise",
    "mmdet_to_idea",
    "mmdet_to_transformers",
    "normalise_caption",
    "phrases_from_positions",
    "preprocess_image",
    "read_checkpoint",
    "release_resize_hw",
    "tiny_grounding_dino",
    "tiny_tokenizer",
    "tiny_vocabulary",
    "to_transformers",
    "transformers_to_idea",
    "transformers_to_mmdet",
    "unwrap_state_dict",
]

BASE_REPO = "IDEA-Research/grounding-dino-tiny"
FILO_REPO = "FantasticGNU/FiLo"
#: FiLo's fine-tuned detector per *training* dataset (the release tests each dataset with the other one's file).
FILO_GROUNDING_FILES: dict[str, str] = {"mvtec": "grounding_train_on_mvtec.pth", "visa": "grounding_train_on_visa.pth"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Positions of BERT's [CLS], [SEP], "." and "?" in bert-base-uncased (the detector's sub-sentence delimiters).
_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
_FIRST_WORD_ID = 1030

Layout = Literal["transformers", "idea", "mmdet"]


# ----------------------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class GroundingSpec:
    """Which detector to load (see the module docstring for the profiles).

    Attributes:
        kind: "tiny-random", "base" or "filo-finetuned".
        base_repo: transformers hub repo of the architecture, config and tokenizer (Swin-T OGC by default).
        filo_repo / filo_file: hub location of FiLo's fine-tuned weights (``FILO_GROUNDING_FILES``).
        checkpoint: a local file to use instead of the hub download of ``filo_file``.
        cache_dir: hub cache folder (None: the Hugging Face default).
        seed / tiny_words: the tiny profile's seed and the extra words of its vocabulary.
        contrastive_scale: "detect" (from the checkpoint's keys), "none" or "auto" (mmdet's 1/√d similarity scale).
        allow_pickle: allow ``torch.load(weights_only=False)`` for a checkpoint that holds Python objects besides
            tensors (MMDetection's ``meta`` / ``message_hub``); classes that cannot be imported are stubbed.
    """

    kind: Literal["tiny-random", "base", "filo-finetuned"] = "tiny-random"
    base_repo: str = BASE_REPO
    filo_repo: str = FILO_REPO
    filo_file: str = FILO_GROUNDING_FILES["mvtec"]
    checkpoint: Path | None = None
    cache_dir: Path | None = None
    seed: int = 0
    tiny_words: tuple[str, ...] = ()
    contrastive_scale: Literal["detect", "none", "auto"] = "detect"
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("tiny-random", "base", "filo-finetuned"):
            raise ConfigError(f"grounding: unknown kind {self.kind!r}; use 'tiny-random', 'base' or 'filo-finetuned'")
        if self.contrastive_scale not in ("detect", "none", "auto"):
            raise ConfigError(f"grounding: contrastive_scale {self.contrastive_scale!r}; use detect, none or auto")


def filo_grounding_spec(trained_on: str, **overrides: Any) -> GroundingSpec:
    """The paper profile with the detector fine-tuned on ``trained_on`` ("mvtec" or "visa")."""
    if trained_on not in FILO_GROUNDING_FILES:
        raise ConfigError(f"grounding: no FiLo detector trained on {trained_on!r}; "
                          f"use one of {list(FILO_GROUNDING_FILES)}")
    return GroundingSpec(kind="filo-finetuned", filo_file=FILO_GROUNDING_FILES[trained_on], **overrides)


# ------------------------------------------------------------------------------------------------------ tiny model


def tiny_vocabulary(words: Iterable[str] = ()) -> list[str]:
    """The tiny tokenizer's vocabulary: BERT's special tokens at their bert-base-uncased ids, ``[unusedN]`` fillers,
    then the sorted lower-case alphanumeric words of :data:`GENERIC_WORDS` and ``words`` from id 1030 on."""
    found = set()
    for text in (*GENERIC_WORDS, *words):
        found.update(re.findall(r"[a-z0-9]+", text.lower()))
    vocab = [f"[unused{i}]" for i in range(_FIRST_WORD_ID)]
    for token, index in _SPECIAL_IDS.items():
        vocab[index] = token
    return vocab + sorted(found)


def tiny_tokenizer(words: Iterable[str] = ()) -> Any:
    """A lower-casing BERT WordPiece tokenizer over :func:`tiny_vocabulary` (other words become [UNK])."""
    from transformers import BertTokenizer

    with tempfile.TemporaryDirectory(prefix="filo_tiny_vocab_") as folder:
        Path(folder, "vocab.txt").write_text("\n".join(tiny_vocabulary(words)) + "\n", encoding="utf-8")
        tokenizer = BertTokenizer.from_pretrained(folder, do_lower_case=True)
    ids = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?"])
    if ids != [101, 102, 1012, 1029]:  # pragma: no cover - a tokenizer API change
        raise ConfigError(f"grounding: tiny tokenizer special ids {ids}, expected [101, 102, 1012, 1029]")
    return tokenizer


def _tiny_config(vocab_size: int) -> Any:
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    backbone = SwinConfig(image_size=64, patch_size=2, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=4, out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=256)
    # One decoder layer: transformers' tie of bbox_embed.1.. to bbox_embed.0 has nothing to tie and raises, hence no
    # sharing (with a single layer the two settings compute the same thing).
    return GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
                               decoder_layers=1, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2,
                               decoder_attention_heads=2, num_queries=30, encoder_n_points=2, decoder_n_points=2,
                               max_text_len=256, decoder_bbox_embed_share=False)


def tiny_grounding_dino(seed: int = 0, words: Iterable[str] = ()) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of the tiny random profile, in eval mode; identical for equal ``seed`` and ``words``."""
    from transformers import GroundingDinoForObjectDetection

    tokenizer = tiny_tokenizer(words)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(_tiny_config(len(tokenizer)))
    return model.eval().requires_grad_(False), tokenizer


# ---------------------------------------------------------------------------------------------- key-layout mapping
#
# A rule pairs key templates of two layouts. "{name}" fields match digits, except {p} (weight|bias), {x}
# (log_scale|bias) and {rest} (anything). A key matching any template of one side yields every template of the
# other side (duplicate names of one tensor); the first matching rule wins. A split rule turns one fused [3d, ...]
# tensor into three named parts ({part}) and back. Tensor transforms apply one way each.

_FIELDS = {"p": r"weight|bias", "x": r"log_scale|bias", "rest": r".+"}


@dataclass(frozen=True)
class _Rule:
    a: tuple[str, ...]
    b: tuple[str, ...]
    parts: tuple[str, ...] = ()
    a_to_b: Callable[[Tensor], Tensor] | None = None
    b_to_a: Callable[[Tensor], Tensor] | None = None


def _r(a: str | tuple[str, ...], b: str | tuple[str, ...], **kw: Any) -> _Rule:
    return _Rule((a,) if isinstance(a, str) else a, (b,) if isinstance(b, str) else b, **kw)


def _pattern(template: str, context: Mapping[str, str]) -> re.Pattern[str]:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        name = m.group(1)
        if name in context:
            out.append(re.escape(context[name]))
        elif name == "part":
            out.append(r"(?P<part>[a-z_]+)")
        else:
            out.append(f"(?P<{name}>{_FIELDS.get(name, r'[0-9]+')})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


def _apply_rules(state: Mapping[str, Tensor], rules: Sequence[_Rule], forward: bool, drops: Sequence[str],
                 context: Mapping[str, str], what: str) -> dict[str, Tensor]:
    """Rename ``state`` by ``rules`` (a → b when ``forward``); unmatched keys pass through unchanged."""
    compiled = []
    for rule in rules:
        src, dst = (rule.a, rule.b) if forward else (rule.b, rule.a)
        fn = rule.a_to_b if forward else rule.b_to_a
        compiled.append((rule, [_pattern(t, context) for t in src], dst, fn))
    drop_res = [re.compile(d) for d in drops]
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    pending: dict[str, tuple[_Rule, dict[str, Tensor]]] = {}  # split parts to merge: target key -> (rule, parts)
    problems: list[str] = []

    def put(key: str, value: Tensor, source: str) -> None:
        if key in out and not (out[key].shape == value.shape and torch.equal(out[key], value)):
            problems.append(f"{key} gets different tensors from {origin[key]} and {source}")
            return
        out[key], origin[key] = value, source

    for key, value in state.items():
        if any(d.fullmatch(key) for d in drop_res):
            continue
        for rule, patterns, dst, fn in compiled:
            match = next((m for p in patterns if (m := p.fullmatch(key))), None)
            if match is None:
                continue
            fields = {**context, **{k: v for k, v in match.groupdict().items() if k != "part"}}
            if rule.parts and forward:  # fused -> parts
                if value.shape[0] % 3:
                    problems.append(f"{key} {tuple(value.shape)} cannot be split into q, k, v")
                    break
                for part, chunk in zip(rule.parts, value.chunk(3, dim=0)):
                    for template in dst:
                        put(template.format(part=part, **fields), chunk.clone(), key)
            elif rule.parts:  # parts -> fused
                part = match.group("part")
                if part not in rule.parts:
                    continue
                for template in dst:
                    pending.setdefault(template.format(**fields), (rule, {}))[1][part] = value
            else:
                converted = fn(value) if fn is not None else value
                for template in dst:
                    put(template.format(**fields), converted, key)
            break
        else:
            put(key, value, key)
    for key, (rule, parts) in pending.items():
        if set(parts) != set(rule.parts):
            problems.append(f"{key}: only {sorted(parts)} of {list(rule.parts)} present")
            continue
        put(key, torch.cat([parts[p] for p in rule.parts], dim=0), "+".join(rule.parts))
    if problems:
        raise DataError(f"{what}: " + "; ".join(problems[:10]))
    return out


def _to_unfold(t: Tensor) -> Tensor:
    """IDEA/transformers patch-merging order (4 neighbour groups × C) → mmdet's ``nn.Unfold`` order (C × 4)."""
    lead, width = t.shape[:-1], t.shape[-1]
    return t.reshape(*lead, 4, width // 4)[..., [0, 2, 1, 3], :].transpose(-1, -2).reshape(*lead, width)


def _from_unfold(t: Tensor) -> Tensor:
    """Inverse of :func:`_to_unfold`."""
    lead, width = t.shape[:-1], t.shape[-1]
    return t.reshape(*lead, width // 4, 4).transpose(-1, -2)[..., [0, 2, 1, 3], :].reshape(*lead, width)


_SW = "model.backbone.conv_encoder.model.swin."
_ENC, _DEC = "model.encoder.layers.{i}.", "model.decoder.layers.{i}."
_TE, _TD = "transformer.encoder.", "transformer.decoder.layers.{i}."


def _idea_rules() -> list[_Rule]:
    """IDEA (a) ↔ transformers 5 (b)."""
    blk, hblk = "backbone.0.layers.{i}.blocks.{j}.", _SW + "encoder.layers.{i}.blocks.{j}."
    rules = [
        _r("backbone.0.patch_embed.proj.{p}", _SW + "embeddings.patch_embeddings.projection.{p}"),
        _r("backbone.0.patch_embed.norm.{p}", _SW + "embeddings.norm.{p}"),
        _r(blk + "norm1.{p}", hblk + "layernorm_before.{p}"),
        _r(blk + "norm2.{p}", hblk + "layernorm_after.{p}"),
        _r(blk + "attn.qkv.{p}", hblk + "attention.{part}.{p}", parts=("q_proj", "k_proj", "v_proj")),
        _r(blk + "attn.proj.{p}", hblk + "attention.o_proj.{p}"),
        _r(blk + "attn.relative_position_bias_table",
           hblk + "attention.relative_position_bias.relative_position_bias_table"),
        _r(blk + "mlp.fc1.{p}", hblk + "mlp.fc1.{p}"),
        _r(blk + "mlp.fc2.{p}", hblk + "mlp.fc2.{p}"),
        _r("backbone.0.layers.{i}.downsample.{rest}", _SW + "encoder.layers.{i}.downsample.{rest}"),
        *[_r(f"backbone.0.norm{n}.{{p}}", f"model.backbone.conv_encoder.model.hidden_states_norms.stage{n + 1}.{{p}}")
          for n in range(4)],
        _r("bert.{rest}", "model.text_backbone.{rest}"),
        _r("feat_map.{p}", "model.text_projection.{p}"),
        _r("input_proj.{rest}", "model.input_proj_vision.{rest}"),
        _r("transformer.level_embed", "model.level_embed"),
        _r("transformer.tgt_embed.weight", "model.query_position_embeddings.weight"),
        _r("transformer.enc_output.{p}", "model.enc_output.{p}"),
        _r("transformer.enc_output_norm.{p}", "model.enc_output_norm.{p}"),
        _r("transformer.enc_out_bbox_embed.{rest}", "model.encoder_output_bbox_embed.{rest}"),
        _r("transformer.enc_out_class_embed.{x}", "model.encoder_output_class_embed.{x}"),
        # encoder: deformable image layers, text-enhancer layers, fusion layers (one of each per HF layer)
        _r(_TE + "layers.{i}.self_attn.{rest}", _ENC + "deformable_layer.self_attn.{rest}"),
        _r(_TE + "layers.{i}.norm1.{p}", _ENC + "deformable_layer.self_attn_layer_norm.{p}"),
        _r(_TE + "layers.{i}.linear1.{p}", _ENC + "deformable_layer.fc1.{p}"),
        _r(_TE + "layers.{i}.linear2.{p}", _ENC + "deformable_layer.fc2.{p}"),
        _r(_TE + "layers.{i}.norm2.{p}", _ENC + "deformable_layer.final_layer_norm.{p}"),
        _r(_TE + "text_layers.{i}.self_attn.in_proj_{p}", _ENC + "text_enhancer_layer.self_attn.{part}.{p}",
           parts=("query", "key", "value")),
        _r(_TE + "text_layers.{i}.self_attn.out_proj.{p}", _ENC + "text_enhancer_layer.self_attn.out_proj.{p}"),
        _r(_TE + "text_layers.{i}.linear1.{p}", _ENC + "text_enhancer_layer.fc1.{p}"),
        _r(_TE + "text_layers.{i}.linear2.{p}", _ENC + "text_enhancer_layer.fc2.{p}"),
        _r(_TE + "text_layers.{i}.norm1.{p}", _ENC + "text_enhancer_layer.layer_norm_before.{p}"),
        _r(_TE + "text_layers.{i}.norm2.{p}", _ENC + "text_enhancer_layer.layer_norm_after.{p}"),
        _r(_TE + "fusion_layers.{i}.gamma_v", _ENC + "fusion_layer.vision_param"),
        _r(_TE + "fusion_layers.{i}.gamma_l", _ENC + "fusion_layer.text_param"),
        _r(_TE + "fusion_layers.{i}.layer_norm_v.{p}", _ENC + "fusion_layer.layer_norm_vision.{p}"),
        _r(_TE + "fusion_layers.{i}.layer_norm_l.{p}", _ENC + "fusion_layer.layer_norm_text.{p}"),
        *[_r(_TE + f"fusion_layers.{{i}}.attn.{src}.{{p}}", _ENC + f"fusion_layer.attn.{dst}.{{p}}")
          for src, dst in (("v_proj", "vision_proj"), ("l_proj", "text_proj"), ("values_v_proj", "values_vision_proj"),
                           ("values_l_proj", "values_text_proj"), ("out_v_proj", "out_vision_proj"),
                           ("out_l_proj", "out_text_proj"))],
        # decoder layers
        _r(_TD + "cross_attn.{rest}", _DEC + "encoder_attn.{rest}"),
        _r(_TD + "norm1.{p}", _DEC + "encoder_attn_layer_norm.{p}"),
        _r(_TD + "ca_text.in_proj_{p}", _DEC + "encoder_attn_text.{part}.{p}", parts=("query", "key", "value")),
        _r(_TD + "ca_text.out_proj.{p}", _DEC + "encoder_attn_text.out_proj.{p}"),
        _r(_TD + "catext_norm.{p}", _DEC + "encoder_attn_text_layer_norm.{p}"),
        _r(_TD + "self_attn.in_proj_{p}", _DEC + "self_attn.{part}.{p}", parts=("query", "key", "value")),
        _r(_TD + "self_attn.out_proj.{p}", _DEC + "self_attn.out_proj.{p}"),
        _r(_TD + "norm2.{p}", _DEC + "self_attn_layer_norm.{p}"),
        _r(_TD + "linear1.{p}", _DEC + "fc1.{p}"),
        _r(_TD + "linear2.{p}", _DEC + "fc2.{p}"),
        _r(_TD + "norm3.{p}", _DEC + "final_layer_norm.{p}"),
        _r("transformer.decoder.norm.{p}", "model.decoder.layer_norm.{p}"),
        _r("transformer.decoder.ref_point_head.{rest}", "model.decoder.reference_points_head.{rest}"),
        _r(("transformer.decoder.bbox_embed.{i}.{rest}", "bbox_embed.{i}.{rest}"),
           ("bbox_embed.{i}.{rest}", "model.decoder.bbox_embed.{i}.{rest}")),
        _r("class_embed.{i}.{x}", "class_embed.{i}.{x}"),
    ]
    return rules


#: IDEA keys that are dropped on the way to transformers (derived buffers, unused pooler).
_IDEA_DROPS = (r"backbone\.0\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index", r"bert\.pooler\..*",
               r"bert\.embeddings\.(position_ids|token_type_ids)")


def _mmdet_rules() -> list[_Rule]:
    """MMDetection 3.x (a) ↔ IDEA (b); ``{ndec}`` is the number of decoder layers."""
    st, blk = "backbone.stages.{i}.blocks.{j}.", "backbone.0.layers.{i}.blocks.{j}."
    enc, tenc = "encoder.layers.{i}.", "transformer.encoder.layers.{i}."
    txt, ttxt = "encoder.text_layers.{i}.", "transformer.encoder.text_layers.{i}."
    dec, tdec = "decoder.layers.{i}.", "transformer.decoder.layers.{i}."
    rules = [
        _r("backbone.patch_embed.projection.{p}", "backbone.0.patch_embed.proj.{p}"),
        _r("backbone.patch_embed.norm.{p}", "backbone.0.patch_embed.norm.{p}"),
        _r(st + "norm1.{p}", blk + "norm1.{p}"),
        _r(st + "norm2.{p}", blk + "norm2.{p}"),
        _r(st + "attn.w_msa.{rest}", blk + "attn.{rest}"),
        _r(st + "ffn.layers.0.0.{p}", blk + "mlp.fc1.{p}"),
        _r(st + "ffn.layers.1.{p}", blk + "mlp.fc2.{p}"),
        _r("backbone.stages.{i}.downsample.reduction.weight", "backbone.0.layers.{i}.downsample.reduction.weight",
           a_to_b=_from_unfold, b_to_a=_to_unfold),
        _r("backbone.stages.{i}.downsample.norm.{p}", "backbone.0.layers.{i}.downsample.norm.{p}",
           a_to_b=_from_unfold, b_to_a=_to_unfold),
        _r("backbone.norm{i}.{p}", "backbone.0.norm{i}.{p}"),
        _r("language_model.language_backbone.body.model.{rest}", "bert.{rest}"),
        _r("text_feat_map.{p}", "feat_map.{p}"),
        # ChannelMapper: 3 backbone levels + 1 extra stride-2 conv (Swin with out_indices 1, 2, 3)
        *[_r(f"neck.convs.{n}.conv.{{p}}", f"input_proj.{n}.0.{{p}}") for n in range(3)],
        *[_r(f"neck.convs.{n}.gn.{{p}}", f"input_proj.{n}.1.{{p}}") for n in range(3)],
        _r("neck.extra_convs.0.conv.{p}", "input_proj.3.0.{p}"),
        _r("neck.extra_convs.0.gn.{p}", "input_proj.3.1.{p}"),
        _r("level_embed", "transformer.level_embed"),
        _r("query_embedding.weight", "transformer.tgt_embed.weight"),
        _r("memory_trans_fc.{p}", "transformer.enc_output.{p}"),
        _r("memory_trans_norm.{p}", "transformer.enc_output_norm.{p}"),
        _r(enc + "self_attn.{rest}", tenc + "self_attn.{rest}"),
        _r(enc + "norms.0.{p}", tenc + "norm1.{p}"),
        _r(enc + "norms.1.{p}", tenc + "norm2.{p}"),
        _r(enc + "ffn.layers.0.0.{p}", tenc + "linear1.{p}"),
        _r(enc + "ffn.layers.1.{p}", tenc + "linear2.{p}"),
        _r(txt + "self_attn.attn.{rest}", ttxt + "self_attn.{rest}"),
        _r(txt + "norms.0.{p}", ttxt + "norm1.{p}"),
        _r(txt + "norms.1.{p}", ttxt + "norm2.{p}"),
        _r(txt + "ffn.layers.0.0.{p}", ttxt + "linear1.{p}"),
        _r(txt + "ffn.layers.1.{p}", ttxt + "linear2.{p}"),
        _r("encoder.fusion_layers.{rest}", "transformer.encoder.fusion_layers.{rest}"),
        _r(dec + "self_attn.attn.{rest}", tdec + "self_attn.{rest}"),
        _r(dec + "cross_attn_text.attn.{rest}", tdec + "ca_text.{rest}"),
        _r(dec + "cross_attn.{rest}", tdec + "cross_attn.{rest}"),
        _r(dec + "norms.0.{p}", tdec + "norm2.{p}"),
        _r(dec + "norms.1.{p}", tdec + "catext_norm.{p}"),
        _r(dec + "norms.2.{p}", tdec + "norm1.{p}"),
        _r(dec + "norms.3.{p}", tdec + "norm3.{p}"),
        _r(dec + "ffn.layers.0.0.{p}", tdec + "linear1.{p}"),
        _r(dec + "ffn.layers.1.{p}", tdec + "linear2.{p}"),
        _r("decoder.norm.{p}", "transformer.decoder.norm.{p}"),
        _r("decoder.ref_point_head.{rest}", "transformer.decoder.ref_point_head.{rest}"),
        # box heads: Sequential(Linear, ReLU, Linear, ReLU, Linear) = IDEA MLP layers 0, 1, 2; the last is the encoder's
        *[_r(f"bbox_head.reg_branches.{{ndec}}.{2 * k}.{{p}}", f"transformer.enc_out_bbox_embed.layers.{k}.{{p}}")
          for k in range(3)],
        *[_r(f"bbox_head.reg_branches.{{i}}.{2 * k}.{{p}}",
             (f"transformer.decoder.bbox_embed.{{i}}.layers.{k}.{{p}}", f"bbox_embed.{{i}}.layers.{k}.{{p}}"))
          for k in range(3)],
        _r("bbox_head.cls_branches.{ndec}.{x}", "transformer.enc_out_class_embed.{x}"),
        _r("bbox_head.cls_branches.{i}.{x}", "class_embed.{i}.{x}"),
    ]
    return rules


#: mmdet keys with no counterpart in the inference model (training-only denoising queries).
_MMDET_DROPS = (r"dn_query_generator\..*",)


def _count_layers(state: Mapping[str, Tensor], pattern: str) -> int:
    found = [int(m.group(1)) for key in state if (m := re.match(pattern, key))]
    return max(found) + 1 if found else 0


def idea_to_transformers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """IDEA GroundingDINO keys → transformers 5 ``GroundingDinoForObjectDetection`` keys (unknown keys pass)."""
    return _apply_rules(state, _idea_rules(), True, _IDEA_DROPS, {}, "IDEA → transformers")


def transformers_to_idea(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`idea_to_transformers` (IDEA's duplicate ``bbox_embed`` names included)."""
    return _apply_rules(state, _idea_rules(), False, (r".*\.swin\.layernorm\.(weight|bias)",), {},
                        "transformers → IDEA")


def mmdet_to_idea(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """MMDetection 3.x GroundingDINO keys → IDEA keys (inverse of mmdet's ``groundingdino_to_mmdet``)."""
    ndec = _count_layers(state, r"decoder\.layers\.(\d+)\.")
    return _apply_rules(state, _mmdet_rules(), True, _MMDET_DROPS, {"ndec": str(ndec)}, "MMDetection → IDEA")


def idea_to_mmdet(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """IDEA keys → MMDetection 3.x keys (what mmdet's ``groundingdino_to_mmdet`` produces, for tests)."""
    ndec = _count_layers(state, r"transformer\.decoder\.layers\.(\d+)\.")
    return _apply_rules(state, _mmdet_rules(), False, (), {"ndec": str(ndec)}, "IDEA → MMDetection")


def mmdet_to_transformers(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """An MMDetection GroundingDINO checkpoint (wrappers allowed) → transformers keys."""
    return idea_to_transformers(mmdet_to_idea(unwrap_state_dict(state_dict)))


def transformers_to_mmdet(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers keys → MMDetection layout (the inverse of :func:`mmdet_to_transformers`, for tests)."""
    return idea_to_mmdet(transformers_to_idea(state_dict))


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """The tensors of a checkpoint object: ``state_dict`` / ``model`` / ``module`` wrappers and ``module.`` key
    prefixes removed, non-tensor entries (mmdet's ``meta``) ignored."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[w] for w in ("state_dict", "model", "module") if isinstance(obj.get(w), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise DataError(f"{source}: holds a {type(obj).__name__}, not a state dict")
    tensors = {(k[len("module."):] if k.startswith("module.") else k): v
               for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise DataError(f"{source}: no tensors found (top-level keys {list(obj)[:8]})")
    return tensors


def detect_layout(state: Mapping[str, Tensor], source: str = "checkpoint") -> Layout:
    """"transformers", "idea" or "mmdet", from the key prefixes."""
    keys = list(state)

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if has("model.backbone.conv_encoder.", "model.text_backbone.", "model.encoder.layers."):
        return "transformers"
    if has("backbone.stages.", "language_model.", "bbox_head.", "neck.", "memory_trans_fc."):
        return "mmdet"
    if has("backbone.0.", "transformer.", "bert.", "feat_map."):
        return "idea"
    raise DataError(f"{source}: not a Grounding DINO state dict in a known layout (first keys {keys[:6]}); expected "
                    "IDEA (backbone.0., transformer., bert.), MMDetection (backbone.stages., language_model., "
                    "bbox_head.) or transformers (model.backbone.conv_encoder.) keys")


def to_transformers(state_dict: Mapping[str, Any], source: str = "checkpoint") -> tuple[dict[str, Tensor], Layout]:
    """(transformers-keyed state, the layout found) for any supported checkpoint object."""
    state = unwrap_state_dict(state_dict, source)
    layout = detect_layout(state, source)
    if layout == "mmdet":
        return idea_to_transformers(mmdet_to_idea(state)), layout
    if layout == "idea":
        return idea_to_transformers(state), layout
    return dict(state), layout


# --------------------------------------------------------------------------------------------------------- loading

#: transformers 4.x names of the Swin parts (transformers 5 name, 4.x name), tried when the model lacks the 5.x name.
_V4_SWIN_NAMES = (
    ("attention.q_proj.", "attention.self.query."),
    ("attention.k_proj.", "attention.self.key."),
    ("attention.v_proj.", "attention.self.value."),
    ("attention.o_proj.", "attention.output.dense."),
    ("attention.relative_position_bias.relative_position_bias_table", "attention.self.relative_position_bias_table"),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
)
#: Model keys a checkpoint may lack: the final Swin norm the forward pass never reads, and buffers the model derives
#: itself (persistent in transformers 4.x).
_MODEL_OWN_KEYS = re.compile(r"model\.backbone\.conv_encoder\.model\.(swin\.)?layernorm\.(weight|bias)"
                             r"|.*\.relative_position_index|model\.text_backbone\.embeddings\.(position_ids|token_type_ids)")


def _adapt_names(state: Mapping[str, Tensor], model_keys: set[str]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        if key not in model_keys and key.startswith(_SW):
            old = "model.backbone.conv_encoder.model." + key[len(_SW):]
            for new_part, old_part in _V4_SWIN_NAMES:
                old = old.replace(new_part, old_part)
            if old in model_keys:
                key = old
        out[key] = value
    return out


def _listing(title: str, items: Sequence[str], limit: int = 10) -> str:
    more = f" … ({len(items)} in all)" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(items[:limit]) + more


def load_converted_state(model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Load transformers-keyed ``state`` into ``model``, all or nothing.

    Raises :class:`DataError` naming ``source`` and up to 10 each of the missing, unexpected and mis-shaped keys,
    or the tied parameters (shared box heads) that would receive different tensors.
    """
    expected = model.state_dict()
    state = _adapt_names(state, set(expected))
    missing = [k for k in expected if k not in state and not _MODEL_OWN_KEYS.fullmatch(k)]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in state if k in expected and state[k].shape != expected[k].shape]
    tied: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
    for key, tensor in expected.items():
        if key in state and tensor.numel():
            tied.setdefault((tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape)), []).append(key)
    conflicts = [" = ".join(keys) for keys in tied.values()
                 if len(keys) > 1 and not all(torch.equal(state[keys[0]], state[k]) for k in keys[1:]
                                              if state[k].shape == state[keys[0]].shape)]
    if missing or unexpected or misshaped or conflicts:
        text = f"{source}: the weights do not fit {type(model).__name__}:"
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                             ("tied in the model but different in the file", conflicts)):
            if items:
                text += _listing(title, items)
        raise DataError(text + "\nFix: use FiLo's grounding_train_on_{mvtec,visa}.pth (Swin-T OGC) with base_repo "
                        f"{BASE_REPO} (another backbone needs its own base_repo); different box heads per decoder "
                        "layer need decoder_bbox_embed_share=False (load_grounding_dino sets it); keys of a layout "
                        "this loader does not know must be renamed first (baselines/filo/grounding.py).")
    full = {k: v for k, v in expected.items() if k not in state}
    full.update(state)
    model.load_state_dict(full, strict=True)


class _StubObject:
    """Stands in for a pickled object whose class cannot be imported (e.g. mmengine's HistoryBuffer)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_StubObject,), {"__module__": module})


_lenient_pickle = types.ModuleType("filo_lenient_pickle")
_lenient_pickle.Unpickler = _LenientUnpickler  # type: ignore[attr-defined]
_lenient_pickle.load = lambda f, **kw: _LenientUnpickler(f, **kw).load()  # type: ignore[attr-defined]


def read_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, Tensor]:
    """The tensors of a checkpoint file (:func:`unwrap_state_dict`), loaded with ``weights_only=True`` unless
    ``allow_pickle`` (then unknown classes are stubbed instead of imported)."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"Grounding DINO checkpoint {path} does not exist; download FiLo's "
                                  f"{'/'.join(FILO_GROUNDING_FILES.values())} from the Hugging Face repo {FILO_REPO} "
                                  "or fix the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if not allow_pickle:
            raise DataError(
                f"{path}: cannot be read with torch.load(weights_only=True) ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}); it holds Python objects besides tensors (an MMDetection "
                "checkpoint's meta/message_hub). If you trust the file set allow_pickle=True in the grounding spec, "
                "or re-save its weights: torch.save(torch.load(f, weights_only=False)['state_dict'], g)."
            ) from err
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_lenient_pickle)
    return unwrap_state_dict(obj, str(path))


class ScaledContrastiveEmbedding(nn.Module):
    """MMDetection's ``ContrastiveEmbed``: s = (q · tᵀ) · exp(log_scale) or / √d ('auto'), + bias, masked, padded.

    Shapes: vision [B, nq, d], text [B, L, d], mask [B, L] bool → [B, nq, max_text_len] (−inf beyond L and on
    masked tokens). Parameters ``log_scale`` / ``bias`` have mmdet's shape [1].
    """

    def __init__(self, max_text_len: int, log_scale: bool, auto_scale: bool, bias: bool) -> None:
        super().__init__()
        self.max_text_len, self.auto_scale = max_text_len, auto_scale
        self.log_scale = nn.Parameter(torch.zeros(1)) if log_scale else None
        self.bias = nn.Parameter(torch.zeros(1)) if bias else None

    def forward(self, vision_hidden_state: Tensor, text_hidden_state: Tensor, text_token_mask: Tensor) -> Tensor:
        res = vision_hidden_state @ text_hidden_state.transpose(-1, -2)
        if self.log_scale is not None:
            res = res * self.log_scale.exp()
        elif self.auto_scale:
            res = res / math.sqrt(vision_hidden_state.shape[-1])
        if self.bias is not None:
            res = res + self.bias
        res = res.masked_fill(~text_token_mask[:, None, :], float("-inf"))
        out = torch.full((*res.shape[:-1], self.max_text_len), float("-inf"), device=res.device, dtype=res.dtype)
        out[..., : res.shape[-1]] = res
        return out


def install_contrastive_extras(model: nn.Module, state: Mapping[str, Tensor], mode: str = "detect") -> bool:
    """Swap in :class:`ScaledContrastiveEmbedding` heads when ``state`` has ``log_scale`` / ``bias`` for them or
    ``mode`` is "auto"; returns whether it did."""
    heads = re.compile(r"(class_embed\.\d+|model\.encoder_output_class_embed)\.(log_scale|bias)")
    found = {m.group(2) for k in state if (m := heads.fullmatch(k))}
    log_scale, bias = "log_scale" in found, "bias" in found
    auto = mode == "auto" or (mode == "detect" and bias and not log_scale)
    if not (log_scale or bias or auto):
        return False
    max_len = model.config.max_text_len
    model.class_embed = nn.ModuleList(ScaledContrastiveEmbedding(max_len, log_scale, auto, bias)
                                      for _ in range(len(model.class_embed)))
    model.model.encoder_output_class_embed = ScaledContrastiveEmbedding(max_len, log_scale, auto, bias)
    return True


def _bbox_heads_shared(state: Mapping[str, Tensor], layers: int) -> bool:
    first = {k[len("bbox_embed.0."):]: v for k, v in state.items() if k.startswith("bbox_embed.0.")}
    for i in range(1, layers):
        for name, value in first.items():
            other = state.get(f"bbox_embed.{i}.{name}")
            if other is not None and (other.shape != value.shape or not torch.equal(other, value)):
                return False
    return True


def _hub_error(what: str, repo: str, cache_dir: Path | None, err: Exception) -> MissingWeightsError:
    where = cache_dir or "the Hugging Face cache (HF_HOME)"
    return MissingWeightsError(
        f"grounding: {what} of {repo} is not in {where} and could not be downloaded ({type(err).__name__}: "
        f"{str(err).splitlines()[0][:200] if str(err) else ''}). Run once with internet access, or download the "
        f"repo into that cache (huggingface-cli download {repo} --cache-dir <dir>)."
    )


def load_grounding_dino(spec: GroundingSpec) -> tuple[nn.Module, Any]:
    """(model in eval mode without gradients, tokenizer) of ``spec``. See the module docstring for the profiles.

    Raises:
        MissingWeightsError: a file is neither cached nor downloadable.
        DataError: the checkpoint cannot be read or does not fit the architecture (keys listed).
    """
    if spec.kind == "tiny-random":
        return tiny_grounding_dino(spec.seed, spec.tiny_words)
    from transformers import AutoTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection

    cache = None if spec.cache_dir is None else str(spec.cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.base_repo, cache_dir=cache)
    except Exception as err:
        raise _hub_error("the tokenizer", spec.base_repo, spec.cache_dir, err) from err
    if spec.kind == "base":
        try:
            model = GroundingDinoForObjectDetection.from_pretrained(spec.base_repo, cache_dir=cache)
        except Exception as err:
            raise _hub_error("the weights", spec.base_repo, spec.cache_dir, err) from err
        return model.eval().requires_grad_(False), tokenizer
    path = spec.checkpoint
    if path is None:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(spec.filo_repo, spec.filo_file, cache_dir=cache))
        except Exception as err:
            raise _hub_error(spec.filo_file, spec.filo_repo, spec.cache_dir, err) from err
    state, layout = to_transformers(read_checkpoint(path, spec.allow_pickle), str(path))
    try:
        config = GroundingDinoConfig.from_pretrained(spec.base_repo, cache_dir=cache)
    except Exception as err:
        raise _hub_error("the config", spec.base_repo, spec.cache_dir, err) from err
    # one decoder layer: nothing to share (and transformers' tie of bbox_embed.1.. to .0 would raise)
    config.decoder_bbox_embed_share = config.decoder_layers > 1 and _bbox_heads_shared(state, config.decoder_layers)
    model = GroundingDinoForObjectDetection(config)
    install_contrastive_extras(model, state, spec.contrastive_scale)
    load_converted_state(model, state, f"{path} ({layout} layout)")
    model.filo_checkpoint_layout = layout  # for the run log
    return model.eval().requires_grad_(False), tokenizer


# ------------------------------------------------------------------------------------------------------- inference


def release_resize_hw(width: int, height: int, size: int = 518, max_size: int | None = 1333) -> tuple[int, int]:
    """(h, w) after IDEA's ``RandomResize([size], max_size)``: shorter side → ``size`` unless the longer side would
    exceed ``max_size`` (then size = round(max_size · short / long), Python's round); the longer side is truncated
    (``int``), and an image whose shorter side already equals the size keeps its shape."""
    if max_size is not None:
        short, long = float(min(width, height)), float(max(width, height))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        image = Image.open(image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ConfigError(f"grounding: image array must be uint8 HxWx3 (the original file), got {image.dtype}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ConfigError(f"grounding: image must be a uint8 array, a PIL image or a path, got {type(image).__name__}")
    return image.convert("RGB")


def preprocess_image(image: Any, size: int = 518, max_size: int | None = 1333) -> Tensor:
    """The release's detector input: [3, h, w] float32 (:func:`release_resize_hw`, PIL bilinear, ImageNet norm).

    ``image``: uint8 H×W×3 (or H×W) array, PIL image or path of the original file.
    """
    pil = _as_pil(image)
    h, w = release_resize_hw(pil.width, pil.height, size, max_size)
    resized = TF.resize(pil, [h, w], interpolation=TF.InterpolationMode.BILINEAR)
    return TF.normalize(TF.to_tensor(resized), list(IMAGENET_MEAN), list(IMAGENET_STD))


def normalise_caption(caption: str) -> str:
    """Lower-case, strip, end with "." (``get_grounding_output``)."""
    caption = caption.lower().strip()
    return caption if caption.endswith(".") else caption + "."


@dataclass
class Detection:
    """One image's detector output.

    Attributes:
        logits: [nq, 256] sigmoid probabilities per text-token position (IDEA's ``pred_logits.sigmoid()``; 0 at
            positions beyond the caption).
        boxes: [nq, 4] normalised cx, cy, w, h.
        input_ids: the caption's token ids ([CLS] … [SEP], unpadded).
        caption: the normalised caption.
        input_hw: (h, w) of the resized image the detector saw.
    """

    logits: Tensor
    boxes: Tensor
    input_ids: list[int]
    caption: str
    input_hw: tuple[int, int]

    @property
    def probs(self) -> Tensor:
        """Alias of ``logits`` (they are probabilities)."""
        return self.logits


def _tokenizer_of(tokenizer_or_processor: Any) -> Any:
    return getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)


@torch.no_grad()
def detect_batch(model: nn.Module, tokenizer_or_processor: Any, images: Sequence[Any], caption: str, *,
                 size: int = 518, max_size: int | None = 1333) -> list[Detection]:
    """:func:`detect` for several images and one caption; images of equal resized shape run as one batch (the
    release runs one image at a time; batching changes results only by float rounding)."""
    tokenizer = _tokenizer_of(tokenizer_or_processor)
    caption = normalise_caption(caption)
    tokens = tokenizer(caption, return_tensors="pt")
    input_ids = tokens["input_ids"][0].tolist()
    device = next(model.parameters()).device
    pixels = [preprocess_image(image, size, max_size) for image in images]
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, pixel in enumerate(pixels):
        groups.setdefault(tuple(pixel.shape), []).append(index)
    results: list[Detection | None] = [None] * len(pixels)
    for shape, indices in groups.items():
        batch = torch.stack([pixels[i] for i in indices]).to(device)
        n = len(indices)
        text = {k: v.expand(n, -1).to(device) for k, v in tokens.items()
                if k in ("input_ids", "attention_mask", "token_type_ids")}
        out = model(pixel_values=batch, **text)
        logits = out.logits.cpu().sigmoid()
        boxes = out.pred_boxes.cpu()
        for row, i in enumerate(indices):
            results[i] = Detection(logits[row], boxes[row], input_ids, caption, (shape[1], shape[2]))
    return [r for r in results if r is not None]


def detect(model: nn.Module, tokenizer_or_processor: Any, image: Any, caption: str, *, size: int = 518,
           max_size: int | None = 1333) -> Detection:
    """Run the detector on one original image with ``caption`` (normalised here), as ``get_grounding_output``."""
    return detect_batch(model, tokenizer_or_processor, [image], caption, size=size, max_size=max_size)[0]


def phrases_from_positions(mask_row: Tensor, input_ids: Sequence[int], tokenizer_or_processor: Any) -> str:
    """IDEA's ``get_phrases_from_posmap``: decode the ids at the selected positions (0 and ≥ 255 ignored).

    ``mask_row``: [256] bool (e.g. ``probs_row > text_threshold``), not modified.
    """
    return _tokenizer_of(tokenizer_or_processor).decode(selected_token_ids(mask_row, input_ids))


def localise(detection: Detection, tokenizer_or_processor: Any, words: Sequence[str], **kwargs: Any) -> HqLocResult:
    """:func:`baselines.filo.hqloc.hq_localise` on a :class:`Detection` (keyword arguments passed on)."""
    tokenizer = _tokenizer_of(tokenizer_or_processor)
    return hq_localise(detection.logits, detection.boxes, detection.input_ids, tokenizer.decode, words, **kwargs)
