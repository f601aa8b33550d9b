"""ImageBind -> open_clip key mapping: exact round trip, forward equivalence and loud failures.

The reference ImageBind forward below is written from ImageBind's module structure (PadIm2Video repeat +
Conv3d stem, CLS + positional embedding, pre-LN, pre-norm blocks, LN -> CLS -> Linear head; text: token +
positional embedding, causal blocks, LN + Linear at the EOT argmax) and runs on ImageBind-named tensors only.
"""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from siad.backbones.imagebind import (
    IMAGEBIND_LAYER_NORM_EPS,
    TEXT_MASK_KEY,
    imagebind_to_openclip,
    is_imagebind_state_dict,
    load_imagebind_into_openclip,
    openclip_to_imagebind,
    sum_stem_frames,
)
from siad.errors import MissingWeightsError, SiadError

STEM = "modality_preprocessors.vision.rgbt_stem.proj.1.weight"
PATCH, WIDTH, HEADS, EMBED, CONTEXT, VOCAB = 14, 32, 2, 24, 8, 50


def tiny_h14(seed: int, image_size: int = 28, quick_gelu: bool = False) -> open_clip.CLIP:
    """A ViT-H-14-shaped CLIP (patch 14, head width 16, pre-LN, exact GELU) small enough for a unit test.

    Every parameter is perturbed so that a swapped LayerNorm weight/bias or a missing transpose shows.
    """
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=EMBED,
        vision_cfg={"width": WIDTH, "layers": 3, "head_width": WIDTH // HEADS, "patch_size": PATCH,
                    "image_size": image_size},
        text_cfg={"context_length": CONTEXT, "vocab_size": VOCAB, "width": WIDTH, "heads": HEADS, "layers": 2},
        quick_gelu=quick_gelu,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


# --------------------------------------------------------------------- reference ImageBind forward (test only)


def _ln(x: Tensor, sd: dict[str, Tensor], prefix: str, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)


def _attention(x: Tensor, sd: dict[str, Tensor], prefix: str, heads: int, mask: Tensor | None) -> Tensor:
    b, n, d = x.shape
    q, k, v = F.linear(x, sd[f"{prefix}.in_proj_weight"], sd[f"{prefix}.in_proj_bias"]).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        logits = logits + mask
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
    return F.linear(out, sd[f"{prefix}.out_proj.weight"], sd[f"{prefix}.out_proj.bias"])


