import open_clip
import pytest

from siad.backbones import BACKBONES, get_backbone_spec, load_openclip
from siad.backbones.registry import vision_config
from siad.errors import ConfigError, UnknownNameError

TINY = ["tiny-vit-demo", "tiny-vit-l14-demo", "tiny-vit-b16plus-demo", "tiny-vit-h14-demo"]


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_entry_has_taps_inside_its_blocks(name):
    spec = get_backbone_spec(name)
    assert spec.taps, "every registered backbone names its default stage taps"
    assert list(spec.taps) == sorted(set(spec.taps))
    assert 0 <= spec.taps[0] and spec.taps[-1] < spec.n_blocks
    assert spec.taps[-1] == spec.n_blocks - 1, "the default taps end at the last block"


@pytest.mark.parametrize(
    ("name", "grid", "blocks"),
    [
        ("openai-vit-l-14-336", 24, 24),
        ("openai-vit-l-14-336-518-gelu", 37, 24),
        ("openai-vit-l-14-336-518-quickgelu", 37, 24),
        ("laion400m-vit-b-16-plus-240", 15, 12),
        ("imagebind-huge", 16, 32),
    ],
)
def test_paper_grids_and_depths(name, grid, blocks):
    spec = get_backbone_spec(name)
    assert (spec.grid, spec.n_blocks) == (grid, blocks)


def test_gelu_flavour_is_explicit_per_method():
    gelu = get_backbone_spec("openai-vit-l-14-336-518-gelu")
    quick = get_backbone_spec("openai-vit-l-14-336-518-quickgelu")
    for spec in (gelu, quick):
        assert (spec.arch, spec.pretrained, spec.image_size) == ("ViT-L-14-336", "openai", 518)
        assert spec.taps == (5, 11, 17, 23)
    assert gelu.quick_gelu is False and quick.quick_gelu is True
    assert get_backbone_spec("openai-vit-l-14-336").quick_gelu is True


def test_anovl_backbone_pins_the_e32_release_url_not_the_e31_hub_copy():
    spec = get_backbone_spec("laion400m-vit-b-16-plus-240")
    cfg = open_clip.get_pretrained_cfg("ViT-B-16-plus-240", "laion400m_e32")
    assert (spec.arch, spec.pretrained, spec.image_size) == ("ViT-B-16-plus-240", "laion400m_e32", 240)
    assert spec.taps == (2, 5, 8, 11)
    assert spec.url == cfg["url"] and "laion400m_e32" in spec.url
    # the trap the explicit URL avoids: open_clip's hub entry for this tag is the e31 checkpoint
    assert "e31" in cfg["hf_hub"]


def test_imagebind_huge_is_the_openclip_h14_tower():
    spec = get_backbone_spec("imagebind-huge")
    assert (spec.arch, spec.pretrained, spec.image_size) == ("ViT-H-14", "laion2b_s32b_b79k", 224)
    assert spec.quick_gelu is False
    assert spec.taps == (7, 15, 23, 31)
    cfg = vision_config("ViT-H-14")
    assert (cfg["width"], cfg["layers"], cfg["head_width"], cfg["patch_size"]) == (1280, 32, 80, 14)


@pytest.mark.parametrize("name", TINY)
def test_tiny_variants_are_random_small_and_gridded(name):
    spec = get_backbone_spec(name)
    assert spec.random_init and spec.url is None
    assert spec.image_size <= 128 and spec.grid >= 6
    visual = load_openclip(spec).model.visual
    assert visual.grid_size == (spec.grid, spec.grid)
    assert len(visual.transformer.resblocks) == spec.n_blocks


def test_tiny_families_mirror_their_paper_models():
    b16 = get_backbone_spec("tiny-vit-b16plus-demo")
    assert (b16.n_blocks, b16.patch_size, b16.taps) == (12, 16, get_backbone_spec("laion400m-vit-b-16-plus-240").taps)
    h14 = get_backbone_spec("tiny-vit-h14-demo")
    assert h14.patch_size == 14 and h14.n_blocks == 8
    # taps after blocks 2/4/6/8: ImageBind's 8/16/24/32 scaled by the depth ratio
    scale = get_backbone_spec("imagebind-huge").n_blocks // h14.n_blocks
    assert [(t + 1) * scale for t in h14.taps] == [8, 16, 24, 32]
    l14 = get_backbone_spec("tiny-vit-l14-demo")
    assert l14.patch_size == 14 and [(t + 1) * 3 for t in l14.taps] == [6, 12, 18, 24]


def test_taps_override_from_a_config_list():
    spec = get_backbone_spec("tiny-vit-demo", {"taps": [1, 3]})
    assert spec.taps == (1, 3)
    with pytest.raises(ConfigError, match="strictly increasing"):
        get_backbone_spec("tiny-vit-demo", {"taps": [3, 1]})
    with pytest.raises(ConfigError, match="non-negative"):
        get_backbone_spec("tiny-vit-demo", {"taps": [-1]})


def test_taps_beyond_the_blocks_stop_the_load():
    with pytest.raises(ConfigError, match="exceed the 4 blocks"):
        load_openclip(get_backbone_spec("tiny-vit-demo", {"taps": [0, 4]}))


def test_unknown_architecture_names_the_config_dir():
    spec = get_backbone_spec("tiny-vit-demo", {"arch": "no-such-arch"})
    with pytest.raises(UnknownNameError, match="model_configs"):
        _ = spec.grid
