import copy
import math

import pytest
import torch

import siad.backbones.attention as attention_module
from siad.backbones import (
    PRESETS,
    AttentionVariant,
    get_backbone_spec,
    load_openclip,
    stage_features,
    variant_features,
)
from siad.errors import ConfigError


@pytest.fixture(scope="module")
def anovl_tiny():
    """The 12-block ViT-B/16+-shaped mini: AnoVL's V-V runs on all its blocks."""
    backbone = load_openclip(get_backbone_spec("tiny-vit-b16plus-demo"), seed=11)
    size = backbone.spec.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return backbone, images


def slow_attention(block, normed, *, kind, heads, scale, over_batch):
    """Multi-head attention of a block's weights written out with explicit loops over groups and heads."""
    width = normed.shape[-1]
    weight, bias = block.attn.in_proj_weight, block.attn.in_proj_bias
    q = normed @ weight[:width].T + bias[:width]
    k = normed @ weight[width : 2 * width].T + bias[width : 2 * width]
    v = normed @ weight[2 * width :].T + bias[2 * width :]
    head_dim = width // heads
    out = torch.zeros_like(v)
    batch, length = normed.shape[:2]
    # a group is the set of rows that attend to each other: one image's tokens, or one token across the batch
    groups = [(slice(None), t) for t in range(length)] if over_batch else [(b,) for b in range(batch)]
    for index in groups:
        qg, kg, vg = q[index], k[index], v[index]  # [rows, width]
        result = torch.zeros_like(vg)
        for h in range(heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            if kind == "v":
                result[:, cols] = vg[:, cols]
                continue
            left, right = (qg, kg) if kind == "qkv" else (vg, vg)
            weights = torch.softmax(left[:, cols] @ right[:, cols].T * scale, dim=-1)
            result[:, cols] = weights @ vg[:, cols]
        out[index] = result
    return out @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def slow_reference(visual, images, *, start, kind="vv", path="dual", with_mlp=False, heads=None, scale=None,
                   over_batch=False):
    """Both streams after every block, in float64, straight from the definitions."""
    visual = copy.deepcopy(visual).double()
    x = images.double()
    patches = torch.nn.functional.conv2d(x, visual.conv1.weight, stride=visual.conv1.stride)
    tokens = patches.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.reshape(1, 1, -1).repeat(x.shape[0], 1, 1)
    h = visual.ln_pre(torch.cat([cls, tokens], 1) + visual.positional_embedding)
    u = None
    originals, modifieds = [], []
    for i, block in enumerate(visual.transformer.resblocks):
        n_heads = heads or block.attn.num_heads
        s = scale or 1 / math.sqrt(h.shape[-1] // n_heads)
        if i >= start:
            u = h.clone() if u is None else u
            source = h if path == "dual" else u
            u = u + slow_attention(block, block.ln_1(source), kind=kind, heads=n_heads, scale=s, over_batch=over_batch)
            if with_mlp:
                u = u + block.mlp(block.ln_2(u))
        h = block(h)
        originals.append(h)
        modifieds.append(h if u is None else u)
    return originals, modifieds


def assert_close(fast, slow):
    assert torch.allclose(fast.double(), slow, atol=1e-5, rtol=1e-5), (fast.double() - slow).abs().max()


CASES = {
    "anovl all blocks": (AttentionVariant(start_block=0), {"start": 0}),
    "dpam-like from block 5": (AttentionVariant(start_block=5), {"start": 5}),
    "V-V last block": (PRESETS["anovl_vv_last"], {"start": 11}),
    "V last block": (PRESETS["anovl_v_last"], {"start": 11, "kind": "v"}),
    "custom heads and scale": (
        AttentionVariant(start_block=3, heads=6, scale=0.3),
        {"start": 3, "heads": 6, "scale": 0.3},
    ),
    "surgery token-wise": (
        AttentionVariant(start_block=5, path="single", with_mlp=True),
        {"start": 5, "path": "single", "with_mlp": True},
    ),
    "surgery as released (across batch)": (
        AttentionVariant(start_block=5, path="single", with_mlp=True, attend_over="batch"),
        {"start": 5, "path": "single", "with_mlp": True, "over_batch": True},
    ),
    "qkv without mlp": (AttentionVariant(start_block=2, kind="qkv"), {"start": 2, "kind": "qkv"}),
}


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_variant_matches_a_slow_reimplementation(anovl_tiny, case):
    backbone, images = anovl_tiny
    variant, reference_args = CASES[case]
    visual = backbone.model.visual
    taps = list(range(12))
    result = variant_features(visual, images, variant, taps)
    originals, modifieds = slow_reference(visual, images, **reference_args)
    for block in taps:
        assert_close(result.modified.cls_at(block), modifieds[block][:, 0])
        assert_close(result.modified.patch_at(block), modifieds[block][:, 1:])
        assert_close(result.original.patch_at(block), originals[block][:, 1:])
    # the variant really changes the tokens from its start block on (the test could not pass by accident)
    first = result.start_block
    assert not torch.allclose(result.modified.patch_at(first), result.original.patch_at(first), atol=1e-3)
    if first > 0:
        assert torch.equal(result.modified.patch_at(first - 1), result.original.patch_at(first - 1))


@torch.no_grad()
def test_original_stream_is_bit_identical_to_the_unmodified_model(anovl_tiny):
    backbone, images = anovl_tiny
    visual = backbone.model.visual
    taps = backbone.spec.taps
    plain = stage_features(visual, images, taps, ln_post=True, project=True)
    for variant in (PRESETS["anovl"], PRESETS["aaclip_surgery"], AttentionVariant(start_block=4, heads=3)):
        result = variant_features(visual, images, variant, taps, ln_post=True, project=True)
        for block in taps:
            assert torch.equal(result.original.patch_at(block), plain.taps.patch_at(block))
            assert torch.equal(result.original.cls_at(block), plain.taps.cls_at(block))
        assert torch.equal(result.image_embedding, backbone.model.encode_image(images))


@torch.no_grad()
def test_qkv_with_mlp_is_the_identity_variant(anovl_tiny):
    backbone, images = anovl_tiny
    visual = backbone.model.visual
    result = variant_features(visual, images, AttentionVariant(start_block=0, kind="qkv", with_mlp=True), range(12))
    for block in range(12):
        assert torch.allclose(result.modified.patch_at(block), result.original.patch_at(block), atol=1e-5)
        assert torch.allclose(result.modified.cls_at(block), result.original.cls_at(block), atol=1e-5)


@torch.no_grad()
def test_taps_are_per_block_not_aliased(anovl_tiny):
    backbone, images = anovl_tiny
    result = variant_features(backbone.model.visual, images, PRESETS["anovl"], [2, 5, 8, 11])
    last = result.modified.patch_at(11).clone()
    for block in (2, 5, 8):
        assert not torch.allclose(result.modified.patch_at(block), last, atol=1e-3)
    # each V-V tap keeps its own CLS row (AnoVL's released code overwrites the final one with the original CLS)
    assert not torch.allclose(result.modified.cls_at(11), result.original.cls_at(11), atol=1e-3)


@torch.no_grad()
def test_surgery_as_released_on_one_image_is_plain_values(anovl_tiny):
    """Spec: AA-CLIP's surgery attends across the batch axis, which with one image is exactly out_proj(v)."""
    backbone, images = anovl_tiny
    visual = backbone.model.visual
    one = images[:1]
    released = variant_features(visual, one, PRESETS["aaclip_surgery"], [11])
    values = variant_features(visual, one, AttentionVariant(5, kind="v", path="single", with_mlp=True), [11])
    tokenwise = variant_features(visual, one, PRESETS["aaclip_surgery_tokenwise"], [11])
    assert torch.allclose(released.modified.patch_at(11), values.modified.patch_at(11), atol=1e-6)
    assert not torch.allclose(released.modified.patch_at(11), tokenwise.modified.patch_at(11), atol=1e-3)


@torch.no_grad()
def test_single_path_can_skip_the_original_stream(anovl_tiny):
    backbone, images = anovl_tiny
    visual = backbone.model.visual
    variant = PRESETS["aaclip_surgery_tokenwise"]
    both = variant_features(visual, images, variant, [3, 11])
    alone = variant_features(visual, images, variant, [3, 11], run_original=False)
    assert alone.original is None and alone.image_embedding is None
    for block in (3, 11):
        assert torch.equal(alone.modified.patch_at(block), both.modified.patch_at(block))


@torch.no_grad()
def test_the_model_is_not_modified(anovl_tiny):
    backbone, images = anovl_tiny
    model = backbone.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [type(m) for m in model.modules()]
    expected = model.encode_image(images)
    for variant in PRESETS.values():
        variant_features(model.visual, images, variant, [11])
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert types_before == [type(m) for m in model.modules()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert torch.equal(model.encode_image(images), expected)


def test_gradients_flow_to_the_input(anovl_tiny):
    """Test-time adaptation differentiates through the tokens: no in-place ops may break autograd."""
    backbone, images = anovl_tiny
    x = images.clone().requires_grad_(True)
    result = variant_features(backbone.model.visual, x, PRESETS["anovl"], [11], ln_post=True, project=True)
    result.modified.patch_at(11).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bad_variants_are_refused(anovl_tiny):
    backbone, images = anovl_tiny
    visual = backbone.model.visual
    with pytest.raises(ConfigError, match="12 blocks"):
        variant_features(visual, images, AttentionVariant(start_block=12), [11])
    with pytest.raises(ConfigError, match="run_original"):
        variant_features(visual, images, PRESETS["anovl"], [11], run_original=False)
    with pytest.raises(ConfigError, match="kind"):
        AttentionVariant(start_block=0, kind="kv")
    with pytest.raises(ConfigError, match="divisible"):
        variant_features(visual, images, AttentionVariant(start_block=0, heads=5), [11])
    with pytest.raises(ConfigError, match="scale"):
        AttentionVariant(start_block=0, scale=0.0)


def test_presets_follow_the_specs():
    assert PRESETS["anovl"] == AttentionVariant(start_block=0, kind="vv", path="dual", with_mlp=False)
    assert PRESETS["filo"].start_block == 6 and PRESETS["anomalyclip_dpam"].start_block == 5
    surgery = PRESETS["aaclip_surgery"]
    assert (surgery.start_block, surgery.path, surgery.with_mlp, surgery.attend_over) == (5, "single", True, "batch")
    assert PRESETS["anovl_v_last"].resolve_start(12) == 11


# --- the fused dual pass (fast mode) and the skipped original taps -------------------------------------------

FUSED_CASES = {
    "anovl all blocks": AttentionVariant(start_block=0),
    "dpam-like from block 5": AttentionVariant(start_block=5),
    "V last block": PRESETS["anovl_v_last"],
    "custom heads and scale": AttentionVariant(start_block=3, heads=6, scale=0.3),
    "qkv without mlp": AttentionVariant(start_block=2, kind="qkv"),
    "V-V with mlp": AttentionVariant(start_block=4, with_mlp=True),
}


def assert_relatively_close(fast, reference, tolerance=1e-5):
    error = float((fast - reference).abs().max() / reference.abs().max())
    assert error <= tolerance, error


@pytest.fixture
def fused_calls(monkeypatch):
    """Records the ``cls_only`` flag of every fused block, so a test sees that the fast mode really ran."""
    calls = []
    original = attention_module._fused_step

    def spy(*args, **kwargs):
        calls.append(kwargs["cls_only"])
        return original(*args, **kwargs)

    monkeypatch.setattr(attention_module, "_fused_step", spy)
    return calls


@pytest.mark.parametrize("case", list(FUSED_CASES))
@torch.no_grad()
def test_fused_dual_pass_equals_the_reference_mode_within_rounding(anovl_tiny, fused_calls, case):
    backbone, images = anovl_tiny
    visual = backbone.model.visual
    variant = FUSED_CASES[case]
    taps = list(range(12))
    reference = variant_features(visual, images, variant, taps)
    fused = variant_features(visual, images, variant, taps, fused_dual_pass=True)
    start = reference.start_block
    assert fused_calls == [False] * (12 - start)  # every modified block fused; the last one in full (it is tapped)
    for stream in ("original", "modified"):
        for block in taps:
            assert_relatively_close(getattr(fused, stream).patch_at(block), getattr(reference, stream).patch_at(block))
            assert_relatively_close(getattr(fused, stream).cls_at(block), getattr(reference, stream).cls_at(block))
    assert_relatively_close(fused.image_embedding, reference.image_embedding)
    # and against the float64 definition, so both modes are right, not merely alike
    args = {"start": start, "kind": variant.kind, "heads": variant.heads, "scale": variant.scale,
            "with_mlp": variant.with_mlp}
    originals, modifieds = slow_reference(visual, images, **args)
    for block in taps:
        assert_close(fused.modified.patch_at(block), modifieds[block][:, 1:])
        assert_close(fused.original.patch_at(block), originals[block][:, 1:])


@torch.no_grad()
def test_fused_dual_pass_computes_the_last_block_for_the_cls_row_only_when_nothing_else_reads_it(
        anovl_tiny, fused_calls):
    backbone, images = anovl_tiny
    visual = backbone.model.visual
    variant = PRESETS["anovl"]
    reference = variant_features(visual, images, variant, [5, 11], ln_post=True, project=True, original_taps=False)
    fused = variant_features(visual, images, variant, [5, 11], ln_post=True, project=True, original_taps=False,
                             fused_dual_pass=True)
    assert fused_calls == [False] * 11 + [True]
    assert fused.original is None
    for block in (5, 11):
        assert_relatively_close(fused.modified.patch_at(block), reference.modified.patch_at(block))
    assert_relatively_close(fused.image_embedding, backbone.model.encode_image(images))
    fused_calls.clear()  # with the original last-block tap asked for, the last block runs in full
    variant_features(visual, images, variant, [11], fused_dual_pass=True)
    assert fused_calls == [False] * 12


@torch.no_grad()
def test_skipping_the_original_taps_is_bit_identical_and_skips_their_head(anovl_tiny):
    backbone, images = anovl_tiny
    visual = backbone.model.visual
    calls = []
    hook = visual.ln_post.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    try:
        full = variant_features(visual, images, PRESETS["anovl"], [3, 11], ln_post=True, project=True)
        with_original = len(calls)
        calls.clear()
        lean = variant_features(visual, images, PRESETS["anovl"], [3, 11], ln_post=True, project=True,
                                original_taps=False)
    finally:
        hook.remove()
    assert lean.original is None and full.original is not None
    assert torch.equal(lean.image_embedding, full.image_embedding)
    for block in (3, 11):
        assert torch.equal(lean.modified.patch_at(block), full.modified.patch_at(block))
        assert torch.equal(lean.modified.cls_at(block), full.modified.cls_at(block))
    assert len(calls) == with_original - 2  # two taps of the original stream not passed through ln_post


def test_fused_dual_pass_refuses_what_it_cannot_fuse(anovl_tiny):
    backbone, images = anovl_tiny
    visual = backbone.model.visual
    for variant in (PRESETS["aaclip_surgery_tokenwise"], AttentionVariant(start_block=5, attend_over="batch")):
        with pytest.raises(ConfigError, match="fused_dual_pass"):
            variant_features(visual, images, variant, [11], fused_dual_pass=True)
