"""Tests of AnomalyGPT's decoder, maps, prompt learner and losses (siad/methods/llm_components.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from siad.errors import ConfigError, SiadError
from siad.methods.llm_components import (
    ConvPromptLearner,
    StageDecoder,
    combine_stage_maps,
    dice_loss,
    focal_loss,
    stage_anomaly_maps,
)


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen), dim=-1)


# ---------------------------------------------------------------- decoder


def test_decoder_drops_cls_projects_and_normalises() -> None:
    torch.manual_seed(0)
    dec = StageDecoder(width=12, embed_dim=6, n_stages=3)
    taps = [torch.randn(2, 1 + 16, 12) for _ in range(3)]
    out = dec(taps)
    assert len(out) == 3
    for i, (o, t) in enumerate(zip(out, taps, strict=True)):
        assert o.shape == (2, 16, 6)
        assert torch.allclose(o.norm(dim=-1), torch.ones(2, 16), atol=1e-6)
        expected = F.normalize(dec.fc[i](t[:, 1:]), dim=-1)  # CLS (token 0) dropped, own Linear per stage
        assert torch.allclose(o, expected, atol=1e-6)
    assert not torch.allclose(out[0], F.normalize(dec.fc[1](taps[0][:, 1:]), dim=-1))
    no_cls = dec([t[:, 1:] for t in taps], has_cls=False)
    assert torch.allclose(no_cls[2], out[2], atol=1e-6)


def test_decoder_parameter_count_matches_released_linear_with_bias() -> None:
    dec = StageDecoder()
    assert sum(p.numel() for p in dec.parameters()) == 4 * (1280 * 1024 + 1024)  # ≈ 5.25M (spec)
    assert sum(p.numel() for p in StageDecoder(bias=False).parameters()) == 4 * 1280 * 1024


def test_decoder_rejects_wrong_inputs() -> None:
    dec = StageDecoder(width=8, embed_dim=4, n_stages=2)
    with pytest.raises(ConfigError, match="expects 2 stage"):
        dec([torch.randn(1, 5, 8)])
    with pytest.raises(ConfigError, match="batch-first"):
        dec([torch.randn(1, 5, 7), torch.randn(1, 5, 8)])


# ---------------------------------------------------------------- maps


def test_maps_shape_and_probabilities() -> None:
    tokens = [_unit(2, 4, 8, seed=s) for s in range(4)]
    text = _unit(2, 2, 8, seed=9)
    probs = stage_anomaly_maps(tokens, text, size=9)
    assert probs.shape == (2, 4, 2, 9, 9)
    assert torch.allclose(probs.sum(dim=2), torch.ones(2, 4, 9, 9), atol=1e-6)
    shared = stage_anomaly_maps(tokens, text[0], size=9)  # one [2, D] text shared by the batch
    assert torch.allclose(shared[0], probs[0])
    assert not torch.allclose(shared[1], probs[1])


def test_maps_upsample_logits_then_softmax_by_hand() -> None:
    # 2×2 grid → 3×3 with align_corners=True: corners are the token logits, the centre is their mean.
    tokens = [_unit(1, 4, 8, seed=1)]
    text = _unit(1, 2, 8, seed=2)
    scale = 7.0
    probs = stage_anomaly_maps(tokens, text, logit_scale=scale, size=3)[0, 0]  # [2, 3, 3]
    logits = [[scale * float(tokens[0][0, n] @ text[0, c]) for c in range(2)] for n in range(4)]

    def softmax_abnormal(pair: list[float]) -> float:
        return math.exp(pair[1]) / (math.exp(pair[0]) + math.exp(pair[1]))

    assert probs[1, 0, 0].item() == pytest.approx(softmax_abnormal(logits[0]), abs=1e-5)
    assert probs[1, 0, 2].item() == pytest.approx(softmax_abnormal(logits[1]), abs=1e-5)  # row-major grid
    assert probs[1, 2, 0].item() == pytest.approx(softmax_abnormal(logits[2]), abs=1e-5)
    centre_logits = [sum(lg[c] for lg in logits) / 4 for c in range(2)]
    centre = softmax_abnormal(centre_logits)
    assert probs[1, 1, 1].item() == pytest.approx(centre, abs=1e-5)
    softmax_first = sum(softmax_abnormal(lg) for lg in logits) / 4  # the wrong order
    assert abs(centre - softmax_first) > 1e-3
    assert probs[1, 1, 1].item() != pytest.approx(softmax_first, abs=1e-4)


def test_maps_differ_from_softmax_then_upsample() -> None:
    tokens = [_unit(1, 16, 8, seed=3)]
    text = _unit(1, 2, 8, seed=4)
    probs = stage_anomaly_maps(tokens, text, size=32)[0, 0]
    grid = (100.0 * tokens[0] @ text.transpose(1, 2)).transpose(1, 2).reshape(1, 2, 4, 4)
    wrong = F.interpolate(torch.softmax(grid, dim=1), size=32, mode="bilinear", align_corners=True)[0]
    assert (probs - wrong).abs().max() > 1e-2


def test_maps_reject_non_square_and_bad_text() -> None:
    with pytest.raises(ConfigError, match="square"):
        stage_anomaly_maps([_unit(1, 5, 8)], _unit(1, 2, 8))
    with pytest.raises(ConfigError, match="normal, abnormal"):
        stage_anomaly_maps([_unit(1, 4, 8)], _unit(1, 3, 8))


def test_combine_mean_as_released_and_sum_as_paper() -> None:
    probs = torch.softmax(torch.randn(2, 4, 2, 5, 5, generator=torch.Generator().manual_seed(5)), dim=2)
    mean = combine_stage_maps(probs)
    total = combine_stage_maps(probs, reduce="sum")
    assert mean.shape == (2, 5, 5)
    assert torch.allclose(mean, (probs[:, 0, 1] + probs[:, 1, 1] + probs[:, 2, 1] + probs[:, 3, 1]) / 4)
    assert torch.allclose(total, 4 * mean, atol=1e-6)
    assert mean.max() <= 1.0
    with pytest.raises(ConfigError, match="'mean'"):
        combine_stage_maps(probs, reduce="max")  # type: ignore[arg-type]


# ---------------------------------------------------------------- prompt learner


def test_prompt_learner_shape_order_and_seed() -> None:
    learner = ConvPromptLearner(dim_out=8, n_base=9, seed=3)
    x = torch.rand(2, 1, 224, 224, generator=torch.Generator().manual_seed(0))
    out = learner(x)
    assert out.shape == (2, 18, 8)
    assert torch.equal(out[0, :9], learner.base_prompts) and torch.equal(out[1, :9], learner.base_prompts)
    grid = learner.meta_net(x)
    assert grid.shape == (2, 8, 3, 3)
    assert torch.equal(out[:, 9 + 1 * 3 + 2], grid[:, :, 1, 2])  # row-major: token 9+5 is row 1, col 2
    same = ConvPromptLearner(dim_out=8, n_base=9, seed=3)
    other = ConvPromptLearner(dim_out=8, n_base=9, seed=4)
    assert torch.equal(same.base_prompts, learner.base_prompts)
    assert torch.equal(same(x), out)
    assert not torch.equal(other.base_prompts, learner.base_prompts)
    assert ConvPromptLearner(dim_out=8, n_base=4)(x).shape == (2, 13, 8)


def test_prompt_learner_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ConvPromptLearner(dim_out=4)
    assert torch.equal(torch.rand(3), expected)


def test_prompt_learner_parameter_count_is_107_4m() -> None:
    channels = [1, 4, 16, 64, 256, 1024]
    convs = sum(c_out * c_in * 9 + c_out for c_in, c_out in zip(channels[:-1], channels[1:], strict=True))
    expected = convs + (4096 * 1024 * 25 + 4096) + 9 * 4096
    learner = ConvPromptLearner()
    assert sum(p.numel() for p in learner.parameters()) == expected
    assert round(expected / 1e6, 1) == 107.4


def test_prompt_learner_rejects_wrong_map_size() -> None:
    with pytest.raises(ConfigError, match="224, 224"):
        ConvPromptLearner(dim_out=4)(torch.rand(1, 1, 112, 112))


# ---------------------------------------------------------------- losses


def test_focal_loss_by_hand() -> None:
    probs = torch.tensor([0.8, 0.4, 0.2, 0.6]).reshape(1, 2, 1, 2)  # pixel 0: (0.8, 0.2); pixel 1: (0.4, 0.6)
    target = torch.tensor([[[0.0, 1.0]]])
    eps = 1e-5
    p0 = 0.8 * (1 - eps) + 0.2 * eps + eps
    p1 = 0.4 * eps + 0.6 * (1 - eps) + eps
    expected = (-((1 - p0) ** 2) * math.log(p0) - ((1 - p1) ** 2) * math.log(p1)) / 2
    assert focal_loss(probs, target).item() == pytest.approx(expected, rel=1e-5)
    gamma0 = (-math.log(p0) - math.log(p1)) / 2
    assert focal_loss(probs, target, gamma=0.0).item() == pytest.approx(gamma0, rel=1e-5)


def test_focal_loss_binarises_at_threshold() -> None:
    probs = torch.tensor([0.8, 0.2]).reshape(1, 2, 1, 1)
    soft = torch.tensor([[[0.4]]])
    assert focal_loss(probs, soft).item() == pytest.approx(focal_loss(probs, torch.zeros(1, 1, 1)).item())
    assert focal_loss(probs, soft, threshold=0.3).item() == pytest.approx(
        focal_loss(probs, torch.ones(1, 1, 1)).item()
    )


def test_dice_loss_by_hand_and_released_row_variant() -> None:
    p = torch.tensor([[[0.5, 1.0], [0.0, 0.0]]])
    g = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert dice_loss(p, g).item() == pytest.approx(1 - 4 / 4.5, abs=1e-6)  # (2·1.5+1)/(1.5+2+1)
    # Released squeeze at B=1: row 0 gives 4/4.5, the empty row 1 gives 1 → mean over rows.
    released = dice_loss(p, g, per_image=False).item()
    assert released == pytest.approx(1 - (4 / 4.5 + 1) / 2, abs=1e-6)
    assert released != pytest.approx(dice_loss(p, g).item(), abs=1e-3)


def test_dice_variants_agree_for_batches_larger_than_one() -> None:
    gen = torch.Generator().manual_seed(6)
    p = torch.rand(3, 5, 5, generator=gen)
    g = (torch.rand(3, 5, 5, generator=gen) > 0.6).float()
    assert torch.allclose(dice_loss(p, g), dice_loss(p, g, per_image=False))
    per_image = [(2 * (p[b] * g[b]).sum() + 1) / (p[b].sum() + g[b].sum() + 1) for b in range(3)]
    assert dice_loss(p, g).item() == pytest.approx(1 - float(sum(per_image)) / 3, abs=1e-6)


def test_losses_finite_on_empty_masks() -> None:
    empty = torch.zeros(2, 4, 4)
    assert dice_loss(torch.zeros(2, 4, 4), empty).item() == pytest.approx(0.0)
    probs = torch.stack([torch.ones(2, 4, 4), torch.zeros(2, 4, 4)], dim=1)  # certain "normal"
    focal = focal_loss(probs, empty)
    assert torch.isfinite(focal) and focal.item() < 1e-8
    wrong = focal_loss(probs.flip(1), empty)  # certain "abnormal" on an empty mask: large but finite
    assert torch.isfinite(wrong) and wrong.item() > 5


def test_loss_shape_errors() -> None:
    with pytest.raises(SiadError):
        focal_loss(torch.rand(1, 3, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(SiadError):
        dice_loss(torch.rand(1, 2, 3), torch.zeros(1, 2, 2))


def test_gradients_flow_through_decoder_and_prompt_learner() -> None:
    torch.manual_seed(0)
    dec = StageDecoder(width=12, embed_dim=8, n_stages=2)
    learner = ConvPromptLearner(dim_out=4, n_base=2)
    taps = [torch.randn(2, 17, 12) for _ in range(2)]
    text = _unit(2, 2, 8, seed=7)
    target = torch.zeros(2, 224, 224)
    target[:, 50:120, 60:140] = 1.0
    probs = stage_anomaly_maps(dec(taps), text)
    seg = sum(focal_loss(probs[:, s], target) + dice_loss(probs[:, s, 1], target) for s in range(2))
    prompts = learner(combine_stage_maps(probs).unsqueeze(1))
    (seg + prompts.pow(2).mean()).backward()
    for name, param in [*dec.named_parameters(), *learner.named_parameters()]:
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
