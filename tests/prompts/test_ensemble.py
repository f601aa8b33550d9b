import dataclasses

import pytest
import torch
import torch.nn.functional as F

from siad.backbones import get_backbone_spec, load_openclip
from siad.errors import ConfigError
from siad.prompts import (
    ANOVL_TABLE4_VARIANTS,
    ENSEMBLES,
    ClassNaming,
    DomainSet,
    PromptEnsemble,
    aggregate_text_features,
    encode_class_text,
    encode_sentences,
    encode_state_features,
    mean_text_feature,
    object_name,
)


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


# --- domain-aware ensembles (AnoVL), naming, aggregation, batched encoding ---


@pytest.fixture(scope="module")
def tiny():
    return load_openclip(get_backbone_spec("tiny-vit-demo"))


def test_anovl_object_class_has_462_sentences_per_state():
    normal, abnormal = ENSEMBLES.get("anovl").class_sentences("metal_nut")
    assert len(normal) == len(abnormal) == 3 * 22 * 7 == 462
    assert len(set(normal)) == 462 and not set(normal) & set(abnormal)
    # template-major order, as AnoVL's released code: all 7 states of template 1 first
    assert normal[0] == "a cropped industrial photo of the normal metal_nut"
    assert normal[1] == "a cropped industrial photo of the flawless metal_nut"
    assert normal[7] == "a cropped industrial photo of a normal metal_nut"
    assert abnormal[1] == "a cropped industrial photo of the abnormal metal_nut"
    assert "an industrial image of the large metal_nut without flaw" in normal
    assert abnormal[-1] == "a manufacturing image of a metal_nut with damage for anomaly detection"
    assert not any("textural" in s or "surface" in s for s in normal + abnormal)


def test_anovl_texture_class_uses_texture_domains():
    normal, abnormal = ENSEMBLES.get("anovl").class_sentences("carpet")
    assert len(normal) == len(abnormal) == 462
    assert "a cropped surface picture of the blemished carpet" in abnormal
    assert "a textural photo of a carpet without defect for visual inspection" in normal
    assert "an industrial photo of a perfect carpet" in normal  # "industrial photo" is in both groups
    assert not any("manufacturing" in s or "industrial image" in s for s in normal + abnormal)


def test_texture_lookup_is_a_parameter():
    anovl = ENSEMBLES.get("anovl")
    as_texture = dataclasses.replace(
        anovl, domains=dataclasses.replace(anovl.domains, class_groups={"bottle": "texture"})
    )
    assert any("surface picture" in s for s in as_texture.class_sentences("bottle")[0])
    assert any("manufacturing" in s for s in as_texture.class_sentences("carpet")[0])
    explicit, _ = anovl.class_sentences("bottle", domain_group="texture")
    assert explicit == as_texture.class_sentences("bottle")[0]
    with pytest.raises(ConfigError, match="unknown domain group"):
        anovl.class_sentences("bottle", domain_group="fabric")


def test_anovl_class_words_are_raw_keys_except_macaroni():
    anovl = ENSEMBLES.get("anovl")
    assert anovl.class_sentences("macaroni2")[0][0] == "a cropped industrial photo of the normal macaroni"
    assert anovl.class_sentences("pipe_fryum")[0][0].endswith("normal pipe_fryum")
    assert ENSEMBLES.get("siad_appendix_d").class_sentences("pipe_fryum")[0][0] == "a photo of a pipe fryum."
    assert ClassNaming(replacements=(("-", " "),)).word("brain-mri_x") == "brain mri_x"


def test_anovl_table4_variants():
    assert dict(ANOVL_TABLE4_VARIANTS) == {"Base": "anovl_base", "+CS Prompt": "anovl_cs", "+DA Prompt": "anovl"}
    base_n, base_a = ENSEMBLES.get("anovl_base").class_sentences("bottle")
    assert len(base_n) == len(base_a) == 22
    assert base_n[12] == "a photo of a normal bottle" and base_a[13] == "a photo of the abnormal bottle"
    cs_n, cs_a = ENSEMBLES.get("anovl_cs").class_sentences("carpet")
    assert len(cs_n) == len(cs_a) == 154
    assert "a blurry photo of a blemished carpet" in cs_a and not any("industrial" in s for s in cs_n)
    full = ENSEMBLES.get("anovl")
    for name in ("anovl_base", "anovl_cs"):
        assert ENSEMBLES.get(name).aggregate == full.aggregate == "mean_then_normalize"


