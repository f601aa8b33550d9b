"""AnomalyCLIP against the released code: every vector of tests/data/anomalyclip/vectors.npz (see its README).

The vectors were made by running zqhang/AnomalyCLIP@45ed4dd on the tiny ViT-L/14@336-shaped QuickGELU CLIP of
``anomalyclip_reference.TINY_CONFIG`` with ``tiny_state_dict()`` and ``reference_inputs()``; here the suite's
implementation runs on the same open_clip model, weights, inputs and initial learnables.
"""

import importlib.util
import pathlib

import numpy as np
import open_clip
import pytest
import torch

from baselines.anomalyclip import AnomalyCLIPConfig, AnomalyCLIPModel
from baselines.anomalyclip.torch_model import (
    anomaly_map,
    image_logits,
    image_scores,
    run_positional_embedding,
    smooth_maps,
)
from siad.methods import build_method

_path = pathlib.Path(__file__).with_name("anomalyclip_reference.py")
_spec = importlib.util.spec_from_file_location("anomalyclip_reference", _path)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

pytestmark = pytest.mark.skipif(not ref.VECTORS_PATH.is_file(), reason="reference vectors not generated")

ATOL = 1e-5
S7 = (slice(None), slice(None, None, 7), slice(None, None, 7))
CROP = (slice(None), slice(None, 40), slice(None, 40))


assert_close = ref.assert_close  # shape, then max |diff| ≤ atol (default 1e-5)


@pytest.fixture(scope="module")
def vectors():
    return ref.load_vectors()


