"""AA-CLIP (baselines/aaclip): adapters, text, surgery, heads, blur, per-class normalisation, two-stage training,
augmentation, caching, persistence."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from baselines.aaclip import AACLIP, AACLIPAdapters, AACLIPConfig, AACLIPModel
from baselines.aaclip.class_names import CLASS_INFO, DATASET_DOMAINS, DESCRIPTIONS, class_info
from baselines.aaclip.torch_model import (
    aaclip_sentences,
    adapted_image_features,
    anomaly_map,
    colour_jitter,
    detection_logits,
    encode_text_adapted,
    gaussian_blur2d,
    gaussian_kernel1d,
    joint_geometric,
    layer_anomaly_map,
    normalize_class,
    orthogonality_loss,
    raw_image_scores,
    residual_adapt,
    seg_loss,
    stage1_features,
    stage1_loss,
    stage2_loss,
    surgery_patch_features,
    surgery_variant,
    text_features_from_sentences,
    training_probabilities,
)
from siad.backbones import PRESETS, get_backbone_spec, load_openclip
from siad.errors import ConfigError, DataError
from siad.methods import build_method, get_method_class
from siad.methods.losses import dice_loss, focal_loss

# The demo stand-in: exact-GELU ViT-L/14-shaped, 8 vision blocks (width 64, 4 heads), 112 px = 8x8 grid, 12 text
# blocks; the paper's layers 6/12/18/24 of 24 scaled to 2/4/6/8, surgery on blocks 3-8, image adapters after 1-2.
TINY = {"backbone": "tiny-vit-l14-gelu-demo", "features": [2, 4, 6, 8], "surgery_start": 3,
        "image_adapter_blocks": 2, "progress": False}
SIZE, GRID = 112, 8
TINY_CONFIG = AACLIPConfig(features=(2, 4, 6, 8), surgery_start=3, image_adapter_blocks=2)
QUICK = {"stage1_epochs": 1, "stage2_epochs": 2, "checkpoint_epoch": 2, "stage1_batch_size": 4}


@pytest.fixture(scope="module")
def backbone():
    return load_openclip(get_backbone_spec("tiny-vit-l14-gelu-demo"), seed=0)


@pytest.fixture(scope="module")
def model(backbone):
    return AACLIPModel(backbone.model, backbone.tokenizer, TINY_CONFIG, seed=0)


def _images(n=2, seed=0, size=SIZE):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class ToyData(torch.utils.data.Dataset):
    """n items in the engine's training-set format; ``anomalous``: odd items carry a square defect and its mask;
    ``invalid``: item 3's mask is not pixel truth (an anomaly of a dataset without masks)."""

    def __init__(self, n=6, seed=0, anomalous=True, invalid=False, cls_names=("bottle",), sha=False):
        self.n, self.seed, self.anomalous, self.invalid, self.cls_names, self.sha = (
            n, seed, anomalous, invalid, cls_names, sha)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = _images(1, self.seed * 1000 + i)[0]
        mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        label = 0
        if self.anomalous and i % 2:
            mask[20:60, 30:70] = True
            image[:, 20:60, 30:70] += 2.0
            label = 1
        valid = not (self.invalid and i == 3)
        if not valid:
            mask[:] = False
        item = {"image": image, "mask": mask, "label": label, "has_mask": valid,
                "cls_name": self.cls_names[i % len(self.cls_names)], "img_path": f"img{i}.png", "mask_valid": valid}
        if self.sha:
            item["image_sha256"] = f"{self.seed:04d}{i:060d}"
        return item


def _method(seed=0, weights_seed=None, **params):
    return build_method("aaclip", {**TINY, **params}, seed=seed, weights_seed=weights_seed)


# ------------------------------------------------------------------------------------------------- registry


def test_registered_with_the_release_defaults():
    assert get_method_class("aaclip") is AACLIP
    assert not AACLIP.training_free and AACLIP.per_class_postprocess and AACLIP.training_mask_resize == "nearest"
    d = AACLIP.defaults
    expected = {"backbone": "openai-vit-l-14-336-518-gelu", "text_adapter_blocks": 3, "image_adapter_blocks": 6,
                "text_adapt_weight": 0.1, "image_adapt_weight": 0.1, "features": [6, 12, 18, 24],
                "surgery_start": 6, "surgery_attention": "batch", "stage1_loss_layers": "last",
                "orthogonality_weight": 0.1, "proj_relu": False, "stage1_lr": 1e-5, "stage1_batch_size": 16,
                "stage1_epochs": 5, "stage1_augment": True, "stage2_lr": 5e-4, "stage2_batch_size": 2,
                "stage2_epochs": 20, "checkpoint_epoch": 15, "milestones": [16000, 32000], "gamma": 0.5,
                "betas": [0.5, 0.999], "augment": True, "industrial_blur": [7, 1.0], "medical_blur": [9, 1.5],
                "class_descriptions": "release", "domain": None}
    assert {k: d[k] for k in expected} == expected
    AACLIP.resolve_params({})  # validates against ViT-L/14@336 at 518 without loading it
    spec = get_backbone_spec(d["backbone"])
    assert not spec.quick_gelu and spec.image_size == 518 and spec.n_blocks == 24 and spec.grid == 37


