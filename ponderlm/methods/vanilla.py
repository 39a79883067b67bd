"""`vanilla`: the backbone as a standard causal language model, the reference every method is compared with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ponderlm.config import Config
from ponderlm.model import KVCache, Transformer


class Vanilla(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.backbone = Transformer(config.model)

    def forward(self, input_ids: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        """Next-token logits (B, T, V) for token ids (B, T). (tau: accepted for a uniform interface; unused.)"""
        return self.backbone.lm_head(self.backbone.hidden_states(self.backbone.embed(input_ids)))

    def infer(self, input_ids: torch.Tensor, tau: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the latent slots run per token: none."""
        return self(input_ids), torch.zeros(input_ids.shape, dtype=torch.long, device=input_ids.device)

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, step: int | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """The training objective and statistics worth logging (none beyond the loss for vanilla).

        step: the training step (from 1), for methods whose objective follows a schedule; None outside training.
        """
        logits = self(input_ids)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()), {}

    def new_cache(self, batch_size: int, max_tokens: int, dtype: torch.dtype = torch.float32) -> KVCache:
        device = self.backbone.lm_head.weight.device
        return KVCache(self.config.model, batch_size, max_tokens, dtype, device)

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, cache: KVCache, steps_used: list | None = None) -> torch.Tensor:
        """Feed (B, n) new tokens after the cached ones; return the logits (B, V) for the token after them."""
        hidden = self.backbone.hidden_states(self.backbone.embed(input_ids), cache=cache)
        cache.commit(input_ids.shape[1])
        cache.tokens += input_ids.shape[1]
        if steps_used is not None:
            steps_used += [torch.zeros(input_ids.shape[0], dtype=torch.long)] * input_ids.shape[1]
        return self.backbone.lm_head(hidden[:, -1])
