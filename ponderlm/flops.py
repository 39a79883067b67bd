"""Analytic FLOPs (docs/design.md §5): the building blocks every method's own counter is made of.

Per executed slot or pass: 2 * N_nonembedding (every block matmul, forward) + 4 * n_layers * d * (keys that slot
attends to: q.k and attention-weighted v), plus what a method spends per token outside the blocks (the lm-head
2 * d * V per predicted distribution, a router, a soft embedding). Slots a token did not run are neither computed
nor attended to, so they cost nothing anywhere. Elementwise work (norms, activations, output mixtures) is not
counted, as in FlopCounterMode.

Extra steps come in two shapes: *interleaved* methods put a token's extra steps into extra slots of one sequence,
which later tokens also attend to; *multi-pass* methods run the layer stack once more over the plain token
sequence per extra step, each pass attending to its own keys.
"""

from __future__ import annotations

import torch

from ponderlm.schema import ModelConfig


def block_flops(model: ModelConfig, num_matmul_params: int, slots, keys):
    """Forward FLOPs of the layer stack for `slots` query slots that together attend to `keys` keys."""
    return 2 * num_matmul_params * slots + 4 * model.num_hidden_layers * model.hidden_size * keys


def lm_head_flops(model: ModelConfig) -> int:
    return 2 * model.hidden_size * model.vocab_size


def interleaved_inference_flops(model: ModelConfig, num_matmul_params: int, extra_steps: torch.Tensor,
                                per_token: float) -> float:
    """Total forward FLOPs to decode windows whose tokens ran `extra_steps` (B, T) extra slots each.

    Token t's slot k sees every slot of the tokens before it in its window plus slots 0..k of its own.
    """
    slots = extra_steps.double() + 1  # slots run per token, the token slot included
    before = slots.cumsum(dim=-1) - slots  # slots of earlier tokens in the window
    keys = slots * before + slots * (slots + 1) / 2  # sum over k = 0..K_hat of (before + k + 1)
    return (block_flops(model, num_matmul_params, slots, keys) + per_token).sum().item()


def multipass_inference_flops(model: ModelConfig, num_matmul_params: int, extra_steps: torch.Tensor,
                              per_token: float) -> float:
    """Total forward FLOPs for tokens that ran the layer stack 1 + `extra_steps` (B, T) times."""
    position = torch.arange(1, extra_steps.shape[-1] + 1, dtype=torch.float64).expand(extra_steps.shape)
    passes = extra_steps.double() + 1
    return (passes * block_flops(model, num_matmul_params, 1, position) + per_token).sum().item()


def causal_pass_flops(model: ModelConfig, num_matmul_params: int, length: int) -> float:
    """Forward FLOPs of one causal pass over a sequence of `length` slots (each query sees itself and before)."""
    return block_flops(model, num_matmul_params, length, length * (length + 1) / 2)
