import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import siad.prompts.ensemble as ensemble_module
from baselines.anovl import (
    AnoVL,
    PaperAdapter,
    augmented_views,
    smooth_and_upsample,
    stable_seed,
)
from siad.backbones import AttentionVariant, apply_head, variant_features
from siad.errors import ConfigError
from siad.methods import build_method, get_method_class

TINY = {"backbone": "tiny-vit-b16plus-demo"}  # 12 blocks like ViT-B-16-plus, 112 px, 7x7 grid
SIZE, GRID = 112, 7


def _anovl(**params):
    return build_method("anovl", {**TINY, **params}, seed=0)


@pytest.fixture(scope="module")
def tfa():
    return _anovl(tta="none")


def _images(n=2, seed=0):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _batch(n=2, seed=0, classes=("bottle", "carpet")):
    return {"image": _images(n, seed), "cls_name": list(classes[:n]), "img_path": [f"img{i}.png" for i in range(n)]}


def _share_text(target, source):
    """Reuse already-encoded class text (identical weights: same backbone, same seed) to keep tests fast."""
    target._text.update(source._text)
    return target


def test_registered_training_free_and_params_checked():
    assert get_method_class("anovl") is AnoVL
    assert AnoVL.training_free
    with pytest.raises(ConfigError, match="temperature"):
        build_method("anovl", {**TINY, "temperature": 1.0})
    for bad in ({"tta": "tent"}, {"attention": "qk"}, {"prompts": "winclip"}, {"image_views": "tiles"},
                {"attention": "qkv", "start_block": -1}, {"start_block": 12}, {"tta_steps": -1}):
        with pytest.raises(ConfigError):
            build_method("anovl", {**TINY, **bad})


def test_prompt_counts_reach_the_text_encoder(monkeypatch):
    seen = []
    original = ensemble_module.encode_sentences

    def spy(model, tokenizer, sentences, **kwargs):
        seen.append(list(sentences))
        return original(model, tokenizer, sentences, **kwargs)

    monkeypatch.setattr(ensemble_module, "encode_sentences", spy)
    method = _anovl(tta="none")
    text = method.class_text("bottle")
    assert [len(s) for s in seen] == [924]
    assert len(text.sentences[0]) == len(text.sentences[1]) == 462
    assert text.sentence_features.shape == (924, 40)
    assert torch.allclose(text.sentence_features.norm(dim=-1), torch.ones(924), atol=1e-5)
    assert any("manufacturing image" in s for s in seen[0]) and not any("textural photo" in s for s in seen[0])
    method.class_text("carpet")  # texture class: texture domains
    assert any("textural photo" in s for s in seen[1]) and not any("manufacturing image" in s for s in seen[1])
    method.class_text("bottle")  # cached: not encoded again
    assert len(seen) == 2
    # class feature = normalise(mean of the UN-normalised sentence embeddings), not of the normalised ones
    raw = original(method.backbone.model, method.backbone.tokenizer, seen[0][:462])
    assert torch.allclose(text.features[0], F.normalize(raw.mean(0), dim=-1), atol=1e-5)
    for prompts, per_state in (("cs", 154), ("base", 22)):
        other = _anovl(tta="none", prompts=prompts)
        assert len(other.class_text("bottle").sentences[0]) == per_state


def test_pixel_tokens_are_the_last_block_vv_tokens_through_ln_post_and_proj(tfa):
    x = _images()
    global_features, tokens = tfa.encode_image(x)
    visual = tfa.backbone.model.visual
    raw = variant_features(visual, x, AttentionVariant(start_block=0, kind="vv"), [11])
    expected = apply_head(visual, raw.modified.patch_at(11), ln_post=True, project=True)
    assert tokens.shape == (2, GRID * GRID, 40)
    assert torch.allclose(tokens, expected, atol=1e-5)
    plain = visual.ln_post(visual.transformer(visual._embeds(x)))[:, 1:] @ visual.proj
    assert not torch.allclose(tokens, plain, atol=1e-3)  # the V-V path really differs from plain tokens
    assert torch.allclose(global_features, F.normalize(tfa.backbone.model.encode_image(x), dim=-1), atol=1e-5)


