"""Analytic FLOPs per token (DESIGN §5), for every method from the extra steps each token actually ran.

Per executed slot or pass: 2 * N_nonembedding (every block matmul, forward) + 4 * n_layers * d * (keys that slot
attends to: q.k and attention-weighted v), plus the lm-head 2 * d * V per predicted distribution, plus the router
2 * d * (K + 1) for ponderlm3 and the soft embedding 2 * V * d per refinement for ponderlm1. Slots a token did not
run are neither computed nor attended to, so they cost nothing anywhere. Elementwise work (norms, activations, the
ponderlm3 output mixture) is not counted, as in FlopCounterMode.

Methods come in two shapes: *interleaved* (vanilla, pause, ponderlm2, ponderlm3) put a token's extra steps into
extra slots of one sequence, which later tokens also attend to; *multi-pass* (loop, ponderlm1) run the layer stack
K + 1 times over a plain token sequence, each pass attending to its own keys.
"""

from __future__ import annotations

import torch

from ponderlm.config import Config

MULTI_PASS = ("loop", "ponderlm1")


def _block_flops(config: Config, num_matmul_params: int, slots, keys):
    return 2 * num_matmul_params * slots + 4 * config.model.num_hidden_layers * config.model.hidden_size * keys


def per_token_flops(config: Config) -> float:
    """FLOPs spent per token outside the blocks: lm-head(s), the router, the soft embedding."""
    m, K = config.model, config.ponder.steps
    head = 2 * m.hidden_size * m.vocab_size
    if config.method == "ponderlm1":
        return (K + 1) * head + K * 2 * m.vocab_size * m.hidden_size
    if config.method == "ponderlm3":
        return head + 2 * m.hidden_size * (K + 1)
    return head


def inference_flops(config: Config, num_matmul_params: int, extra_steps: torch.Tensor) -> float:
    """Total forward FLOPs to decode windows whose tokens ran `extra_steps` (B, T) extra steps each.

    Interleaved: token t's slot k sees every slot of the tokens before it in its window plus slots 0..k of its own.
    """
    if config.method in MULTI_PASS:
        position = torch.arange(1, extra_steps.shape[-1] + 1, dtype=torch.float64).expand(extra_steps.shape)
        passes = extra_steps.double() + 1
        total = passes * _block_flops(config, num_matmul_params, 1, position) + per_token_flops(config)
        return total.sum().item()
    slots = extra_steps.double() + 1  # slots run per token, the token slot included
    before = slots.cumsum(dim=-1) - slots  # slots of earlier tokens in the window
    keys = slots * before + slots * (slots + 1) / 2  # sum over k = 0..K_hat of (before + k + 1)
    total = _block_flops(config, num_matmul_params, slots, keys) + per_token_flops(config)
    return total.sum().item()


def training_flops_per_token(config: Config, num_matmul_params: int, causal: bool = True) -> float:
    """Forward + backward (3x forward) per token for one training sequence of data.seq_len tokens.

    Latent methods count every Jacobi pass: K growth passes of 1..K slots per token, then the mean number of
    refinement passes + 1 over all K + 1 slots, each over the interleaved causal sequence.
    causal=False counts every query against every key, as attention kernels that compute masked blocks do.
    """
    T, K = config.data.seq_len, config.ponder.steps

    def pass_flops(width: int) -> float:
        length = width * T
        keys = length * (length + 1) / 2 if causal else length * length
        return _block_flops(config, num_matmul_params, length, keys)

    if config.method == "vanilla":
        forward = pass_flops(1)
    elif config.method in MULTI_PASS:
        forward = (K + 1) * pass_flops(1)
    elif config.method == "pause":
        forward = pass_flops(K + 1)
    else:
        mean_refine = sum(config.ponder.train_refine_passes) / len(config.ponder.train_refine_passes)
        forward = sum(pass_flops(width) for width in range(1, K + 1)) + (mean_refine + 1) * pass_flops(K + 1)
        if config.method == "ponderlm3":  # the router also runs on every pass that feeds a bias to the next one
            forward += (K + mean_refine) * T * 2 * config.model.hidden_size * (K + 1)
    forward += T * per_token_flops(config)
    return 3 * forward / T