@pytest.mark.parametrize(("bad", "key"), [
    ({"features": [9]}, "features"), ({"features": []}, "features"), ({"surgery_start": 9}, "surgery_start"),
    ({"image_adapter_blocks": 9}, "image_adapter_blocks"), ({"text_adapter_blocks": 13}, "text_adapter_blocks"),
    ({"surgery_attention": "tokens"}, "surgery_attention"), ({"stage1_loss_layers": "first"}, "stage1_loss_layers"),
    ({"checkpoint_epoch": 21}, "checkpoint_epoch"), ({"milestones": [5, 3]}, "milestones"),
    ({"industrial_blur": [7.5, 1.0]}, "industrial_blur"), ({"medical_blur": [17, 1.5]}, "medical_blur"),
    ({"medical_blur": [9, 0]}, "medical_blur"), ({"domain": "textile"}, "domain"),
    ({"class_descriptions": "gpt"}, "class_descriptions"), ({"stage2_lr": "5e-4"}, "stage2_lr"),
    ({"betas": [0.5]}, "betas"), ({"augment": "yes"}, "augment"),
])
def test_bad_params_are_refused_naming_the_key(bad, key):
    with pytest.raises(ConfigError, match=f"methods/aaclip/params/{key}"):
        AACLIP.resolve_params({**TINY, **bad})


def test_unknown_params_are_refused():
    with pytest.raises(ConfigError, match="unknown parameter"):
        AACLIP.resolve_params({**TINY, "text_epoch": 5})


# ---------------------------------------------------------------------------------------------- class table


def test_every_class_of_the_nine_datasets_has_a_description_and_a_domain():
    from siad.data import converters
    from siad.data.synthetic import DATASET_CLASSES

    assert set(DATASET_CLASSES) == set(DATASET_DOMAINS) == set(DESCRIPTIONS)
    for dataset, classes in DATASET_CLASSES.items():
        module = __import__(f"siad.data.converters.{dataset}", fromlist=["CLASSES"])
        assert set(module.CLASSES) == set(classes) == set(DESCRIPTIONS[dataset]), dataset
        for cls in classes:
            info = class_info(cls)
            assert info.description and info.domain == DATASET_DOMAINS[dataset] and dataset in info.datasets
    assert converters is not None
    assert class_info("brain").datasets == ("brainmri", "br35h") and class_info("brain").domain == "medical"
    assert class_info("head").domain == "medical" and class_info("bottle").domain == "industrial"
    # the release's entries verbatim, the suite's marked
    assert class_info("bottle").description == "dark bottle" and class_info("bottle").source == "release"
    assert class_info("pcb1").description == "dual ultrasonic distance sensor pcb module"
    assert class_info("02").source == "release"
    assert {CLASS_INFO[c].source for c in DATASET_CLASSES["dtd"]} == {"suite"}
    assert class_info("brain").description == "scan" and class_info("brain").source == "suite"
    with pytest.raises(ConfigError, match="class_descriptions"):
        class_info("spaceship")


def test_sentences_are_the_releases_six_and_ten():
    normal, abnormal = aaclip_sentences("dark bottle")
    assert normal == ["dark bottle.", "a photo of dark bottle.", "a dark bottle.", "a photo of a dark bottle.",
                      "the dark bottle.", "a photo of the dark bottle."]
    assert len(abnormal) == 10 and abnormal[:2] == ["a damaged dark bottle.", "a photo of a damaged dark bottle."]
    assert abnormal[-1] == "a photo of a dark bottle with damage."


def test_class_words_and_domain_switches():
    m = _method()
    assert m.description("metal_nut") == "metal nut which has four notched edges"
    assert m.domain("head") == "medical"
    plain = _method(class_descriptions="class_name", domain="medical")
    assert plain.description("metal_nut") == "metal nut" and plain.domain("bottle") == "medical"
    assert plain.description("spaceship") == "spaceship"


# ------------------------------------------------------------------------------------------------- adapters


def test_residual_adapter_matches_a_per_token_loop():
    torch.manual_seed(0)
    adapter = AACLIPAdapters(6, 8, 5, text_blocks=1, image_blocks=1, n_features=1).text_adapter[0].double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    out = residual_adapt(x, adapter, 0.1)
    w = adapter.fc[0].weight
    for b in range(2):
        for t in range(3):
            h = x[b, t]
            a = F.leaky_relu(w @ h, 0.01)
            a = a * (h.norm() / a.norm())
            assert torch.allclose(out[b, t], 0.1 * a + 0.9 * h, atol=1e-12)


