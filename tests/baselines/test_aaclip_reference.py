"""AA-CLIP against the released code: the vectors of tests/data/aaclip/vectors.npz (see its README).

The vectors were made by running Mwxinnn/AA-CLIP@53db195 on the tiny exact-GELU ViT-L/14@336-shaped CLIP of
``aaclip_reference.TINY_CONFIG`` at 518 px with ``tiny_state_dict()`` (the values the release's loader holds) and
``reference_inputs()`` / ``fake_class_inputs()``; here the suite's implementation runs on the same open_clip model,
weights, inputs and initial adapter weights (``init/<release name>``).
"""

import copy
import dataclasses
import importlib.util
import pathlib

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from baselines.aaclip import AACLIPConfig, AACLIPModel
from baselines.aaclip.torch_model import (
    anomaly_map,
    detection_logits,
    gaussian_blur2d,
    gaussian_kernel1d,
    normalize_class,
    orthogonality_loss,
    patch_logits,
    raw_image_scores,
    seg_loss,
    stage1_features,
    training_probabilities,
)
from siad.backbones import variant_features
from siad.methods import build_method
from siad.methods.frozen import ImageEmbeddings
from siad.methods.losses import dice_loss, focal_loss

_path = pathlib.Path(__file__).with_name("aaclip_reference.py")
_spec = importlib.util.spec_from_file_location("aaclip_reference", _path)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

pytestmark = pytest.mark.skipif(not ref.VECTORS_PATH.is_file(), reason="reference vectors not generated")

ATOL = 1e-5
LEVELS = (6, 12, 18, 24)
T14 = slice(None, None, 14)  # patches 0, 14, ... of 1369 (CLS dropped)
T42 = slice(None, None, 42)  # tokens 0, 42, ... of 1370 (CLS first)
S7 = (slice(None), slice(None, None, 7), slice(None, None, 7))
CROP = (slice(None), slice(None, 40), slice(None, 40))


assert_close = ref.assert_close  # shape, then max |diff| ≤ atol (default 1e-5)


@pytest.fixture(scope="module")
def vectors():
    return ref.load_vectors()


@pytest.fixture(scope="module")
def clip():
    """The tiny CLIP built at 518 px (exact GELU), the release's loaded weights, the positional embedding resized by
    open_clip (bicubic, antialias: the release's load-time resize)."""
    config = copy.deepcopy(ref.TINY_CONFIG)
    config["vision_cfg"]["image_size"] = ref.IMAGE_SIZE
    model = open_clip.model.CLIP(**config, quick_gelu=False)
    state = ref.tiny_state_dict(as_loaded=True)
    open_clip.model.resize_pos_embed(state, model)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-L-14-336")


@pytest.fixture(scope="module")
def inputs():
    return ref.reference_inputs()


def build(clip, tokenizer, vectors, **config):
    model = AACLIPModel(clip, tokenizer, AACLIPConfig(**config), seed=0)
    init = ref.initial_adapters(vectors)
    state = model.adapters.state_dict()
    assert set(init) == set(state) - {"text_adapted"}
    model.adapters.load_state_dict({**init, "text_adapted": torch.tensor(True)})  # release: text always adapted
    return model


@pytest.fixture(scope="module")
def model(clip, tokenizer, vectors):
    return build(clip, tokenizer, vectors)


@pytest.fixture(scope="module")
def text(model):
    with torch.no_grad():
        return model.text_features("dark bottle")


def test_inputs_and_weights_are_the_reference_ones(vectors, inputs, clip):
    state = ref.tiny_state_dict(as_loaded=False)
    assert list(vectors["weights_keys"]) == sorted(state)
    assert np.allclose([float(state[k].double().sum()) for k in vectors["weights_keys"]], vectors["weights_sum"],
                       rtol=0, atol=1e-9)
    loaded = ref.tiny_state_dict(as_loaded=True)
    assert np.allclose([float(loaded[k].double().sum()) for k in vectors["weights_keys"]],
                       vectors["weights_loaded_sum"], rtol=0, atol=1e-9)
    assert np.array_equal(inputs["image"][:, :, ::37, ::37].numpy(), vectors["input_image_slice"])
    assert np.array_equal(inputs["label"].numpy(), vectors["input_label"])
    assert_close(clip.visual.positional_embedding[::10], vectors["visual_pos_embed_rows10"], 0.0,
                 "visual_pos_embed_rows10")