def test_attention_variants_of_table3():
    x = _images()
    qkv = _anovl(tta="none", attention="qkv")
    visual = qkv.backbone.model.visual
    plain = visual.ln_post(visual.transformer(visual._embeds(x)))[:, 1:] @ visual.proj
    assert torch.allclose(qkv.encode_image(x)[1], plain, atol=1e-5)
    v_last = _anovl(tta="none", attention="v", start_block=-1)
    stream = visual._embeds(x)
    for block in visual.transformer.resblocks[:-1]:
        stream = block(stream)
    last = visual.transformer.resblocks[-1]
    attn = last.attn
    width = attn.embed_dim
    values = F.linear(last.ln_1(stream), attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:])
    manual = (visual.ln_post(stream + attn.out_proj(values)) @ visual.proj)[:, 1:]
    assert torch.allclose(v_last.encode_image(x)[1], manual, atol=1e-5)


def test_image_score_is_the_untempered_softmax_of_the_global_feature(tfa):
    batch = _batch()
    scores, maps = tfa.predict(batch)
    global_features, _ = tfa.encode_image(batch["image"])
    for i, cls in enumerate(batch["cls_name"]):
        expected = (global_features[i] @ tfa.class_text(cls).features.T).softmax(-1)[1]
        assert torch.isclose(scores[i], expected, atol=1e-6)
    assert scores.shape == (2,) and maps.shape == (2, SIZE, SIZE)
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all()
    assert float(maps.min()) > 0.0 and float(maps.max()) < 1.0


def test_map_is_the_smoothed_upsampled_abnormal_probability(tfa):
    batch = _batch(n=1)
    _, maps = tfa.predict(batch)
    _, tokens = tfa.encode_image(batch["image"])
    text = tfa.class_text("bottle").features
    probs = (F.normalize(tokens[0], dim=-1) @ text.T).softmax(-1)[:, 1].reshape(GRID, GRID).double().numpy()
    padded = np.pad(probs, 1, mode="edge")
    pooled = np.mean([padded[i:i + GRID, j:j + GRID] for i in range(3) for j in range(3)], axis=0)
    direct = F.interpolate(torch.from_numpy(pooled)[None, None], size=(SIZE, SIZE), mode="bilinear",
                           align_corners=True)[0, 0]
    assert torch.allclose(maps[0].double(), direct, atol=1e-6)
    assert math.isclose(float(maps[0, 0, 0]), pooled[0, 0], abs_tol=1e-6)  # align_corners: corners kept
    assert math.isclose(float(maps[0, -1, -1]), pooled[-1, -1], abs_tol=1e-6)
    assert torch.allclose(smooth_and_upsample(torch.full((1, GRID, GRID), 0.3), 20), torch.full((1, 20, 20), 0.3))


@pytest.mark.parametrize("tta", ["paper", "code", "linear_probe"])
def test_tta_reduces_its_own_loss_on_a_fixed_image(tfa, tta):
    # One noise draw per image makes the objective fixed over the steps, so a correct optimiser must lower
    # it (with the default fresh draw per step the loss is a different random function at every step).
    method = _share_text(_anovl(tta=tta, noise_per_step=False), tfa)
    tokens = method.encode_image(_images(1))[1][0]
    losses = method.adapt(tokens, "bottle", "img0.png").losses
    assert len(losses) == 5
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    default = _share_text(_anovl(tta=tta), tfa).adapt(tokens, "bottle", "img0.png")
    assert all(math.isfinite(v) for v in default.losses)