@pytest.fixture(scope="module")
def clip():
    model = ref.tiny_model()
    model.load_state_dict(ref.tiny_state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-L-14-336")


@pytest.fixture(scope="module")
def inputs():
    return ref.reference_inputs()


def build(clip, tokenizer, vectors, **config):
    model = AnomalyCLIPModel(clip, tokenizer, AnomalyCLIPConfig(**config), seed=0)
    init = ref.initial_learnables(vectors)
    model.prompt_learner.set_values(init["ctx_pos"], init["ctx_neg"], init["compound"])
    return model


@pytest.fixture(scope="module")
def model(clip, tokenizer, vectors):
    return build(clip, tokenizer, vectors)


@pytest.fixture(scope="module")
def features(model, inputs):
    return model.encode_image(inputs["image"])


def test_inputs_and_weights_are_the_reference_ones(vectors, inputs):
    state = ref.tiny_state_dict()
    assert list(vectors["weights_keys"]) == sorted(state)
    sums = np.array([float(state[k].double().sum()) for k in vectors["weights_keys"]])
    assert np.allclose(sums, vectors["weights_sum"], rtol=0, atol=1e-9)
    assert np.allclose(inputs["image"].double().sum(dim=(1, 2, 3)).numpy(), vectors["input_image_sum"], atol=1e-6)
    assert np.array_equal(inputs["image"][:, :, ::37, ::37].numpy(), vectors["input_image_slice"])
    assert np.array_equal(inputs["mask"].double().sum(dim=(1, 2)).numpy(), vectors["input_mask_sum"])
    assert np.array_equal(inputs["label"].numpy(), vectors["input_label"])


# ----------------------------------------------------------------------------------------------------- text


def test_prompt_tokens_and_embeddings(model, vectors):
    learner = model.prompt_learner
    assert np.array_equal(learner.tokens.numpy(), vectors["tokenized_prompts"])
    assert np.array_equal(learner.tokens.argmax(-1).numpy(), vectors["eot_index"])
    assert_close(learner.prompt_embeddings(), vectors["prompt_embeddings"], 0.0, "prompt_embeddings")


def test_text_features(model, clip, tokenizer, vectors):
    with torch.no_grad():
        assert_close(model.text_features(normalize=False), vectors["text_features_raw"], name="text_features_raw")
        assert_close(model.text_features(), vectors["text_features"], name="text_features")
        nohalf = build(clip, tokenizer, vectors, compound_fp16=False).text_features()
    assert_close(nohalf, vectors["text_features_nohalf"], name="text_features_nohalf")
    # the switch matters at this tolerance (the vectors differ by ~1e-4)
    assert np.abs(vectors["text_features"] - vectors["text_features_nohalf"]).max() > 10 * ATOL


# --------------------------------------------------------------------------------------------------- vision


def test_runtime_positional_embedding(clip, vectors):
    assert_close(run_positional_embedding(clip.visual, 518)[::10], vectors["visual_pos_embed_rows10"],
                 name="visual_pos_embed_rows10")


def test_global_and_local_features(model, features, inputs, vectors):
    raw = model.encode_image(inputs["image"], normalize=False)
    assert_close(raw.global_features, vectors["image_global_raw"], name="image_global_raw")
    assert_close(features.global_features, vectors["image_global"], name="image_global")
    assert_close(features.local_features[:, 0], vectors["patch_f24"], name="patch_f24")


def test_logits_scores_and_patch_probabilities(model, features, vectors):
    text = model.text_features().detach()
    logits = image_logits(features.global_features, text)
    assert_close(logits, vectors["image_logits"], name="image_logits")
    assert_close(logits.softmax(-1), vectors["image_probs"], name="image_probs")
    assert_close(image_scores(logits), vectors["image_score"], name="image_score")
    assert_close(image_scores(logits), vectors["test_image_score"], name="test_image_score")
    probs = model.patch_probabilities(features, text)[0]
    assert_close(probs, vectors["patch_probs_24"], name="patch_probs_24")
    assert_close(probs[..., 1].reshape(2, 37, 37), vectors["map_prob_a_37"], name="map_prob_a_37")


def test_maps_before_and_after_smoothing(model, features, vectors):
    text = model.text_features().detach()
    maps = model.similarity_maps(features, text)
    assert_close(maps[0][:, 1][S7], vectors["map_prob_a_518_s7"], name="map_prob_a_518_s7")
    raw = model.raw_maps(features, text)
    assert torch.equal(raw, anomaly_map(maps))
    assert_close(raw[S7], vectors["map_raw_s7"], name="map_raw_s7")
    assert_close(raw[CROP], vectors["map_raw_crop"], name="map_raw_crop")
    smooth = smooth_maps(raw, 4.0)
    assert_close(smooth[S7], vectors["map_smooth_s7"], name="map_smooth_s7")
    assert_close(smooth[CROP], vectors["map_smooth_crop"], name="map_smooth_crop")
    scores, predicted = model.predict(features, text, sigma=4.0)
    assert_close(predicted[S7], vectors["test_map_smooth_s7"], name="test_map_smooth_s7")
    assert_close(scores, vectors["test_image_score"], name="test_image_score")


def test_four_feature_layers(clip, tokenizer, vectors, inputs):
    model = build(clip, tokenizer, vectors, features=(6, 12, 18, 24))
    features = model.encode_image(inputs["image"])
    text = model.text_features().detach()
    probs = model.patch_probabilities(features, text)
    for k, layer in enumerate((6, 12, 18, 24)):
        assert_close(probs[k], vectors[f"patch_probs_{layer}"], name=f"patch_probs_{layer}")
        if layer != 24:
            assert_close(features.local_features[:, k, ::7], vectors[f"patch_f{layer}_s7"], name=f"patch_f{layer}_s7")
    raw = model.raw_maps(features, text)
    assert_close(raw[S7], vectors["ml_map_raw_s7"], name="ml_map_raw_s7")
    assert_close(smooth_maps(raw, 4.0)[S7], vectors["ml_map_smooth_s7"], name="ml_map_smooth_s7")
    terms = model.loss(features, inputs["mask"], inputs["label"])
    got = torch.stack([terms.ce, terms.focal, terms.dice_anomaly, terms.dice_normal, terms.total])
    assert_close(got, vectors["ml_train_loss_terms0"], name="ml_train_loss_terms0")


# -------------------------------------------------------------------------------------------------- training


def _terms(model, features, inputs):
    t = model.loss(features, inputs["mask"], inputs["label"])
    return t, torch.stack([t.ce, t.focal, t.dice_anomaly, t.dice_normal, t.total])


def test_loss_gradients_and_three_adam_steps(clip, tokenizer, vectors, inputs, features):
    model = build(clip, tokenizer, vectors)
    learner = model.prompt_learner
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3, betas=(0.5, 0.999))
    for step in range(4):
        terms, row = _terms(model, features, inputs)
        assert_close(row, vectors["train_loss_terms"][step], name=f"train_loss_terms[{step}]")
        if step == 3:
            break
        optimizer.zero_grad()
        terms.total.backward()
        if step == 0:
            for name in ("ctx_pos", "ctx_neg"):  # ≤ 1e-5 relative to the largest entry (float32 kernels differ by CPU)
                expected = vectors[f"step0_grad_{name}"]
                assert_close(getattr(learner, name).ctx.grad, expected, ATOL * max(1.0, float(np.abs(expected).max())),
                             name=f"step0_grad_{name}")
            _check_rounded_gradient(torch.stack([p.grad for p in learner.compound.prompts]),
                                    vectors["step0_grad_compound"])
        optimizer.step()
        if step == 0:
            _check_learnables(learner, vectors, "step1")
    _check_learnables(learner, vectors, "step3")
    with torch.no_grad():
        assert_close(model.text_features(), vectors["step3_text_features"], name="step3_text_features")


