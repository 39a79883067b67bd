"""PonderLM-2 and PonderLM-3: Jacobi training forward, soft mask, router, pruned inference, consistency."""

import pytest
import torch

from ponderlm.config import load_config
from ponderlm.engine import teacher_forced
from ponderlm.errors import PonderError
from ponderlm.methods import build_model
from ponderlm.methods.latent import log_tail_mass

VOCAB = 53


def make(method, *overrides, seed=0):
    torch.manual_seed(seed)
    config = load_config("tiny", [f"method={method}", f"model.vocab_size={VOCAB}"],
                         shared=["ponder.extra_steps=2", *overrides])
    return build_model(config).eval()


def sharpen_router(model, scale):
    """Give the router random, large weights so tokens get different step distributions."""
    with torch.no_grad():
        model.router.weight.normal_(0, scale)
        model.router.bias.normal_(0, 1)


def sequential_logits(model, ids, tau=None):
    return teacher_forced(model, ids, tau)


def test_log_tail_mass_matches_a_direct_computation_and_stays_finite():
    logits = torch.randn(5, 4)
    direct = logits.softmax(-1).flip(-1).cumsum(-1).flip(-1).log()
    torch.testing.assert_close(log_tail_mass(logits), direct, rtol=1e-5, atol=1e-6)
    extreme = torch.tensor([[1e4, -1e4, -1e4, -1e4], [-1e4, -1e4, -1e4, 1e4], [80.0, -80.0, 0.0, -3e38]])
    log_w = log_tail_mass(extreme)
    assert torch.isfinite(log_w).all()
    assert (log_w[:, 0] == 0).all() and (log_w.diff(dim=-1) <= 0).all()
    assert log_w[0, 1].item() == pytest.approx(-2e4, rel=1e-3)  # exact, where log(sum) would give -inf


@pytest.mark.parametrize("method", ["ponderlm2", "ponderlm3"])
def test_causality_through_latent_slots(method):
    model = make(method)
    if method == "ponderlm3":
        sharpen_router(model, 0.5)
    ids = torch.randint(0, VOCAB, (2, 10))
    base = model(ids)
    for t in (0, 4, 8):
        changed = ids.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % VOCAB
        torch.testing.assert_close(model(changed)[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,tau", [("ponderlm2", 1e-4), ("ponderlm3", 0.0), ("ponderlm3", 0.2)])
def test_jacobi_with_enough_passes_equals_sequential_decoding(method, tau):
    tokens, K = 6, 2
    model = make(method, f"ponder.eval_refine_passes={(K + 1) * tokens}", f"ponder.tau={tau}")
    if method == "ponderlm3":
        sharpen_router(model, 0.5)
    ids = torch.randint(0, VOCAB, (2, tokens))
    with torch.no_grad():
        parallel, parallel_used = model.infer(ids)
    sequential, sequential_used = sequential_logits(model, ids)
    assert torch.equal(parallel_used, sequential_used)
    torch.testing.assert_close(parallel, sequential, rtol=1e-4, atol=1e-4)
    if tau == 0.2:
        assert 0 < parallel_used.float().mean() < K  # the check covered pruned and kept slots


def test_one_hot_router_makes_soft_forward_equal_pruned_forward():
    model = make("ponderlm3")
    sharpen_router(model, 200.0)  # saturated softmax: s is one-hot per token, at different k for different tokens
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        soft, soft_used = model.infer(ids, tau=0.0)
        pruned, pruned_used = model.infer(ids, tau=1e-4)
    assert (soft_used == 2).all() and len(pruned_used.unique()) > 1
    torch.testing.assert_close(soft, pruned, rtol=1e-4, atol=1e-4)


def test_tau_zero_runs_every_latent_slot():
    model = make("ponderlm3", "ponder.tau=0.0")
    with torch.no_grad():
        model.router.bias.copy_(torch.tensor([30.0, 0.0, 0.0]))  # w_1 = w_2 ~ 1e-13: all mass on k = 0
    ids = torch.randint(0, VOCAB, (1, 8))
    _, used = sequential_logits(model, ids)
    assert (used == 2).all()
    _, used = sequential_logits(model, ids, tau=1e-4)  # the same model prunes everything once w_k < tau
    assert (used == 0).all()


def test_router_gets_gradients_through_the_mask_and_through_the_mixture(monkeypatch):
    model = make("ponderlm3").train()
    sharpen_router(model, 0.1)
    ids, targets = torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (2, 8))

    def router_grad():
        model.zero_grad()
        model.loss(ids, targets)[0].backward()
        return model.router.weight.grad.abs().sum().item()

    assert router_grad() > 0
    route = type(model).route
    original_bias = type(model)._slot_bias
    # Only the mask: the mixture weights are cut from the graph.
    monkeypatch.setattr(type(model), "route",
                        lambda self, states, warming_up=False: tuple(x.detach() for x in route(self, states)))
    monkeypatch.setattr(type(model), "_slot_bias",
                        lambda self, states, slots, tau, warming_up: _attached_bias(self, route, states, slots))
    assert router_grad() > 0
    # Only the mixture: the mask is cut from the graph.
    monkeypatch.setattr(type(model), "route", route)
    monkeypatch.setattr(type(model), "_slot_bias",
                        lambda self, states, slots, tau, warming_up: original_bias(self, states, slots, tau,
                                                                                   warming_up).detach())
    assert router_grad() > 0


def _attached_bias(model, route, states, slots):
    log_w = route(model, states)[1][..., :slots].clone()
    log_w[..., 0] = 0.0
    return log_w.flatten(1, 2)


def test_fixed_router_ablation_uses_one_distribution_for_every_token():
    fixed = [0.96, 0.02, 0.02]
    p3 = make("ponderlm3", f"ponder.router_fixed={fixed}", "ponder.router_warmup_steps=1").train()
    sharpen_router(p3, 0.3)  # a router that would vary by token: it must not matter
    ids, targets = torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (2, 8))
    assert p3.loss(ids, targets, train_step=1)[1]["step_mass_2"] == 1.0  # the warm-up comes first
    p3.zero_grad()
    loss, stats = p3.loss(ids, targets, train_step=2)
    loss.backward()
    assert [float(stats[f"step_mass_{k}"]) for k in range(3)] == pytest.approx(fixed)
    assert float(stats["expected_extra_steps"]) == pytest.approx(0.06)  # w_1 + w_2 = 0.04 + 0.02
    assert p3.router.weight.grad.abs().sum() == 0
    p3.eval()
    # w_1 = 0.04, w_2 = 0.02: tau = 0.03 keeps exactly one latent slot for every token.
    assert (p3.infer(ids, tau=0.03)[1] == 1).all() and (p3.infer(ids, tau=0.05)[1] == 0).all()
    for bad in ("[0.5,0.5]", "[0.5,0.6,-0.1]", "[0.3,0.3,0.3]"):
        with pytest.raises(PonderError, match="ponder.router_fixed must hold extra_steps \\+ 1 = 3 positive"):
            make("ponderlm3", f"ponder.router_fixed={bad}")
    with pytest.raises(PonderError, match="ponder.router_fixed: halting runs do not read it"):
        load_config("tiny", ["method=halting", "ponder.extra_steps=2", f"ponder.router_fixed={fixed}"])


