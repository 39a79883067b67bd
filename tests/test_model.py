"""The backbone: causality, KV-cache decoding, the additive key bias, RoPE and initialisation."""

import math

import pytest
import torch

from ponderlm.config import load_config
from ponderlm.kvcache import KVCache
from ponderlm.methods import build_model
from ponderlm.model import Attention, apply_rotary, biased_causal_attention, linear_cross_entropy, rotary_tables


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = load_config("tiny", ["model.vocab_size=97"])
    return build_model(config).eval()


def test_changing_a_later_token_never_changes_earlier_logits(model):
    ids = torch.randint(0, 97, (2, 24))
    base = model(ids)
    for t in (0, 7, 22):
        changed = ids.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 97
        out = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def naive_attention(attn: Attention, x, positions, key_bias):
    """Softmax attention written out by hand, as an independent reference."""
    batch, seq, d = x.shape
    heads, hd = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv_proj(x).split(d, dim=-1)
    q, k, v = (t.view(batch, seq, heads, hd).transpose(1, 2) for t in (q, k, v))
    cos, sin = rotary_tables(positions, hd, 10000.0)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf")) + key_bias[:, None, None, :]
    out = scores.softmax(-1) @ v
    return attn.o_proj(out.transpose(1, 2).reshape(batch, seq, d))


def test_key_bias_is_added_to_every_querys_logit_for_that_key(model):
    attn = model.backbone.layers[0].self_attn
    x = torch.randn(2, 10, 64)
    positions = torch.arange(10)
    bias = torch.randn(2, 10) * 3
    bias[:, 4] = -30.0  # a nearly invisible key
    cos, sin = rotary_tables(positions, attn.head_dim, 10000.0)
    ours = attn(x, cos, sin, None, 0, (bias * attn.head_dim ** 0.5)[:, None, :, None])
    torch.testing.assert_close(ours, naive_attention(attn, x, positions, bias), rtol=1e-5, atol=1e-5)


def test_zero_key_bias_equals_no_bias(model):
    emb = model.backbone.embed(torch.randint(0, 97, (1, 12)))
    plain = model.backbone.hidden_states(emb)
    biased = model.backbone.hidden_states(emb, key_bias=torch.zeros(1, 12))
    torch.testing.assert_close(plain, biased, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j):
        cos_i, sin_i = rotary_tables(torch.tensor([i]), 16, 10000.0)
        cos_j, sin_j = rotary_tables(torch.tensor([j]), 16, 10000.0)
        return (apply_rotary(q, cos_i, sin_i) * apply_rotary(k, cos_j, sin_j)).sum()

    torch.testing.assert_close(score(7, 3), score(107, 103), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(7, 3), score(7, 5))


def test_rope_matches_complex_rotation():
    x = torch.randn(3, 8)
    positions = torch.arange(3)
    cos, sin = rotary_tables(positions, 8, 10000.0)
    ours = apply_rotary(x, cos, sin)
    # Pair dimension i with i + 4 (half-split layout) and rotate it as a complex number by position * freq_i.
    freqs = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    z = torch.complex(x[:, :4], x[:, 4:]) * torch.polar(torch.ones(3, 4), positions[:, None].float() * freqs)
    torch.testing.assert_close(ours, torch.cat([z.real, z.imag], dim=-1), rtol=1e-5, atol=1e-5)


def test_initialisation_follows_the_design():
    torch.manual_seed(0)
    config = load_config("tiny", ["model.vocab_size=4096", "model.hidden_size=128", "model.num_hidden_layers=3"])
    backbone = build_model(config).backbone
    std = math.sqrt(2 / (5 * 128))
    weight = backbone.embed_tokens.weight
    assert abs(weight.std().item() - std * 0.88) < 0.02 * std  # a normal truncated at 2 std keeps 0.88 of it
    assert weight.abs().max().item() <= 2 * std + 1e-7
    o_proj = backbone.layers[0].self_attn.o_proj.weight
    assert o_proj.abs().max().item() <= 2 * std / math.sqrt(6) + 1e-7
    assert backbone.embed_scale == pytest.approx(math.sqrt(2.5 * 128))
    tokens = backbone.embed(torch.arange(4096))
    assert tokens.std().item() == pytest.approx(0.88, abs=0.03)  # unit scale before truncation


