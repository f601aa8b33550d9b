"""FiLo (baselines/filo): taps, MMCI, prompts, text features, maps, scores, both training stages, settings, persistence.

The comparison with the released code on shared random weights is in test_filo_reference.py; the detector and the box
logic in test_filo_grounding.py / test_filo_hqloc.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines.filo.method import (
    FiLo,
    class_descriptions,
    load_descriptions,
    position_cells,
    prompt_descriptions,
    prompt_word,
)
from baselines.filo.torch_model import (
    KERNELS,
    POSITIONS,
    FiLoConfig,
    abnormal_prompt_texts,
    frozen_taps,
    mmci,
    normal_prompt_texts,
    position_rows,
    tap_index,
    tap_layout,
)
from siad.backbones.attention import AttentionVariant, variant_features
from siad.data.registry import DATASETS, get_dataset
from siad.errors import ConfigError
from siad.methods import build_method

_toy_spec = importlib.util.spec_from_file_location("toy_training_set",
                                                   Path(__file__).with_name("toy_training_set.py"))
toy = importlib.util.module_from_spec(_toy_spec)
_toy_spec.loader.exec_module(toy)

SIZE = 112
TINY = {"backbone": "tiny-vit-l14-demo", "features": [2, 4, 6, 8], "vv_start": 3, "detector": "tiny-random",
        "detector_size": 112, "epochs": 1, "adapter_epochs": 1, "progress": False}


def _method(seed=0, **params) -> FiLo:
    return build_method("filo", {**TINY, **params}, seed=seed, weights_seed=0)


def _images(n, seed):
    return toy.toy_images(n, seed, SIZE)


def ToyData(n=4, name="visa", valid=True, anomalies=True):  # noqa: N802 (reads like the class)
    """The shared toy training set (tests/baselines/toy_training_set.py) at this file's size."""
    return toy.ToyData(n, name, valid, anomalies, size=SIZE, n_pcb=1)


@pytest.fixture(scope="module")
def method() -> FiLo:
    return _method()


# ------------------------------------------------------------------------------------------------- registry


def test_registered_with_the_release_defaults():
    d = FiLo.defaults
    assert d["backbone"] == "openai-vit-l-14-336-518-gelu-noantialias"
    assert (d["features"], d["vv_start"], d["n_ctx"], d["kernels"]) == ([6, 12, 18, 24], 7, 12, list(KERNELS))
    assert (d["lr"], d["decoder_lr"], d["adapter_lr"], d["betas"], d["epochs"], d["adapter_epochs"]) == (
        1e-3, 1e-4, 1e-5, [0.5, 0.999], 15, 5)
    assert (d["box_threshold"], d["area_threshold"], d["outside_factor"], d["text_threshold"]) == (0.25, 0.7, 0.7, None)
    assert (d["blur_kernel"], d["blur_sigma"], d["temperature"], d["mosaic_rate"]) == (3, 4.0, 0.07, 0.2)


@pytest.mark.parametrize("key, value", [("kernels", ["2x2"]), ("kernels", []), ("vv_start", 30), ("blur_kernel", 4),
                                        ("detector", "dino"), ("descriptions", "llm")])
def test_bad_parameters_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"methods/filo/params/{key}"):
        FiLo.resolve_params({**TINY, key: value})


def test_position_enhancement_needs_grounding():
    with pytest.raises(ConfigError, match="position_enhancement"):
        FiLo.resolve_params({**TINY, "grounding": False})
    FiLo.resolve_params({**TINY, "grounding": False, "position_enhancement": False})


# ------------------------------------------------------------------------------------------------- image pass


def test_tap_layout_splits_as_coded():
    layout = tap_layout((6, 12, 18, 24), 7)
    assert layout == [(6, "single"), (12, "vv"), (12, "ori"), (18, "vv"), (18, "ori"), (24, "vv"), (24, "ori")]
    assert layout[::2] == [(6, "single"), (12, "ori"), (18, "ori"), (24, "ori")]  # linear heads
    assert layout[1::2] == [(12, "vv"), (18, "vv"), (24, "vv")]  # MMCI


