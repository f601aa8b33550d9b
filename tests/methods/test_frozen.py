"""Frozen passes shared between methods (siad/methods/frozen.py): content keys and the shared image embedding."""

import torch

from siad.backbones import get_backbone_spec, load_openclip
from siad.methods.frozen import ImageEmbeddings, batch_content_keys, content_keys


def _images(n=2, seed=0):
    return torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def test_content_keys_prefer_the_file_hash_and_hash_tensors_otherwise():
    images = _images()
    keys = content_keys(images, ["ab" * 32, ""])
    assert keys[0] == "sha256/" + "ab" * 32 and keys[1].startswith("tensor-sha256/")
    assert content_keys(images)[1] == keys[1] and content_keys(images + 1)[1] != keys[1]


def test_batch_content_keys_hash_the_files(tmp_path):
    f = tmp_path / "a.png"
    f.write_bytes(b"image bytes")
    import hashlib

    assert batch_content_keys({"image": _images(1), "image_file": [str(f)]}) == [
        "sha256/" + hashlib.sha256(b"image bytes").hexdigest()]


def test_image_embedding_is_encode_image_and_is_shared_through_the_cache(tmp_path):
    backbone = load_openclip(get_backbone_spec("tiny-vit-l14-gelu-demo"), seed=0)
    images = _images()
    with torch.no_grad():
        expected = backbone.model.encode_image(images)
    plain = ImageEmbeddings(backbone, 0)
    torch.testing.assert_close(plain(images), expected)
    keys = ["sha256/" + "1" * 64, "sha256/" + "2" * 64]
    first = ImageEmbeddings(backbone, 0, tmp_path)  # e.g. AdaCLIP's g0
    assert torch.equal(first(images, keys), plain(images))
    second = ImageEmbeddings(backbone, 0, tmp_path)  # e.g. AA-CLIP's ĝ on the same backbone: read, not recomputed
    second.compute = lambda images: (_ for _ in ()).throw(AssertionError("recomputed"))
    assert torch.equal(second(images, keys), first(images, keys))
    assert second._cache.cache_stats.hits == 2
    other_weights = ImageEmbeddings(backbone, 1, tmp_path)  # another random-weights seed: another namespace
    assert other_weights._cache.folder != first._cache.folder


def test_cached_rows_reads_a_repeated_key_once_and_keeps_the_order(tmp_path):
    from siad.backbones.cache import FeatureCache
    from siad.methods.frozen import cached_rows

    cache = FeatureCache(tmp_path, {"feature": "test"})
    calls = []

    def compute(positions):
        calls.append(list(positions))
        return {"x": torch.tensor([[float(p)] for p in positions])}

    rows = cached_rows(cache, ["a", "b", "a"], compute)
    assert calls == [[0, 1]] and rows["x"].flatten().tolist() == [0.0, 1.0, 0.0]
    again = cached_rows(cache, ["b", "a"], compute)
    assert calls == [[0, 1]] and again["x"].flatten().tolist() == [1.0, 0.0]
