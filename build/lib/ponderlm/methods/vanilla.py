"""`vanilla`: the backbone as a standard causal language model, the reference every method is compared with."""

from __future__ import annotations

import torch

from ponderlm.config import Config
from ponderlm.flops import causal_pass_flops, multipass_inference_flops
from ponderlm.methods.base import Method
from ponderlm.model import KVCache


class Vanilla(Method):
    name = "vanilla"

    def __init__(self, config: Config):
        super().__init__(config, max_extra_steps=0)

    def infer(self, input_ids: torch.Tensor, tau: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.backbone.lm_head(self.backbone.hidden_states(self.backbone.embed(input_ids)))
        return logits, torch.zeros(input_ids.shape, dtype=torch.long, device=input_ids.device)

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, cache: KVCache, tau: float | None = None,
               extra_steps: list[torch.Tensor] | None = None) -> torch.Tensor:
        hidden = self.backbone.hidden_states(self.backbone.embed(input_ids), cache=cache)
        cache.commit(input_ids.shape[1])
        cache.tokens += input_ids.shape[1]
        if extra_steps is not None:
            extra_steps += [torch.zeros(input_ids.shape[0], dtype=torch.long)] * input_ids.shape[1]
        return self.backbone.lm_head(hidden[:, -1])

    def inference_flops(self, extra_steps: torch.Tensor) -> float:
        return multipass_inference_flops(self.config.model, self.num_matmul_params(), extra_steps,
                                         self.per_token_flops())

    def training_flops_per_token(self) -> float:
        T = self.config.data.seq_len
        forward = causal_pass_flops(self.config.model, self.num_matmul_params(), T) + T * self.per_token_flops()
        return 3 * forward / T
