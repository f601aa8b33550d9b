"""AnomalyCLIP (baselines/anomalyclip): prompt learner, DPAM, run-time resize, maps, loss, training, persistence."""

import copy
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from baselines.anomalyclip import AnomalyCLIP, AnomalyCLIPConfig, AnomalyCLIPModel
from baselines.anomalyclip.torch_model import (
    anomaly_map,
    image_logits,
    image_scores,
    loss_terms,
    patch_probabilities,
    run_positional_embedding,
    similarity_maps,
    smooth_maps,
)
from siad.backbones import PRESETS, apply_head, get_backbone_spec, load_openclip, variant_features
from siad.errors import ConfigError, DataError
from siad.methods import build_method, get_method_class

# The demo stand-in: QuickGELU ViT-L/14-shaped, 8 blocks, built at 56 px (4x4 grid), run at 112 px (8x8 grid);
# DPAM on blocks 3-8 (the paper's 6-24 of 24 scaled), features from the last block.
TINY = {"backbone": "tiny-vit-l14-quickgelu-demo", "image_size": 112, "dpam_start": 3, "features": [8],
        "progress": False}
SIZE, GRID = 112, 8
TINY_CONFIG = AnomalyCLIPConfig(dpam_start=3, features=(8,), image_size=SIZE)


@pytest.fixture(scope="module")
def backbone():
    return load_openclip(get_backbone_spec("tiny-vit-l14-quickgelu-demo"), seed=0)


@pytest.fixture(scope="module")
def model(backbone):
    return AnomalyCLIPModel(backbone.model, backbone.tokenizer, TINY_CONFIG, seed=0)


def _images(n=2, seed=0, size=SIZE):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class ToyData(torch.utils.data.Dataset):
    """n items in the engine's training-set format: half anomalous with a square mask."""

    def __init__(self, n=8, seed=0, sha=False):
        self.n, self.seed, self.sha = n, seed, sha

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = _images(1, self.seed * 1000 + i)[0]
        mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        if i % 2:
            mask[20:60, 30:70] = True
            image[:, 20:60, 30:70] += 2.0
        item = {"image": image, "mask": mask, "label": i % 2, "has_mask": True, "cls_name": "bottle",
                "img_path": f"img{i}.png"}
        if self.sha:
            item["image_sha256"] = f"{self.seed:04d}{i:060d}"
        return item


def _method(seed=0, weights_seed=None, **params):
    return build_method("anomalyclip", {**TINY, **params}, seed=seed, weights_seed=weights_seed)


# ------------------------------------------------------------------------------------------------- registry


def test_registered_with_the_release_defaults():
    assert get_method_class("anomalyclip") is AnomalyCLIP
    assert not AnomalyCLIP.training_free
    d = AnomalyCLIP.defaults
    expected = {"backbone": "openai-vit-l-14-336", "image_size": 518, "n_ctx": 12, "depth": 9, "t_n_ctx": 4,
                "dpam_start": 6, "features": [24], "local_weight": 4.0, "temperature": 0.07, "lr": 1e-3,
                "betas": [0.5, 0.999], "batch_size": 8, "epochs": 15, "sigma": 4.0, "compound_fp16": True,
                "global_ln_post": False, "pos_resize": "bilinear"}
    assert {k: d[k] for k in expected} == expected
    AnomalyCLIP.resolve_params({})  # the paper defaults validate against ViT-L/14@336 without loading it
    spec = get_backbone_spec(d["backbone"])
    assert spec.quick_gelu and spec.image_size == 336 and spec.n_blocks == 24


@pytest.mark.parametrize(("bad", "key"), [
    ({"features": [9]}, "features"), ({"features": []}, "features"), ({"features": [8, 8]}, "features"),
    ({"features": [0]}, "features"), ({"dpam_start": 9}, "dpam_start"), ({"dpam_start": 0}, "dpam_start"),
    ({"depth": 13}, "depth"), ({"depth": 1}, "depth"), ({"pos_resize": "nearest"}, "pos_resize"),
    ({"lr": "1e-3"}, "lr"), ({"compound_fp16": "yes"}, "compound_fp16"), ({"betas": [0.5]}, "betas"),
    ({"feature_cache_dtype": "int8"}, "feature_cache_dtype"), ({"backbone": "vit-huge"}, "backbone"),
    ({"temperature": 0}, "temperature"), ({"n_ctx": 0}, "n_ctx"),
])
def test_bad_params_are_refused_naming_the_key(bad, key):
    with pytest.raises(ConfigError, match=f"methods/anomalyclip/params/{key}"):
        AnomalyCLIP.resolve_params({**TINY, **bad})