# ----------------------------------------------------------------------------------------------------- text


def test_sentences_tokens_and_text_features(model, text, vectors, clip):
    tokens, n_normal = model.tokens("dark bottle")
    normal_abnormal = [str(s) for s in vectors["text_sentences"]]
    from baselines.aaclip.torch_model import aaclip_sentences

    assert sum(aaclip_sentences("dark bottle"), []) == normal_abnormal and n_normal == 6
    assert np.array_equal(tokens.numpy(), vectors["text_tokens"])
    trace = {}
    with torch.no_grad():
        again = model.text_features("dark bottle", trace=trace)
    assert_close(trace["sentence_embeddings"], vectors["text_sentence_raw"], name="text_sentence_raw")
    assert_close(F.normalize(trace["sentence_embeddings"], dim=-1), vectors["text_sentence_features"],
                 name="text_sentence_features")
    assert_close(text.T, vectors["text_T"], name="text_T")
    assert torch.equal(again, text)
    with torch.no_grad():
        assert_close(model.text_features("dark bottle", adapted=False).T, vectors["text_T_plain_clip"],
                     name="text_T_plain_clip")
        med_tokens, _ = model.tokens("scan")
        assert np.array_equal(med_tokens.numpy(), vectors["text_med_tokens"])
        assert_close(model.text_features("scan").T, vectors["text_med_T"], name="text_med_T")


def test_text_adapter_intermediates(model, vectors):
    """Block outputs, raw adapter outputs and mixed streams of text blocks 1-3, sentences 0 and 6, positions 0-11."""
    from baselines.aaclip.torch_model import encode_text_adapted

    tokens, _ = model.tokens("dark bottle")
    trace = {}
    with torch.no_grad():
        encode_text_adapted(model.clip, tokens, model.adapters, trim=False, trace=trace)
    for name in ("block_out", "adapter_raw", "mixed"):
        got = torch.stack([t[[0, 6], :12] for t in trace[f"text_{name}"]])
        assert_close(got, vectors[f"text_{name}"], name=f"text_{name}")


# ---------------------------------------------------------------------------------------------------- stage 1


@pytest.fixture(scope="module")
def stage1(model, inputs):
    images = inputs["image"]
    surgery = model.surgery_features(images, LEVELS)
    g = model.global_embedding(images)
    return surgery, g, stage1_features(surgery, g)


def test_surgery_tokens_global_and_stage1_features(model, inputs, vectors, stage1):
    surgery, g, f = stage1
    feats = variant_features(model.clip.visual, inputs["image"], model.variant, [lv - 1 for lv in LEVELS],
                             run_original=False).modified
    tokens = torch.stack([torch.cat([c[:, None], p], dim=1)[:, T42] for c, p in zip(feats.cls, feats.patch,
                                                                                        strict=True)])
    assert_close(tokens, vectors["s1_surgery_tokens_t42"], name="s1_surgery_tokens_t42")
    assert_close(F.normalize(g, dim=-1), vectors["s1_ghat"], name="s1_ghat")
    assert_close(f[:, :, T14].transpose(0, 1), vectors["s1_f_t14"], name="s1_f_t14")
    # batch 1: the attention across the batch axis is out_proj(v)
    one = variant_features(model.clip.visual, inputs["image"][:1], model.variant, [23], run_original=False).modified
    assert_close(torch.cat([one.cls[0][:, None], one.patch[0]], 1)[:, T42], vectors["s1_b1_surgery_tokens24_t42"],
                 name="s1_b1_surgery_tokens24_t42")
    first = inputs["image"][:1]
    f1 = stage1_features(model.surgery_features(first, (24,)), model.global_embedding(first))
    assert_close(f1[:, 0, T14], vectors["s1_b1_f24_t14"], name="s1_b1_f24_t14")