def _trunk(x: Tensor, sd: dict[str, Tensor], trunk: str, heads: int, eps: float, mask: Tensor | None) -> Tensor:
    k = 0
    while f"{trunk}.blocks.{k}.norm_1.weight" in sd:
        p = f"{trunk}.blocks.{k}"
        x = x + _attention(_ln(x, sd, f"{p}.norm_1", eps), sd, f"{p}.attn", heads, mask)
        hidden = F.gelu(F.linear(_ln(x, sd, f"{p}.norm_2", eps), sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"]))
        x = x + F.linear(hidden, sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])
        k += 1
    return x


def imagebind_vision(sd: dict[str, Tensor], images: Tensor, eps: float = IMAGEBIND_LAYER_NORM_EPS) -> Tensor:
    clip = images.unsqueeze(2).repeat(1, 1, 2, 1, 1)  # the image as two identical frames
    x = F.conv3d(clip, sd[STEM], stride=(2, PATCH, PATCH)).flatten(2).transpose(1, 2)
    cls = sd["modality_preprocessors.vision.cls_token"].expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + sd["modality_preprocessors.vision.pos_embedding_helper.pos_embed"]
    x = _ln(x, sd, "modality_trunks.vision.pre_transformer_layer.0", eps)
    x = _trunk(x, sd, "modality_trunks.vision", HEADS, eps, None)
    x = _ln(x, sd, "modality_heads.vision.0", eps)[:, 0]
    return F.linear(x, sd["modality_heads.vision.2.weight"])


def imagebind_text(sd: dict[str, Tensor], tokens: Tensor, eps: float = IMAGEBIND_LAYER_NORM_EPS) -> Tensor:
    x = sd["modality_preprocessors.text.token_embedding.weight"][tokens] + sd["modality_preprocessors.text.pos_embed"]
    x = _trunk(x, sd, "modality_trunks.text", HEADS, eps, sd[TEXT_MASK_KEY])
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
    x = _ln(x, sd, "modality_heads.text.proj.0", eps)
    return F.linear(x, sd["modality_heads.text.proj.1.weight"])


# ------------------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def source() -> open_clip.CLIP:
    return tiny_h14(seed=1)


@pytest.fixture()
def imagebind_sd(source) -> dict[str, Tensor]:
    sd = openclip_to_imagebind(source.state_dict())
    # Give the two frames different kernels (same sum): loading must not depend on the split convention.
    gen = torch.Generator().manual_seed(7)
    delta = 0.3 * torch.randn(sd[STEM][:, :, 0].shape, generator=gen)
    sd[STEM] = torch.stack([sd[STEM][:, :, 0] + delta, sd[STEM][:, :, 1] - delta], dim=2)
    return sd


def test_round_trip_openclip_imagebind_openclip_is_exact(source):
    original = source.state_dict()
    imagebind = openclip_to_imagebind(original)
    assert imagebind[STEM].shape == (WIDTH, 3, 2, PATCH, PATCH)
    assert torch.equal(imagebind[STEM][:, :, 0], imagebind[STEM][:, :, 1])  # the equal-halves convention
    assert imagebind["modality_heads.vision.2.weight"].shape == (EMBED, WIDTH)
    back = imagebind_to_openclip(imagebind)
    assert set(back) == set(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize(
    ("imagebind_key", "openclip_key"),
    [
        ("modality_trunks.vision.blocks.31.attn.in_proj_weight", "visual.transformer.resblocks.31.attn.in_proj_weight"),
        ("modality_trunks.vision.blocks.7.mlp.fc2.bias", "visual.transformer.resblocks.7.mlp.c_proj.bias"),
        ("modality_trunks.vision.pre_transformer_layer.0.weight", "visual.ln_pre.weight"),
        ("modality_heads.vision.0.bias", "visual.ln_post.bias"),
        ("modality_trunks.text.blocks.23.norm_2.weight", "transformer.resblocks.23.ln_2.weight"),
        ("modality_heads.text.proj.0.weight", "ln_final.weight"),
        ("modality_postprocessors.text.1.log_logit_scale", "logit_scale"),
    ],
)
def test_imagebind_names_map_to_openclip_names(imagebind_key, openclip_key):
    value = torch.zeros(3)
    assert list(imagebind_to_openclip({imagebind_key: value})) == [openclip_key]
    assert list(openclip_to_imagebind({openclip_key: value})) == [imagebind_key]


def test_two_frame_conv3d_on_a_duplicated_image_equals_the_summed_2d_kernel():
    gen = torch.Generator().manual_seed(0)
    kernel3d = torch.randn(8, 3, 2, PATCH, PATCH, generator=gen)  # frames deliberately different
    image = torch.randn(2, 3, 2 * PATCH, 3 * PATCH, generator=gen)
    video = image.unsqueeze(2).repeat(1, 1, 2, 1, 1)
    out3d = F.conv3d(video, kernel3d, stride=(2, PATCH, PATCH)).squeeze(2)
    out2d = F.conv2d(image, sum_stem_frames(kernel3d), stride=PATCH)
    torch.testing.assert_close(out3d, out2d, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(out2d, F.conv2d(image, kernel3d[:, :, 0], stride=PATCH), atol=1e-2)


def test_loaded_model_reproduces_the_imagebind_forward(imagebind_sd):
    target = tiny_h14(seed=2)
    report = load_imagebind_into_openclip(target, imagebind_sd, layer_norm_eps=IMAGEBIND_LAYER_NORM_EPS)
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 28, 28, generator=gen)
    tokens = torch.randint(1, VOCAB - 1, (3, CONTEXT), generator=gen)
    tokens[torch.arange(3), torch.tensor([2, 5, 7])] = VOCAB - 1  # an EOT token (the argmax) per row
    with torch.no_grad():
        torch.testing.assert_close(target.encode_image(images), imagebind_vision(imagebind_sd, images),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(target.encode_text(tokens), imagebind_text(imagebind_sd, tokens),
                                   atol=1e-5, rtol=1e-5)
    assert report.layer_norm_eps == IMAGEBIND_LAYER_NORM_EPS
    assert target.visual.ln_pre.eps == target.ln_final.eps == IMAGEBIND_LAYER_NORM_EPS


def test_default_keeps_openclip_eps_and_loads_every_tensor(imagebind_sd, source):
    target = tiny_h14(seed=2)
    report = load_imagebind_into_openclip(target, imagebind_sd)
    assert target.visual.transformer.resblocks[0].ln_1.eps == 1e-5
    assert report.layer_norm_eps is None and report.missing == []
    assert set(report.mapped) == set(target.state_dict())
    assert report.mapped["visual.proj"] == "modality_heads.vision.2.weight"
    assert report.mapped["visual.conv1.weight"] == STEM
    assert report.checked == [TEXT_MASK_KEY]
    for key, value in source.state_dict().items():  # the frame split does not matter, only the sum
        torch.testing.assert_close(target.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)


def test_other_modalities_are_ignored_and_reported(imagebind_sd):
    others = {
        "modality_preprocessors.audio.rgbt_stem.proj.weight": torch.zeros(2),
        "modality_trunks.depth.blocks.0.attn.bias_k": torch.zeros(2),
        "modality_heads.thermal.2.weight": torch.zeros(2),
        "modality_postprocessors.imu.1.log_logit_scale": torch.zeros(()),
    }
    report = load_imagebind_into_openclip(tiny_h14(seed=2), {**imagebind_sd, **others})
    assert report.ignored == sorted(others)
    assert "4 other-modality tensors ignored" in report.summary()


def test_missing_key_fails_loudly_and_loads_nothing(imagebind_sd):
    target = tiny_h14(seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    del imagebind_sd["modality_trunks.vision.blocks.1.mlp.fc1.weight"]
    with pytest.raises(SiadError, match=r"visual\.transformer\.resblocks\.1\.mlp\.c_fc\.weight"):
        load_imagebind_into_openclip(target, imagebind_sd)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_non_strict_reports_and_warns_about_missing_keys(imagebind_sd):
    vision_only = {k: v for k, v in imagebind_sd.items() if ".vision." in k}
    with pytest.warns(UserWarning, match="NOT loaded"):
        report = load_imagebind_into_openclip(tiny_h14(seed=2), vision_only, strict=False)
    assert "token_embedding.weight" in report.missing and "text_projection" in report.missing
    assert all(key.startswith("visual.") for key in report.mapped)


@pytest.mark.parametrize(
    ("extra_key", "message"),
    [
        ("modality_trunks.vision.blocks.0.attn.bias_k", "no open_clip counterpart"),
        ("trunk.something.else", "no open_clip counterpart"),
        ("modality_trunks.vision.blocks.9.norm_1.weight", "does not have"),
    ],
)
def test_unexpected_keys_fail_loudly(imagebind_sd, extra_key, message):
    imagebind_sd[extra_key] = torch.zeros(WIDTH)
    with pytest.raises(SiadError, match=message):
        load_imagebind_into_openclip(tiny_h14(seed=2), imagebind_sd)


def test_shape_mismatch_names_the_tensor(imagebind_sd):
    with pytest.raises(SiadError, match="visual.positional_embedding"):
        load_imagebind_into_openclip(tiny_h14(seed=2, image_size=42), imagebind_sd)


def test_quick_gelu_model_is_refused(imagebind_sd):
    with pytest.raises(SiadError, match="QuickGELU"):
        load_imagebind_into_openclip(tiny_h14(seed=2, quick_gelu=True), imagebind_sd)


def test_non_causal_text_mask_is_refused(imagebind_sd):
    imagebind_sd[TEXT_MASK_KEY] = torch.zeros(CONTEXT, CONTEXT)
    with pytest.raises(SiadError, match="causal"):
        load_imagebind_into_openclip(tiny_h14(seed=2), imagebind_sd)


def test_loads_from_a_file_and_reports_bad_files(tmp_path, imagebind_sd):
    path = tmp_path / "imagebind_huge.pth"
    torch.save({"model": imagebind_sd}, path)
    report = load_imagebind_into_openclip(tiny_h14(seed=2), path)
    assert report.source == str(path)
    with pytest.raises(MissingWeightsError, match="nope.pth"):
        load_imagebind_into_openclip(tiny_h14(seed=2), tmp_path / "nope.pth")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(path.read_bytes()[:1000])  # an interrupted download
    with pytest.raises(SiadError, match="broken.pth"):
        load_imagebind_into_openclip(tiny_h14(seed=2), broken)


def test_is_imagebind_state_dict(source, imagebind_sd):
    assert is_imagebind_state_dict(imagebind_sd)
    assert not is_imagebind_state_dict(source.state_dict())


def test_vit_h_14_maps_onto_imagebind_huge_shapes():
    """The full ViT-H-14 (on the meta device: shapes only) covers exactly ImageBind-Huge's vision+text keys."""
    with torch.device("meta"):
        model = open_clip.CLIP(**open_clip.get_model_config("ViT-H-14"))
    imagebind = openclip_to_imagebind(model.state_dict())
    assert imagebind[STEM].shape == (1280, 3, 2, 14, 14)
    assert imagebind["modality_preprocessors.vision.pos_embedding_helper.pos_embed"].shape == (1, 257, 1280)
    assert imagebind["modality_preprocessors.vision.cls_token"].shape == (1, 1, 1280)
    assert imagebind["modality_heads.vision.2.weight"].shape == (1024, 1280)
    assert imagebind["modality_heads.text.proj.1.weight"].shape == (1024, 1024)
    assert imagebind[TEXT_MASK_KEY].shape == (77, 77)
    vision_blocks = {k.split(".")[3] for k in imagebind if k.startswith("modality_trunks.vision.blocks.")}
    text_blocks = {k.split(".")[3] for k in imagebind if k.startswith("modality_trunks.text.blocks.")}
    assert (len(vision_blocks), len(text_blocks)) == (32, 24)
    assert set(imagebind_to_openclip(imagebind)) == set(model.state_dict())


def test_load_openclip_reads_an_original_imagebind_checkpoint(tmp_path):
    from siad.backbones import get_backbone_spec, load_openclip

    source = load_openclip(get_backbone_spec("tiny-vit-h14-demo"), seed=5).model
    path = tmp_path / "imagebind_huge.pth"
    torch.save(openclip_to_imagebind(source.state_dict()), path)
    spec = get_backbone_spec("tiny-vit-h14-demo", {"checkpoint": str(path), "checkpoint_format": "imagebind"})
    loaded = load_openclip(spec, seed=99).model  # a different seed: every weight must come from the file
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
