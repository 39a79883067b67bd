"""The fixed-compute baselines pause, loop and ponderlm1: causality, decoding, and their definitions."""

import pytest
import torch

from ponderlm.config import load_config
from ponderlm.methods import build_model

VOCAB = 41
BASELINES = ["pause", "loop", "ponderlm1"]


def make(method, steps=2):
    torch.manual_seed(0)
    config = load_config("tiny", [f"method={method}", f"model.vocab_size={VOCAB}"], shared=[f"ponder.extra_steps={steps}"])
    return build_model(config).eval()


@pytest.mark.parametrize("method", BASELINES)
def test_changing_a_later_token_never_changes_earlier_logits(method):
    model = make(method)
    ids = torch.randint(0, VOCAB, (2, 12))
    base = model(ids)
    for t in (0, 5, 10):
        changed = ids.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % VOCAB
        out = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_zero_steps_reduce_loop_and_ponderlm1_to_vanilla():
    ids = torch.randint(0, VOCAB, (1, 9))
    reference = make("vanilla")(ids)
    for method in ("loop", "ponderlm1"):
        torch.testing.assert_close(make(method, steps=0)(ids), reference)


def test_loop_applies_the_stack_k_plus_one_times_with_one_final_norm():
    model = make("loop")
    ids = torch.randint(0, VOCAB, (1, 7))
    backbone = model.backbone
    x = backbone.embed(ids)
    positions = torch.arange(7)
    from ponderlm.model import rotary_tables

    cos, sin = rotary_tables(positions, 16, 10000.0)
    for _ in range(3):
        for layer in backbone.layers:
            x = layer(x, cos, sin, None, 0)
    torch.testing.assert_close(model(ids), backbone.lm_head(backbone.norm(x)), rtol=1e-5, atol=1e-5)


def test_ponderlm1_feeds_back_the_expected_embedding():
    model = make("ponderlm1", steps=1)
    ids = torch.randint(0, VOCAB, (1, 6))
    backbone = model.backbone
    e0 = backbone.embed(ids)
    probs = backbone.lm_head(backbone.hidden_states(e0)).softmax(-1)
    e1 = e0 + probs @ (backbone.embed_tokens.weight * backbone.embed_scale)
    torch.testing.assert_close(model(ids), backbone.lm_head(backbone.hidden_states(e1)), rtol=1e-5, atol=1e-5)


def test_pause_slots_share_the_tokens_position_and_one_learned_embedding():
    model = make("pause")
    slots, positions = model.slots(torch.randint(0, VOCAB, (1, 3)))
    assert positions.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(slots[0, 1], slots[0, 2]) and torch.equal(slots[0, 1], slots[0, 4])
    assert model.pause_embedding.requires_grad
