import torch
import torch.nn.functional as F

from siad.backbones import get_backbone_spec, load_openclip
from siad.prompts import ENSEMBLES, encode_state_features, mean_text_feature, object_name


def test_appendix_d_ensemble_sentences():
    normal, abnormal = ENSEMBLES.get("siad_appendix_d").sentences("metal nut")
    assert len(normal) == 7 * 2 and len(abnormal) == 5 * 2
    assert normal[0] == "a photo of a metal nut."
    assert "a photo of the metal nut without damage." in normal
    assert "a photo of a broken metal nut." in abnormal
    assert not set(normal) & set(abnormal)


def test_two_sentence_clip_ensemble():
    normal, abnormal = ENSEMBLES.get("anomalyclip_two_sentences").sentences("bottle")
    assert (normal, abnormal) == (["A photo of a normal bottle."], ["A photo of an anomalous bottle."])


def test_object_name_replaces_underscores():
    assert object_name("metal_nut") == "metal nut"


def test_mean_text_feature_normalises_before_and_after():
    feats = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    expected = F.normalize(torch.tensor([1.0, 1.0]), dim=0)  # unnormalised mean would tilt towards row 0
    assert torch.allclose(mean_text_feature(feats), expected)


def test_state_features_match_manual_encoding():
    backbone = load_openclip(get_backbone_spec("tiny-vit-demo"))
    ensemble = ENSEMBLES.get("siad_appendix_d")
    feats = encode_state_features(backbone.model, backbone.tokenizer, ensemble, "bottle")
    normal, _ = ensemble.sentences("bottle")
    manual = F.normalize(backbone.model.encode_text(backbone.tokenizer(normal)), dim=-1).mean(0)
    assert feats.shape == (2, 64)
    assert torch.allclose(feats[0], F.normalize(manual, dim=0), atol=1e-6)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-6)