@pytest.mark.parametrize(("name", "n_normal", "n_abnormal"), [("adaclip", 28, 20), ("aa_clip", 6, 10)])
def test_other_method_ensemble_counts(name, n_normal, n_abnormal):
    normal, abnormal = ENSEMBLES.get(name).class_sentences("bottle")
    assert (len(normal), len(abnormal)) == (n_normal, n_abnormal)


def test_ensemble_definitions_are_validated():
    with pytest.raises(ConfigError, match="exactly one"):
        PromptEnsemble(("normal",), ("broken {}",), ("a photo of a {}.",))
    with pytest.raises(ConfigError, match="aggregate"):
        PromptEnsemble(("{}",), ("broken {}",), ("a photo of a {}.",), aggregate="median")
    with pytest.raises(ConfigError, match="no word 'photo'"):
        PromptEnsemble(("{}",), ("broken {}",), ("a {}.",), domains=ENSEMBLES.get("anovl").domains)
    with pytest.raises(ConfigError, match="no domain phrases"):
        DomainSet(phrases={"object": ("industrial photo",)}, class_groups={"carpet": "texture"}, default_group="object")


def test_aggregation_variants_differ():
    feats = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(aggregate_text_features(feats, "normalize_then_mean"), F.normalize(torch.ones(2), dim=0))
    expected = F.normalize(torch.tensor([3.0, 1.0]), dim=0)  # the larger row dominates
    assert torch.allclose(aggregate_text_features(feats, "mean_then_normalize"), expected)
    with pytest.raises(ConfigError, match="aggregate"):
        aggregate_text_features(feats, "mean")


def test_encode_class_text_anovl_on_tiny_model(tiny):
    model, tokenizer = tiny.model, tiny.tokenizer
    out = encode_class_text(model, tokenizer, ENSEMBLES.get("anovl"), "bottle", batch_size=200)
    assert out.sentence_features.shape == (924, 64)
    assert torch.allclose(out.sentence_features.norm(dim=-1), torch.ones(924), atol=1e-5)
    normal, abnormal = out.sentences
    raw = model.encode_text(tokenizer(normal))
    assert torch.allclose(out.features[0], F.normalize(raw.mean(0), dim=0), atol=1e-5)  # mean, then normalise
    assert torch.allclose(out.sentence_features[:462], F.normalize(raw, dim=-1), atol=1e-5)
    other = encode_class_text(model, tokenizer, ENSEMBLES.get("anovl"), "bottle", aggregate="normalize_then_mean")
    cosine = (out.features * other.features).sum(-1)
    assert (1 - cosine).max() > 1e-4  # the two conventions differ measurably
    assert torch.allclose(other.sentence_features, out.sentence_features, atol=1e-6)
    default = encode_state_features(model, tokenizer, ENSEMBLES.get("anovl"), "bottle")
    assert torch.allclose(default, out.features, atol=1e-6)


def test_batched_trimmed_encoding_equals_encode_text(tiny):
    sentences = ENSEMBLES.get("anovl_cs").class_sentences("screw")[1] + ["a much longer sentence " * 5]
    reference = tiny.model.encode_text(tiny.tokenizer(sentences))
    for batch_size, trim in ((7, True), (1000, True), (50, False)):
        got = encode_sentences(tiny.model, tiny.tokenizer, sentences, batch_size=batch_size, trim_padding=trim)
        assert torch.allclose(got, reference, atol=1e-5)
    with pytest.raises(ConfigError):
        encode_sentences(tiny.model, tiny.tokenizer, sentences, batch_size=0)