def test_compound_gradient_without_the_rounding(clip, tokenizer, vectors, inputs, features):
    model = build(clip, tokenizer, vectors, compound_fp16=False)
    model.loss(features, inputs["mask"], inputs["label"]).total.backward()
    grad = torch.stack([p.grad for p in model.prompt_learner.compound.prompts])
    # entries up to ~7.6: 1e-4 absolute is ~1e-5 relative
    assert_close(grad, vectors["step0_grad_compound_nohalf"], 1e-4, "step0_grad_compound_nohalf")


def _check_rounded_gradient(grad, expected):
    """The compound prompts' gradient under the float16 rounding: each sentence copy's gradient is rounded to
    float16 (as released), so float32 noise (~1e-7) flips an fp16 rounding now and then, by one fp16 step (≤ 2^-10
    for copies below 2 in magnitude). Allowed: a few such flips (12 of 2048 entries here; rounding after the sum
    of the copies instead would miss 1499); everything else within 1e-4 (1e-5 of the largest entry, ~7.6)."""
    diff = (grad - torch.from_numpy(expected)).abs()
    assert float(diff.max()) <= 2.0**-10 + 1e-6, f"step0_grad_compound: max |diff| {float(diff.max()):.3g}"
    assert int((diff > 1e-4).sum()) <= 0.01 * diff.numel(), f"{int((diff > 1e-4).sum())} entries off by > 1e-4"


def _check_learnables(learner, vectors, prefix):
    assert_close(learner.ctx_pos.ctx, vectors[f"{prefix}_ctx_pos"], name=f"{prefix}_ctx_pos")
    assert_close(learner.ctx_neg.ctx, vectors[f"{prefix}_ctx_neg"], name=f"{prefix}_ctx_neg")
    compound = torch.stack(list(learner.compound.prompts))
    assert_close(compound, vectors[f"{prefix}_compound"], name=f"{prefix}_compound")


class _ReferenceItems(torch.utils.data.Dataset):
    def __init__(self, inputs):
        self.inputs = inputs

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return {"image": self.inputs["image"][i], "mask": self.inputs["mask"][i].bool(),
                "label": int(self.inputs["label"][i]), "cls_name": "object", "img_path": f"ref{i}.png"}


def test_the_method_fit_reproduces_three_released_epochs(clip, tokenizer, vectors, inputs):
    """AnomalyCLIP.fit (DataLoader, Adam(1e-3, (0.5, 0.999)), batch 8) on the two reference items for 3 epochs = the
    release's 3 Adam steps (the batch order differs, which moves the sums by rounding only)."""
    method = build_method("anomalyclip", {"backbone": "tiny-vit-l14-quickgelu-demo", "features": [8],
                                          "epochs": 3, "progress": False}, seed=0)
    method.model = build(clip, tokenizer, vectors)
    method.fit(_ReferenceItems(inputs), "zad")
    assert [round(h["total"], 4) for h in method.loss_history] == [
        round(float(x), 4) for x in vectors["train_loss_terms"][:3, 4]]
    _check_learnables(method.model.prompt_learner, vectors, "step3")