def test_stage1_logits_probabilities_and_loss(model, text, inputs, vectors, stage1):
    _, _, f = stage1
    per_image = text.expand(2, 2, -1)
    logits = torch.stack([patch_logits(f[:, k], per_image)[:, T14] for k in range(4)])
    assert_close(logits, vectors["s1_logits_t14"], 1e-3, "s1_logits_t14")  # scale 100: 1e-5 relative
    masks = inputs["mask"]
    terms = []
    for k in range(4):
        probs = training_probabilities(f[:, k], per_image, ref.IMAGE_SIZE)
        m = masks
        terms.append([focal_loss(probs, m), dice_loss(probs[:, 0], 1 - m), dice_loss(probs[:, 1], m),
                      seg_loss(probs, m)])
        if k == 3:
            assert_close(probs[:, 1][S7], vectors["s1_P24_a_s7"], name="s1_P24_a_s7")
            assert_close(probs[:, 1][CROP], vectors["s1_P24_a_crop"], name="s1_P24_a_crop")
    assert_close(torch.tensor([[float(t) for t in row] for row in terms]), vectors["s1_seg_terms"],
                 name="s1_seg_terms")
    assert_close(orthogonality_loss(per_image), vectors["s1_ortho"], name="s1_ortho")
    loss = model.stage1_loss(f[:, -1:], per_image, masks)
    assert_close(loss.total, vectors["s1_loss"], name="s1_loss")
    every = AACLIPConfig(stage1_loss_layers="all")
    assert every.stage1_loss_layers == "all"


@pytest.mark.parametrize(("lr", "tag"), [(1e-5, "lr1e-5"), (1e-3, "lr1e-3")])
def test_stage1_gradients_and_three_adam_steps(clip, tokenizer, vectors, inputs, stage1, lr, tag):
    model = build(clip, tokenizer, vectors)
    _, _, f = stage1
    params = dict(model.adapters.text_adapter.named_parameters())
    optimizer = torch.optim.Adam(params.values(), lr=lr, betas=(0.5, 0.999))
    rows = []
    for step in range(4):
        text = model.text_features("dark bottle").expand(2, 2, -1)
        terms = model.stage1_loss(f[:, -1:], text, inputs["mask"])
        probs = training_probabilities(f[:, -1], text, ref.IMAGE_SIZE)
        m = inputs["mask"]
        rows.append([float(focal_loss(probs, m)), float(dice_loss(probs[:, 0], 1 - m)),
                     float(dice_loss(probs[:, 1], m)), float(terms.orthogonality), float(terms.total)])
        if step == 3:
            break
        optimizer.zero_grad()
        terms.total.backward()
        if step == 0 and tag == "lr1e-5":
            for k, p in params.items():
                assert_close(p.grad, vectors[f"s1_grad0/text_adapter.{k}"], 1e-5, f"s1_grad0/{k}")
        optimizer.step()
        if step in (0, 2):
            for k, p in params.items():
                key = f"s1_{tag}_step{step + 1}/text_adapter.{k}"
                assert_close(p, vectors[key], name=key)
                # the moves are ~lr per step: compare them too, to 1 % of a step
                start = vectors[f"init/text_adapter.{k}"]
                assert_close(p.detach() - torch.from_numpy(start), vectors[key] - start, lr * 1e-2, f"{key} (delta)")
    assert_close(torch.tensor(rows), vectors[f"s1_{tag}_losses"], name=f"s1_{tag}_losses")


# ---------------------------------------------------------------------------------------------------- stage 2


def test_stage2_features_intermediates_and_loss(model, text, inputs, vectors):
    trace = {}
    with torch.no_grad():
        feats = model.image_features(inputs["image"], trace=trace)
    mixed = torch.stack([t[:, T42] for t in trace["image_mixed"]])
    assert_close(mixed[..., ::2], vectors["s2_adapter_mixed_t42_c2"], name="s2_adapter_mixed_t42_c2")
    assert_close(mixed[0], vectors["s2_adapter1_mixed_t42"], name="s2_adapter1_mixed_t42")
    assert_close(trace["image_block_out"][0][:, T42], vectors["s2_block1_out_t42"], name="s2_block1_out_t42")
    assert_close(trace["image_adapter_raw"][0][:, T42], vectors["s2_adapter1_raw_t42"], name="s2_adapter1_raw_t42")
    assert_close(feats.seg[:, :, T14].transpose(0, 1), vectors["s2_F_t14"], name="s2_F_t14")
    assert_close(feats.det, vectors["s2_det"], name="s2_det")
    assert_close(detection_logits(feats.det, text), vectors["s2_cls_logits"], name="s2_cls_logits")
    rows = []
    for k in range(4):
        probs = training_probabilities(feats.seg[:, k], text, ref.IMAGE_SIZE)
        m = inputs["mask"]
        rows.append([float(focal_loss(probs, m)), float(dice_loss(probs[:, 0], 1 - m)),
                     float(dice_loss(probs[:, 1], m)), float(seg_loss(probs, m))])
    assert_close(torch.tensor(rows), vectors["s2_seg_terms"], name="s2_seg_terms")
    loss = model.stage2_loss(feats, text, inputs["mask"], inputs["label"])
    assert_close(loss.total, vectors["s2_loss"], name="s2_loss")