def test_aliased_taps_are_what_the_in_place_updates_leave(method):
    clip = method.backbone.model
    images = _images(2, 1)
    cfg = method.config
    assert tap_index(cfg, 8) == (0, 0, 1, 0, 2, 0, 3)  # L2 and every V-V tap: the final V-V tokens
    released = frozen_taps(clip, images, cfg)
    clean_cfg = FiLoConfig(features=(2, 4, 6, 8), vv_start=3, aliased_taps=False, image_size=SIZE)
    clean = frozen_taps(clip, images, clean_cfg)
    ref = variant_features(clip.visual, images, AttentionVariant(start_block=2), [1, 3, 5, 7])
    torch.testing.assert_close(clean.tap(0), ref.original.patch_at(1))  # L2, single path
    torch.testing.assert_close(clean.tap(1), ref.modified.patch_at(3))  # L4 V-V
    torch.testing.assert_close(clean.tap(2), ref.original.patch_at(3))  # L4 original
    for i in (0, 1, 3, 5):  # as released: the one V-V tensor, updated up to the last block
        torch.testing.assert_close(released.tap(i), ref.modified.patch_at(7))
    torch.testing.assert_close(released.tap(6), ref.original.patch_at(7))
    # L4 original as released = block 5's state after its attention residual, before its MLP
    block = clip.visual.transformer.resblocks[4]
    full = torch.cat([ref.original.cls_at(3)[:, None], ref.original.patch_at(3)], dim=1)
    mid = full + block.attn(block.ln_1(full), block.ln_1(full), block.ln_1(full), need_weights=False)[0]
    torch.testing.assert_close(released.tap(2), mid[:, 1:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(released.tap(2), clean.tap(2))
    torch.testing.assert_close(released.global_features, clip.encode_image(images))


# ------------------------------------------------------------------------------------------------- MMCI


def _slow_conv(x, conv):
    """One convolution by explicit loops over output pixels and kernel offsets (zero 'same' padding)."""
    w, b = conv.weight, conv.bias
    kh, kw = w.shape[-2:]
    _, _, h, wd = x.shape
    out = torch.zeros(x.shape[0], w.shape[0], h, wd, dtype=torch.float64)
    for r in range(h):
        for c in range(wd):
            total = b.double().clone()[None].expand(x.shape[0], -1).clone()
            for i in range(kh):
                for j in range(kw):
                    rr, cc = r + i - (kh - 1) // 2, c + j - (kw - 1) // 2
                    if 0 <= rr < h and 0 <= cc < wd:
                        total += x[:, :, rr, cc].double() @ w[:, :, i, j].double().T
            out[:, :, r, c] = total
    return out


def test_mmci_is_the_sum_of_the_six_kernels():
    torch.manual_seed(0)
    convs = [torch.nn.Conv2d(3, 2, kernel_size=KERNELS[k][0], padding="same") for k in KERNELS]
    tokens = torch.randn(2, 25, 3)  # 5x5 grid, row-major
    grid = tokens.reshape(2, 5, 5, 3).permute(0, 3, 1, 2)
    slow = sum(_slow_conv(grid, conv) for conv in convs)  # [2, 2, 5, 5]
    fast = mmci(tokens, convs)  # [2, 25, 2]
    torch.testing.assert_close(fast.double(), slow.permute(0, 2, 3, 1).reshape(2, 25, 2), atol=1e-5, rtol=1e-5)
    only_1x1 = mmci(tokens, convs[:1])
    assert not torch.allclose(only_1x1, fast)


def test_kernel_sets_of_the_ablation_build_only_their_convolutions():
    names = {k.split(".")[1] for k in _method(kernels=["1x1", "1x5", "5x1"]).learnables.state_dict() if
             k.startswith("decoder_cov.")}
    assert names == {"fc_11", "fc_15", "fc_51"}


# ------------------------------------------------------------------------------------------------- prompts


def test_prompt_lists_are_state_major_with_nine_positions():
    texts = abnormal_prompt_texts("bottle", ["cracked large", "dented"])
    assert len(texts) == (2 + 5) * 9
    assert texts[0] == "abnormal bottle with cracked large at top left."
    assert texts[8] == "abnormal bottle with cracked large at bottom right."
    assert texts[9] == "abnormal bottle with dented at top left."
    assert texts[18] == "damaged bottle at top left." and texts[-1] == "bottle with damage at bottom right."
    assert normal_prompt_texts("metal nut") == ["metal nut.", "flawless metal nut.", "perfect metal nut.",
                                                 "unblemished metal nut.", "metal nut without flaw.",
                                                 "metal nut without defect.", "metal nut without damage."]
    rows = position_rows(len(texts), ["center"])
    assert [texts[r] for r in rows] == [t for t in texts if t.endswith(" at center.")]
    assert position_rows(len(texts), []) == list(range(len(texts)))  # no cell found: every row
    assert position_rows(len(texts), None) == list(range(len(texts)))


def test_prompt_ids_put_twelve_context_placeholders_after_the_start_token(method):
    normal, abnormal = method.prompt_ids("mvtec", "bottle")
    descriptions = class_descriptions("mvtec", "bottle")
    assert normal.shape[0] == 7 and abnormal.shape[0] == (len(descriptions) + 5) * len(POSITIONS)
    x = method.backbone.tokenizer(["X"])[0][1]
    assert bool((normal[:, 1:13] == x).all()) and bool((abnormal[:, 1:13] == x).all())
    assert not bool((normal[:, 13] == x).any())


def test_every_dataset_class_has_descriptions_and_the_release_lists_are_kept():
    data = load_descriptions()
    for name in DATASETS.names():
        for cls in get_dataset(name).classes:
            assert class_descriptions(name, cls)
    assert data["datasets"]["mvtec"]["source"] == "release" and data["datasets"]["mpdd"]["source"] == "suite"
    assert class_descriptions("mvtec", "bottle")[:2] == ["cracked large", "cracked small"]
    assert class_descriptions("visa", "macaroni1")[0] == "uneven shape "  # verbatim, trailing space included


def test_classes_sharing_a_prompt_name_use_the_last_ones_list_as_released():
    assert prompt_word("macaroni1") == "macaroni" and prompt_word("pcb3") == "pcb" and prompt_word("metal_nut") == (
        "metal nut")
    assert prompt_descriptions("visa", "macaroni1", "last") == class_descriptions("visa", "macaroni2")
    assert prompt_descriptions("visa", "macaroni1", "own") == class_descriptions("visa", "macaroni1")
    assert prompt_descriptions("visa", "candle", "last") == class_descriptions("visa", "candle")


def test_generic_descriptions_keep_only_the_generic_states():
    generic = _method(descriptions="generic")
    _, abnormal = generic.prompt_ids("mvtec", "bottle")
    assert abnormal.shape[0] == 5 * 9


def test_unknown_class_names_the_descriptions_file():
    with pytest.raises(ConfigError, match="descriptions.yaml"):
        class_descriptions("mvtec", "teapot")


# ------------------------------------------------------------------------------------------------- text and maps


def test_text_features_are_jointly_normalised_to_one_over_root_two(method):
    images = _images(2, 3)
    taps = method.frozen(images)
    unit = F.normalize(taps.global_features, dim=-1)
    with torch.no_grad():
        text = method._text(["mvtec", "mvtec"], ["bottle", "bottle"], unit, [None, ["top"]])
    assert text.shape == (2, 2, method.backbone.model.text_projection.shape[1])
    torch.testing.assert_close(text.norm(dim=-1), torch.full((2, 2), 2**-0.5))
    assert not torch.allclose(text[0, 1], text[1, 1])  # another image, another position: another Fa
    raw = _method(joint_norm=False)
    raw.learnables.load_state_dict(method.learnables.state_dict())
    with torch.no_grad():
        unit_rows = raw._text(["mvtec"], ["bottle"], unit[:1], [None])
    torch.testing.assert_close(unit_rows * 2**-0.5, text[:1], atol=1e-6, rtol=1e-6)


def test_predict_gives_scores_and_maps_and_the_box_decisions(method):
    batch = {"image": _images(2, 5), "cls_name": ["bottle", "carpet"], "img_path": ["a", "b"], "dataset": "mvtec"}
    scores, maps = method.predict(batch)
    assert scores.shape == (2,) and maps.shape == (2, SIZE, SIZE)
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all()
    assert len(method.last_localizations) == 2 and all(loc is not None for loc in method.last_localizations)
    again, _ = method.predict(batch)
    torch.testing.assert_close(scores, again)  # cached detections, same numbers


def test_grounding_damps_the_map_outside_the_boxes_only(method):
    batch = {"image": _images(1, 6), "cls_name": ["bottle"], "img_path": ["a"], "dataset": "mvtec"}
    plain = _method(grounding=False, position_enhancement=False)
    plain.learnables.load_state_dict(method.learnables.state_dict())
    no_pos = _method(position_enhancement=False)
    no_pos.learnables.load_state_dict(method.learnables.state_dict())
    s0, m0 = plain.predict(batch)
    s1, m1 = no_pos.predict(batch)
    torch.testing.assert_close(s0, s1)  # the score uses the map before damping
    inside = no_pos.last_localizations[0].mask()
    torch.testing.assert_close(m1[0][inside], m0[0][inside])
    outside = ~inside & (m0[0] != 1)
    torch.testing.assert_close(m1[0][outside], 0.7 * m0[0][outside])


def test_position_cells_scale_with_the_input_size():
    assert position_cells(518)[4] == ("center", (173, 173), (344, 344))
    name, low, high = position_cells(259)[4]
    assert name == "center" and low == (86.5, 86.5) and high == (172.0, 172.0)


# ------------------------------------------------------------------------------------------------- training


def test_stages_touch_only_their_own_tensors_and_lower_their_losses():
    m = _method(epochs=4, adapter_epochs=4, lr=1e-2, decoder_lr=1e-2, adapter_lr=1e-2, mosaic_rate=0.0)
    before = {k: v.clone() for k, v in m.learnables.state_dict().items()}
    clip_before = {k: v.clone() for k, v in m.backbone.model.state_dict().items()}
    data = ToyData(n=2)
    m._epochs(data, 4, 1, lambda b, d: m._stage1_step(_adamw(m, 1), b, d))  # noqa: B023
    after1 = m.learnables.state_dict()
    changed1 = {k for k in before if not torch.equal(before[k], after1[k])}
    assert changed1 and all(not k.startswith("adapter.") for k in changed1)
    assert any(k.startswith("decoder_cov.") for k in changed1) and any("prompt_learner" in k for k in changed1)
    stage1 = [h["total"] for h in m.loss_history if h["stage"] == 1]
    assert np.mean(stage1[-2:]) < np.mean(stage1[:2])
    mid = {k: v.clone() for k, v in after1.items()}
    m.loss_history = []
    m._epochs(data, 6, 2, lambda b, d: m._stage2_step(_adamw(m, 2), b, d))  # noqa: B023
    after2 = m.learnables.state_dict()
    changed2 = {k for k in mid if not torch.equal(mid[k], after2[k])}
    assert changed2 == {"adapter.fc.0.weight", "adapter.fc.2.weight"}
    stage2 = [h["total"] for h in m.loss_history]
    assert np.mean(stage2[-2:]) < np.mean(stage2[:2])
    assert all(torch.equal(v, m.backbone.model.state_dict()[k]) for k, v in clip_before.items())


_OPTIMIZERS: dict = {}


def _adamw(m, stage):
    """One optimiser per (method, stage), as fit builds them (its moments persist across steps)."""
    key = (id(m), stage)
    if key not in _OPTIMIZERS:
        params = m.learnables.stage_parameters(stage)
        _OPTIMIZERS[key] = torch.optim.AdamW(params, lr=1e-2, betas=(0.5, 0.999))
    return _OPTIMIZERS[key]


@pytest.mark.parametrize("setting, data", [("uzad", ToyData(anomalies=False)), ("pseudo", ToyData()),
                                           ("zad", ToyData(valid=False))])
def test_each_setting_trains(setting, data):
    m = _method()
    m.fit(data, setting)
    assert [h["stage"] for h in m.loss_history] == [1] * len(data) + [2] * len(data)
    assert all(np.isfinite(h["total"]) for h in m.loss_history)


def test_save_and_load_round_trip_and_the_release_checkpoint_layout(tmp_path, method):
    path = tmp_path / "filo.pt"
    method.trained_on = "visa"
    method.save(path)
    other = _method(seed=3)
    assert not torch.equal(other.learnables.adapter.fc[0].weight, method.learnables.adapter.fc[0].weight)
    other.load(path)
    assert all(torch.equal(v, method.learnables.state_dict()[k]) for k, v in other.learnables.state_dict().items())
    assert other.trained_on == "visa"  # the training source travels with the weights (it picks the detector)
    release = tmp_path / "release.pth"  # the release saves {"filo": filo_model.state_dict()} with CLIP inside
    state = {**method.learnables.state_dict(), "clip_model.visual.proj": torch.zeros(2)}
    torch.save({"filo": state}, release)
    _method(seed=4).load(release)
    with pytest.raises(ConfigError, match="do not match"):
        _method(kernels=["1x1"]).load(path)


# ------------------------------------------------------------------------------------------------- detector choice


@pytest.mark.parametrize("source, expected", [("mvtec", "grounding_train_on_mvtec.pth"),
                                              ("visa", "grounding_train_on_visa.pth")])
def test_the_fine_tuned_detector_is_the_training_source_s(source, expected):
    m = _method(detector="filo-finetuned")
    m.trained_on = source
    spec = m.detector_spec()
    assert (spec.kind, spec.filo_file, spec.checkpoint) == ("filo-finetuned", expected, None)


def test_sources_without_released_weights_use_the_base_detector_and_unknown_sources_are_refused(tmp_path, caplog):
    m = _method(detector="filo-finetuned")
    m.trained_on = "br35h"
    assert m.detector_spec().kind == "base"
    assert "no released fine-tuned Grounding DINO" in caplog.text
    m.trained_on = ""  # e.g. loaded from the release's own checkpoint file
    with pytest.raises(ConfigError, match="methods/filo/params/detector"):
        m.detector_spec()
    local = tmp_path / "dino.pth"
    own = _method(detector="filo-finetuned", detector_checkpoint=str(local))
    assert own.detector_spec().checkpoint == local
    assert _method(detector="base").detector_spec().kind == "base"
    with pytest.raises(ConfigError, match="detector_checkpoint"):
        FiLo.resolve_params({**TINY, "detector": "base", "detector_checkpoint": str(local)})


def test_a_batch_gives_the_numbers_of_its_images_one_by_one(method):
    images = _images(2, 8)
    batch = {"image": images, "cls_name": ["bottle", "screw"], "img_path": ["a", "b"], "dataset": "mvtec"}
    scores, maps = method.predict(batch)
    for i in range(2):
        one = {"image": images[i : i + 1], "cls_name": batch["cls_name"][i : i + 1], "img_path": ["x"],
               "dataset": "mvtec"}
        s, m = method.predict(one)
        torch.testing.assert_close(s[0], scores[i], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(m[0], maps[i], atol=1e-6, rtol=1e-6)


def test_the_speed_path_builds_the_paper_detector_architecture_with_random_weights():
    from baselines.filo.method import random_grounding_dino

    model, tokenizer = random_grounding_dino(0, ["cracked large"])
    config = model.config
    assert (config.num_queries, config.encoder_layers, config.decoder_layers, config.d_model) == (900, 6, 6, 256)
    assert (config.backbone_config.embed_dim, list(config.backbone_config.depths)) == (96, [2, 2, 6, 2])
    assert config.text_config.num_hidden_layers == 12 and tokenizer.convert_tokens_to_ids("[CLS]") == 101


def test_table4_rows_that_differ_only_at_test_time_share_one_training():
    import yaml

    from siad.config import method_params
    from siad.engine.protocol import RunKey
    from siad.engine.spec import resolve_run_spec

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "config" / "demo.yaml").read_text())
    digest = {v: resolve_run_spec(config, RunKey("zad", "filo", v, "visa", "mvtec", 0)).shared_training_digest
              for v in ("default", "hq_none", "hq_grounding", "hq_position", "hq_shape", "hq_scale", "no_detector")}
    assert digest["hq_none"] == digest["hq_grounding"] == digest["hq_position"]  # the 1x1-MMCI model, trained once
    assert digest["default"] == digest["no_detector"]
    assert len({digest[v] for v in ("default", "hq_none", "hq_shape", "hq_scale")}) == 4
    assert FiLo.resolve_params(method_params(config, "filo", "hq_grounding"))["grounding"] is True
