import open_clip
import pytest
import torch
from torch import nn

from siad.backbones import get_backbone_spec, load_openclip
from siad.errors import ConfigError
from siad.prompts import (
    ContextVectors,
    DeepTextPrompts,
    MetaNetContext,
    context_prompt_tokens,
    encode_text_with_context,
    inject_context,
    text_hidden_states,
)

WIDTH = 32  # text width of the 4-block model below


@pytest.fixture(scope="module")
def tiny():
    return load_openclip(get_backbone_spec("tiny-vit-demo"))


@pytest.fixture(scope="module")
def deep_model():
    """A frozen random CLIP with a 4-block text tower (the demo model has only 2 blocks)."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": WIDTH, "heads": 2, "layers": 4},
    )
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tokens(tiny):
    return context_prompt_tokens(tiny.tokenizer, ["object.", "damaged object."], n_ctx=4)


def test_nothing_injected_equals_encode_text(tiny, deep_model, tokens):
    for model in (tiny.model, deep_model):
        assert torch.allclose(encode_text_with_context(model, tokens), model.encode_text(tokens), atol=1e-6)
        normed = encode_text_with_context(model, tokens, normalize=True)
        assert torch.allclose(normed, model.encode_text(tokens, normalize=True), atol=1e-6)


def test_trimmed_sequence_gives_the_same_eot_features(deep_model, tokens):
    eot = int(tokens.argmax(-1).max())
    trimmed = encode_text_with_context(deep_model, tokens[:, : eot + 1])
    assert torch.allclose(trimmed, deep_model.encode_text(tokens), atol=1e-5)


def test_context_prompt_tokens_put_placeholders_after_the_start_token(tiny, tokens):
    x_id = tiny.tokenizer(["X"])[0, 1]
    assert (tokens[:, 1:5] == x_id).all() and (tokens[:, 0] == tokens[0, 0]).all()
    assert tokens[1, 5] == tiny.tokenizer(["damaged"])[0, 1]
    with pytest.raises(ConfigError, match="truncated"):
        context_prompt_tokens(tiny.tokenizer, ["object."], n_ctx=75)
    with pytest.raises(ConfigError, match="single token"):
        context_prompt_tokens(tiny.tokenizer, ["object."], n_ctx=2, placeholder="qqzzxqj")


def test_shallow_context_replaces_exactly_the_placeholder_positions(tiny, tokens):
    model = tiny.model
    embeddings = model.token_embedding(tokens)
    ctx = ContextVectors(4, embeddings.shape[-1], seed=1)
    with torch.no_grad():
        ctx.ctx.copy_(embeddings[0, 1:5])  # the placeholder embeddings themselves: nothing changes
    unchanged = encode_text_with_context(model, tokens, ctx(embeddings))
    assert torch.allclose(unchanged, model.encode_text(tokens), atol=1e-6)
    learned = ContextVectors(4, embeddings.shape[-1], seed=1)
    injected = learned(embeddings)
    assert torch.equal(injected[:, 1:5], learned.ctx.detach().expand(2, -1, -1))
    assert torch.equal(injected[:, 0], embeddings[:, 0]) and torch.equal(injected[:, 5:], embeddings[:, 5:])
    assert not torch.allclose(encode_text_with_context(model, tokens, injected), model.encode_text(tokens), atol=1e-3)


def test_gradients_reach_only_the_learnable_modules(deep_model, tokens):
    ctx = ContextVectors(4, WIDTH, seed=0)
    deep = DeepTextPrompts(2, WIDTH, blocks=(1, 2, 3), seed=0)
    out = encode_text_with_context(deep_model, tokens, ctx(deep_model.token_embedding(tokens)), deep())
    out.pow(2).sum().backward()
    assert ctx.ctx.grad is not None and ctx.ctx.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in deep.prompts)
    assert all(p.grad is None for p in deep_model.parameters())


def test_deep_prompts_change_hidden_states_only_where_intended(deep_model, tokens):
    prompt = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(3))
    plain = text_hidden_states(deep_model, tokens)
    prompted = text_hidden_states(deep_model, tokens, deep_prompts={2: prompt})
    assert len(plain) == len(prompted) == 5  # entering blocks 0..3, then the output
    for before in (0, 1):
        assert torch.equal(prompted[before], plain[before])
    entering = prompted[2]
    assert torch.allclose(entering[:, 1:4], prompt.expand(2, -1, -1))
    assert torch.equal(entering[:, 0], plain[2][:, 0]) and torch.equal(entering[:, 4:], plain[2][:, 4:])
    for after in (3, 4):
        # causal mask: the start token never sees the prompted positions
        assert torch.allclose(prompted[after][:, 0], plain[after][:, 0], atol=1e-6)
        assert not torch.allclose(prompted[after][:, 4:], plain[after][:, 4:], atol=1e-4)


def test_deep_prompts_equal_to_the_plain_hidden_states_change_nothing(deep_model, tokens):
    plain = text_hidden_states(deep_model, tokens)
    same = {1: plain[1][:, 1:5], 3: plain[3][:, 2:4]}
    out = encode_text_with_context(deep_model, tokens, deep_prompts={1: same[1]})
    assert torch.allclose(out, deep_model.encode_text(tokens), atol=1e-6)
    shifted = encode_text_with_context(deep_model, tokens, deep_prompts={3: same[3]}, deep_start=2)
    assert torch.allclose(shifted, deep_model.encode_text(tokens), atol=1e-6)


def test_deep_prompt_sequence_means_blocks_from_one(deep_model, tokens):
    deep = DeepTextPrompts(2, WIDTH, blocks=range(1, 4), seed=5)
    as_map = deep()
    assert sorted(as_map) == [1, 2, 3]
    by_sequence = encode_text_with_context(deep_model, tokens, deep_prompts=[as_map[1], as_map[2], as_map[3]])
    assert torch.equal(by_sequence, encode_text_with_context(deep_model, tokens, deep_prompts=as_map))
    with pytest.raises(ConfigError, match="block"):
        encode_text_with_context(deep_model, tokens, deep_prompts={4: as_map[1]})


def test_deep_prompt_blocks_and_neighbouring_seeds_draw_distinct_tokens():
    first, second = DeepTextPrompts(5, WIDTH, blocks=(1, 2), seed=0), DeepTextPrompts(5, WIDTH, blocks=(1, 2), seed=1)
    assert not torch.equal(first.prompts[0], first.prompts[1])
    assert not torch.equal(first.prompts[1], second.prompts[0])  # seed + 1 would make these equal
    assert torch.equal(first.prompts[0], DeepTextPrompts(5, WIDTH, blocks=(1, 2), seed=0).prompts[0])


def test_per_image_deep_prompt_offsets(deep_model, tokens):
    """AdaCLIP-style: static tokens + one dynamic offset per image, broadcast over the sentences."""
    deep = DeepTextPrompts(3, WIDTH, blocks=(1, 2), seed=0)
    offset = torch.randn(2, 1, 3, WIDTH, generator=torch.Generator().manual_seed(1))  # [B, 1, n, W]
    per_image = deep(offset)
    assert per_image[2].shape == (2, 1, 3, WIDTH)
    embeddings = deep_model.token_embedding(tokens).expand(2, *tokens.shape, WIDTH)
    out = encode_text_with_context(deep_model, tokens, embeddings, per_image)
    assert out.shape == (2, 2, 16)
    for b in range(2):
        alone = encode_text_with_context(deep_model, tokens, deep_prompts={k: v[b, 0] for k, v in per_image.items()})
        assert torch.allclose(out[b], alone, atol=1e-6)
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_learnable_modules_are_seeded():
    assert torch.equal(ContextVectors(12, 8, seed=4).ctx, ContextVectors(12, 8, seed=4).ctx)
    assert not torch.equal(ContextVectors(12, 8, seed=4).ctx, ContextVectors(12, 8, seed=5).ctx)
    a, b = MetaNetContext(12, 8, 64, seed=2), MetaNetContext(12, 8, 64, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert 0.015 < ContextVectors(12, 768, seed=0).ctx.std() < 0.025  # N(0, 0.02²)


def test_meta_net_context_depends_on_the_normalised_image_feature(deep_model, tokens):
    meta = MetaNetContext(n_ctx=4, ctx_dim=WIDTH, feature_dim=64, seed=0)
    assert meta.meta_net[0].out_features == 4  # 64 → 64/16 → ReLU → WIDTH
    images = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    ctx = meta.context(images)
    assert ctx.shape == (3, 4, WIDTH)
    shift = ctx - meta.ctx
    assert torch.allclose(shift, shift[:, :1].expand_as(shift))  # the same shift on every context vector
    assert not torch.allclose(ctx[0], ctx[1])
    assert torch.allclose(meta.context(images * 3.0), ctx, atol=1e-6)  # input is L2-normalised

    embeddings = meta(deep_model.token_embedding(tokens), images)
    assert embeddings.shape == (3, 2, tokens.shape[1], WIDTH)
    out = encode_text_with_context(deep_model, tokens, embeddings)
    assert out.shape == (3, 2, 16)
    single = encode_text_with_context(deep_model, tokens, embeddings[1])
    assert torch.allclose(out[1], single, atol=1e-6)
    out.sum().backward()
    assert meta.ctx.grad is not None and meta.meta_net[0].weight.grad.abs().sum() > 0


def test_bad_inputs_are_rejected(tiny, tokens):
    embeddings = tiny.model.token_embedding(tokens)
    with pytest.raises(ConfigError, match="width"):
        inject_context(embeddings, torch.zeros(4, 7))
    with pytest.raises(ConfigError, match="does not fit"):
        inject_context(embeddings, torch.zeros(80, embeddings.shape[-1]))
    with pytest.raises(ConfigError, match="text transformer"):
        encode_text_with_context(nn.Linear(3, 3), tokens)
    with pytest.raises(ConfigError, match="token embeddings"):
        encode_text_with_context(tiny.model, tokens, embeddings[:, :10])