def test_tta_changes_maps_not_image_scores_and_none_equals_tfa(tfa):
    batch = _batch()
    tfa_scores, tfa_maps = tfa.predict(batch)
    again = _share_text(_anovl(tta="none"), tfa).predict(batch)
    assert torch.equal(again[0], tfa_scores) and torch.equal(again[1], tfa_maps)
    for tta in ("paper", "code", "linear_probe"):
        scores, maps = _share_text(_anovl(tta=tta), tfa).predict(batch)
        assert torch.equal(scores, tfa_scores)
        assert maps.shape == tfa_maps.shape and torch.isfinite(maps).all()
        assert not torch.allclose(maps, tfa_maps, atol=1e-7)
        assert float(maps.min()) > 0.0 and float(maps.max()) < 1.0


def test_paper_adapter_starts_from_the_text_tokens_and_linear_probe_does_not(tfa):
    text = tfa.class_text("bottle").sentence_features
    tokens = tfa.encode_image(_images(1))[1][0]
    adapter = PaperAdapter(text, text)
    expected = (tokens @ text.T).softmax(-1) @ text + tokens  # Eq. 9 at initialisation
    assert torch.allclose(adapter(tokens), expected, atol=1e-5)
    probe = _share_text(_anovl(tta="linear_probe"), tfa)
    omega = probe._adapter("bottle", text, torch.Generator().manual_seed(0))[0].omega.detach()
    assert not torch.allclose(omega, text)
    assert float(omega.abs().max()) <= 1 / math.sqrt(text.shape[1]) and float(omega.std()) > 0.05


def test_determinism_including_the_code_variant_across_fresh_instances(tfa):
    first, second = _batch(seed=1), _batch(seed=2, classes=("bottle", "bottle"))
    for tta in ("paper", "code"):
        runs = []
        for _ in range(2):
            method = _share_text(_anovl(tta=tta), tfa)
            runs.append([method.predict(first), method.predict(second)])
        for (s1, m1), (s2, m2) in zip(runs[0], runs[1], strict=True):
            assert torch.equal(s1, s2) and torch.equal(m1, m2)
    code = _share_text(_anovl(tta="code"), tfa)
    code.predict(first)
    state = code._code_state["bottle"][1].state
    assert all(int(s["step"]) == 5 for s in state.values())  # moments persist per class ...
    code.predict(second)
    assert all(int(s["step"]) == 15 for s in code._code_state["bottle"][1].state.values())  # ... across images
    other_seed = _share_text(build_method("anovl", {**TINY, "tta": "code"}, seed=1), tfa)
    assert not torch.equal(other_seed.predict(first)[1], runs[0][0][1])
    assert stable_seed(0, "bottle", "a.png") == stable_seed(0, "bottle", "a.png") != stable_seed(0, "bottle", "b.png")


def test_augmented_views_and_their_image_score(tfa):
    x = _images(1)
    views = augmented_views(x)
    assert views.shape == (1, 22, 3, SIZE, SIZE)
    assert torch.equal(views[0, 0], x[0])
    assert torch.equal(views[0, 17], x[0].flip(-1))
    assert torch.equal(views[0, 19], torch.rot90(x[0], 1, dims=(-2, -1)))
    grey = views[0, 18]
    assert torch.allclose(grey[0], grey[1]) and torch.allclose(grey[0], 0.299 * x[0, 0] + 0.587 * x[0, 1]
                                                                + 0.114 * x[0, 2], atol=1e-6)
    assert torch.allclose(views[0, 1:17].mean(dim=(-1, -2)), x[0].mean(dim=(-1, -2)).expand(16, 3), atol=0.2)
    method = _share_text(_anovl(tta="none", image_views="augmented"), tfa)
    scores, _ = method.predict({"image": x, "cls_name": ["bottle"], "img_path": ["a"]})
    model = method.backbone.model
    features = F.normalize(model.encode_image(views[0]), dim=-1)
    expected = (features @ method.class_text("bottle").features.T).softmax(-1)[:, 1].mean()
    assert torch.isclose(scores[0], expected, atol=1e-6)
    with pytest.raises(ConfigError, match="square"):
        augmented_views(torch.zeros(1, 3, 8, 9))