def test_adapter_names_shapes_and_seeded_xavier_init():
    a = AACLIPAdapters(48, 64, 32, text_blocks=3, image_blocks=6, n_features=4, seed=5)
    shapes = {k: tuple(v.shape) for k, v in a.state_dict().items()}
    expected = {"text_adapted": (), **{f"text_adapter.{i}.fc.0.weight": (48, 48) for i in range(3)},
                "text_adapter.3.fc.0.weight": (32, 48),
                **{f"image_adapter.layer_adapters.{i}.fc.0.weight": (64, 64) for i in range(6)},
                **{f"image_adapter.seg_proj.{i}.fc.weight": (32, 64) for i in range(4)},
                "image_adapter.det_proj.fc.weight": (32, 64)}
    assert shapes == expected
    assert isinstance(a.text_adapter[3].fc[1], torch.nn.LeakyReLU)  # the text projection keeps its LeakyReLU
    assert isinstance(a.image_adapter["seg_proj"][0].fc, torch.nn.Linear)  # --relu off
    for name, p in a.named_parameters():
        p = p.detach()
        bound = math.sqrt(6 / (p.shape[0] + p.shape[1]))
        assert float(p.abs().max()) <= bound and float(p.abs().max()) > 0.8 * bound, name
    b = AACLIPAdapters(48, 64, 32, text_blocks=3, image_blocks=6, n_features=4, seed=5)
    c = AACLIPAdapters(48, 64, 32, text_blocks=3, image_blocks=6, n_features=4, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not any(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))
    params = list(a.parameters())
    assert not torch.equal(params[0], params[1])  # every tensor from its own seed
    relu = AACLIPAdapters(48, 64, 32, proj_relu=True)
    assert "image_adapter.det_proj.fc.0.weight" in relu.state_dict()


# ----------------------------------------------------------------------------------------------------- text


def _slow_text(clip, tokens, adapters, weight):
    """The adapted text tower on the full 77 tokens, float64, written out."""
    clip = copy.deepcopy(clip).double()
    adapters = copy.deepcopy(adapters).double() if adapters is not None else None
    x = clip.token_embedding(tokens) + clip.positional_embedding
    for i, block in enumerate(clip.transformer.resblocks):
        x = block(x, attn_mask=clip.attn_mask.double())
        if adapters is not None and i < adapters.text_blocks:
            a = adapters.text_adapter[i](x)
            a = a * x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True)
            x = weight * a + (1 - weight) * x
    x = clip.ln_final(x)[torch.arange(len(tokens)), tokens.argmax(-1)]
    return adapters.text_adapter[-1](x) if adapters is not None else x @ clip.text_projection


def test_adapted_text_tower_matches_the_definition(model, backbone):
    tokens, n_normal = model.tokens("dark bottle")
    assert tuple(tokens.shape) == (16, 77) and n_normal == 6
    with torch.no_grad():
        plain = encode_text_adapted(model.clip, tokens, None)
        assert torch.allclose(plain, backbone.model.encode_text(tokens), atol=1e-5)
        adapted = encode_text_adapted(model.clip, tokens, model.adapters)
        untrimmed = encode_text_adapted(model.clip, tokens, model.adapters, trim=False)
    assert torch.allclose(adapted, untrimmed, atol=1e-5)
    slow = _slow_text(model.clip, tokens, model.adapters, 0.1).float()
    assert torch.allclose(adapted, slow, atol=1e-5)
    assert not torch.allclose(adapted, plain, atol=1e-3)
    trace = {}
    with torch.no_grad():
        T = model.text_features("dark bottle", adapted=True, trace=trace)
    assert len(trace["text_adapter_raw"]) == len(trace["text_mixed"]) == 3 and tuple(T.shape) == (2, 48)
    emb = trace["sentence_embeddings"]
    manual = torch.stack([F.normalize(F.normalize(e, dim=-1).mean(0), dim=0) for e in (emb[:6], emb[6:])])
    assert torch.allclose(T, manual, atol=1e-6) and torch.allclose(T, text_features_from_sentences(emb, 6))
    # before stage 1 has run, the text comes from the plain CLIP (the release's text_epoch == 0 branch)
    assert not bool(model.adapters.text_adapted)
    with torch.no_grad():
        default = model.text_features("dark bottle")
    assert torch.allclose(default, text_features_from_sentences(plain, 6), atol=1e-6)


# --------------------------------------------------------------------------------------------------- vision


