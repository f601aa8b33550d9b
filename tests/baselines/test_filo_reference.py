"""FiLo against the released code (CASIA-IVA-Lab/FiLo@36ff29c) on shared tiny random weights.

`tests/data/filo/vectors.npz` was made by running the release (tests/data/filo/README.md); the tiny setting is built
by `filo_reference.py`. Everything here runs the suite's own code (`baselines/filo`) on the same weights and inputs and
compares to ≤ 1e-5 (maps, losses, scores) or to the float rounding of the quantity's scale.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from baselines.filo import hqloc
from baselines.filo.method import class_descriptions, prompt_descriptions, prompt_word, stage_optimizers
from baselines.filo.torch_model import (
    FiLoConfig,
    FiLoLearnables,
    FrozenTaps,
    abnormal_prompt_texts,
    anomaly_maps,
    frozen_taps,
    image_score,
    normal_prompt_texts,
    position_rows,
    smoothed_map,
    stage1_terms,
    stage2_loss,
    text_features,
)
from siad.methods.losses import dice_loss, focal_loss
from siad.prompts.learnable import context_prompt_tokens

_spec = importlib.util.spec_from_file_location("filo_reference", Path(__file__).with_name("filo_reference.py"))
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

COL18 = slice(18, None, 37)  # patch tokens of grid column 18 (rows 0..36)
CONFIG = FiLoConfig(features=ref.FEATURE_LAYERS, vv_start=7, image_size=ref.IMAGE_SIZE)
PARAMS = {"lr": ref.LR_PROMPT, "decoder_lr": ref.LR_DECODER, "adapter_lr": ref.ADAPTER_LRS[0],
          "betas": [0.5, 0.999], "weight_decay": 0.01}


@pytest.fixture(scope="module")
def vectors():
    return ref.load_vectors()


@pytest.fixture(scope="module")
def clip():
    model = ref.tiny_model()
    model.load_state_dict(ref.loaded_state_dict())
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def inputs():
    return ref.reference_inputs()


@pytest.fixture(scope="module")
def taps(clip, inputs):
    return frozen_taps(clip, inputs["image"], CONFIG)


def _learnables(vectors, prefix="init") -> FiLoLearnables:
    learn = FiLoLearnables(CONFIG, embed_dim=ref.EMBED_DIM, vision_width=ref.VISION_WIDTH, text_width=ref.EMBED_DIM)
    state = ref.learnables("init", vectors)
    if prefix != "init":
        state.update(ref.learnables(prefix, vectors))
    learn.load_state_dict(state)
    return learn


def _ids(dataset, cls_name):
    tok = open_clip.get_tokenizer("ViT-L-14")
    word = prompt_word(cls_name)
    normal = context_prompt_tokens(tok, normal_prompt_texts(word), ref.N_CTX)
    abnormal = context_prompt_tokens(tok, abnormal_prompt_texts(word, prompt_descriptions(dataset, cls_name, "last")),
                                     ref.N_CTX)
    return normal, abnormal


def _text(clip, learn, unit, positions=None):
    """F [B, 2, E], one image at a time (the release's batch of one)."""
    normal, abnormal = _ids("mvtec", ref.CLASS_NAME)
    rows = position_rows(len(abnormal), positions)
    return torch.cat([text_features(clip, learn, normal, abnormal[rows], unit[i : i + 1]) for i in range(len(unit))])


def _close(actual, expected, atol=1e-5, name=""):
    ref.assert_close(actual, torch.as_tensor(np.asarray(expected)), atol=atol, name=name)


# ------------------------------------------------------------------------------------------------- prompts


def test_prompt_token_ids_equal_the_release(vectors):
    normal, abnormal = _ids("mvtec", "bottle")
    assert torch.equal(normal, torch.from_numpy(vectors["tokens_normal_bottle"]))
    assert torch.equal(abnormal, torch.from_numpy(vectors["tokens_abnormal_bottle"]))
    for cls in ref.VISA_RECORDED:  # macaroni1 takes macaroni2's descriptions, as released
        normal, abnormal = _ids("visa", cls)
        assert torch.equal(normal, torch.from_numpy(vectors[f"tokens_normal_{cls}"])), cls
        assert torch.equal(abnormal, torch.from_numpy(vectors[f"tokens_abnormal_{cls}"])), cls
    assert [str(c) for c in vectors["visa_class_order"]] == list(ref.VISA_CLASS_ORDER)
    assert class_descriptions("mvtec", "bottle") == [
        s.split("abnormal bottle with ")[1].rsplit(" at ", 1)[0] for s in vectors["sentences_abnormal_bottle"][:90:9]]


# ------------------------------------------------------------------------------------------------- image pass


def test_frozen_taps_equal_the_releases_aliased_taps(vectors, taps):
    _close(taps.global_features, vectors["image_features_cls"], name="image feature")
    expected = torch.from_numpy(vectors["patch_tokens_col18"])  # [7, 2, 37, 128]
    for i in range(7):
        _close(taps.tap(i)[:, COL18], expected[i], name=f"tap {i}")
    assert [int(b) for b in vectors["vv_blocks"]] == list(range(7, 25))


def test_heads_equal_the_release(vectors, taps):
    learn = _learnables(vectors)
    with torch.no_grad():
        linear = learn.decoder_linear(taps.linear_inputs())
        conv = learn.decoder_cov(taps.conv_inputs())
    for i, out in enumerate(linear):
        _close(out[:, COL18], vectors["decoder_linear_col18"][i], name=f"linear {i}")
    for i, out in enumerate(conv):
        _close(out[:, COL18], vectors["decoder_cov_col18"][i], name=f"MMCI {i}")


# ------------------------------------------------------------------------------------------------- text and maps


def test_text_features_and_stage1_maps_equal_the_release(vectors, clip, taps):
    learn = _learnables(vectors)
    unit = F.normalize(taps.global_features, dim=-1)
    with torch.no_grad():
        _close(learn.normal_prompt_learner.meta_net(unit), vectors["meta_bias_normal"], name="meta-net")
        text = _text(clip, learn, unit)
        _close(text, vectors["text_features"], name="F")
        _close((unit[:, None] * text).sum(-1), vectors["text_probs"], name="text probs")
        maps = anomaly_maps(learn, taps, text, CONFIG)
    anomaly = torch.stack([m[:, 1] for m in maps], dim=1)  # [2, 7, S, S]
    _close(anomaly[..., ::7, ::7], vectors["s1_maps_s7"], name="maps s7")
    _close(anomaly[..., 259, :], vectors["s1_maps_row259"], name="maps row 259")
    _close(anomaly[..., :, 517], vectors["s1_maps_col517"], name="maps col 517")


def test_stage1_loss_terms_equal_the_release(vectors, clip, taps, inputs):
    learn = _learnables(vectors)
    unit = F.normalize(taps.global_features, dim=-1)
    expected = torch.from_numpy(vectors["s1_loss_terms_init"]).double()  # [2, 22]
    with torch.no_grad():
        text = _text(clip, learn, unit)
        for i in range(2):
            one = FrozenTaps(taps.global_features[i : i + 1], taps.tokens[i : i + 1], taps.index)
            maps = anomaly_maps(learn, one, text[i : i + 1], CONFIG)
            mask = inputs["mask"][i : i + 1]
            per_map = torch.tensor([[float(focal_loss(m, mask)), float(dice_loss(m[:, 1], mask, per_image=False)),
                                     float(dice_loss(m[:, 0], 1 - mask.float(), per_image=False))] for m in maps])
            _close(per_map.flatten(), expected[i, :21], name=f"terms of image {i}")
            terms = stage1_terms(maps, mask, dice_per_row=True)
            _close(terms.total, expected[i, 21], atol=1e-4, name=f"total of image {i}")


def _stage1_step(clip, learn, taps, inputs, i, optimizer=None):
    one = FrozenTaps(taps.global_features[i : i + 1], taps.tokens[i : i + 1], taps.index)
    text = _text(clip, learn, F.normalize(one.global_features, dim=-1))
    terms = stage1_terms(anomaly_maps(learn, one, text, CONFIG), inputs["mask"][i : i + 1], dice_per_row=True)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
    return terms


def test_three_stage1_steps_equal_the_release(vectors, clip, taps, inputs):
    learn = _learnables(vectors)
    main, _ = stage_optimizers(learn, PARAMS)
    assert [g["lr"] for g in main.param_groups] == [float(x) for x in vectors["optimizer_lrs"]]
    names = [n for n, _ in learn.named_parameters() if not n.startswith("adapter.")]
    order = [n for g in main.param_groups for n, p in learn.named_parameters() for q in g["params"] if p is q]
    assert order == ref.trainable_names(vectors) and sorted(order) == sorted(names)
    losses = []
    for step, i in enumerate(ref.TRAIN_ORDER):
        terms = _stage1_step(clip, learn, taps, inputs, i, main)
        losses.append(float(terms.total.detach()))
        if step == 0:  # gradients of the first step
            grads = {n: p.grad for n, p in learn.named_parameters() if p.grad is not None}
            for name, g in ref.learnables("s1_grad0", vectors).items():
                scale = float(g.abs().max()) or 1.0
                _close(grads[name] / scale, g / scale, atol=1e-4, name=f"grad {name}")
            for name, g in ref.learnables("s1_grad0_slice", vectors).items():
                got = grads[name][:2, :2] if grads[name].dim() > 1 else grads[name]
                scale = float(g.abs().max()) or 1.0
                _close(got / scale, g / scale, atol=1e-4, name=f"grad {name}")
    with torch.no_grad():
        after = float(_stage1_step(clip, learn, taps, inputs, 1).total)
    expected = vectors["s1_train_loss_terms"][:, -1]
    np.testing.assert_allclose(losses + [after], expected, rtol=1e-5)
    # after three steps: within 2e-5, or 1 % of what the steps moved a tensor (Adam's normalisation magnifies the
    # float rounding of near-zero gradients, which differs between CPUs)
    state, init = learn.state_dict(), ref.learnables("init", vectors)
    for name, value in ref.learnables("s1_step3", vectors).items():
        moved = float((value - init[name]).abs().max())
        _close(state[name], value, atol=max(2e-5, 0.01 * moved), name=f"step 3 {name}")
    for name, value in ref.learnables("s1_step3_slice", vectors).items():
        got, start = ((state[name][:2, :2], init[name][:2, :2]) if state[name].dim() > 1
                      else (state[name], init[name]))
        moved = float((value - start).abs().max())
        _close(got, value, atol=max(2e-5, 0.01 * moved), name=f"step 3 {name}")
    assert torch.equal(state["adapter.fc.0.weight"], ref.learnables("init", vectors)["adapter.fc.0.weight"])


@pytest.mark.parametrize("chain, lr", [("s2a", ref.ADAPTER_LRS[0]), ("s2b", ref.ADAPTER_LRS[1])])
def test_stage2_equals_the_release(vectors, clip, taps, inputs, chain, lr):
    learn = _learnables(vectors, "s1_step3")
    with torch.no_grad():
        adapted = learn.adapter(taps.global_features)
        _close(adapted, vectors["s2_adapter_cls"], name="adapter")
        text = _text(clip, learn, F.normalize(adapted, dim=-1))
        _close(text, vectors["s2_text_features"], name="stage-2 F")
    _, optimizer = stage_optimizers(learn, {**PARAMS, "adapter_lr": lr})
    losses = []
    for i in ref.TRAIN_ORDER:
        adapted = learn.adapter(taps.global_features[i : i + 1])
        with torch.no_grad():
            text = _text(clip, learn, F.normalize(adapted, dim=-1).detach())
        loss = stage2_loss(adapted, text, inputs["label"][i : i + 1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    np.testing.assert_allclose(losses, vectors[f"{chain}_train_loss"][:3], rtol=1e-5)
    for name, value in ref.learnables(f"{chain}_step3", vectors).items():
        _close(learn.state_dict()[name], value, atol=1e-6, name=f"{chain} step 3 {name}")


# ------------------------------------------------------------------------------------------------- test time


def test_test_time_maps_scores_and_suppression_equal_the_release(vectors, clip, taps):
    learn = _learnables(vectors)
    with torch.no_grad():
        adapted = learn.adapter(taps.global_features)
        unit = F.normalize(adapted, dim=-1)
        for case, positions in enumerate(ref.POSITION_CASES):
            text = _text(clip, learn, unit, list(positions))
            _close(text, vectors["test_text_features"][case], name=f"F {positions}")
            maps = anomaly_maps(learn, taps, text, CONFIG)
            mean = smoothed_map(maps, CONFIG)
            _close(mean[:, ::7, ::7], vectors["test_mean_s7"][case], name=f"mean map {positions}")
            _close(image_score(adapted, text, mean, CONFIG).double(), vectors["test_score"][case],
                   name=f"score {positions}")
            if case == 0:
                _close(torch.stack([m[:, 1] for m in maps], 1)[..., ::14, ::14], vectors["test_maps_s14"])
                blurred = torch.stack([smoothed_map([m], CONFIG) for m in maps], dim=1)
                _close(blurred[..., ::14, ::14], vectors["test_blur_s14"], name="blur")
                _close(blurred[..., 0, :], vectors["test_blur_row0"], name="blur row 0")
                first = mean
    for case in range(len(vectors["supp_n_boxes"])):
        boxes = torch.from_numpy(vectors["supp_boxes"][case][: int(vectors["supp_n_boxes"][case])]).float()
        mask = hqloc.box_mask(boxes, ref.IMAGE_SIZE)
        assert torch.equal(mask | (first[0] == 1), torch.from_numpy(vectors["supp_keep"][case])), case
        damped = torch.stack([hqloc.suppress_outside(m, mask, ref.SUPPRESSION) for m in first])
        _close(damped[:, ::7, ::7], vectors["supp_map_s7"][case], name=f"suppressed {case}")
        _close(damped[:, 200], vectors["supp_map_row200"][case], name=f"suppressed row 200 {case}")
