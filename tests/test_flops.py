"""The analytic FLOPs counter against torch's FlopCounterMode (MATH attention backend, which it can see)."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ponderlm.config import load_config
from ponderlm.flops import inference_flops, training_flops_per_token
from ponderlm.methods import build_model


def make(method, *overrides):
    torch.manual_seed(0)
    config = load_config("tiny", [f"method={method}", "model.vocab_size=101", "ponder.steps=2", "data.seq_len=8",
                                  "ponder.train_refine_passes=[2]", *overrides])
    return build_model(config).eval()


def counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("method,tau", [("vanilla", 1e-4), ("pause", 1e-4), ("loop", 1e-4), ("ponderlm1", 1e-4),
                                        ("ponderlm2", 1e-4), ("ponderlm3", 0.0), ("ponderlm3", 0.3)])
def test_inference_flops_match_the_counted_decode(method, tau):
    model = make(method, f"ponder.tau={tau}")
    if method == "ponderlm3":
        with torch.no_grad():
            model.router.weight.normal_(0, 0.5)
    ids = torch.randint(0, 101, (1, 9))
    cache = model.new_cache(1, 9)
    used = []
    # Token by token, as inference runs: every slot's query meets exactly the keys it can see.
    measured = counted(lambda: [model.decode(ids[:, t : t + 1], cache, used) for t in range(9)])
    slots = torch.stack(used, dim=1)
    if method == "ponderlm3" and tau > 0:
        assert 0 < slots.float().mean() < 2  # pruning happened and the counter saw only the kept slots
    expected = inference_flops(model.config, model.backbone.num_matmul_params(), slots)
    if method == "pause":  # a token's K + 1 slots go in as one chunk: the kernel also scores the masked pairs
        m = model.config.model
        expected += 9 * (3 * 2 / 2) * 4 * m.num_hidden_layers * m.hidden_size
    assert expected == measured


@pytest.mark.parametrize("method", ["vanilla", "pause", "loop", "ponderlm1", "ponderlm2"])
def test_training_flops_match_the_counted_forward_and_backward(method):
    model = make(method).train()
    ids = torch.randint(0, 101, (2, 8))

    def step():
        model.loss(ids, ids)[0].backward()

    per_token = training_flops_per_token(model.config, model.backbone.num_matmul_params(), causal=False)
    assert per_token * ids.numel() == counted(step)


def test_causal_training_flops_count_half_the_attention_square():
    config = make("ponderlm2").config
    n_mm = 1000
    dense = training_flops_per_token(config, n_mm, causal=False)
    causal = training_flops_per_token(config, n_mm, causal=True)
    m, T, K = config.model, config.data.seq_len, config.ponder.steps
    widths = [1, 2] + [K + 1] * 3  # growth passes, then R = 2 refinement passes + the final pass
    saved = sum(4 * m.num_hidden_layers * m.hidden_size * (w * T) * (w * T - 1) / 2 for w in widths)
    assert dense - causal == pytest.approx(3 * saved / T)
