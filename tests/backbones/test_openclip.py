import huggingface_hub.constants
import pytest
import torch

from siad.backbones import BACKBONES, get_backbone_spec, load_openclip, resolve_checkpoint
from siad.errors import ConfigError, MissingWeightsError, UnknownNameError


def test_tiny_backbone_is_random_seeded_and_frozen():
    spec = get_backbone_spec("tiny-vit-demo")
    a = load_openclip(spec, seed=3)
    b = load_openclip(spec, seed=3)
    c = load_openclip(spec, seed=4)
    wa, wb, wc = (m.model.visual.conv1.weight for m in (a, b, c))
    assert a.random_init
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    assert not any(p.requires_grad for p in a.model.parameters())
    assert not a.model.training


def test_openai_spec_uses_quick_gelu_at_336():
    spec = get_backbone_spec("openai-vit-l-14-336")
    assert (spec.arch, spec.pretrained, spec.image_size, spec.quick_gelu) == ("ViT-L-14-336", "openai", 336, True)


def test_quick_gelu_flag_reaches_the_model():
    quick = load_openclip(get_backbone_spec("tiny-vit-demo", {"quick_gelu": True}))
    exact = load_openclip(get_backbone_spec("tiny-vit-demo"))
    act = lambda m: type(m.model.visual.transformer.resblocks[0].mlp.gelu).__name__  # noqa: E731
    assert act(quick) == "QuickGELU"
    assert act(exact) == "GELU"


def test_image_size_override_resizes_the_grid():
    backbone = load_openclip(get_backbone_spec("tiny-vit-demo", {"image_size": 96}))
    out = backbone.model.visual.forward_intermediates(torch.zeros(1, 3, 96, 96), indices=[0], output_fmt="NLC")
    assert out["image_intermediates"][0].shape[1] == (96 // 8) ** 2


def test_missing_weights_offline_names_tag_and_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingWeightsError) as err:
        resolve_checkpoint(get_backbone_spec("openai-vit-l-14-336"), cache_dir=tmp_path)
    message = str(err.value)
    assert "ViT-L-14-336 / openai" in message
    assert str(tmp_path) in message
    assert "checkpoint" in message


def test_missing_local_checkpoint_file(tmp_path):
    spec = get_backbone_spec("tiny-vit-demo", {"checkpoint": str(tmp_path / "nope.pt")})
    with pytest.raises(MissingWeightsError, match="nope.pt"):
        resolve_checkpoint(spec)


def test_unknown_names_and_overrides():
    with pytest.raises(UnknownNameError, match="tiny-vit-demo"):
        get_backbone_spec("no-such-backbone")
    with pytest.raises(ConfigError, match="colour"):
        get_backbone_spec("tiny-vit-demo", {"colour": "red"})
    with pytest.raises(UnknownNameError, match="laion"):
        resolve_checkpoint(get_backbone_spec("tiny-vit-demo", {"arch": "ViT-B-32", "pretrained": "laion-nope"}))
    assert "openai-vit-l-14-336" in BACKBONES
