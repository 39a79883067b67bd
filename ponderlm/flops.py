"""Analytic FLOPs per token (DESIGN §5).

Per executed slot: 2 * N_nonembedding (every block matmul, forward) + 4 * n_layers * d * (keys that slot attends
to: q.k and attention-weighted v), plus the lm-head 2 * d * V once per predicted token.
"""

from __future__ import annotations

from ponderlm.config import Config


def slot_flops(config: Config, num_matmul_params: int, visible_keys: float) -> float:
    m = config.model
    return 2 * num_matmul_params + 4 * m.num_hidden_layers * m.hidden_size * visible_keys


def lm_head_flops(config: Config) -> float:
    return 2 * config.model.hidden_size * config.model.vocab_size


def vanilla_inference_flops_per_token(config: Config, num_matmul_params: int, context: int) -> float:
    """Mean forward FLOPs per token when scoring windows of `context` tokens (token t sees t + 1 keys)."""
    mean_visible = (context + 1) / 2
    return slot_flops(config, num_matmul_params, mean_visible) + lm_head_flops(config)


def training_flops_per_token(inference_flops: float) -> float:
    """Forward plus backward (about twice the forward)."""
    return 3 * inference_flops
