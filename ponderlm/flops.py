"""Analytic FLOPs per token (DESIGN §5), for every method from the latent slots each token actually ran.

Per executed slot: 2 * N_nonembedding (every block matmul, forward) + 4 * n_layers * d * (keys that slot attends
to: q.k and attention-weighted v), plus the lm-head 2 * d * V once per token, plus the router 2 * d * (K + 1) for
ponderlm3. Slots a token did not run are neither computed nor attended to, so they cost nothing anywhere.
Elementwise work (norms, activations, the ponderlm3 output mixture) is not counted, as in FlopCounterMode.
"""

from __future__ import annotations

import torch

from ponderlm.config import Config


def per_token_flops(config: Config) -> float:
    """FLOPs spent once per token whatever its slots: the lm-head, and the router for ponderlm3."""
    m = config.model
    router = 2 * m.hidden_size * (config.ponder.steps + 1) if config.method == "ponderlm3" else 0
    return 2 * m.hidden_size * m.vocab_size + router


def inference_flops(config: Config, num_matmul_params: int, latent_slots: torch.Tensor) -> float:
    """Total forward FLOPs to decode windows whose tokens ran `latent_slots` (B, T) latent slots each.

    Token t's slot k sees every slot of the tokens before it in its window plus slots 0..k of its own.
    """
    m = config.model
    slots = latent_slots.double() + 1  # slots run per token, the token slot included
    before = slots.cumsum(dim=-1) - slots  # slots of earlier tokens in the window
    keys = slots * before + slots * (slots + 1) / 2  # sum over k = 0..K_hat of (before + k + 1)
    attention = 4 * m.num_hidden_layers * m.hidden_size * keys
    total = 2 * num_matmul_params * slots + attention + per_token_flops(config)
    return total.sum().item()


def training_flops_per_token(config: Config, num_matmul_params: int, causal: bool = True) -> float:
    """Forward + backward (3x forward) per token for one training sequence of data.seq_len tokens.

    Vanilla: one pass. Latent methods: every Jacobi pass (K growth passes of 1..K slots per token, then the mean
    number of refinement passes + 1 over all K + 1 slots), each pass over the interleaved causal sequence.
    causal=False counts every query against every key, as attention kernels that compute masked blocks do.
    """
    m, T = config.model, config.data.seq_len

    def pass_flops(width: int) -> float:
        length = width * T
        keys = length * (length + 1) / 2 if causal else length * length
        router = 2 * m.hidden_size * (config.ponder.steps + 1) * T if config.method == "ponderlm3" else 0
        return 2 * num_matmul_params * length + 4 * m.num_hidden_layers * m.hidden_size * keys + router

    if config.method == "vanilla":
        forward = pass_flops(1)
    else:
        K = config.ponder.steps
        mean_refine = sum(config.ponder.train_refine_passes) / len(config.ponder.train_refine_passes)
        forward = sum(pass_flops(width) for width in range(1, K + 1)) + (mean_refine + 1) * pass_flops(K + 1)
    forward += T * 2 * m.hidden_size * m.vocab_size
    return 3 * forward / T