def test_unknown_params_are_refused():
    with pytest.raises(ConfigError, match="unknown parameter"):
        AnomalyCLIP.resolve_params({**TINY, "feature_list": [24]})


def test_backbone_is_built_native_and_run_larger():
    method = _method()
    assert method.backbone.spec.image_size == 56 and method.input_size == SIZE
    assert method.random_init
    assert tuple(method.backbone.model.visual.positional_embedding.shape) == (1 + 4 * 4, 64)
    from PIL import Image

    x = method.transform(Image.fromarray(np.zeros((40, 70, 3), np.uint8)))
    assert tuple(x.shape) == (3, SIZE, SIZE)


# --------------------------------------------------------------------------------------------------- text


def test_prompt_learner_shapes_and_tokens(model, backbone):
    learner = model.prompt_learner
    width = backbone.model.ln_final.weight.shape[0]
    state = learner.state_dict()
    assert set(state) == {"ctx_pos.ctx", "ctx_neg.ctx", *(f"compound.prompts.{i}" for i in range(8))}
    assert tuple(state["ctx_pos.ctx"].shape) == tuple(state["ctx_neg.ctx"].shape) == (12, width)
    assert all(tuple(state[f"compound.prompts.{i}"].shape) == (4, width) for i in range(8))
    x_id = backbone.tokenizer(["X"])[0, 1]
    tokens = learner.tokens
    assert (tokens[:, 1:13] == x_id).all()
    assert torch.equal(tokens[0], backbone.tokenizer(["X " * 12 + "object."])[0])
    assert torch.equal(tokens[1], backbone.tokenizer(["X " * 12 + "damaged object."])[0])
    emb = learner.prompt_embeddings()
    assert torch.equal(emb[0, 1:13], learner.ctx_pos.ctx) and torch.equal(emb[1, 1:13], learner.ctx_neg.ctx)
    assert torch.equal(emb[:, 13:], learner.token_embeddings[:, 13:])
    # N(0, .02) from the seed, different tensors, reproducible
    values = torch.cat([p.detach().flatten() for p in learner.parameters()])
    assert abs(float(values.std()) - 0.02) < 0.003
    again = AnomalyCLIPModel(backbone.model, backbone.tokenizer, TINY_CONFIG, seed=0).prompt_learner
    other = AnomalyCLIPModel(backbone.model, backbone.tokenizer, TINY_CONFIG, seed=1).prompt_learner
    assert all(torch.equal(a, b) for a, b in zip(learner.parameters(), again.parameters(), strict=True))
    assert not torch.equal(learner.ctx_pos.ctx, other.ctx_pos.ctx)
    assert not torch.equal(learner.ctx_pos.ctx, learner.ctx_neg.ctx)
    text = model.text_features()
    assert tuple(text.shape) == (2, backbone.model.text_projection.shape[1])
    assert torch.allclose(text.norm(dim=-1), torch.ones(2))


def _block_inputs_outputs(model):
    """Inputs and outputs [2, L, W] of every text block during text_features()."""
    inputs, outputs, handles = [], [], []
    for block in model.clip.transformer.resblocks:
        handles.append(block.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach().clone())))
        handles.append(block.register_forward_hook(lambda mod, args, out: outputs.append(out.detach().clone())))
    try:
        text = model.text_features()
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs, text


def test_compound_prompts_overwrite_positions_1_to_4_before_blocks_1_to_8_only(model):
    inputs, outputs, _ = _block_inputs_outputs(model)
    learner = model.prompt_learner
    compound = [p.detach().half().float() for p in learner.compound.prompts]
    assert len(inputs) == 12
    # block 0: the context embeddings + positional embedding, no compound prompt
    pos = model.clip.positional_embedding
    assert torch.allclose(inputs[0], learner.prompt_embeddings().detach() + pos, atol=1e-6)
    for b in range(1, 12):
        prev = outputs[b - 1]
        if b <= 8:
            for sentence in range(2):
                assert torch.equal(inputs[b][sentence, 1:5], compound[b - 1])
            assert torch.equal(inputs[b][:, :1], prev[:, :1]) and torch.equal(inputs[b][:, 5:], prev[:, 5:])
        else:  # blocks 9..11 read the previous block's output unchanged
            assert torch.equal(inputs[b], prev)