def _image_subset(key, value):
    return value[::8] if "layer_adapters" in key else value


def test_stage2_gradients_and_three_adam_steps(clip, tokenizer, vectors, inputs):
    model = build(clip, tokenizer, vectors)
    with torch.no_grad():
        text = model.text_features("dark bottle")
    params = dict(model.adapters.image_adapter.named_parameters())
    optimizer = torch.optim.Adam(params.values(), lr=5e-4, betas=(0.5, 0.999))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[16000, 32000], gamma=0.5)
    rows = []
    for step in range(4):
        feats = model.image_features(inputs["image"])
        terms = model.stage2_loss(feats, text, inputs["mask"], inputs["label"])
        rows.append([float(terms.ce), *[float(s) for s in terms.seg], float(terms.total)])
        if step == 3:
            break
        optimizer.zero_grad()
        terms.total.backward()
        if step == 0:
            for k, p in params.items():
                assert_close(_image_subset(k, p.grad), vectors[f"s2_grad0/image_adapter.{k}"], 1e-5, f"s2_grad0/{k}")
        optimizer.step()
        scheduler.step()
        if step in (0, 2):
            for k, p in params.items():
                key = f"s2_step{step + 1}/image_adapter.{k}"
                assert_close(_image_subset(k, p), vectors[key], name=key)
    assert_close(torch.tensor(rows), vectors["s2_losses"], name="s2_losses")
    assert scheduler.get_last_lr()[0] == pytest.approx(float(vectors["s2_lr_after3"]))


# ----------------------------------------------------------------------------------------------- inference


def test_inference_logits_blur_and_maps(model, text, inputs, vectors):
    with torch.no_grad():
        feats = model.image_features(inputs["image"])
    assert_close(raw_image_scores(feats.det, text), vectors["inf_score_raw"], name="inf_score_raw")
    logits = torch.stack([patch_logits(feats.seg[:, k], text) for k in range(4)])
    assert_close(logits[:, :, T14], vectors["inf_logits_t14"], 1e-3, "inf_logits_t14")
    grid = logits.permute(0, 1, 3, 2).reshape(4, 2, 2, ref.GRID, ref.GRID)
    m = (grid[:, :, 1] + 1 - grid[:, :, 0]) / 2
    assert_close(m, vectors["inf_m_grid"], 1e-3, "inf_m_grid")
    for dom, (size, sigma) in {"ind": (7, 1.0), "med": (9, 1.5)}.items():
        assert_close(gaussian_kernel1d(size, sigma), vectors[f"inf_{dom}_kernel1d"], 1e-7, f"inf_{dom}_kernel1d")
        blurred = torch.stack([gaussian_blur2d(layer[:, None], size, sigma)[:, 0] for layer in m])
        assert_close(blurred, vectors[f"inf_{dom}_blur_grid"], 1e-3, f"inf_{dom}_blur_grid")
        summed = anomaly_map(feats.seg, text, ref.IMAGE_SIZE, (size, sigma))
        assert_close(summed[S7], vectors[f"inf_{dom}_map_s7"], 1e-3, f"inf_{dom}_map_s7")
        assert_close(summed[CROP], vectors[f"inf_{dom}_map_crop"], 1e-3, f"inf_{dom}_map_crop")


@pytest.mark.parametrize(("dom", "cls_name", "description", "domain"),
                         [("ind", "bottle", "dark bottle", "industrial"), ("med", "brain", "scan", "medical")])
