"""AdaCLIP (baselines/adaclip): prompt insertion, dynamic prompts, HSF, maps, loss, training, mosaic, persistence.

Each piece is checked against a slow, obviously-correct version written here (hooks on the frozen blocks, explicit
loops); the numbers of the release itself are checked in test_adaclip_reference.py.
"""

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from baselines.adaclip import AdaCLIP, AdaCLIPConfig, AdaCLIPModel
from baselines.adaclip.method import prompt_class_name
from baselines.adaclip.torch_model import (
    cluster_centre,
    hybrid_semantic_fusion,
    inference_map,
    layer_prompts,
    loss_terms,
    train_maps,
    upsample_logits,
)
from siad.backbones import get_backbone_spec, load_openclip
from siad.errors import ConfigError
from siad.methods import build_method, get_method_class
from siad.methods.mosaic import mosaic
from siad.prompts.ensemble import ENSEMBLES

# The demo stand-in: exact-GELU ViT-L/14-shaped, 8 blocks, 112 px (8x8 grid), 12 text blocks; taps 2/4/6/8.
_toy_spec = importlib.util.spec_from_file_location("toy_training_set",
                                                   Path(__file__).with_name("toy_training_set.py"))
toy = importlib.util.module_from_spec(_toy_spec)
_toy_spec.loader.exec_module(toy)

SIZE, GRID = 112, 8
TINY = {"backbone": "tiny-vit-l14-gelu-demo", "features": [2, 4, 6, 8], "k_clusters": 4, "progress": False}
CONFIG = AdaCLIPConfig(features=(2, 4, 6, 8), k_clusters=4, image_size=SIZE)


@pytest.fixture(scope="module")
def backbone():
    return load_openclip(get_backbone_spec("tiny-vit-l14-gelu-demo"), seed=0)


@pytest.fixture(scope="module")
def model(backbone):
    return AdaCLIPModel(backbone.model, backbone.tokenizer, CONFIG, seed=0)


def _images(n=2, seed=0):
    return toy.toy_images(n, seed, SIZE)


def ToyData(n=6, name="visa", valid=True, anomalies=True):  # noqa: N802 (reads like the class)
    """The shared toy training set (tests/baselines/toy_training_set.py) at this file's size."""
    return toy.ToyData(n, name, valid, anomalies, size=SIZE, n_pcb=2)


def _method(seed=0, **params):
    return build_method("adaclip", {**TINY, **params}, seed=seed, weights_seed=0)


# ------------------------------------------------------------------------------------------------- registry


def test_registered_with_the_release_defaults():
    assert get_method_class("adaclip") is AdaCLIP
    d = AdaCLIP.defaults
    spec = get_backbone_spec(d["backbone"])
    assert d["backbone"] == "openai-vit-l-14-336-518-gelu-noantialias" and not spec.quick_gelu
    assert spec.pos_resize == "bicubic" and spec.image_size == 518
    assert (d["features"], d["prompt_depth"], d["prompt_length"], d["prompt_type"], d["prompt_branch"]) == (
        [6, 12, 18, 24], 4, 5, "SD", "VL")
    assert (d["k_clusters"], d["hsf_alpha"], d["lr"], d["betas"], d["weight_decay"]) == (20, 0.2, 0.01, [0.5, 0.999],
                                                                                         0.01)
    assert (d["batch_size"], d["epochs"], d["mosaic_rate"], d["mosaic_datasets"], d["selection"]) == (
        1, 5, 0.2, ["mvtec"], "fixed")
    assert AdaCLIP.training_mask_resize == "bilinear"


@pytest.mark.parametrize("key, value", [("features", [9]), ("prompt_depth", 9), ("prompt_type", "X"),
                                        ("k_clusters", 70), ("mosaic_datasets", ["nope"]), ("selection", "best")])
def test_bad_parameters_are_refused_before_building(key, value):
    with pytest.raises(ConfigError, match=key):
        AdaCLIP.validate_params(AdaCLIP.resolve_params({**TINY, key: value}))


def test_sentences_are_the_release_lists_in_state_major_order():
    normal, abnormal = ENSEMBLES.get("adaclip").class_sentences("pipe-fryum")
    assert len(normal) == 28 and len(abnormal) == 20
    assert normal[:4] == ["a bad photo of a pipe fryum.", "a low resolution photo of the pipe fryum.",
                          "a bad photo of the pipe fryum.", "a cropped photo of the pipe fryum."]
    assert normal[4] == "a bad photo of a flawless pipe fryum." and normal[-1].endswith("pipe fryum without damage.")
    assert abnormal[0] == "a bad photo of a damaged pipe fryum." and abnormal[-1].endswith("with damage.")
    assert ENSEMBLES.get("adaclip").class_sentences("metal_nut")[0][0] == "a bad photo of a metal_nut."