def test_fp16_rounding_of_the_compound_prompts_is_a_switch(backbone):
    on = AnomalyCLIPModel(backbone.model, backbone.tokenizer, TINY_CONFIG, seed=3)
    off = AnomalyCLIPModel(backbone.model, backbone.tokenizer, AnomalyCLIPConfig(
        dpam_start=3, features=(8,), image_size=SIZE, compound_fp16=False), seed=3)
    raw = on.prompt_learner.compound.prompts[0].detach()
    assert tuple(on.prompt_learner.deep_prompts()[1].shape) == (2, *raw.shape)  # one copy per sentence
    assert torch.equal(on.prompt_learner.deep_prompts()[1], raw.half().float().expand(2, *raw.shape))
    assert torch.equal(off.prompt_learner.deep_prompts()[1], raw.expand(2, *raw.shape))
    assert not torch.equal(raw.half().float(), raw)
    t_on, t_off = on.text_features(), off.text_features()
    assert not torch.equal(t_on, t_off) and torch.allclose(t_on, t_off, atol=1e-3)
    # the rounding passes gradients straight through
    t_on.sum().backward()
    assert on.prompt_learner.compound.prompts[0].grad is not None


# ------------------------------------------------------------------------------------------------- vision


def test_runtime_resize_is_bilinear_keeps_cls_and_differs_from_open_clip(backbone):
    visual = backbone.model.visual
    native = visual.positional_embedding.detach()
    resized = run_positional_embedding(visual, SIZE)
    assert tuple(resized.shape) == (1 + GRID * GRID, native.shape[1])
    assert torch.equal(resized[0], native[0])
    grid = native[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    manual = F.interpolate(grid, size=(GRID, GRID), mode="bilinear").permute(0, 2, 3, 1).reshape(GRID * GRID, -1)
    assert torch.equal(resized[1:], manual)
    # open_clip's resize at load (what BackboneSpec.image_size would do): bicubic with antialias
    state = {"visual.positional_embedding": native.clone()}
    big = open_clip.create_model("tiny-ViT-L-14-quickgelu-demo", force_image_size=SIZE)
    open_clip.model.resize_pos_embed(state, big)
    bicubic = state["visual.positional_embedding"]
    assert torch.equal(bicubic[0], native[0])
    assert (resized[1:] - bicubic[1:]).abs().max() > 1e-3
    assert torch.allclose(run_positional_embedding(visual, SIZE, "bicubic"), bicubic, atol=1e-6)
    assert torch.equal(run_positional_embedding(visual, 56), native)  # native size: the model's own


def _manual_dpam(visual, images, pos, start, tap):
    """DPAM from the definitions, float64: h normal CLIP; u from block `start` (0-indexed) on:
    u += out_proj(softmax(v vᵀ / √d) v), v from ln_1(h_prev), no FFN."""
    visual = copy.deepcopy(visual).double()
    x = F.conv2d(images.double(), visual.conv1.weight, stride=visual.conv1.stride).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.reshape(1, 1, -1).expand(x.shape[0], 1, -1)
    h = visual.ln_pre(torch.cat([cls, x], 1) + pos.double())
    u = None
    for i, block in enumerate(visual.transformer.resblocks):
        if i >= start:
            u = h if u is None else u
            attn = block.attn
            width, heads = attn.embed_dim, attn.num_heads
            v = block.ln_1(h) @ attn.in_proj_weight[2 * width:].T + attn.in_proj_bias[2 * width:]
            v = v.reshape(*v.shape[:2], heads, width // heads).transpose(1, 2)
            w = torch.softmax(v @ v.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
            mixed = (w @ v).transpose(1, 2).reshape(h.shape)
            u = u + attn.out_proj(mixed)
        h = block(h)
        if i == tap:
            return h, u


def test_dpam_is_the_shared_attention_variant_and_matches_the_definition(model):
    visual = model.clip.visual
    images = _images(2, seed=5)
    feats = model.encode_image(images)
    pos = run_positional_embedding(visual, SIZE)
    shared = variant_features(visual, images, PRESETS["anomalyclip_dpam"].__class__(start_block=2), [7],
                              ln_post=True, project=True, positional_embedding=pos)
    assert torch.allclose(feats.local_features[:, 0], F.normalize(shared.modified.patch[0], dim=-1), atol=1e-6)
    assert model.variant == PRESETS["anomalyclip_dpam"].__class__(start_block=2)
    h, u = _manual_dpam(visual, images, pos, start=2, tap=7)
    local = F.normalize(apply_head(copy.deepcopy(visual).double(), u[:, 1:]), dim=-1).float()
    assert torch.allclose(feats.local_features[:, 0], local, atol=1e-5)
    # global: CLS of the ORIGINAL stream @ proj, without ln_post (as released)
    g = F.normalize((h[:, 0] @ visual.proj.double()).float(), dim=-1)
    assert torch.allclose(feats.global_features, g, atol=1e-5)
    with_ln = AnomalyCLIPModel(model.clip, open_clip.get_tokenizer("tiny-ViT-L-14-quickgelu-demo"), AnomalyCLIPConfig(
        dpam_start=3, features=(8,), image_size=SIZE, global_ln_post=True)).encode_image(images)
    expected_ln = F.normalize(apply_head(visual, h[:, 0].float(), ln_post=True, project=True), dim=-1)
    assert torch.allclose(with_ln.global_features, expected_ln, atol=1e-5)
    assert not torch.allclose(with_ln.global_features, feats.global_features, atol=1e-3)


def test_features_before_dpam_start_are_the_original_stream(backbone):
    m = AnomalyCLIPModel(backbone.model, backbone.tokenizer,
                         AnomalyCLIPConfig(dpam_start=3, features=(1, 2, 8), image_size=SIZE))
    images = _images(1, seed=2)
    feats = m.encode_image(images)
    assert tuple(feats.local_features.shape) == (1, 3, GRID * GRID, backbone.model.visual.output_dim)
    visual = backbone.model.visual
    plain = variant_features(visual, images, m.variant, [0, 1], ln_post=True, project=True,
                             positional_embedding=run_positional_embedding(visual, SIZE)).original
    for k in range(2):
        assert torch.allclose(feats.local_features[:, k], F.normalize(plain.patch[k], dim=-1), atol=1e-6)


def test_encode_image_refuses_other_sizes(model):
    with pytest.raises(ConfigError, match="112"):
        model.encode_image(_images(1, size=56))


# --------------------------------------------------------------------------------------------------- heads


def test_maps_shapes_range_and_smoothing(model):
    feats = model.encode_image(_images(2, seed=1))
    text = model.text_features().detach()
    probs = model.patch_probabilities(feats, text)
    assert len(probs) == 1 and tuple(probs[0].shape) == (2, GRID * GRID, 2)
    assert torch.allclose(probs[0].sum(-1), torch.ones(2, GRID * GRID))
    maps = model.similarity_maps(feats, text)
    assert tuple(maps[0].shape) == (2, 2, SIZE, SIZE)
    grid = probs[0].reshape(2, GRID, GRID, 2).permute(0, 3, 1, 2)
    assert torch.allclose(maps[0], F.interpolate(grid, size=SIZE, mode="bilinear", align_corners=False))
    raw = model.raw_maps(feats, text)
    assert tuple(raw.shape) == (2, SIZE, SIZE)
    assert torch.allclose(raw, maps[0][:, 1], atol=1e-6)  # (S_a + 1 − S_n)/2 = S_a
    assert 0 <= float(raw.min()) and float(raw.max()) <= 1
    scores, smooth = model.predict(feats, text, sigma=4.0)
    assert tuple(scores.shape) == (2,) and tuple(smooth.shape) == (2, SIZE, SIZE)
    assert np.allclose(smooth.numpy(), np.stack([gaussian_filter(m, sigma=4) for m in raw.numpy()]))
    assert float(smooth.std()) < float(raw.std())
    assert torch.allclose(scores, (feats.global_features @ text.T / 0.07).softmax(-1)[:, 1])
    assert torch.equal(smooth_maps(raw, 0), raw)


def test_anomaly_map_sums_the_layers():
    a = torch.rand(1, 2, 4, 4).softmax(1)
    b = torch.rand(1, 2, 4, 4).softmax(1)
    assert torch.allclose(anomaly_map([a, b]), a[:, 1] + b[:, 1], atol=1e-6)


def test_loss_terms_on_a_hand_made_case():
    # one 1x2 image: pixel 0 normal (P_a = .2), pixel 1 anomalous (P_a = .6); logits (0, ln 3), label 1
    p_a = torch.tensor([[[0.2, 0.6]]])
    maps = torch.stack([1 - p_a, p_a], dim=1)  # [1, 2, 1, 2]
    mask = torch.tensor([[[False, True]]])
    logits = torch.tensor([[0.0, math.log(3.0)]])
    terms = loss_terms(logits, [maps], mask, torch.tensor([1]), local_weight=4.0)
    ce = -math.log(3 / 4)
    eps = 1e-5
    pt0 = (1 - eps) * 0.8 + eps * 0.2 + eps
    pt1 = eps * 0.4 + (1 - eps) * 0.6 + eps
    focal = -((1 - pt0) ** 2 * math.log(pt0) + (1 - pt1) ** 2 * math.log(pt1)) / 2
    dice_a = 1 - (2 * 0.6 + 1) / (0.8 + 1 + 1)
    dice_n = 1 - (2 * 0.8 + 1) / (1.2 + 1 + 1)
    assert float(terms.ce) == pytest.approx(ce, rel=1e-6)
    assert float(terms.focal) == pytest.approx(focal, rel=1e-5)
    assert float(terms.dice_anomaly) == pytest.approx(dice_a, rel=1e-6)
    assert float(terms.dice_normal) == pytest.approx(dice_n, rel=1e-6)
    assert float(terms.total) == pytest.approx(ce + 4 * (focal + dice_a + dice_n), rel=1e-6)
    # two layers: the segmentation terms add up; λ scales them only
    two = loss_terms(logits, [maps, maps], mask, torch.tensor([1]), local_weight=1.0)
    assert float(two.focal) == pytest.approx(2 * focal, rel=1e-5)
    assert float(two.total) == pytest.approx(ce + 2 * (focal + dice_a + dice_n), rel=1e-5)


def test_pixel_terms_skip_images_without_pixel_truth():
    torch.manual_seed(0)
    maps = [torch.rand(3, 2, 4, 4).softmax(1)]
    masks = torch.rand(3, 4, 4) > 0.7
    logits, labels = torch.randn(3, 2), torch.tensor([0, 1, 1])
    valid = torch.tensor([True, True, False])  # image 2: an anomaly of a dataset without masks
    kept = loss_terms(logits, maps, masks, labels, mask_valid=valid)
    subset = loss_terms(logits[:2], [maps[0][:2]], masks[:2], labels[:2])
    assert float(kept.focal) == pytest.approx(float(subset.focal))
    assert float(kept.dice_anomaly) == pytest.approx(float(subset.dice_anomaly))
    assert float(kept.ce) == pytest.approx(float(loss_terms(logits, maps, masks, labels).ce))  # CE sees every image
    none = loss_terms(logits, maps, masks, labels, mask_valid=torch.zeros(3, dtype=torch.bool))
    assert float(none.focal) == float(none.dice_normal) == 0.0 and float(none.total) == float(none.ce)


def test_module_functions_agree_with_the_model_methods(model):
    feats = model.encode_image(_images(2, seed=4))
    text = model.text_features().detach()
    logits = image_logits(feats.global_features, text)
    assert torch.allclose(logits, model.image_logits(feats, text))
    assert torch.allclose(image_scores(logits), logits.softmax(-1)[:, 1])
    probs = patch_probabilities(feats.local_features[:, 0], text)
    assert torch.allclose(similarity_maps(probs, SIZE), model.similarity_maps(feats, text)[0])


# ------------------------------------------------------------------------------------------------ training


def _clip_state(method):
    return {k: v.clone() for k, v in method.backbone.model.state_dict().items()}


def test_training_lowers_the_loss_and_touches_only_the_learnables():
    method = _method(epochs=6, batch_size=4, lr=1e-2)
    before_clip = _clip_state(method)
    before = {k: v.clone() for k, v in method.model.prompt_learner.state_dict().items()}
    data = ToyData(8)
    feats, masks, labels, _ = method._training_features(data)
    with torch.no_grad():
        start = float(method.model.loss(feats, masks, labels).total)
    method.fit(data, "zad")
    with torch.no_grad():
        end = float(method.model.loss(feats, masks, labels).total)
    assert end < start
    assert len(method.loss_history) == 6 * 2
    after = method.model.prompt_learner.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    after_clip = method.backbone.model.state_dict()
    assert all(torch.equal(before_clip[k], after_clip[k]) for k in before_clip)
    assert not any(p.requires_grad for p in method.backbone.model.parameters())


def test_training_is_reproducible_and_seeded():
    a, b, c = _method(epochs=2, seed=0), _method(epochs=2, seed=0), _method(epochs=2, seed=1)
    for m in (a, b, c):
        m.fit(ToyData(6), "pseudo")
    assert a.loss_history == b.loss_history
    assert a.loss_history != c.loss_history


def test_features_are_computed_once_per_fit(monkeypatch):
    method = _method(epochs=3, batch_size=2)
    calls = []
    original = method.model.encode_image
    monkeypatch.setattr(method.model, "encode_image", lambda x: calls.append(len(x)) or original(x))
    method.fit(ToyData(5), "uzad")
    assert sum(calls) == 5  # 5 images, once each, whatever the epochs
    assert len(method.loss_history) == 3 * 3  # batches of 2, 2, 1 (a batch of one image works)


def test_feature_cache_serves_later_fits_and_predictions(tmp_path):
    data = ToyData(6, sha=True)
    plain = _method(epochs=2)
    plain.fit(data, "zad")
    cached = _method(epochs=2, feature_cache=str(tmp_path))
    cached.fit(data, "zad")
    assert cached.loss_history == plain.loss_history  # float32 storage: the same numbers
    stats = cached._cache.cache_stats
    assert stats.misses == 6 and stats.written == 6
    again = _method(epochs=2, feature_cache=str(tmp_path), seed=1, weights_seed=0)  # another training seed
    again.fit(data, "zad")
    assert again._cache.cache_stats.hits == 6 and again._cache.cache_stats.misses == 0
    assert again.loss_history != plain.loss_history
    other_weights = _method(epochs=1, feature_cache=str(tmp_path), seed=1)  # random stand-in of seed 1: new entries
    other_weights.fit(data, "zad")
    assert other_weights._cache.cache_stats.hits == 0
    batch = {"image": torch.stack([data[i]["image"] for i in range(3)]), "cls_name": ["bottle"] * 3}
    s1, m1 = plain.predict(batch)
    s2, m2 = cached.predict(batch)
    assert torch.equal(s1, s2) and torch.equal(m1, m2)


def test_fit_refuses_masks_of_another_size():
    class Bad(ToyData):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            item["mask"] = item["mask"][:64, :64]
            return item

    with pytest.raises(DataError, match="112"):
        _method(epochs=1).fit(Bad(2), "zad")


def test_fit_on_an_engine_dataset(mvtec_standin):
    from siad.data.loading import AnomalyDataset

    root, meta = mvtec_standin
    method = _method(epochs=1)
    data = AnomalyDataset(root, meta, split="test", classes=["bottle"], transform=method.transform,
                          mask_size=(SIZE, SIZE), name="mvtec")
    method.fit(data, "zad")
    batch = {"image": torch.stack([data[i]["image"] for i in range(2)]), "cls_name": ["bottle"] * 2,
             "image_file": [str(root / data.records[i]["img_path"]) for i in range(2)]}
    scores, maps = method.predict(batch)
    assert tuple(scores.shape) == (2,) and tuple(maps.shape) == (2, SIZE, SIZE)
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all()


# ---------------------------------------------------------------------------------------------- persistence


def test_save_load_round_trip(tmp_path):
    trained = _method(epochs=1)
    trained.fit(ToyData(4), "zad")
    path = tmp_path / "model.pt"
    trained.save(path)
    state = torch.load(path, weights_only=True)
    assert set(state) == set(trained.model.prompt_learner.state_dict())  # learnables only, no CLIP weights
    fresh = _method(seed=7, weights_seed=0)  # another training seed, the same frozen CLIP
    assert not torch.equal(fresh.text_features(), trained.text_features())
    fresh.load(path)
    assert torch.equal(fresh.text_features(), trained.text_features())
    batch = {"image": _images(2, seed=9), "cls_name": ["bottle", "bottle"]}
    s1, m1 = trained.predict(batch)
    s2, m2 = fresh.predict(batch)
    assert torch.equal(s1, s2) and torch.equal(m1, m2)
    other = _method(n_ctx=8)
    with pytest.raises(ConfigError, match="do not match"):
        other.load(path)