def test_feature_cache_reproduces_the_backbone_and_is_shared_by_variants(tmp_path, tfa):
    files = []
    for i in range(2):  # the cache only fingerprints the files; the tensors are the batch's
        files.append(str(tmp_path / f"img{i}.png"))
        (tmp_path / f"img{i}.png").write_bytes(bytes([i]) * 16)
    cached_tfa = _anovl(tta="none", feature_cache=str(tmp_path / "cache"))
    cached_tta = _anovl(tta="paper", feature_cache=str(tmp_path / "cache"))
    for method in (cached_tfa, cached_tta):
        _share_text(method, tfa)
    batch = {**_batch(n=2), "image_file": files}
    plain_scores, plain_maps = tfa.predict(batch)
    scores, maps = cached_tfa.predict(batch)
    assert torch.allclose(scores, plain_scores) and torch.allclose(maps, plain_maps)
    assert cached_tfa._cache.cache_stats.misses == 2
    cached_tta.predict(batch)  # same visual path: read back, not recomputed
    assert (cached_tta._cache.cache_stats.hits, cached_tta._cache.cache_stats.misses) == (2, 0)
    qkv = _anovl(tta="none", attention="qkv", feature_cache=str(tmp_path / "cache"))
    _share_text(qkv, tfa)
    qkv.predict(batch)  # another visual path: another namespace
    assert qkv._cache.cache_stats.misses == 2


@pytest.mark.parametrize("tta", ["paper", "linear_probe", "code"])
def test_batched_tta_equals_the_per_image_adapters(tfa, tta):
    """The paper / linear-probe adapters of a batch train together (stacked ω, one AdamW): the same numbers as
    one adapter and one AdamW per image; the code variant stays sequential (its optimiser state runs on)."""
    tokens = tfa.encode_image(_images(3, seed=4))[1]
    names, keys = ["bottle", "carpet", "bottle"], ["a.png", "b.png", "c.png"]
    batched = _share_text(_anovl(tta=tta), tfa).adapt_batch(tokens, names, keys)
    single = _share_text(_anovl(tta=tta), tfa)
    for i, result in enumerate(batched):
        alone = single.adapt(tokens[i], names[i], keys[i])
        assert len(result.losses) == len(alone.losses) == 5
        assert np.allclose(result.losses, alone.losses, atol=1e-6, rtol=0)
        error = float((result.tokens - alone.tokens).abs().max())
        assert error <= 1e-6, error
        assert not torch.allclose(result.tokens, tokens[i], atol=1e-3)  # the adaptation did move the tokens
    assert not torch.allclose(batched[0].tokens - tokens[0], batched[2].tokens - tokens[2], atol=1e-4)  # own draws


def test_fused_dual_pass_is_a_switch_equal_within_rounding(tfa):
    fused = _share_text(_anovl(tta="none", fused_dual_pass=True), tfa)
    images = _images(2, seed=3)
    reference_global, reference_tokens = tfa.encode_image(images)
    fast_global, fast_tokens = fused.encode_image(images)
    for fast, reference in ((fast_global, reference_global), (fast_tokens, reference_tokens)):
        assert float((fast - reference).abs().max() / reference.abs().max()) <= 1e-5
    expected = variant_features(tfa.backbone.model.visual, images, AttentionVariant(start_block=0), [-1],
                                ln_post=True, project=True)
    assert torch.equal(reference_tokens, expected.modified.patch[0])  # the default stays the bit-identical mode
    assert torch.equal(reference_global, F.normalize(expected.image_embedding, dim=-1))
    scores, maps = fused.predict(_batch())
    reference_scores, reference_maps = tfa.predict(_batch())
    assert torch.allclose(scores, reference_scores, atol=1e-6) and torch.allclose(maps, reference_maps, atol=1e-6)
    with pytest.raises(ConfigError):
        _anovl(fused_dual_pass="yes")