def test_prompt_class_names_follow_the_release():
    assert prompt_class_name("sdd", "electrical_commutators") == "SDD"
    assert prompt_class_name("brainmri", "brain") == "brain_mri" and prompt_class_name("br35h", "brain") == "br35h"
    assert prompt_class_name("headct", "head") == "headct" and prompt_class_name("mvtec", "metal_nut") == "metal_nut"


# ------------------------------------------------------------------------------------------------- prompts


def test_learnables_have_the_release_names_and_shapes(model):
    shapes = {k: tuple(v.shape) for k, v in model.learnables.state_dict().items()}
    assert shapes["text_prompter.static_prompts.0"] == (5, 48)  # text width 48
    assert shapes["visual_prompter.static_prompts.3"] == (5, 64)  # vision width 64
    assert shapes["dynamic_visual_prompt_generator.head.4.weight"] == (64, 48)  # E → Wv
    assert shapes["dynamic_text_prompt_generator.head.0.weight"] == (48, 48)  # E → Wt
    assert shapes["patch_token_layer.head.3.weight"] == (48, 64) and shapes["cls_token_layer.head.0.bias"] == (48,)
    assert len([k for k in shapes if k.startswith("patch_token_layer")]) == 8  # 4 layers × (weight, bias)
    assert all(not p.requires_grad for p in model.clip.parameters())


def test_dynamic_prompts_broadcast_one_per_image(model):
    g0 = torch.randn(3, 48)
    learn = model.learnables
    from baselines.adaclip.torch_model import dynamic_prompts

    dv = dynamic_prompts(learn.dynamic_visual_prompt_generator, g0)
    assert dv.shape == (3, 5, 64)
    for b in range(3):
        for j in range(5):
            head = learn.dynamic_visual_prompt_generator.head[j]
            torch.testing.assert_close(dv[b, j], g0[b] @ head.weight.T + head.bias)
    static = learn.static_prompts("visual")
    prompts = layer_prompts(static, dv, 4, 3, fp16=False)
    for j in range(4):
        torch.testing.assert_close(prompts[j], dv + static[j][None])  # the same dynamic part in every layer
    rounded = layer_prompts(static, dv, 4, 3, fp16=True)
    assert torch.equal(rounded[1], (dv + static[1][None]).half().float())


def _block_inputs(blocks):
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0].detach().clone()))
               for b in blocks]
    return seen, handles


def test_visual_prompts_are_appended_then_replaced_then_carried(model):
    images = _images(2)
    out = model.forward(images, ["candle", "candle"])
    visual_prompts = layer_prompts(model.learnables.static_prompts("visual"), out.dynamic_visual, 4, 2, fp16=True)
    blocks = model.clip.visual.transformer.resblocks
    with torch.no_grad():
        g0 = model.clip.encode_image(images)  # the frozen pass, outside the hooks
    seen, handles = _block_inputs(blocks)
    try:
        with torch.no_grad():
            again = model.forward(images, ["candle", "candle"], frozen_global=g0)
    finally:
        for h in handles:
            h.remove()
    n = 1 + GRID * GRID
    assert seen[0].shape == (2, n + 5, 64)  # appended before block 0
    for j in range(4):
        torch.testing.assert_close(seen[j][:, n:], visual_prompts[j].detach())  # written before blocks 0..3
    # block 4 onwards: the prompt tokens are carried, not replaced: block 4's input = block 3's output
    outputs = [blocks[j](seen[j]) for j in range(len(blocks))]
    torch.testing.assert_close(seen[4], outputs[3])
    assert not torch.allclose(seen[4][:, n:], visual_prompts[3].detach())
    # the taps are the block outputs without the prompt tokens
    for tap, block in zip(again.taps, (1, 3, 5, 7), strict=True):
        torch.testing.assert_close(tap, outputs[block][:, :n])
    # the global is ln_post(CLS) @ proj of the final stream
    visual = model.clip.visual
    torch.testing.assert_close(again.global_features, visual.ln_post(outputs[-1][:, 0]) @ visual.proj)