def test_per_class_normalisation_on_the_fake_class(model, vectors, dom, cls_name, description, domain):
    fake = ref.fake_class_inputs()
    with torch.no_grad():
        text = model.text_features(description)
    scores, maps = model.predict(fake["image"], text.expand(4, 2, -1), [domain] * 4)
    assert_close(maps[:, ::14, ::14], vectors[f"inf_{dom}_fake_map_s14"], 1e-3, f"inf_{dom}_fake_map_s14")
    assert_close(maps[CROP], vectors[f"inf_{dom}_fake_map_crop"], 1e-3, f"inf_{dom}_fake_map_crop")
    assert_close(scores, vectors[f"inf_{dom}_fake_score_raw"], name=f"inf_{dom}_fake_score_raw")
    final, norm = normalize_class(scores, maps, domain)
    assert_close(norm.flatten(1).max(1).values, vectors[f"inf_{dom}_fake_map_norm_max"],
                 name=f"inf_{dom}_fake_map_norm_max")
    assert_close(final, vectors[f"inf_{dom}_fake_image_score"], name=f"inf_{dom}_fake_image_score")


# ---------------------------------------------------------------------------------------------------- method


def _reference_method(clip, tokenizer, vectors, **params):
    """The suite method on the tiny reference CLIP (518 px) with the reference initial adapters."""
    method = build_method("aaclip", {"backbone": "tiny-vit-l14-gelu-demo", "features": [2, 4, 6, 8],
                                     "surgery_start": 3, "image_adapter_blocks": 2, "progress": False, **params})
    spec = dataclasses.replace(method.backbone.spec, image_size=ref.IMAGE_SIZE)
    method.backbone = dataclasses.replace(method.backbone, spec=spec, model=clip, tokenizer=tokenizer)
    method.embeddings = ImageEmbeddings(method.backbone, 0)
    method.model = build(clip, tokenizer, vectors)
    method.config = method.model.config
    return method


class _ReferenceItems(torch.utils.data.Dataset):
    def __init__(self, inputs):
        self.inputs = inputs

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return {"image": self.inputs["image"][i], "mask": self.inputs["mask"][i].bool(),
                "label": int(self.inputs["label"][i]), "cls_name": "bottle", "img_path": f"ref{i}.png"}


def test_the_method_stages_reproduce_three_released_epochs(clip, tokenizer, vectors, inputs):
    """fit_text_adapter / fit_image_adapter on the two reference items (batch 2, no augmentation, 3 epochs each)
    = the release's 3 Adam steps per stage (the batch order may differ, which moves the sums by rounding only)."""
    method = _reference_method(clip, tokenizer, vectors, stage1_epochs=3, stage1_batch_size=2, stage1_augment=False,
                               stage2_epochs=3, checkpoint_epoch=3, augment=False)
    method.fit_image_adapter(_ReferenceItems(inputs), "zad")  # T of the initial text adapter, as the vectors
    for k, p in method.model.adapters.image_adapter.named_parameters():
        assert_close(_image_subset(k, p), vectors[f"s2_step3/image_adapter.{k}"], name=f"s2_step3/{k}")
    assert_close([h["total"] for h in method.loss_history], vectors["s2_losses"][:3, -1], name="method s2 totals")
    method.fit_text_adapter(_ReferenceItems(inputs), "zad")
    for k, p in method.model.adapters.text_adapter.named_parameters():
        assert_close(p, vectors[f"s1_lr1e-5_step3/text_adapter.{k}"], name=f"s1_lr1e-5_step3/{k}")
    stage1 = [h for h in method.loss_history if h["stage"] == 1]
    assert_close([h["total"] for h in stage1], vectors["s1_lr1e-5_losses"][:3, -1], name="method s1 totals")
    # the engine's hook: the released per-class normalisation of the method's raw outputs
    fake = ref.fake_class_inputs()
    method.model.adapters.load_state_dict({**ref.initial_adapters(vectors), "text_adapted": torch.tensor(True)})
    method._text = {}
    scores, maps = method.predict({"image": fake["image"], "cls_name": ["bottle"] * 4})
    final, _ = method.postprocess_class("bottle", scores, maps)
    assert_close(final, vectors["inf_ind_fake_image_score"], name="method inf_ind_fake_image_score")
