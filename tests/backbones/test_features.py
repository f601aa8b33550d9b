import pytest
import torch
from torch import nn

from siad.backbones import get_backbone_spec, load_openclip, stage_features, tokens_to_grid
from siad.backbones.features import apply_head, normalize_taps
from siad.errors import ConfigError


@pytest.fixture(scope="module")
def tiny():
    backbone = load_openclip(get_backbone_spec("tiny-vit-h14-demo"), seed=5)
    size = backbone.spec.image_size
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    return backbone, images


def manual_streams(visual, images):
    """The residual stream after every block, by an explicit loop over the resblocks."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.reshape(1, 1, -1).expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    streams = []
    for block in visual.transformer.resblocks:
        x = block(x)
        streams.append(x)
    return streams


@torch.no_grad()
def test_taps_equal_a_manual_block_loop(tiny):
    backbone, images = tiny
    visual = backbone.model.visual
    streams = manual_streams(visual, images)
    taps = (6, 1, 3)  # order as requested
    features = stage_features(visual, images, taps)
    assert features.taps.blocks == taps
    for block, cls, patch in zip(taps, features.taps.cls, features.taps.patch):
        assert torch.equal(cls, streams[block][:, 0])
        assert torch.equal(patch, streams[block][:, 1:])
        assert patch.shape == (3, backbone.spec.grid**2, visual.transformer.width)
    assert not torch.equal(features.taps.patch_at(1), features.taps.patch_at(3))


@torch.no_grad()
def test_image_embedding_is_encode_image_from_the_same_pass(tiny):
    backbone, images = tiny
    features = stage_features(backbone.model.visual, images, [0])
    assert torch.equal(features.image_embedding, backbone.model.encode_image(images))


@torch.no_grad()
def test_ln_post_and_projection_options_match_open_clip(tiny):
    backbone, images = tiny
    visual = backbone.model.visual
    taps = list(backbone.spec.taps)
    ref = visual.forward_intermediates(
        images, indices=taps, normalize_intermediates=True, output_fmt="NLC", output_extra_tokens=True
    )
    normed = stage_features(visual, images, taps, ln_post=True)
    projected = stage_features(visual, images, taps, ln_post=True, project=True)
    for i, block in enumerate(taps):
        assert torch.allclose(normed.taps.patch_at(block), ref["image_intermediates"][i], atol=1e-6)
        assert torch.allclose(normed.taps.cls_at(block), ref["image_intermediates_prefix"][i][:, 0], atol=1e-6)
        expected = ref["image_intermediates"][i] @ visual.proj
        assert torch.allclose(projected.taps.patch_at(block), expected, atol=1e-5)
    assert projected.taps.patch[0].shape[-1] == backbone.model.visual.output_dim
    raw = stage_features(visual, images, taps).taps.patch_at(taps[-1])
    assert torch.allclose(apply_head(visual, raw, ln_post=True, project=False), normed.taps.patch_at(taps[-1]))
    only_proj = stage_features(visual, images, taps, project=True).taps.patch_at(taps[-1])
    assert torch.allclose(only_proj, raw @ visual.proj)


@torch.no_grad()
def test_stop_early_and_negative_taps(tiny):
    backbone, images = tiny
    visual = backbone.model.visual
    full = stage_features(visual, images, [2, -1])
    assert full.taps.blocks == (2, backbone.spec.n_blocks - 1)
    early = stage_features(visual, images, [2], with_image_embedding=False)
    assert early.image_embedding is None
    assert torch.equal(early.taps.patch_at(2), full.taps.patch_at(2))
    with pytest.raises(KeyError, match="not tapped"):
        early.taps.patch_at(3)


def test_tokens_to_grid_matches_open_clip_nchw(tiny):
    backbone, images = tiny
    visual = backbone.model.visual
    with torch.no_grad():
        patch = stage_features(visual, images, [4]).taps.patch_at(4)
        ref = visual.forward_intermediates(images, indices=[4], output_fmt="NCHW")["image_intermediates"][0]
    grid = tokens_to_grid(patch)
    assert torch.equal(grid, ref)
    assert torch.equal(tokens_to_grid(patch, backbone.spec.grid), ref)
    # row-major: token r * W + c sits at (r, c)
    assert torch.equal(grid[:, :, 1, 2], patch[:, 1 * backbone.spec.grid + 2])
    with pytest.raises(ConfigError, match="grid"):
        tokens_to_grid(patch[:, 1:])
    with pytest.raises(ConfigError, match="4x17"):
        tokens_to_grid(patch, (4, 17))


def test_bad_inputs_are_refused(tiny):
    backbone, images = tiny
    visual = backbone.model.visual
    with pytest.raises(ConfigError, match="image_size"):
        stage_features(visual, images[:, :, :64, :64], [0])
    with pytest.raises(ConfigError, match="0..7"):
        stage_features(visual, images, [8])
    with pytest.raises(ConfigError, match="no taps"):
        normalize_taps([], 8)
    with pytest.raises(ConfigError, match="not an open_clip VisionTransformer"):
        stage_features(nn.Linear(2, 2), images, [0])
