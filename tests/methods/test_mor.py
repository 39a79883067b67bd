"""`mor`: token-choice Mixture-of-Recursions; recursion-wise attention checked against a masked reference."""

import pytest
import torch
import torch.nn.functional as F

from ponderlm.config import load_config
from ponderlm.errors import PonderError
from ponderlm.methods import build_model
from ponderlm.model import HARD_MASK

VOCAB = 43


def make(*overrides, K=2):
    torch.manual_seed(0)
    config = load_config("tiny", ["method=mor", f"model.vocab_size={VOCAB}", f"ponder.extra_steps={K}", *overrides])
    model = build_model(config).eval()
    with torch.no_grad():
        model.router.weight.normal_(0, 0.5)  # decisive: tokens choose different depths
    return model


def masked_reference(model, ids):
    """Every recursion over the whole sequence, inactive tokens' keys hidden by a bias and their states kept."""
    backbone = model.backbone
    x0 = backbone.embed(ids)
    x = backbone.hidden_states(x0, final_norm=False)
    g = model.router(x).softmax(-1)
    depth = g.argmax(-1) + 1
    for recursion in range(2, g.shape[-1] + 1):
        active = depth >= recursion
        bias = torch.zeros(active.shape).masked_fill(~active, HARD_MASK)
        x = torch.where(active[..., None], backbone.hidden_states(x, key_bias=bias, final_norm=False), x)
    out = x0 + g.gather(-1, depth[..., None] - 1) * (x - x0)
    return backbone.lm_head(backbone.norm(out)), depth - 1


def test_gathered_recursions_equal_the_masked_reference():
    model = make()
    ids = torch.randint(0, VOCAB, (3, 14))
    with torch.no_grad():
        logits, extra = model.infer(ids)
        reference, reference_extra = masked_reference(model, ids)
    assert torch.equal(extra, reference_extra) and len(extra.unique()) == 3  # every depth occurs
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


def test_one_recursion_is_vanilla():
    model = make(K=0)
    vanilla = build_model(load_config("tiny", ["method=vanilla", f"model.vocab_size={VOCAB}"])).eval()
    vanilla.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith("backbone.")})
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), vanilla(ids))


def test_the_loss_adds_the_balancing_term_and_the_router_learns_through_the_output():
    model = make("options.mor.balance_weight=0.0").train()
    ids, targets = torch.randint(0, VOCAB, (2, 10)), torch.randint(0, VOCAB, (2, 10))
    loss, stats = model.loss(ids, targets)
    loss.backward()
    assert model.router.weight.grad.abs().sum() > 0  # no balancing term: only the gated output trains the router
    with torch.no_grad():
        _, g, depth = model.recurse(ids)
    share = torch.stack([(depth == d).float().mean() for d in (1, 2, 3)])
    balance = 3 * (share * g.mean((0, 1))).sum()
    assert stats["balance_loss"] == pytest.approx(balance.item(), rel=1e-5)
    assert [stats[f"depth_share_{d}"] for d in (1, 2, 3)] == pytest.approx(share.tolist())
    weighted = make("options.mor.balance_weight=0.5").train()
    with torch.no_grad():
        cross_entropy = F.cross_entropy(weighted(ids).flatten(0, 1), targets.flatten())
        assert weighted.loss(ids, targets)[0].item() == pytest.approx(cross_entropy.item() + 0.5 * balance.item(),
                                                                      rel=1e-5)


def test_tau_plays_no_role():
    model = make()
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.equal(model.infer(ids, 0.0)[0], model.infer(ids, 0.99)[0])


@pytest.mark.parametrize("scale_output", ["true", "false"])
@pytest.mark.parametrize("depth,peer", [(1, "vanilla"), (3, "loop")])
def test_a_fixed_depth_is_vanilla_or_loop_in_the_forward_pass_and_in_training(depth, peer, scale_output):
    """The router is bypassed: the same logits, loss and backbone gradients as the peer, and none for the router
    (the penalty and the balancing loss included, which would otherwise reach the backbone through it)."""
    model = make(f"options.mor.fixed_depth={depth}", f"options.mor.scale_output={scale_output}",
                 "ponder.penalty=0.5", "options.mor.balance_weight=0.5")
    other = build_model(load_config("tiny", [f"method={peer}", f"model.vocab_size={VOCAB}"],
                                    shared=["ponder.extra_steps=2"]))
    other.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith("backbone.")})
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        logits, extra = model.infer(ids)
        torch.testing.assert_close(logits, other.eval()(ids), rtol=1e-5, atol=1e-5)
    assert extra.eq(depth - 1).all()
    losses = [m.train().loss(ids, ids.roll(-1, 1))[0] for m in (model, other)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for loss in losses:
        loss.backward()
    assert model.router.weight.grad is None
    for (name, mine), (_, theirs) in zip(model.backbone.named_parameters(), other.backbone.named_parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6, msg=name)
    router_flops = 3 * 2 * model.config.model.hidden_size * 3
    assert model.training_flops_per_token() == pytest.approx(other.training_flops_per_token() + router_flops)


def test_an_unscaled_output_still_trains_the_router():
    model = make("options.mor.scale_output=false", "options.mor.balance_weight=0.0").train()
    ids = torch.randint(0, VOCAB, (2, 10))
    model.loss(ids, ids)[0].backward()
    assert model.router.weight.grad.abs().sum() > 0


def test_a_fixed_depth_beyond_the_recursions_is_refused():
    with pytest.raises(PonderError, match=r"options.mor.fixed_depth=4: a depth is 1..K \+ 1 = 3"):
        make("options.mor.fixed_depth=4")