def test_bf16_autocast_forward_is_close_to_fp32(model):
    ids = torch.randint(0, 97, (2, 16))
    full = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids)
    assert (low.float() - full).abs().max().item() < 0.1


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_fused_linear_cross_entropy_equals_lm_head_then_cross_entropy_in_value_and_gradients(chunk_rows):
    torch.manual_seed(0)
    hidden = torch.randn(3, 21, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (3, 21))
    logits = hidden @ weight.T
    reference = (logits.logsumexp(-1) - logits.gather(-1, targets[..., None])[..., 0]).mean()
    expected = torch.autograd.grad(2.5 * reference, (hidden, weight))
    fused = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    got = torch.autograd.grad(2.5 * fused, (hidden, weight))
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_fused_linear_cross_entropy_under_bf16_autocast_matches_the_unfused_autocast_loss():
    torch.manual_seed(0)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(64, 32, requires_grad=True)
    targets = torch.randint(0, 64, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).float(), targets)
        fused = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, reference, rtol=1e-3, atol=1e-3)
    expected = torch.autograd.grad(reference, (hidden, weight))
    for g, e in zip(torch.autograd.grad(fused, (hidden, weight)), expected):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=0.05, atol=0.02 * e.abs().max().item())


def test_fused_linear_cross_entropy_without_gradients_keeps_none():
    hidden, weight = torch.randn(5, 8), torch.randn(11, 8)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, torch.randint(0, 11, (5,)))
    assert loss.ndim == 0 and not loss.requires_grad


def test_fused_biased_attention_equals_the_float_mask_and_passes_gradients():
    q, k, v = (torch.randn(2, 4, 12, 16) for _ in range(3))
    bias = (torch.randn(2, 12) * 2 - 1).requires_grad_()
    fused = biased_causal_attention(q, k, v, (bias * 16**0.5)[:, None, :, None])  # augmented q.k, is_causal
    future = torch.ones(12, 12, dtype=torch.bool).triu(1)
    mask = torch.zeros(12, 12).masked_fill(future, float("-inf"))[None, None] + bias[:, None, None, :]
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    (grad_fused,) = torch.autograd.grad(fused.square().sum(), bias)
    (grad_reference,) = torch.autograd.grad(reference.square().sum(), bias)
    torch.testing.assert_close(grad_fused, grad_reference, rtol=1e-4, atol=1e-5)
    assert grad_fused.abs().sum() > 0


def test_backbone_with_key_bias_matches_the_cached_path_one_slot_at_a_time(model):
    """The fused training path (bias inside q.k) against the engine's cache, which keeps each key's bias and
    adds it for every later query."""
    emb = model.backbone.embed(torch.randint(0, 97, (2, 12)))
    bias = torch.randn(2, 12)
    fused = model.backbone.hidden_states(emb, key_bias=bias)
    cache = KVCache(model.config.model, 2, 12, torch.float32)
    for t in range(12):
        view = cache.step(2, torch.zeros(2, dtype=torch.long), bias[:, t])
        out = model.backbone.hidden_states(emb[:, t:t + 1], torch.full((2, 1), t), cache=view)
        view.commit()
        torch.testing.assert_close(out[:, 0], fused[:, t], rtol=1e-4, atol=1e-4)


def test_compiled_blocks_agree_with_eager():
    torch.manual_seed(0)
    model = build_model(load_config("tiny", ["method=ponderlm3", "model.vocab_size=61", "ponder.extra_steps=2"])).eval()
    with torch.no_grad():
        model.router.weight.normal_(0, 0.5)  # a non-trivial soft mask through the augmented attention
    ids = torch.randint(0, 61, (2, 12))
    eager = model(ids)
    for block in model.backbone.layers:
        block.compile()
    torch.testing.assert_close(model(ids), eager, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention is used on CUDA only")
def test_flex_attention_equals_the_augmented_sdpa_on_cuda():
    from ponderlm.model import flex_biased_causal_attention

    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", requires_grad=True) for _ in range(3))
    bias = (torch.randn(2, 256, device="cuda") - 1).requires_grad_()
    fused = biased_causal_attention(q, k, v, (bias * 8)[:, None, :, None])
    flex = flex_biased_causal_attention(q, k, v, bias)
    torch.testing.assert_close(flex, fused, rtol=2e-3, atol=2e-3)
    grads = [torch.autograd.grad(out.square().sum(), bias)[0] for out in (fused, flex)]
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-3, atol=2e-3)
