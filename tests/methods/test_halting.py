"""`halting`: online gates give w_k = c_1...c_k; decisions step by step at inference; PonderLM-3's mask and rule."""

import pytest
import torch

from ponderlm.config import load_config
from ponderlm.engine import Engine, Request
from ponderlm.errors import PonderError
from ponderlm.methods import build_model

VOCAB = 37


def make(*overrides, seed=0):
    torch.manual_seed(seed)
    config = load_config("tiny", ["method=halting", f"model.vocab_size={VOCAB}", "ponder.extra_steps=2", *overrides])
    return build_model(config).eval()


def random_gates(model, scale):
    with torch.no_grad():
        for gate in model.gates:
            gate.weight.normal_(0, scale)
            gate.bias.normal_(0, 1)
        if model.step_embedding is not None:
            model.step_embedding.normal_(0, 1)


@pytest.mark.parametrize("gate", ["per_step", "shared"])
def test_tail_mass_is_the_product_of_continue_probabilities(gate):
    model = make(f"options.halting.gate={gate}")
    random_gates(model, 0.5)
    states = torch.randn(3, 5, 3, model.config.model.hidden_size)
    s, log_w = model.route(states)
    with torch.no_grad():  # an independent computation of c_k = sigmoid(g_k(h^(k-1)))
        if gate == "per_step":
            c = [torch.sigmoid(states[..., k - 1, :] @ model.gates[k - 1].weight[0] + model.gates[k - 1].bias)
                 for k in (1, 2)]
        else:
            g = model.gates[0]
            c = [torch.sigmoid((states[..., k - 1, :] + model.step_embedding[k - 1]) @ g.weight[0] + g.bias)
                 for k in (1, 2)]
    w = torch.stack([torch.ones_like(c[0]), c[0], c[0] * c[1]], dim=-1)
    torch.testing.assert_close(log_w.exp(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s, torch.stack([1 - c[0], c[0] * (1 - c[1]), c[0] * c[1]], dim=-1),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.sum(-1), torch.ones(3, 5))


def test_decisive_gates_make_the_soft_forward_equal_the_pruned_one():
    model = make()
    random_gates(model, 200.0)  # saturated: every gate is open or shut, differently for different tokens
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        soft, soft_used = model.infer(ids, tau=0.0)
        pruned, pruned_used = model.infer(ids, tau=1e-4)
    assert (soft_used == 2).all() and len(pruned_used.unique()) > 1
    torch.testing.assert_close(soft, pruned, rtol=1e-4, atol=1e-4)


def test_a_shut_first_gate_stops_every_token_before_its_first_latent_step():
    model = make()
    with torch.no_grad():
        model.gates[0].bias.fill_(-30.0)  # c_1 ~ 1e-13
    ids = torch.randint(0, VOCAB, (1, 6)).tolist()[0]
    for tau, extra_steps, slots in ((1e-4, 0, 6), (0.0, 2, 18)):
        engine = Engine(model, max_batch=1)
        sequence = engine.add(Request(ids, tau=tau))
        list(engine.stream())
        assert sequence.extra_steps == [extra_steps] * 6 and engine.slot_rows == slots  # no latent slot ran


def test_warm_up_holds_every_gate_open_then_hands_over():
    model = make("ponder.router_warmup_steps=2", "ponder.penalty=0.5").train()
    random_gates(model, 0.3)
    ids, targets = torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (2, 8))
    p2 = make("method=ponderlm2").train()
    p2.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith("backbone.")})
    torch.manual_seed(1)
    loss, stats = model.loss(ids, targets, train_step=2)
    torch.manual_seed(1)
    torch.testing.assert_close(loss, p2.loss(ids, targets)[0] + 0.5 * 2)  # ponderlm2 plus the penalty on K steps
    assert stats["step_mass_2"] == 1.0
    assert model.loss(ids, targets, train_step=3)[1]["step_mass_2"] < 1.0


def test_a_bad_gate_option_is_one_clear_error():
    with pytest.raises(PonderError, match="options.halting.gate must be per_step or shared"):
        load_config("tiny", ["method=halting", "options.halting.gate=global"])
