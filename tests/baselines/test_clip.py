import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from baselines.clip import ZeroShotCLIP
from siad.errors import ConfigError, UnknownNameError
from siad.methods import build_method, get_method_class

TINY = {"backbone": "tiny-vit-demo"}


@pytest.fixture(scope="module")
def clip():
    return build_method("clip", TINY, seed=0)


def _batch(method, n=2, seed=0):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (50 + 7 * i, 70, 3), dtype=np.uint8)) for i in range(n)]
    return {"image": torch.stack([method.transform(im) for im in images]), "cls_name": ["bottle", "metal_nut"][:n]}


def test_registered_and_training_free():
    assert get_method_class("clip") is ZeroShotCLIP
    assert ZeroShotCLIP.training_free
    with pytest.raises(UnknownNameError, match="clip"):
        get_method_class("no-such-method")
    with pytest.raises(ConfigError, match="temperature"):
        build_method("clip", {**TINY, "temperature": 1})


def test_encode_image_matches_the_plain_open_clip_path(clip):
    x = _batch(clip)["image"]
    model = clip.backbone.model
    global_feat, patches = clip.encode_image(x)
    assert torch.allclose(global_feat, F.normalize(model.encode_image(x), dim=-1), atol=1e-5)
    visual = model.visual
    tokens = visual.ln_post(visual.transformer(visual._embeds(x)))
    manual = F.normalize(tokens[:, 1:] @ visual.proj, dim=-1)
    assert torch.allclose(patches, manual, atol=1e-5)


def test_scores_are_the_abnormal_softmax_of_the_global_embedding(clip):
    batch = _batch(clip)
    scores, maps = clip.predict(batch)
    global_feat, _ = clip.encode_image(batch["image"])
    for i, cls in enumerate(batch["cls_name"]):
        logits = 100.0 * global_feat[i] @ clip.text_features(cls).T
        assert torch.isclose(scores[i], logits.softmax(-1)[1], atol=1e-5)
    assert maps.shape == (2, 64, 64)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0


def test_map_is_the_upsampled_patch_softmax(clip):
    batch = _batch(clip, n=1)
    _, maps = clip.predict(batch)
    _, patches = clip.encode_image(batch["image"])
    probs = (100.0 * patches[0] @ clip.text_features("bottle").T).softmax(-1)[:, 1].reshape(1, 1, 8, 8)
    expected = F.interpolate(probs, size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(maps[0], expected, atol=1e-5)


def test_same_seed_same_numbers():
    a, b = build_method("clip", TINY, seed=1), build_method("clip", TINY, seed=1)
    batch = _batch(a)
    sa, ma = a.predict(batch)
    sb, mb = b.predict(batch)
    assert torch.equal(sa, sb) and torch.equal(ma, mb)