def test_text_prompts_overwrite_positions_1_to_L_before_blocks_1_to_3(model):
    images = _images(1)
    out = model.forward(images, ["candle"])
    text_prompts = layer_prompts(model.learnables.static_prompts("text"), out.dynamic_text, 4, 1, fp16=True)
    seen, handles = _block_inputs(model.clip.transformer.resblocks)
    try:
        with torch.no_grad():
            model.text_features(["candle"], out.dynamic_text)
    finally:
        for h in handles:
            h.remove()
    normal_calls = seen[:12]  # first the 28 normal sentences through 12 blocks, then the 20 abnormal ones
    tokens = model.sentence_tokens("candle")[0]
    embedded = model.clip.token_embedding(tokens) + model.clip.positional_embedding
    torch.testing.assert_close(normal_calls[0], embedded[:, : normal_calls[0].shape[1]])  # block 0 untouched
    for j in (1, 2, 3):
        expected = text_prompts[j][0].detach().expand(28, -1, -1)
        torch.testing.assert_close(normal_calls[j][:, 1:6], expected)
    assert not torch.allclose(normal_calls[4][:, 1:6], text_prompts[3][0].detach().expand(28, -1, -1))


def test_text_features_per_image_equal_batch_one(model):
    images = _images(2, seed=3)
    both = model.forward(images, ["candle", "pcb1"])
    for b, name in enumerate(["candle", "pcb1"]):
        one = model.forward(images[b : b + 1], [name])
        torch.testing.assert_close(both.text[b], one.text[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(both.scores[b], one.scores[0], atol=1e-6, rtol=0)
    assert both.text.shape == (2, 48, 2)
    torch.testing.assert_close(both.text.norm(dim=1), torch.ones(2, 2))


# ------------------------------------------------------------------------------------------------- HSF, maps


def test_hsf_on_a_fixed_token_set_equals_a_slow_version():
    g = torch.Generator().manual_seed(0)
    feats = [F.normalize(torch.randn(1, 64, 8, generator=g), dim=-1) for _ in range(4)]
    logits = [torch.randn(1, 64, 2, generator=g) * 3 for _ in range(4)]
    result = hybrid_semantic_fusion(feats, logits, k_clusters=5, random_state=7)
    # slow: rank patches by the softmaxed mean logit, take the top 25, cluster their concatenated tokens
    p = torch.softmax(sum(logits) / 4, dim=2)[0, :, 1]
    top = sorted(range(64), key=lambda i: -float(p[i]))[:25]
    assert result.top_indices[0].tolist() == top
    stacked = torch.cat([f[0, top] for f in feats], dim=1).numpy()
    labels = KMeans(n_clusters=5, n_init="auto", random_state=7).fit_predict(stacked)
    assert (result.labels[0] == labels).all()
    centres = []
    for c in range(5):
        rows = [f[0, i] for f in feats for i, lab in zip(top, labels, strict=True) if lab == c]
        centres.append(torch.stack(rows).mean(dim=0))
    torch.testing.assert_close(result.centre[0], F.normalize(torch.stack(centres).mean(dim=0), dim=0))


def test_cluster_centre_leaves_out_empty_clusters():
    tokens = [torch.tensor([[1.0, 0.0], [3.0, 0.0]])]
    assert torch.equal(cluster_centre(tokens, np.array([0, 0]), 3), torch.tensor([2.0, 0.0]))


def test_hsf_is_deterministic_and_refuses_too_few_patches():
    g = torch.Generator().manual_seed(1)
    feats = [F.normalize(torch.randn(2, 36, 8, generator=g), dim=-1)]
    logits = [torch.randn(2, 36, 2, generator=g)]
    a = hybrid_semantic_fusion(feats, logits, 4, 3)
    b = hybrid_semantic_fusion(feats, logits, 4, 3)
    assert torch.equal(a.centre, b.centre)
    with pytest.raises(ConfigError, match="k_clusters"):
        hybrid_semantic_fusion(feats, logits, 40, 3)


def test_maps_upsample_with_aligned_corners_and_test_map_averages_logits_first():
    g = torch.Generator().manual_seed(2)
    logits = [torch.randn(2, 16, 2, generator=g) for _ in range(3)]
    up = upsample_logits(logits[0], 10)
    assert up.shape == (2, 2, 10, 10)
    grid = logits[0].permute(0, 2, 1).reshape(2, 2, 4, 4)
    torch.testing.assert_close(up[:, :, 0, 0], grid[:, :, 0, 0])  # align_corners=True keeps the corners
    torch.testing.assert_close(up[:, :, -1, -1], grid[:, :, -1, -1])
    probs = train_maps(logits, 10)
    torch.testing.assert_close(probs[1], torch.softmax(upsample_logits(logits[1], 10), dim=1))
    mean = sum(upsample_logits(a, 10) for a in logits) / 3
    p = torch.softmax(mean, dim=1)
    torch.testing.assert_close(inference_map(logits, 10), (p[:, 1] + 1 - p[:, 0]) / 2)
    assert not torch.allclose(inference_map(logits, 10), sum(q[:, 1] for q in probs) / 3)  # not the mean of softmaxes


def test_loss_terms_match_the_definitions():
    g = torch.Generator().manual_seed(3)
    maps = train_maps([torch.randn(2, 16, 2, generator=g)], 8)
    masks = torch.zeros(2, 8, 8)
    masks[1, 2:5, 2:5] = 1
    scores = torch.softmax(torch.randn(2, 2, generator=g), dim=1)
    t = loss_terms(scores, maps, masks, torch.tensor([0, 1]))
    pt = scores[torch.arange(2), torch.tensor([0, 1])].clamp(max=1)  # onehot clamp: p_t = (1-1e-5)p + 1e-5 q + 1e-5
    onehot = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).clamp(1e-5, 1 - 1e-5)
    pt = (onehot * scores).sum(1) + 1e-5
    torch.testing.assert_close(t.score_focal, (-(1 - pt) ** 2 * pt.log()).mean())
    p1, p0 = maps[0][:, 1].flatten(1), maps[0][:, 0].flatten(1)
    m = masks.flatten(1)
    dice = lambda p, q: 1 - ((2 * (p * q).sum(1) + 1) / (p.sum(1) + q.sum(1) + 1)).mean()  # noqa: E731
    torch.testing.assert_close(t.dice_anomaly, dice(p1, m))
    torch.testing.assert_close(t.dice_normal, dice(p0, 1 - m))
    torch.testing.assert_close(t.total, t.score_focal + t.focal + t.dice_anomaly + t.dice_normal)
    only_first = loss_terms(scores, maps, masks, torch.tensor([0, 1]), mask_valid=torch.tensor([True, False]))
    torch.testing.assert_close(only_first.dice_anomaly, dice(p1[:1], m[:1]))
    # a batch of one image: the release's squeezed mask makes each row a sample (dice_per_row, the default)
    one = loss_terms(scores[1:], [maps[0][1:]], masks[1:], torch.tensor([1]))
    rows_p, rows_m = maps[0][1, 1], masks[1]
    torch.testing.assert_close(one.dice_anomaly, dice(rows_p, rows_m))
    per_image = loss_terms(scores[1:], [maps[0][1:]], masks[1:], torch.tensor([1]), dice_per_row=False)
    torch.testing.assert_close(per_image.dice_anomaly, dice(p1[1:], m[1:]))
    assert not torch.allclose(one.dice_anomaly, per_image.dice_anomaly)


# ------------------------------------------------------------------------------------------------- mosaic


def test_mosaic_places_four_images_in_a_2x2_grid():
    images = [torch.full((3, 32, 32), float(i)) for i in range(4)]
    masks = [torch.zeros(32, 32, dtype=torch.bool) for _ in range(4)]
    masks[3][:] = True
    image, mask = mosaic(images, masks)
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
    inner = {0: image[:, 4:12, 4:12], 1: image[:, 4:12, 20:28], 2: image[:, 20:28, 4:12], 3: image[:, 20:28, 20:28]}
    for i, values in inner.items():  # away from the seams the bicubic resize keeps each tile's value
        torch.testing.assert_close(values, torch.full_like(values, float(i)), atol=1e-4, rtol=0)
    assert mask[16:, 16:].all() and not mask[:16].any() and not mask[:, :16].any()


# ------------------------------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_touches_only_the_learnables():
    method = _method(epochs=4, lr=0.01)
    frozen = copy.deepcopy(method.backbone.model.state_dict())
    before = copy.deepcopy(method.model.learnables.state_dict())
    method.fit(ToyData(), "zad")
    history = [h["total"] for h in method.loss_history]
    assert len(history) == 4 * 6  # batch 1
    assert np.mean(history[-6:]) < np.mean(history[:6])
    after = method.model.learnables.state_dict()
    unused = "text_prompter.static_prompts.0"  # as released: text block 0 is never prompted, S_t[0] gets no gradient
    assert torch.equal(before[unused], after[unused])
    assert all(not torch.equal(before[k], after[k]) for k in before if k != unused)
    assert all(torch.equal(frozen[k], v) for k, v in method.backbone.model.state_dict().items())


def test_training_is_deterministic_under_a_seed_and_seeds_differ():
    a, b, c = _method(seed=5, epochs=1), _method(seed=5, epochs=1), _method(seed=6, epochs=1)
    for m in (a, b, c):
        m.fit(ToyData(name="mvtec"), "pseudo")  # mvtec: the mosaic draws are exercised too
    sa, sb, sc = (m.model.learnables.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["cls_token_layer.head.0.weight"], sc["cls_token_layer.head.0.weight"])


@pytest.mark.parametrize("setting, data", [("uzad", ToyData(anomalies=False)), ("pseudo", ToyData()),
                                           ("zad", ToyData(valid=False))])
def test_each_setting_trains(setting, data):
    method = _method(epochs=1)
    method.fit(data, setting)
    assert all(np.isfinite(h["total"]) for h in method.loss_history)
    if setting == "zad":  # anomalies without pixel truth: no pixel terms for them
        assert method.loss_history


def test_mosaic_is_drawn_only_on_the_mosaic_datasets():
    always = _method(epochs=1, mosaic_rate=1.0)
    data = ToyData(n=6, name="mvtec")
    drawn = [always._mosaic(data, i, {"candle": [0, 1, 2, 3], "pcb1": [4, 5]}, True, torch.Generator())
             for i in range(6)]
    assert [bool(d.get("mosaic")) for d in drawn] == [True] * 4 + [False] * 2  # pcb1 has fewer than 4 images
    assert [d["label"] for d in drawn[:4]] == [0, 1, 0, 1]  # as released: the replaced item's label
    content = _method(epochs=1, mosaic_rate=1.0, mosaic_label="content")
    drawn = content._mosaic(data, 0, {"candle": [0, 1, 2, 3], "pcb1": [4, 5]}, True, torch.Generator())
    assert drawn["label"] == int(drawn["mask"].any())


def test_pseudo_f1_selection_keeps_an_epoch_and_needs_anomalies():
    method = _method(epochs=2, selection="pseudo_f1")
    method.fit(ToyData(), "pseudo")
    assert method.selected_epoch in (1, 2)
    with pytest.raises(ConfigError, match="pseudo_f1"):
        _method(epochs=1, selection="pseudo_f1").fit(ToyData(anomalies=False), "uzad")


# ------------------------------------------------------------------------------------------------- inference


def test_predict_gives_scores_and_smoothed_maps_at_the_input_size():
    method = _method(epochs=1)
    batch = {"image": _images(3), "cls_name": ["candle"] * 3, "dataset": "visa"}
    scores, maps = method.predict(batch)
    assert scores.shape == (3,) and maps.shape == (3, SIZE, SIZE)
    assert ((scores > 0) & (scores < 1)).all() and torch.isfinite(maps).all()
    unsmoothed = _method(epochs=1, sigma=0).predict(batch)[1]
    assert maps.std() < unsmoothed.std()


def test_frozen_global_from_the_feature_cache_equals_the_computed_one(tmp_path):
    plain = _method(epochs=1)
    cached = _method(epochs=1, feature_cache=str(tmp_path))
    batch = {"image": _images(2), "cls_name": ["candle"] * 2, "image_sha256": ["a" * 64, "b" * 64]}
    first = cached.predict(batch)
    assert any(tmp_path.rglob("*.pt")) or any(tmp_path.rglob("*"))
    for x, y in zip(plain.predict(batch), first, strict=True):
        assert torch.equal(x, y)
    again = cached.predict(batch)  # read back from the cache
    assert torch.equal(again[0], first[0])
    assert cached.embeddings._cache.cache_stats.hits == 2


def test_save_load_round_trip_and_mismatch(tmp_path):
    a = _method(seed=1, epochs=1)
    a.fit(ToyData(), "pseudo")
    a.save(tmp_path / "w.pt")
    b = _method(seed=2)
    b.load(tmp_path / "w.pt")
    batch = {"image": _images(2), "cls_name": ["candle"] * 2}
    for x, y in zip(a.predict(batch), b.predict(batch), strict=True):
        torch.testing.assert_close(x, y)
    with pytest.raises(ConfigError, match="Re-run the fit step"):
        _method(prompt_length=3).load(tmp_path / "w.pt")