def _slow_surgery(visual, images, start, across_batch, tap):
    """Single-path surgery from the definitions, float64: from block `start` (0-indexed) on, x += out_proj(softmax(
    v vᵀ/√d) v) with v from ln_1(x) and the MLP kept; `across_batch`: one attention per token over the images."""
    visual = copy.deepcopy(visual).double()
    x = F.conv2d(images.double(), visual.conv1.weight, stride=visual.conv1.stride).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.reshape(1, 1, -1).expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], 1) + visual.positional_embedding)
    for i, block in enumerate(visual.transformer.resblocks):
        if i < start:
            x = block(x)
        else:
            attn = block.attn
            width, heads = attn.embed_dim, attn.num_heads
            v = block.ln_1(x) @ attn.in_proj_weight[2 * width:].T + attn.in_proj_bias[2 * width:]
            out = torch.zeros_like(v)
            for h in range(heads):
                sl = slice(h * width // heads, (h + 1) * width // heads)
                vh = v[..., sl]
                if across_batch:  # per token t: softmax over the images b
                    for t in range(vh.shape[1]):
                        w = torch.softmax(vh[:, t] @ vh[:, t].T / math.sqrt(width // heads), dim=-1)
                        out[:, t, sl] = w @ vh[:, t]
                else:
                    w = torch.softmax(vh @ vh.transpose(1, 2) / math.sqrt(width // heads), dim=-1)
                    out[..., sl] = w @ vh
            x = x + attn.out_proj(out)
            x = x + block.mlp(block.ln_2(x))
        if i == tap:
            return x


def test_surgery_is_the_shared_preset_and_matches_the_definition(model):
    visual = model.clip.visual
    assert model.variant == PRESETS["aaclip_surgery"].__class__(start_block=2, path="single", with_mlp=True,
                                                                attend_over="batch")
    assert surgery_variant(3, "tokenwise") == PRESETS["aaclip_surgery_tokenwise"].__class__(
        start_block=2, path="single", with_mlp=True)
    images = _images(2, seed=3)
    for across, name in ((True, "batch"), (False, "tokenwise")):
        got = surgery_patch_features(model.clip, images, surgery_variant(3, name), [8])[:, 0]
        slow = _slow_surgery(visual, images, 2, across, 7)
        v64 = copy.deepcopy(visual).double()
        expected = F.normalize((v64.ln_post(slow[:, 1:]) @ v64.proj).float(), dim=-1)
        assert torch.allclose(got, expected, atol=1e-5), name


def test_surgery_across_the_batch_is_out_proj_v_for_one_image(model):
    """At batch 1 the attention over the batch axis has a single key: softmax = 1, output out_proj(v)."""
    visual = model.clip.visual
    image = _images(1, seed=4)
    got = surgery_patch_features(model.clip, image, surgery_variant(3, "batch"), [8])[:, 0]
    v64 = copy.deepcopy(visual).double()
    x = F.conv2d(image.double(), v64.conv1.weight, stride=v64.conv1.stride).flatten(2).transpose(1, 2)
    x = v64.ln_pre(torch.cat([v64.class_embedding.reshape(1, 1, -1), x], 1) + v64.positional_embedding)
    for i, block in enumerate(v64.transformer.resblocks):
        if i < 2:
            x = block(x)
            continue
        width = block.attn.embed_dim
        v = block.ln_1(x) @ block.attn.in_proj_weight[2 * width:].T + block.attn.in_proj_bias[2 * width:]
        x = x + block.attn.out_proj(v)
        x = x + block.mlp(block.ln_2(x))
    expected = F.normalize((v64.ln_post(x[:, 1:]) @ v64.proj).float(), dim=-1)
    assert torch.allclose(got, expected, atol=1e-5)
    # with two images each image's features depend on the other one (as released); token-wise they do not
    pair = torch.cat([image, _images(1, seed=5)])
    batch_pair = surgery_patch_features(model.clip, pair, surgery_variant(3, "batch"), [8])[:1, 0]
    assert not torch.allclose(batch_pair, got, atol=1e-4)
    tok_one = surgery_patch_features(model.clip, image, surgery_variant(3, "tokenwise"), [8])
    tok_pair = surgery_patch_features(model.clip, pair, surgery_variant(3, "tokenwise"), [8])[:1]
    assert torch.allclose(tok_one, tok_pair, atol=1e-5)


def test_global_embedding_and_stage1_features(model, backbone):
    images = _images(2, seed=6)
    g = model.global_embedding(images)
    assert torch.allclose(g, backbone.model.encode_image(images), atol=1e-5)
    surgery = model.surgery_features(images)
    assert tuple(surgery.shape) == (2, 4, GRID * GRID, 48)
    f = stage1_features(surgery, g)
    assert torch.allclose(f - surgery, F.normalize(g, dim=-1)[:, None, None].expand_as(f), atol=1e-6)
    assert not torch.allclose(f.norm(dim=-1), torch.ones(2, 4, GRID * GRID))  # not renormalised
    assert model.stage1_taps() == (8,)


def _slow_adapted(clip, adapters, images, features, weight):
    visual = copy.deepcopy(clip.visual).double()
    adapters = copy.deepcopy(adapters).double()
    x = F.conv2d(images.double(), visual.conv1.weight, stride=visual.conv1.stride).flatten(2).transpose(1, 2)
    x = visual.ln_pre(torch.cat([visual.class_embedding.reshape(1, 1, -1).expand(len(x), 1, -1), x], 1)
                      + visual.positional_embedding)
    taps = []
    for i, block in enumerate(visual.transformer.resblocks):
        x = block(x)
        if i < adapters.image_blocks:
            x = residual_adapt(x, adapters.image_adapter["layer_adapters"][i], weight)
        if i + 1 in features:
            taps.append(visual.ln_post(x[:, 1:]))
    seg = [F.normalize(adapters.image_adapter["seg_proj"][k](t), dim=-1) for k, t in enumerate(taps)]
    det = F.normalize(adapters.image_adapter["det_proj"](taps[-1]), dim=-1).mean(1)
    return torch.stack(seg, 1).float(), det.float()


def test_adapted_image_features_match_the_definition(model):
    images = _images(2, seed=7)
    trace = {}
    with torch.no_grad():
        feats = model.image_features(images, trace=trace)
    seg, det = _slow_adapted(model.clip, model.adapters, images, (2, 4, 6, 8), 0.1)
    assert tuple(feats.seg.shape) == (2, 4, GRID * GRID, 48) and tuple(feats.det.shape) == (2, 48)
    assert torch.allclose(feats.seg, seg, atol=1e-5) and torch.allclose(feats.det, det, atol=1e-5)
    assert torch.allclose(feats.seg.norm(dim=-1), torch.ones(2, 4, GRID * GRID), atol=1e-5)
    assert len(trace["image_adapter_raw"]) == len(trace["image_block_out"]) == 2 and len(trace["image_tokens"]) == 4
    # without adapters and with the CLIP projection as seg / det projection: the plain ln_post(tok) @ proj
    bare = AACLIPAdapters(48, 64, 48, text_blocks=0, image_blocks=0, n_features=1)
    with torch.no_grad():
        bare.image_adapter["seg_proj"][0].fc.weight.copy_(model.clip.visual.proj.T)
        plain = adapted_image_features(model.clip, bare, images, (8,))
    surgery_free = F.normalize(model.clip.visual.ln_post(
        model.clip.visual.transformer.resblocks[7](_prefix(model.clip, images, 7))[:, 1:]) @ model.clip.visual.proj,
        dim=-1)
    assert torch.allclose(plain.seg[:, 0], surgery_free, atol=1e-5)


def _prefix(clip, images, n):
    x = clip.visual._embeds(images)
    for block in clip.visual.transformer.resblocks[:n]:
        x = block(x)
    return x


def test_images_of_another_size_are_refused(model):
    with pytest.raises(ConfigError, match="112"):
        model.image_features(_images(1, size=56))


# ---------------------------------------------------------------------------------------------------- heads


def test_training_probabilities_upsample_logits_then_softmax():
    torch.manual_seed(0)
    patch = F.normalize(torch.randn(2, 16, 8), dim=-1)
    text = F.normalize(torch.randn(2, 2, 8), dim=-1)
    probs = training_probabilities(patch, text, 12)
    logits = 100 * torch.einsum("bne,bce->bnc", patch, text)
    grid = logits.permute(0, 2, 1).reshape(2, 2, 4, 4)
    expected = F.interpolate(grid, size=12, mode="bilinear", align_corners=True).softmax(1)
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.allclose(training_probabilities(patch[:1], text[0], 12), expected[:1], atol=1e-6)  # [2, E] text


def test_seg_and_orthogonality_losses_and_detection_logits():
    torch.manual_seed(1)
    probs = torch.rand(2, 2, 5, 5).softmax(1)
    masks = torch.rand(2, 5, 5) > 0.6
    m = masks.float()
    expected = focal_loss(probs, m) + dice_loss(probs[:, 0], 1 - m) + dice_loss(probs[:, 1], m)
    assert torch.allclose(seg_loss(probs, masks), expected)
    text = F.normalize(torch.randn(3, 2, 4), dim=-1)
    dots = [float(text[b, 0] @ text[b, 1]) for b in range(3)]
    assert float(orthogonality_loss(text)) == pytest.approx((sum(dots) / 3) ** 2, rel=1e-5)
    det = torch.randn(3, 4)
    assert torch.allclose(detection_logits(det, text), torch.einsum("be,bce->bc", det, text), atol=1e-6)
    assert torch.allclose(raw_image_scores(det, text), (torch.einsum("be,be->b", det, text[:, 1]) + 1) / 2)


def test_stage1_loss_keeps_only_the_last_layer_as_released():
    torch.manual_seed(2)
    f = F.normalize(torch.randn(2, 3, 16, 8), dim=-1)
    text = F.normalize(torch.randn(2, 2, 8), dim=-1)
    masks = torch.zeros(2, 12, 12, dtype=torch.bool)
    masks[1, 3:7, 2:9] = True
    seg = [seg_loss(training_probabilities(f[:, k], text, 12), masks) for k in range(3)]
    orth = orthogonality_loss(text)
    last = stage1_loss(f, text, masks, size=12)
    assert float(last.total) == pytest.approx(float(seg[-1] + 0.1 * orth), rel=1e-6)
    every = stage1_loss(f, text, masks, size=12, layers="all", orthogonality_weight=0.5)
    assert float(every.total) == pytest.approx(float(sum(seg) + 0.5 * orth), rel=1e-6)
    # images without pixel truth leave the pixel terms; none: the orthogonality term alone
    kept = stage1_loss(f, text, masks, size=12, mask_valid=torch.tensor([False, True]))
    alone = seg_loss(training_probabilities(f[1:, -1], text[1:], 12), masks[1:])
    assert float(kept.total) == pytest.approx(float(alone + 0.1 * orth), rel=1e-6)
    none = stage1_loss(f, text, masks, size=12, mask_valid=torch.tensor([False, False]))
    assert float(none.total) == pytest.approx(float(0.1 * orth), rel=1e-6)


def test_stage2_loss_is_ce_without_temperature_plus_every_layer():
    from baselines.aaclip.torch_model import AdaptedImageFeatures

    torch.manual_seed(3)
    feats = AdaptedImageFeatures(F.normalize(torch.randn(2, 2, 16, 8), dim=-1), torch.randn(2, 8) * 0.3)
    text = F.normalize(torch.randn(2, 8), dim=-1)
    masks = torch.zeros(2, 12, 12, dtype=torch.bool)
    masks[1, :4] = True
    labels = torch.tensor([0, 1])
    terms = stage2_loss(feats, text, masks, labels, size=12)
    ce = F.cross_entropy(feats.det @ text.T, labels)
    seg = sum(seg_loss(training_probabilities(feats.seg[:, k], text, 12), masks) for k in range(2))
    assert float(terms.ce) == pytest.approx(float(ce), rel=1e-6)
    assert float(terms.total) == pytest.approx(float(ce + seg), rel=1e-6)
    partial = stage2_loss(feats, text, masks, labels, size=12, mask_valid=torch.tensor([True, False]))
    assert float(partial.ce) == pytest.approx(float(ce), rel=1e-6)  # CE sees every image


# ----------------------------------------------------------------------------------------------- inference


def test_gaussian_blur_is_korniass_reflect_blur():
    k = gaussian_kernel1d(7, 1.0)
    x = torch.arange(7.0) - 3
    assert torch.allclose(k, torch.exp(-x**2 / 2) / torch.exp(-x**2 / 2).sum())
    even = gaussian_kernel1d(4, 1.0)
    assert torch.allclose(even, torch.exp(-(torch.arange(4.0) - 1.5) ** 2 / 2) / torch.exp(
        -(torch.arange(4.0) - 1.5) ** 2 / 2).sum())
    torch.manual_seed(4)
    grid = torch.randn(2, 1, 10, 10)
    for size, sigma in ((7, 1.0), (9, 1.5)):
        kernel = gaussian_kernel1d(size, sigma).double()
        padded = F.pad(grid.double(), (size // 2,) * 4, mode="reflect")
        slow = torch.zeros(2, 1, 10, 10, dtype=torch.float64)
        for i in range(10):
            for j in range(10):
                window = padded[:, :, i:i + size, j:j + size]
                slow[:, :, i, j] = (window * torch.outer(kernel, kernel)).sum(dim=(-1, -2))
        assert torch.allclose(gaussian_blur2d(grid, size, sigma).double(), slow, atol=1e-6)
    with pytest.raises(ConfigError, match="grid side"):
        gaussian_blur2d(torch.randn(1, 1, 4, 4), 9, 1.5)


def test_test_maps_use_logits_blur_upsample_and_sum():
    torch.manual_seed(5)
    seg = F.normalize(torch.randn(2, 3, 64, 8), dim=-1)
    text = F.normalize(torch.randn(2, 8), dim=-1)
    one = layer_anomaly_map(seg[:, 0], text, 20, (7, 1.0))
    logits = 100 * seg[:, 0] @ text.T  # no softmax
    m = ((logits[..., 1] + 1 - logits[..., 0]) / 2).reshape(2, 1, 8, 8)
    expected = F.interpolate(gaussian_blur2d(m, 7, 1.0), size=20, mode="bilinear", align_corners=True)[:, 0]
    assert torch.allclose(one, expected, atol=1e-5)
    total = anomaly_map(seg, text, 20, (7, 1.0))
    assert torch.allclose(total, sum(layer_anomaly_map(seg[:, k], text, 20, (7, 1.0)) for k in range(3)), atol=1e-4)
    assert not torch.allclose(anomaly_map(seg, text, 20, (9, 1.5)), total)


def test_per_class_normalisation_as_metrics_eval():
    scores = torch.tensor([0.2, 0.6, 0.4])
    maps = torch.stack([torch.full((4, 4), v) for v in (1.0, 3.0, 2.0)])
    maps[2, 0, 0] = 5.0
    final, norm = normalize_class(scores, maps, "industrial")
    assert torch.allclose(norm, (maps - 1) / 4)  # jointly over the class
    s = (scores - 0.2) / 0.4
    peak = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(final, 0.5 * peak + 0.5 * s)
    medical, _ = normalize_class(scores, maps, "medical")
    assert torch.allclose(medical, peak)
    # a maximum of exactly 1 is left alone (the release's `if max != 1`), a constant input gives zeros
    untouched, same = normalize_class(torch.tensor([0.5, 1.0]), torch.stack([torch.full((2, 2), 0.5),
                                                                             torch.ones(2, 2)]), "industrial")
    assert torch.allclose(same[0], torch.full((2, 2), 0.5)) and torch.allclose(untouched, torch.tensor([0.5, 1.0]))
    flat, _ = normalize_class(torch.tensor([0.3]), torch.full((1, 2, 2), 7.0), "medical")
    assert torch.isfinite(flat).all() and float(flat[0]) == 0.0
    with pytest.raises(ConfigError):
        normalize_class(scores, maps, "textile")


def test_method_predict_and_postprocess_shapes():
    method = _method()
    batch = {"image": _images(3, seed=8), "cls_name": ["bottle", "bottle", "brain"]}
    scores, maps = method.predict(batch)
    assert tuple(scores.shape) == (3,) and tuple(maps.shape) == (3, SIZE, SIZE)
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all()
    feats = method.model.image_features(batch["image"])
    text = torch.stack([method.class_text(c) for c in batch["cls_name"]])
    assert torch.allclose(scores, raw_image_scores(feats.det, text), atol=1e-6)
    assert torch.allclose(maps[2], anomaly_map(feats.seg[2:], text[2:], SIZE, (9, 1.5))[0], atol=1e-4)
    assert torch.allclose(maps[0], anomaly_map(feats.seg[:1], text[:1], SIZE, (7, 1.0))[0], atol=1e-4)
    final, norm = method.postprocess_class("bottle", scores[:2], maps[:2])
    assert float(norm.min()) == 0.0 and float(norm.max()) == pytest.approx(1.0)
    assert tuple(final.shape) == (2,)
    med, _ = method.postprocess_class("brain", scores[2:], maps[2:])
    assert float(med[0]) == pytest.approx(1.0)  # medical: max of the (one image's) normalised map


# -------------------------------------------------------------------------------------------- augmentation


def test_augmentation_is_seeded_joint_and_in_range():
    image = torch.zeros(3, 40, 40)
    mask = torch.zeros(40, 40, dtype=torch.bool)
    mask[5:15, 8:30] = True
    image[:, mask] = 1.0  # the image carries the mask's pattern
    seen = set()
    for seed in range(12):
        a = joint_geometric(image, mask, torch.Generator().manual_seed(seed))
        b = joint_geometric(image, mask, torch.Generator().manual_seed(seed))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(a[0][0] > 0.5, a[1]) and a[1].dtype == torch.bool  # image and mask move together
        seen.add(tuple(a[1].flatten().nonzero()[:3, 0].tolist()))
    assert len(seen) > 4
    none = joint_geometric(image, mask, torch.Generator(), p_rotate=0, p_translate=0, p_hflip=0, p_vflip=0)
    assert torch.equal(none[0], image) and torch.equal(none[1], mask)
    flipped = joint_geometric(image, mask, torch.Generator(), p_rotate=0, p_translate=0, p_hflip=1, p_vflip=0)
    assert torch.equal(flipped[1], mask.flip(-1))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x = (torch.rand(3, 16, 16) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    j1 = colour_jitter(x, mean, std, torch.Generator().manual_seed(1))
    assert torch.equal(j1, colour_jitter(x, mean, std, torch.Generator().manual_seed(1)))
    assert torch.allclose(colour_jitter(x, mean, std, torch.Generator(), p=0.0), x, atol=1e-6)
    back = j1 * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    assert float(back.min()) >= -1e-6 and float(back.max()) <= 1 + 1e-6


# ------------------------------------------------------------------------------------------------ training


def _states(method):
    a = method.model.adapters
    return ({k: v.clone() for k, v in a.text_adapter.state_dict().items()},
            {k: v.clone() for k, v in a.image_adapter.state_dict().items()},
            {k: v.clone() for k, v in method.backbone.model.state_dict().items()})


def test_the_two_stages_touch_only_their_own_tensors():
    method = _method(**QUICK)
    data = ToyData(6)
    text0, image0, clip0 = _states(method)
    method.fit_text_adapter(data, "zad")
    text1, image1, clip1 = _states(method)
    assert all(not torch.equal(text0[k], text1[k]) for k in text0)
    assert all(torch.equal(image0[k], image1[k]) for k in image0)
    assert bool(method.model.adapters.text_adapted)
    method.fit_image_adapter(data, "zad")
    text2, image2, clip2 = _states(method)
    assert all(torch.equal(text1[k], text2[k]) for k in text1)
    assert all(not torch.equal(image1[k], image2[k]) for k in image1)
    assert all(torch.equal(clip0[k], clip2[k]) for k in clip0)
    assert not any(p.requires_grad for p in method.backbone.model.parameters())
    stages = [h["stage"] for h in method.loss_history]
    assert stages == [1] * 2 + [2] * 6  # 6 images: batches of 4 then 2 images


def test_a_few_steps_lower_both_stage_losses():
    method = _method(stage1_lr=1e-3, stage2_lr=1e-3, augment=False, stage1_augment=False, **{
        **QUICK, "stage1_epochs": 8, "stage2_epochs": 5, "checkpoint_epoch": 5, "stage1_batch_size": 6,
        "stage2_batch_size": 6})
    data = ToyData(6)
    batch = {k: [data[i][k] for i in range(6)] for k in ("image", "mask", "label")}
    images, masks, labels = torch.stack(batch["image"]), torch.stack(batch["mask"]), torch.tensor(batch["label"])
    model = method.model

    def s1():
        with torch.no_grad():
            text = model.text_features("dark bottle", adapted=True).expand(6, 2, -1)
            return float(model.stage1_loss(method.stage1_batch_features(images), text, masks).total)

    def s2():
        with torch.no_grad():
            text = method.class_text("bottle").expand(6, 2, -1)
            return float(model.stage2_loss(model.image_features(images), text, masks, labels).total)

    start1 = s1()
    method.fit_text_adapter(data, "zad")
    end1 = s1()
    assert end1 < start1
    start2 = s2()
    method.fit_image_adapter(data, "zad")
    assert s2() < start2


def test_training_is_deterministic_under_the_seed():
    a, b, c = (_method(seed=s, weights_seed=0, **QUICK) for s in (0, 0, 1))
    for m in (a, b, c):
        m.fit(ToyData(6), "pseudo")
    assert a.loss_history == b.loss_history
    assert a.loss_history != c.loss_history
    assert all(torch.equal(x, y) for x, y in zip(a.model.adapters.state_dict().values(),
                                                 b.model.adapters.state_dict().values(), strict=True))


@pytest.mark.parametrize(("setting", "data"), [
    ("uzad", ToyData(5, anomalous=False)),
    ("pseudo", ToyData(5, invalid=False, cls_names=("bottle", "screw"))),
    ("zad", ToyData(6, invalid=True, cls_names=("bottle", "head"))),
])
def test_every_setting_trains(setting, data):
    method = _method(**QUICK)
    method.fit(data, setting)
    assert all(math.isfinite(h["total"]) for h in method.loss_history)
    scores, maps = method.predict({"image": _images(2, seed=11), "cls_name": [data[0]["cls_name"]] * 2})
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all()


def test_checkpoint_epoch_and_the_iteration_schedule():
    method = _method(**{**QUICK, "stage2_epochs": 4, "checkpoint_epoch": 3, "milestones": [2, 4], "gamma": 0.5})
    method.fit(ToyData(4), "zad")
    stage2 = [h for h in method.loss_history if h["stage"] == 2]
    assert len(stage2) == 3 * 2  # stops after the kept epoch: 3 epochs of 2 batches
    assert [h["lr"] for h in stage2] == [5e-4, 5e-4, 2.5e-4, 2.5e-4, 1.25e-4, 1.25e-4]


def test_no_stage1_epochs_keeps_the_plain_text():
    method = _method(**{**QUICK, "stage1_epochs": 0})
    before = {k: v.clone() for k, v in method.model.adapters.text_adapter.state_dict().items()}
    method.fit(ToyData(4), "zad")
    assert not bool(method.model.adapters.text_adapted)
    assert all(torch.equal(before[k], v) for k, v in method.model.adapters.text_adapter.state_dict().items())
    tokens, _ = method.model.tokens(method.description("bottle"))
    with torch.no_grad():
        plain = text_features_from_sentences(method.backbone.model.encode_text(tokens), 6)
    assert torch.allclose(method.class_text("bottle"), plain, atol=1e-5)


def test_fit_refuses_images_of_another_size():
    class Bad(ToyData):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            item["image"] = item["image"][:, :64, :64]
            item["mask"] = item["mask"][:64, :64]
            return item

    with pytest.raises(DataError, match="112"):
        _method(**QUICK).fit(Bad(2), "zad")


def test_frozen_features_are_cached_where_they_depend_on_the_image_alone(tmp_path):
    data = ToyData(6, sha=True)
    params = {**QUICK, "stage1_augment": False, "surgery_attention": "tokenwise", "stage1_batch_size": 2}
    plain = _method(**params)
    plain.fit(data, "zad")
    cached = _method(feature_cache=str(tmp_path), **params)
    cached.fit(data, "zad")
    assert cached.loss_history == plain.loss_history  # float32 storage: the same numbers
    assert cached.embeddings._cache.cache_stats.written == 6
    assert cached._caches["surgery"].cache_stats.written == 6
    again = _method(feature_cache=str(tmp_path), seed=1, weights_seed=0, **params)
    again.fit(data, "zad")
    assert again.embeddings._cache.cache_stats.hits == 6
    assert again._caches["surgery"].cache_stats.hits == 6 and again._caches["surgery"].cache_stats.misses == 0
    # ĝ's namespace is method-neutral (siad.methods.frozen): any method on this backbone reads the same entries
    assert again.embeddings._cache.namespace["options"] == {"feature": "image_embedding"}
    # as released (augmented stage-1 batches, attention across the batch) nothing is cached
    released = _method(feature_cache=str(tmp_path), **{**QUICK, "stage1_batch_size": 2})
    released.fit(data, "zad")
    assert released._caches == {} and released.embeddings._cache.cache_stats.written == 0


def test_fit_on_an_engine_dataset(mvtec_standin):
    from siad.data.loading import AnomalyDataset

    root, meta = mvtec_standin
    method = _method(**QUICK)
    data = AnomalyDataset(root, meta, split="test", classes=["bottle"], transform=method.transform,
                          mask_size=(SIZE, SIZE), name="mvtec")
    method.fit(data, "zad")
    batch = {"image": torch.stack([data[i]["image"] for i in range(2)]), "cls_name": ["bottle"] * 2}
    scores, maps = method.predict(batch)
    assert tuple(scores.shape) == (2,) and tuple(maps.shape) == (2, SIZE, SIZE)


# ---------------------------------------------------------------------------------------------- persistence


def test_save_load_round_trip(tmp_path):
    trained = _method(**QUICK)
    trained.fit(ToyData(4), "zad")
    path = tmp_path / "model.pt"
    trained.save(path)
    state = torch.load(path, weights_only=True)
    assert set(state) == set(trained.model.adapters.state_dict())  # adapters only, no CLIP weights
    assert any(k.startswith("text_adapter.") for k in state) and any(k.startswith("image_adapter.") for k in state)
    fresh = _method(seed=7, weights_seed=0)
    batch = {"image": _images(2, seed=9), "cls_name": ["bottle", "bottle"]}
    assert not torch.equal(fresh.predict(batch)[0], trained.predict(batch)[0])
    fresh.load(path)
    assert bool(fresh.model.adapters.text_adapted)
    s1, m1 = trained.predict(batch)
    s2, m2 = fresh.predict(batch)
    assert torch.equal(s1, s2) and torch.equal(m1, m2)
    other = _method(image_adapter_blocks=3)
    with pytest.raises(ConfigError, match=r"model\.pt.*layer_adapters\.2.*Re-run the fit"):
        other.load(path)