def test_router_warmup_trains_as_ponderlm2_then_hands_over_to_the_router():
    p3 = make("ponderlm3", "ponder.router_warmup_steps=3", "ponder.penalty=0.5").train()
    sharpen_router(p3, 0.3)
    p2 = make("ponderlm2").train()
    p2.backbone.load_state_dict(p3.backbone.state_dict())
    ids, targets = torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (2, 8))

    def loss_and_router_grad(step):
        p3.zero_grad()
        torch.manual_seed(1)  # the same draw of refine passes in both models
        loss, stats = p3.loss(ids, targets, train_step=step)
        loss.backward()
        return loss, stats, p3.router.weight.grad.abs().sum().item()

    loss, stats, grad = loss_and_router_grad(step=3)
    torch.manual_seed(1)
    # ponderlm2's loss plus the penalty on K extra steps, which the bypassed router cannot change
    torch.testing.assert_close(loss, p2.loss(ids, targets)[0] + 0.5 * 2)
    assert stats["step_mass_2"] == 1.0 and grad == 0.0
    loss, stats, grad = loss_and_router_grad(step=4)
    assert stats["step_mass_2"] < 1.0 and grad > 0

def test_truncated_backprop_keeps_the_forward_and_cuts_early_passes():
    ids, targets = torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (2, 8))
    losses, grads = [], []
    for passes in (0, 1):
        model = make("ponderlm2", "ponder.train_refine_passes=[2]", f"ponder.backprop_passes={passes}").train()
        loss, _ = model.loss(ids, targets)
        loss.backward()
        losses.append(loss.item())
        grads.append(model.backbone.layers[0].mlp.down_proj.weight.grad.clone())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert torch.isfinite(grads[1]).all() and grads[1].abs().sum() > 0
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("renormalize", [True, False])
def test_pruning_every_latent_slot_leaves_the_token_slots_alone(renormalize):
    model = make("ponderlm3", f"ponder.renormalize_pruned={str(renormalize).lower()}")
    with torch.no_grad():
        model.router.bias.copy_(torch.tensor([3.0, 0.0, 0.0]))  # w_1 ~ 0.09 < tau = 0.5: K_hat = 0 everywhere
    ids = torch.randint(0, VOCAB, (2, 9))
    backbone = model.backbone
    with torch.no_grad():
        pruned, used = model.infer(ids, tau=0.5)
        h0 = backbone.hidden_states(backbone.embed(ids))  # the token slots alone: every latent key is hidden
        s0 = model.route(h0[:, :, None])[0][..., :1]
        expected = backbone.lm_head(h0 if renormalize else s0 * h0)  # unrenormalised: shrunk by s_0
    assert (used == 0).all()
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(teacher_forced(model, ids, 0.5)[0], expected, rtol=1e-5, atol=1e-5)
