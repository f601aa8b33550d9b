"""FiLo's Grounding DINO wrapper (baselines/filo/grounding.py): the release's preprocessing, the tiny detector, and the
checkpoint key mappings (MMDetection and IDEA layouts ↔ transformers) with their loud failures.

The mappings were also checked offline against a tiny IDEA model built from the release's vendored code and against
MMDetection's own IDEA→mmdet converter (see the module docstring); those need the release checkout and old
transformers, so here they are checked by exact round trips and by the patch-merging semantics."""

import re
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from baselines.filo import grounding as g
from baselines.filo.hqloc import GENERIC_WORDS, grounding_caption
from siad.errors import ConfigError, DataError, MissingWeightsError

DESCRIPTIONS = ["cracked large", "dented small", "missing cap"]
CAPTION = grounding_caption(GENERIC_WORDS, DESCRIPTIONS)


@pytest.fixture(scope="module")
def tiny():
    return g.tiny_grounding_dino(seed=0, words=DESCRIPTIONS)


@pytest.fixture(scope="module")
def image():
    return (np.random.default_rng(0).random((70, 96, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def reference(tiny, image):
    model, tok = tiny
    return g.detect(model, tok, image, CAPTION, size=64)


def _outputs(model, tok, image):
    d = g.detect(model, tok, image, CAPTION, size=64)
    return d.logits, d.boxes


# ---- inputs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wh", "size", "expected"),
    [((1024, 1024), 518, (518, 518)), ((900, 600), 518, (518, 777)), ((518, 700), 518, (700, 518)),
     ((4000, 1000), 518, (333, 1332)),  # longer side capped: size = round(1333 / 4) = 333
     ((2666, 665), 518, (332, 1330))],  # round(332.5) = 332 (half to even); int(1330.99) = 1330
)
def test_release_resize_rounding(wh, size, expected):
    assert g.release_resize_hw(*wh, size=size, max_size=1333) == expected


def test_preprocess_is_pil_bilinear_then_imagenet_norm():
    arr = (np.random.default_rng(1).random((20, 30, 3)) * 255).astype(np.uint8)
    x = g.preprocess_image(arr, size=16)
    assert x.shape == (3, 16, 24)
    ref = np.asarray(Image.fromarray(arr).resize((24, 16), Image.BILINEAR), dtype=np.float32) / 255
    ref = (torch.from_numpy(ref).permute(2, 0, 1) - torch.tensor(g.IMAGENET_MEAN)[:, None, None]) / torch.tensor(
        g.IMAGENET_STD)[:, None, None]
    assert torch.allclose(x, ref, atol=1e-6)
    gray = g.preprocess_image(arr[..., 0], size=16)  # grey images become RGB, as Image.convert("RGB")
    assert gray.shape == (3, 16, 24)
    with pytest.raises(ConfigError, match="uint8"):
        g.preprocess_image(arr.astype(np.float32))


def test_caption_normalisation():
    assert g.normalise_caption("  Anomaly . Cracked large ") == "anomaly . cracked large."
    assert g.normalise_caption("a . b.") == "a . b."


# ---- tiny detector ------------------------------------------------------------------------------------------------


def test_tiny_vocabulary_keeps_bert_special_ids(tiny):
    _, tok = tiny
    assert tok.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", ".", "?"]) == [0, 100, 101, 102, 1012, 1029]
    ids = tok("anomaly . cracked large . zebra.")["input_ids"]
    assert ids[0] == 101 and ids[2] == 1012 and ids[-1] == 102 and 100 in ids  # "zebra" is unknown
    assert tok.decode(ids[3:5]) == "cracked large"


def test_tiny_detector_outputs_and_determinism(tiny, image, reference):
    model, tok = tiny
    d = reference
    assert d.logits.shape == (30, 256) and d.boxes.shape == (30, 4) and d.input_hw == (64, 87)
    assert d.caption == g.normalise_caption(CAPTION) and d.input_ids == tok(d.caption)["input_ids"]
    n = len(d.input_ids)
    assert (d.logits[:, n:] == 0).all() and (d.logits[:, :n] > 0).all()  # -inf beyond the caption
    assert ((d.boxes >= 0) & (d.boxes <= 1)).all()
    again, _ = g.tiny_grounding_dino(seed=0, words=DESCRIPTIONS)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other, _ = g.tiny_grounding_dino(seed=1, words=DESCRIPTIONS)
    assert not torch.equal(other.model.text_projection.weight, model.model.text_projection.weight)


def test_batch_matches_single(tiny, image, reference):
    model, tok = tiny
    small = image[:50, :50]
    out = g.detect_batch(model, tok, [image, small, image], CAPTION, size=64)
    assert [o.input_hw for o in out] == [(64, 87), (64, 64), (64, 87)]
    for o in (out[0], out[2]):
        assert torch.allclose(o.logits, reference.logits, atol=1e-5)
        assert torch.allclose(o.boxes, reference.boxes, atol=1e-5)


def test_phrases_from_positions(tiny, reference):
    _, tok = tiny
    ids = reference.input_ids
    row = torch.zeros(256, dtype=torch.bool)
    row[[0, 3, 4, 255]] = True  # 0 and 255 are never read
    assert g.phrases_from_positions(row, ids, tok) == tok.decode(ids[3:5])
    res = g.localise(reference, tok, DESCRIPTIONS + list(GENERIC_WORDS))
    assert len(res.labels) == len(res.kept) == res.boxes_px.shape[0] >= 1


# ---- key mappings -----------------------------------------------------------------------------------------------


def test_patch_merging_permutation_matches_unfold_semantics():
    c = 3
    x = torch.randn(1, c, 4, 6)
    hwc = x.permute(0, 2, 3, 1)
    idea = torch.cat([hwc[:, 0::2, 0::2], hwc[:, 1::2, 0::2], hwc[:, 0::2, 1::2], hwc[:, 1::2, 1::2]], dim=-1)
    idea = idea.reshape(1, -1, 4 * c)  # IDEA / transformers order: 4 neighbour groups x C
    unfold = F.unfold(x, kernel_size=2, stride=2).transpose(1, 2)  # mmdet order: C x 4 kernel positions
    perm = g._to_unfold(torch.arange(4 * c))
    assert torch.equal(unfold, idea[..., perm])
    w = torch.randn(5, 4 * c)
    assert torch.allclose(idea @ w.T, unfold @ g._to_unfold(w).T, atol=1e-6)
    assert torch.equal(g._from_unfold(g._to_unfold(w)), w)


def test_mmdet_round_trip_loads_strictly_and_reproduces_outputs(tiny, image, reference):
    model, tok = tiny
    sd = model.state_dict()
    mm = g.transformers_to_mmdet(sd)
    assert g.detect_layout(mm) == "mmdet"
    for key in ("backbone.stages.0.blocks.0.attn.w_msa.qkv.weight", "backbone.stages.0.downsample.reduction.weight",
                "backbone.norm3.weight", "text_feat_map.weight", "neck.convs.2.gn.bias", "level_embed",
                "language_model.language_backbone.body.model.embeddings.word_embeddings.weight",
                "neck.extra_convs.0.conv.weight",
                "query_embedding.weight", "memory_trans_fc.weight", "encoder.fusion_layers.0.gamma_v",
                "encoder.text_layers.0.self_attn.attn.in_proj_weight", "decoder.layers.0.norms.3.weight",
                "decoder.layers.0.cross_attn_text.attn.in_proj_bias", "decoder.ref_point_head.layers.1.weight",
                "bbox_head.reg_branches.0.4.bias", "bbox_head.reg_branches.1.0.weight"):
        assert key in mm, key
    assert not any(k.startswith(("model.", "transformer.", "backbone.0.")) for k in mm)
    # the encoder-output box head is reg_branches.{n_dec}
    assert torch.equal(mm["bbox_head.reg_branches.1.4.bias"], sd["model.encoder_output_bbox_embed.layers.2.bias"])
    back = g.mmdet_to_transformers({"state_dict": {f"module.{k}": v for k, v in mm.items()}, "meta": {"epoch": 1}})
    unused = {k for k in sd if ".swin.layernorm." in k}
    assert set(back) == set(sd) - unused
    assert all(torch.equal(back[k], sd[k]) for k in back)
    fresh, _ = g.tiny_grounding_dino(seed=7, words=DESCRIPTIONS)
    g.load_converted_state(fresh, back, "round trip")
    logits, boxes = _outputs(fresh, tok, image)
    assert torch.equal(logits, reference.logits) and torch.equal(boxes, reference.boxes)


def test_idea_round_trip(tiny, image, reference):
    model, tok = tiny
    idea = g.transformers_to_idea(model.state_dict())
    assert g.detect_layout(idea) == "idea"
    for key in ("backbone.0.layers.0.blocks.0.attn.qkv.weight", "backbone.0.norm1.weight", "feat_map.weight",
                "bert.embeddings.LayerNorm.bias", "input_proj.3.1.weight", "transformer.tgt_embed.weight",
                "transformer.encoder.text_layers.0.self_attn.in_proj_weight",
                "transformer.decoder.layers.0.catext_norm.weight", "transformer.decoder.bbox_embed.0.layers.2.bias",
                "bbox_embed.0.layers.2.bias", "transformer.enc_out_bbox_embed.layers.0.weight"):
        assert key in idea, key
    wrapped = {"model": {f"module.{k}": v for k, v in idea.items()}, "optimizer": {}, "epoch": 3}
    state, layout = g.to_transformers(wrapped)
    assert layout == "idea"
    fresh, _ = g.tiny_grounding_dino(seed=8, words=DESCRIPTIONS)
    g.load_converted_state(fresh, state)
    logits, boxes = _outputs(fresh, tok, image)
    assert torch.equal(logits, reference.logits) and torch.equal(boxes, reference.boxes)


@pytest.fixture()
def mmdet_state(tiny):
    return g.transformers_to_mmdet(tiny[0].state_dict())


def _load_mm(mm):
    fresh, _ = g.tiny_grounding_dino(seed=3, words=DESCRIPTIONS)
    g.load_converted_state(fresh, g.mmdet_to_transformers(mm), "ckpt.pth")


def test_missing_key_is_named(mmdet_state):
    del mmdet_state["bbox_head.reg_branches.0.4.bias"]
    with pytest.raises(DataError, match=r"ckpt\.pth.*\n  missing \(2\): .*bbox_embed\.0\.layers\.2\.bias"):
        _load_mm(mmdet_state)


def test_unexpected_key_is_named(mmdet_state):
    mmdet_state["bbox_head.extra_branch.weight"] = torch.zeros(2)
    with pytest.raises(DataError, match=r"unexpected \(1\): bbox_head\.extra_branch\.weight"):
        _load_mm(mmdet_state)


def test_misshaped_key_is_named(mmdet_state):
    mmdet_state["text_feat_map.weight"] = torch.zeros(3, 3)
    expected = "mis-shaped (1): model.text_projection.weight (3, 3) vs model (32, 32)"
    with pytest.raises(DataError, match=re.escape(expected)):
        _load_mm(mmdet_state)
    mmdet_state["backbone.stages.0.blocks.0.attn.w_msa.qkv.weight"] = torch.zeros(47, 16)
    with pytest.raises(DataError, match=re.escape("attn.qkv.weight (47, 16) cannot be split")):
        g.mmdet_to_transformers(mmdet_state)


def test_tied_heads_with_different_weights_fail():
    from transformers import GroundingDinoForObjectDetection

    config = g._tiny_config(1040)
    config.decoder_layers, config.decoder_bbox_embed_share = 2, True
    model = GroundingDinoForObjectDetection(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["bbox_embed.1.layers.0.weight"] += 1
    expected = r"tied in the model but different in the file \(1\): .*bbox_embed\.1\.layers\.0\.weight"
    with pytest.raises(DataError, match=expected):
        g.load_converted_state(model, state)
    assert not g._bbox_heads_shared(state, 2) and g._bbox_heads_shared(model.state_dict(), 2)


def test_mmdet_log_scale_is_honoured(tiny, image, mmdet_state):
    model, tok = tiny
    for i in range(2):  # decoder head 0 and the encoder-output head 1
        mmdet_state[f"bbox_head.cls_branches.{i}.log_scale"] = torch.tensor([0.3])
    state = g.mmdet_to_transformers(mmdet_state)
    assert "class_embed.0.log_scale" in state and "model.encoder_output_class_embed.log_scale" in state
    fresh, _ = g.tiny_grounding_dino(seed=4, words=DESCRIPTIONS)
    assert g.install_contrastive_extras(fresh, state)
    g.load_converted_state(fresh, state)
    ids = tok(g.normalise_caption(CAPTION), return_tensors="pt")
    pixels = g.preprocess_image(image, size=64)[None]
    with torch.no_grad():
        base, scaled = model(pixel_values=pixels, **ids), fresh(pixel_values=pixels, **ids)
    finite = torch.isfinite(base.logits)
    assert torch.equal(finite, torch.isfinite(scaled.logits))
    assert torch.allclose(scaled.logits[finite], base.logits[finite] * np.exp(0.3), rtol=1e-5, atol=1e-5)
    assert torch.allclose(scaled.pred_boxes, base.pred_boxes, atol=1e-6)  # top-k query choice unchanged
    bias_only = g.tiny_grounding_dino(seed=4, words=DESCRIPTIONS)[0]
    assert g.install_contrastive_extras(bias_only, {"class_embed.0.bias": torch.zeros(1)})
    assert bias_only.class_embed[0].auto_scale  # mmdet configs with a bias use log_scale='auto'


def test_unknown_layout_and_bad_objects():
    with pytest.raises(DataError, match="not a Grounding DINO state dict"):
        g.detect_layout({"foo.weight": torch.zeros(1)})
    with pytest.raises(DataError, match="no tensors"):
        g.unwrap_state_dict({"epoch": 3})


# ---- files and profiles -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(tiny, tmp_path_factory):
    """A local stand-in for the hub base repo: the tiny config and tokenizer, saved."""
    folder = tmp_path_factory.mktemp("tiny_base")
    model, tok = tiny
    model.config.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_filo_finetuned_profile_from_local_files(tiny, image, reference, base_dir, tmp_path):
    model, _ = tiny
    path = tmp_path / "grounding_train_on_visa.pth"
    torch.save({"state_dict": g.transformers_to_mmdet(model.state_dict()), "meta": {"epoch": 12, "seed": 0}}, path)
    spec = g.GroundingSpec(kind="filo-finetuned", base_repo=str(base_dir), checkpoint=path)
    loaded, tok = g.load_grounding_dino(spec)
    assert loaded.filo_checkpoint_layout == "mmdet" and not loaded.training
    logits, boxes = _outputs(loaded, tok, image)
    assert torch.equal(logits, reference.logits) and torch.equal(boxes, reference.boxes)
    with pytest.raises(MissingWeightsError, match="nope.pth does not exist"):
        g.load_grounding_dino(g.GroundingSpec(kind="filo-finetuned", base_repo=str(base_dir),
                                              checkpoint=tmp_path / "nope.pth"))


def test_pickled_objects_need_allow_pickle(tiny, tmp_path):
    model, _ = tiny
    fake = types.ModuleType("fake_mmengine_logging")

    class HistoryBuffer:
        def __init__(self):
            self.values = [1.0, 2.0]

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = fake.__name__, "HistoryBuffer"
    fake.HistoryBuffer = HistoryBuffer
    sys.modules[fake.__name__] = fake
    path = tmp_path / "mm.pth"
    try:
        torch.save({"state_dict": g.transformers_to_mmdet(model.state_dict()),
                    "message_hub": {"loss": HistoryBuffer()}}, path)
    finally:
        del sys.modules[fake.__name__]
    with pytest.raises(DataError, match=r"mm\.pth: cannot be read with torch\.load\(weights_only=True\).*allow_pickle"):
        g.read_checkpoint(path)
    state = g.read_checkpoint(path, allow_pickle=True)
    assert g.detect_layout(state) == "mmdet" and "level_embed" in state


def test_specs():
    assert g.filo_grounding_spec("visa").filo_file == "grounding_train_on_visa.pth"
    default = g.GroundingSpec()
    assert default.kind == "tiny-random" and default.base_repo == "IDEA-Research/grounding-dino-tiny"
    with pytest.raises(ConfigError):
        g.GroundingSpec(kind="large")
    with pytest.raises(ConfigError):
        g.filo_grounding_spec("mpdd")
    model, tok = g.load_grounding_dino(g.GroundingSpec(seed=0, tiny_words=tuple(DESCRIPTIONS)))
    assert model.config.num_queries == 30 and tok.convert_tokens_to_ids("dented") != 100
