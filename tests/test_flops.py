"""Every method's analytic FLOPs against torch's FlopCounterMode (MATH attention backend, which it can see)."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ponderlm.config import load_config
from ponderlm.engine import teacher_forced
from ponderlm.methods import build_model


def make(method, *overrides):
    torch.manual_seed(0)
    config = load_config("tiny", [f"method={method}", "model.vocab_size=101", "data.seq_len=8"],
                         shared=["ponder.extra_steps=2", "ponder.train_refine_passes=[2]", *overrides])
    return build_model(config).eval()


def counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("method,tau", [("vanilla", 1e-4), ("pause", 1e-4), ("loop", 1e-4), ("ponderlm1", 1e-4),
                                        ("ponderlm2", 1e-4), ("ponderlm3", 0.0), ("ponderlm3", 0.3),
                                        ("halting", 0.0), ("halting", 0.3), ("mor", 1e-4)])
def test_inference_flops_match_the_counted_decode(method, tau):
    model = make(method, f"ponder.tau={tau}")
    if model.adaptive:  # a router or gates that give tokens different numbers of steps
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if not name.startswith("backbone.") and parameter.dim() == 2:
                    parameter.normal_(0, 0.5)
    ids = torch.randint(0, 101, (1, 9))
    # Slot by slot through the engine, as inference runs: every slot's query meets exactly the keys it can see.
    results = []
    measured = counted(lambda: results.append(teacher_forced(model, ids, prefill=False)))
    slots = results[0][1]
    if model.adaptive and tau > 0:
        assert 0 < slots.float().mean() < 2  # pruning happened and the counter saw only the kept slots
    expected = model.inference_flops(slots)
    if method in ("loop", "ponderlm1", "mor"):
        # The engine keeps one sequence of keys per row; a pass's query also scores the other passes' keys there,
        # which the mask hides: the counter sees those pairs, the analytic count (what the method needs) does not.
        hidden_pairs, cached, ran = 0, 0, []
        for extra in slots[0].tolist():
            for p in range(extra + 1):
                cached += 1
                hidden_pairs += cached - (sum(e >= p for e in ran) + 1)
            ran.append(extra)
        m = model.config.model
        expected += hidden_pairs * 4 * m.num_hidden_layers * m.hidden_size
    assert expected == measured


def pass_lengths(method: str, K: int, T: int, refine: int) -> list[int]:
    """The sequence length of every forward pass one training step makes over T tokens."""
    if method == "vanilla":
        return [T]
    if method == "pause":
        return [(K + 1) * T]
    if method in ("loop", "ponderlm1"):
        return [T] * (K + 1)
    return [width * T for width in range(1, K + 1)] + [(K + 1) * T] * (refine + 1)  # growth, refinement, final


@pytest.mark.parametrize("method,backprop", [("vanilla", 0), ("pause", 0), ("loop", 0), ("ponderlm1", 0),
                                             ("ponderlm2", 0), ("ponderlm2", 2)])
def test_training_flops_match_the_counted_forward_and_backward(method, backprop):
    model = make(method, f"ponder.backprop_passes={backprop}").train()
    ids = torch.randint(0, 101, (2, 8))

    def step():
        model.loss(ids, ids)[0].backward()

    # The analytic count is causal; the MATH kernel also scores the masked half of every pass's square, forward
    # in every pass and backward (2x) in the passes gradients flow through.
    m = model.config.model
    pairs = [n * (n - 1) / 2 for n in pass_lengths(method, 2, 8, refine=2)]
    masked_pairs = sum(pairs) + 2 * sum(pairs[-backprop:] if backprop else pairs)
    masked = 4 * m.num_hidden_layers * m.hidden_size * masked_pairs * ids.shape[0]
    assert model.training_flops_per_token() * ids.numel() + masked == counted(step)
