import urllib.error
import urllib.request

import huggingface_hub.constants
import open_clip
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


def test_explicit_url_is_downloaded_with_open_clip_url_downloader(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, cache_dir=None):
        calls.append((url, cache_dir))
        return str(tmp_path / "weights.pt")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", fake_download)
    monkeypatch.setattr(open_clip, "download_pretrained", lambda *a, **k: pytest.fail("hub path must not be used"))
    spec = get_backbone_spec("laion400m-vit-b-16-plus-240")
    assert resolve_checkpoint(spec, cache_dir=tmp_path) == str(tmp_path / "weights.pt")
    assert calls == [(spec.url, str(tmp_path))]
    assert "laion400m_e32" in calls[0][0]


def test_unreachable_url_names_url_and_cache(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    spec = get_backbone_spec("laion400m-vit-b-16-plus-240")
    with pytest.raises(MissingWeightsError) as err:
        resolve_checkpoint(spec, cache_dir=tmp_path)
    message = str(err.value)
    assert spec.url in message and str(tmp_path) in message and "checkpoint" in message
    assert not (tmp_path / "vit_b_16_plus_240-laion400m_e32-699c4b84.pt").exists()


def test_cached_url_file_is_reused_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("must not touch the network"))
    (tmp_path / "my-weights.pt").write_bytes(b"cached")
    spec = get_backbone_spec("tiny-vit-demo", {"pretrained": "mine", "url": "https://example.invalid/my-weights.pt"})
    assert not spec.random_init
    assert resolve_checkpoint(spec, cache_dir=tmp_path) == str(tmp_path / "my-weights.pt")


def test_no_tag_means_random_weights_even_with_a_url(monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("must not touch the network"))
    spec = get_backbone_spec("laion400m-vit-b-16-plus-240", {"pretrained": None, "image_size": 64})
    assert spec.url is not None and spec.random_init
    assert resolve_checkpoint(spec) is None


def test_local_checkpoint_wins_over_url(tmp_path):
    path = tmp_path / "local.pt"
    path.write_bytes(b"x")
    spec = get_backbone_spec("laion400m-vit-b-16-plus-240", {"checkpoint": str(path)})
    assert resolve_checkpoint(spec) == str(path)


def test_imagebind_huge_offline_names_tag_and_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingWeightsError) as err:
        load_openclip(get_backbone_spec("imagebind-huge"), cache_dir=tmp_path)
    assert "ViT-H-14 / laion2b_s32b_b79k" in str(err.value) and str(tmp_path) in str(err.value)


@pytest.mark.parametrize("mode, antialias", [("bicubic", False), ("open_clip", True)])
def test_weights_of_another_size_get_the_spec_positional_resize(tmp_path, mode, antialias):
    """AdaCLIP / AA-CLIP (pos_resize bicubic): bicubic without antialias at load, as their vendored open_clip; the
    default is open_clip's own (bicubic with antialias). The two tables differ."""
    from dataclasses import replace

    from siad.backbones.features import resize_positional_embedding

    native = get_backbone_spec("tiny-vit-l14-quickgelu-demo")  # built at 56 px: 4x4 grid
    model = load_openclip(native, seed=3).model
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    loaded = load_openclip(replace(native, image_size=112, checkpoint=str(path), pos_resize=mode)).model
    source = model.visual.positional_embedding.data
    expected = resize_positional_embedding(source, 8, mode="bicubic", antialias=antialias)
    assert torch.equal(loaded.visual.positional_embedding.data, expected)
    other = resize_positional_embedding(source, 8, mode="bicubic", antialias=not antialias)
    assert not torch.allclose(loaded.visual.positional_embedding.data, other, atol=1e-4)
    assert loaded.visual.grid_size == (8, 8) and loaded.encode_image(torch.zeros(1, 3, 112, 112)).shape == (1, 48)
    assert get_backbone_spec("openai-vit-l-14-336-518-gelu-noantialias").pos_resize == "bicubic"  # AdaCLIP
    assert get_backbone_spec("openai-vit-l-14-336-518-gelu").pos_resize == "open_clip"  # AA-CLIP
