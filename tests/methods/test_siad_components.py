"""Tests of SIAD-LLM's stage prompts, response prompts, adapter, SEM and PEM (siad/methods/siad_components.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from siad.backbones import get_backbone_spec, load_openclip
from siad.errors import ConfigError
from siad.methods.llm_components import ConvPromptLearner
from siad.methods.siad_components import (
    STAGE_CASES,
    BasePrompts,
    PatchPromptEmbedder,
    StageAdapter,
    StageEnhancement,
    StagePromptLearner,
    refine_text_features,
    response_prompt_tokens,
    response_text_features,
)


@pytest.fixture(scope="module")
def tower():
    """The tiny ViT-H/14-shaped demo model (frozen) and its tokenizer."""
    backbone = load_openclip(get_backbone_spec("tiny-vit-h14-demo"), seed=3)
    return backbone.model, backbone.tokenizer


def _width(model) -> int:
    return model.token_embedding.embedding_dim


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _tokens(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- stage prompts


def test_stage_cases_follow_table_6() -> None:
    assert sorted(STAGE_CASES) == [1, 2, 3]
    assert STAGE_CASES[3] == ("local feature of", "regional feature of", "regional feature of", "global feature of")
    assert STAGE_CASES[1][0] == "very small region of" and STAGE_CASES[1][3] == "very large region of"
    assert STAGE_CASES[2][1] == STAGE_CASES[2][2] == "mid level feature of"


def test_prompt_texts_put_stage_words_then_context_then_sentence(tower) -> None:
    _, tokenizer = tower
    learner = StagePromptLearner(tokenizer, 8, n_ctx=3)
    texts = learner.prompt_texts("metal_nut")
    assert len(texts) == 3 * (14 + 10)  # case 3 has 3 distinct stage words; 14 normal + 10 abnormal sentences
    assert texts[0] == "local feature of X X X a photo of a metal nut."
    assert texts[14] == "local feature of X X X a photo of a damaged metal nut."
    assert texts[24].startswith("regional feature of X X X ")
    no_sp = StagePromptLearner(tokenizer, 8, n_ctx=3, stage_prompts=False).prompt_texts("metal_nut")
    assert no_sp[0] == "X X X a photo of a metal nut." and len(no_sp) == 24


def test_stage_features_shape_norm_and_stage_identity(tower) -> None:
    model, tokenizer = tower
    out = StagePromptLearner(tokenizer, _width(model), seed=1)(model, ["bottle", "metal_nut"])
    assert out.shape == (2, 4, 2, 64)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2, 4, 2), atol=1e-5)
    assert torch.equal(out[:, 1], out[:, 2])  # case 3: stages 2 and 3 share "regional feature of"
    assert not torch.allclose(out[:, 0], out[:, 1]) and not torch.allclose(out[:, 1], out[:, 3])
    assert not torch.allclose(out[0], out[1])  # class word matters
    assert not torch.allclose(out[:, :, 0], out[:, :, 1])  # normal vs abnormal
    case1 = StagePromptLearner(tokenizer, _width(model), stage_case=1, seed=1)(model, ["bottle"])[0]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(case1[i], case1[j])


def test_without_stage_prompts_all_stages_identical(tower) -> None:
    model, tokenizer = tower
    full = StagePromptLearner(tokenizer, _width(model), seed=1)
    no_sp = StagePromptLearner(tokenizer, _width(model), seed=1, stage_prompts=False)
    out = no_sp(model, ["bottle", "cable"])
    assert out.shape == (2, 4, 2, 64)
    for k in range(1, 4):
        assert torch.equal(out[:, 0], out[:, k])
    assert not torch.allclose(out, full(model, ["bottle", "cable"]), atol=1e-4)
    assert _n_params(no_sp) == _n_params(full) == 2 * 12 * 64


def test_context_lands_on_placeholders(tower) -> None:
    # With V = W = the embedding of "X", the learner must reproduce open_clip's own encoding of its texts.
    model, tokenizer = tower
    learner = StagePromptLearner(tokenizer, _width(model), n_ctx=4)
    x_embedding = model.token_embedding.weight[learner._placeholder_id]
    with torch.no_grad():
        learner.normal_ctx.ctx.copy_(x_embedding.expand(4, -1))
        learner.abnormal_ctx.ctx.copy_(x_embedding.expand(4, -1))
        out = learner(model, ["zipper"])[0]
        texts = learner.prompt_texts("zipper")
        sentences = F.normalize(model.encode_text(tokenizer(texts)), dim=-1).reshape(3, 24, -1)
    expected = F.normalize(torch.stack([sentences[:, :14].mean(1), sentences[:, 14:].mean(1)], dim=1), dim=-1)
    assert torch.allclose(out, expected[[0, 1, 1, 2]], atol=1e-5)
    with torch.no_grad():
        learner.normal_ctx.ctx.add_(_tokens(9, 4, _width(model)))  # not a constant shift: LayerNorm removes that
        shifted = learner(model, ["zipper"])[0]
    assert not torch.allclose(shifted[:, 0], out[:, 0], atol=1e-4)  # normal features follow V ...
    assert torch.allclose(shifted[:, 1], out[:, 1], atol=1e-6)  # ... and abnormal ones do not


def test_gradients_reach_only_the_context(tower) -> None:
    model, tokenizer = tower
    learner = StagePromptLearner(tokenizer, _width(model), seed=2)
    out = learner(model, ["bottle", "cable"])
    (out * _tokens(0, *out.shape)).sum().backward()
    assert learner.normal_ctx.ctx.grad is not None and learner.normal_ctx.ctx.grad.abs().sum() > 0
    assert learner.abnormal_ctx.ctx.grad is not None and learner.abnormal_ctx.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert [name for name, _ in learner.named_parameters()] == ["normal_ctx.ctx", "abnormal_ctx.ctx"]


def test_batched_call_equals_single_and_handles_repeats(tower) -> None:
    model, tokenizer = tower
    learner = StagePromptLearner(tokenizer, _width(model), seed=4)
    with torch.no_grad():
        batch = learner(model, ["bottle", "transistor", "bottle"])
        alone = learner(model, ["transistor"])
    assert batch.shape[0] == 3 and torch.equal(batch[0], batch[2])
    assert torch.allclose(batch[1], alone[0], atol=1e-5)


def test_context_init_is_seeded(tower) -> None:
    _, tokenizer = tower
    a, b, c = (StagePromptLearner(tokenizer, 16, seed=s) for s in (5, 5, 6))
    assert torch.equal(a.normal_ctx.ctx, b.normal_ctx.ctx) and torch.equal(a.abnormal_ctx.ctx, b.abnormal_ctx.ctx)
    assert not torch.equal(a.normal_ctx.ctx, c.normal_ctx.ctx)
    assert not torch.equal(a.normal_ctx.ctx, a.abnormal_ctx.ctx)
    assert 0.015 < float(a.normal_ctx.ctx.detach().std()) < 0.025


def test_stage_prompt_learner_rejects_bad_settings(tower) -> None:
    model, tokenizer = tower
    with pytest.raises(ConfigError, match="stage_case 4"):
        StagePromptLearner(tokenizer, 8, stage_case=4)
    with pytest.raises(ConfigError, match="single token"):
        StagePromptLearner(tokenizer, 8, placeholder="xylophonist")
    with pytest.raises(ConfigError, match="does not fit"):
        StagePromptLearner(tokenizer, 64, n_ctx=70)(model, ["bottle"])
    trainable = copy.deepcopy(model).requires_grad_(True)
    with pytest.raises(ConfigError, match="trainable parameter"):
        StagePromptLearner(tokenizer, 64)(trainable, ["bottle"])


# ---------------------------------------------------------------- self-improvement text


def test_response_features_match_open_clip_and_depend_on_the_answer(tower) -> None:
    model, tokenizer = tower
    answers = ["No, there are no anomalies in the image.", "Yes, there is an anomaly in the image, at the top."]
    out = response_text_features(model, tokenizer, answers)
    assert out.shape == (2, 2, 64)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2, 2), atol=1e-5)
    with torch.no_grad():
        direct = model.encode_text(tokenizer([f"{answers[1]} without damaged", f"{answers[1]} with damaged"]))
    assert torch.allclose(out[1], F.normalize(direct, dim=-1), atol=1e-5)
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    assert not torch.allclose(out[:, 0], out[:, 1], atol=1e-4)
    assert not out.requires_grad


def test_long_response_is_cut_before_the_suffix(tower) -> None:
    model, tokenizer = tower
    long_answer = "Yes, there is an anomaly " + "at the top left and the bottom right " * 20
    tokens = response_prompt_tokens(tokenizer, [long_answer], "with damaged", 77)
    tail = tokenizer.encode("with damaged") + [tokenizer.eot_token_id]
    assert tokens[0, -len(tail) :].tolist() == tail
    assert tokens[0, :4].tolist() == [tokenizer.sot_token_id, *tokenizer.encode("Yes, there")]
    naive = tokenizer([f"{long_answer} without damaged", f"{long_answer} with damaged"])
    assert torch.equal(naive[0], naive[1])  # plain truncation would lose the state word
    out = response_text_features(model, tokenizer, [long_answer])
    assert not torch.allclose(out[0, 0], out[0, 1], atol=1e-4)
    with pytest.raises(ConfigError, match="at least one"):
        response_text_features(model, tokenizer, [])


def test_refined_features_differ_from_static_and_follow_the_response() -> None:
    static = F.normalize(_tokens(1, 2, 4, 2, 16), dim=-1)
    response_a = F.normalize(_tokens(2, 2, 2, 16), dim=-1)
    response_b = F.normalize(_tokens(3, 2, 2, 16), dim=-1)
    refined = refine_text_features(static, response_a)
    assert refined.shape == static.shape
    assert torch.allclose(refined.norm(dim=-1), torch.ones(2, 4, 2), atol=1e-6)
    assert torch.allclose(refined[1, 3, 0], F.normalize(static[1, 3, 0] + response_a[1, 0], dim=-1), atol=1e-6)
    assert not torch.allclose(refined, static, atol=1e-3)
    assert not torch.allclose(refined, refine_text_features(static, response_b), atol=1e-3)
    with pytest.raises(ConfigError, match="one response per image"):
        refine_text_features(static, response_a[:1])
    with pytest.raises(ConfigError, match=r"\[B, K, 2, D\]"):
        refine_text_features(static[0], response_a)


# ---------------------------------------------------------------- adapter


def test_adapter_mix_at_lambda_one_and_small_lambda() -> None:
    stages = [_tokens(i, 2, 9, 16) * 3.0 for i in range(4)]  # not unit norm: the adapter normalises first
    full = StageAdapter(16, lam=1.0, seed=7)
    out = full(stages)
    for i, (o, s) in enumerate(zip(out, stages, strict=True)):
        expected = F.normalize(F.leaky_relu(full.fc[i](F.normalize(s, dim=-1)), 0.01), dim=-1)
        assert torch.allclose(o, expected, atol=1e-6)
        assert torch.allclose(o.norm(dim=-1), torch.ones(2, 9), atol=1e-5)
    small = StageAdapter(16, lam=0.1, seed=7)
    for o, s in zip(small(stages), stages, strict=True):
        gap = (o - F.normalize(s, dim=-1)).detach().norm(dim=-1)
        assert float(gap.max()) <= 0.2 + 1e-6 and float(gap.min()) > 0
    assert not torch.allclose(out[0], full.fc[1](stages[0]))


@pytest.mark.parametrize("lam", [0.0, -0.1, 1.5])
def test_adapter_refuses_lambda_outside_unit_interval(lam: float) -> None:
    with pytest.raises(ConfigError, match="adapter_lambda"):
        StageAdapter(8, lam=lam)


def test_adapter_checks_stage_count() -> None:
    with pytest.raises(ConfigError, match="expects 4 stage"):
        StageAdapter(8)([_tokens(0, 1, 4, 8)])


# ---------------------------------------------------------------- SEM


def test_sem_is_identity_at_init_and_not_after_a_step() -> None:
    sem = StageEnhancement(8, seed=1)
    stages = [_tokens(i, 2, 16, 8) for i in range(4)]
    out = sem(stages)
    assert all(torch.equal(o, s) for o, s in zip(out, stages, strict=True))
    loss = sum(((o - 1.0) ** 2).mean() for o in out)
    loss.backward()
    torch.optim.SGD(sem.parameters(), lr=0.1).step()
    with torch.no_grad():
        after = sem(stages)
        moved_final = sem(stages[:3] + [stages[3] + 1.0])
    assert all(not torch.allclose(a, s) for a, s in zip(after, stages, strict=True))
    assert not torch.allclose(moved_final[0], after[0])  # the final stage reaches every stage
    with torch.no_grad():
        explicit = sem(stages, final=stages[0])
    assert not torch.allclose(explicit[1], after[1])


def test_sem_resizes_the_final_grid_and_rejects_non_square() -> None:
    sem = StageEnhancement(4, n_stages=2)
    torch.nn.init.normal_(sem.conv[0].weight)
    out = sem([_tokens(0, 1, 16, 4), _tokens(1, 1, 4, 4)])  # 4x4 stage, final 2x2 grid
    assert out[0].shape == (1, 16, 4) and out[1].shape == (1, 4, 4)
    with pytest.raises(ConfigError, match="square"):
        sem([_tokens(0, 1, 16, 4), _tokens(1, 1, 5, 4)])


# ---------------------------------------------------------------- PEM


def _pem() -> PatchPromptEmbedder:
    return PatchPromptEmbedder(32, hidden=16, seed=3)


def test_pem_shape_base_prompts_and_drop_in_for_conv_prompt_learner() -> None:
    pem = _pem()
    maps = torch.rand(2, 4, 224, 224, generator=torch.Generator().manual_seed(0))
    out = pem(maps)
    assert out.shape == (2, 18, 32)
    assert torch.equal(out[0, :9], pem.base_prompts) and torch.equal(out[1, :9], pem.base_prompts)
    assert not torch.allclose(out[0, 9:], out[1, 9:])
    with torch.no_grad():
        conv = ConvPromptLearner(32, seed=3)(maps[:, :1])
    assert conv.shape == out.shape
    with pytest.raises(ConfigError, match="stage maps"):
        pem(maps[:, :1])


@pytest.mark.parametrize(
    ("row", "col", "group"),
    [(0, 0, 0), (79, 79, 0), (80, 0, 3), (143, 143, 4), (144, 223, 8), (223, 100, 7), (10, 150, 2)],
)
def test_pem_changes_only_the_group_holding_the_patch(row: int, col: int, group: int) -> None:
    # 14 patches per side split 5/4/5: pixels 0–79, 80–143, 144–223.
    pem = _pem()
    blank = torch.zeros(1, 4, 224, 224)
    spot = blank.clone()
    spot[0, :, row, col] = 1.0
    with torch.no_grad():
        base, changed = pem(blank)[0], pem(spot)[0]
    differs = [(base[9 + k] - changed[9 + k]).abs().max().item() > 1e-6 for k in range(9)]
    assert differs == [k == group for k in range(9)]
    assert torch.equal(base[:9], changed[:9])


def test_pem_group_sizes_and_patch_normalisation() -> None:
    pem = _pem()
    counts = torch.bincount(pem.patch_group, minlength=9)
    assert counts.tolist() == [25, 20, 25, 20, 16, 20, 25, 20, 25]
    maps = torch.rand(1, 4, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(pem(maps), pem(maps * 3.0), atol=1e-5)  # each patch is L2-normalised
        raw = PatchPromptEmbedder(32, hidden=16, seed=3, normalize_patches=False)
        assert not torch.allclose(raw(maps), raw(maps * 3.0), atol=1e-3)


def test_modules_are_seeded() -> None:
    for build in (lambda s: PatchPromptEmbedder(8, hidden=8, seed=s), lambda s: StageAdapter(8, seed=s)):
        a, b, c = build(0), build(0), build(1)
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
        assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))
    first, second = StageEnhancement(8, seed=0), StageEnhancement(8, seed=0)
    assert torch.equal(first.proj[2].weight, second.proj[2].weight)


# ---------------------------------------------------------------- paper sizes


def test_parameter_counts_at_paper_sizes(tower) -> None:
    _, tokenizer = tower
    d, llm, e, stages = 1024, 4096, 12, 4
    assert _n_params(StagePromptLearner(tokenizer, d)) == 2 * e * d  # V and W: 24,576
    assert _n_params(StageAdapter(d)) == stages * (d * d + d)  # 4,198,400
    sem_per_stage = (d * d + d) + (9 * d * d + d)  # 1×1 projection + 3×3 conv, both with bias
    assert _n_params(StageEnhancement(d)) == stages * sem_per_stage  # 41,951,232
    patch = 4 * 16 * 16
    pem_expected = (patch * llm + llm) + (llm * llm + llm) + 9 * llm  # MLP 1024→4096→4096 + 9 base prompts
    assert _n_params(PatchPromptEmbedder(llm)) == pem_expected  # 21,016,576


def test_base_prompts_alone_are_seeded_and_repeated_for_the_batch():
    prompts = BasePrompts(32, seed=3)
    out = prompts(4)
    assert out.shape == (4, 9, 32) and all(torch.equal(out[i], prompts.base_prompts) for i in range(4))
    assert torch.equal(BasePrompts(32, seed=3).base_prompts, prompts.base_prompts)
    assert sum(p.numel() for p in BasePrompts(4096).parameters()) == 9 * 4096  # what strict w/o PEM keeps
    with pytest.raises(ConfigError, match="n_base"):
        BasePrompts(32, n_base=0)
