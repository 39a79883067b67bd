"""Fixed-compute baselines (docs/design.md §3), each K extra steps per token on the shared backbone.

- `pause`: K copies of one learned pause embedding after every token, all at the token's RoPE position; the next
  token is predicted from the last pause slot.
- `loop`: the whole layer stack applied K + 1 times with shared weights, final norm once.
- `ponderlm1`: K refinement passes that feed back the predicted distribution as a soft embedding,
  e = e0 + softmax(lm_head(h)) @ (c E), then a last pass for the logits.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from ponderlm.config import Config
from ponderlm.flops import causal_pass_flops, interleaved_inference_flops, multipass_inference_flops
from ponderlm.methods.base import Method
from ponderlm.model import KVCache


class FixedSteps(Method):
    """Shared plumbing: every token runs exactly K extra steps (K = 0: vanilla)."""

    def infer(self, input_ids: torch.Tensor, tau: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        extra = torch.full(input_ids.shape, self.max_extra_steps, dtype=torch.long, device=input_ids.device)
        return self.backbone.lm_head(self.output_states(input_ids)), extra

    @abstractmethod
    def output_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The states (B, T, d) the lm-head reads, after the K extra steps of every token."""

    def loss(self, input_ids, targets, train_step=None):
        return self.lm_loss(self.output_states(input_ids), targets), {}

    def _finish_decode(self, hidden: torch.Tensor, input_ids: torch.Tensor, cache: KVCache, slots: int,
                       extra_steps: list | None) -> torch.Tensor:
        """Commit the `slots` new cache entries, advance the token count, record K steps per token; next logits."""
        cache.commit(slots)
        cache.tokens += input_ids.shape[1]
        if extra_steps is not None:
            extra_steps += [torch.full((input_ids.shape[0],), self.max_extra_steps, dtype=torch.long)] * \
                input_ids.shape[1]
        return self.backbone.lm_head(hidden[:, -1])


class Pause(FixedSteps):
    name = "pause"
    latent_slots = True

    def __init__(self, config: Config):
        super().__init__(config)
        self.pause_embedding = nn.Parameter(torch.empty(config.model.hidden_size))
        std = (2.0 / (5 * config.model.hidden_size)) ** 0.5  # initialised and scaled like a token embedding
        nn.init.trunc_normal_(self.pause_embedding, std=std, a=-2 * std, b=2 * std)

    def slots(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Interleaved inputs (B, T * (K + 1), d) and their positions, relative to the first token."""
        batch, tokens = input_ids.shape
        K = self.max_extra_steps
        token_embeds = self.backbone.embed(input_ids)[:, :, None]
        pauses = (self.pause_embedding * self.backbone.embed_scale).expand(batch, tokens, K, -1)
        slots = torch.cat((token_embeds, pauses.to(token_embeds.dtype)), dim=2).flatten(1, 2)
        positions = torch.arange(tokens, device=input_ids.device).repeat_interleave(K + 1)
        return slots, positions

    def output_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        slots, positions = self.slots(input_ids)
        hidden = self.backbone.hidden_states(slots, positions)
        return hidden.view(*input_ids.shape, self.max_extra_steps + 1, -1)[:, :, -1]

    @torch.no_grad()
    def decode(self, input_ids, cache, tau=None, extra_steps=None):
        # The pause slots' inputs are known in advance, so all slots of the new tokens go in one causal chunk.
        slots, positions = self.slots(input_ids)
        hidden = self.backbone.hidden_states(slots, positions + cache.tokens, cache=cache)
        return self._finish_decode(hidden, input_ids, cache, slots.shape[1], extra_steps)

    def inference_flops(self, extra_steps: torch.Tensor) -> float:
        return interleaved_inference_flops(self.config.model, self.num_matmul_params(), extra_steps,
                                           self.per_token_flops())

    def training_flops_per_token(self) -> float:
        T = self.config.data.seq_len
        forward = causal_pass_flops(self.config.model, self.num_matmul_params(), (self.max_extra_steps + 1) * T)
        return 3 * (forward + T * self.per_token_flops()) / T


class Loop(FixedSteps):
    name = "loop"

    def final_states(self, input_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Final-norm states (B, T, d) after every pass; with a cache, each pass stores its own keys."""
        return self.backbone.hidden_states(self.backbone.embed(input_ids), cache=cache,
                                           repeats=self.max_extra_steps + 1)

    def output_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.final_states(input_ids, None)

    @torch.no_grad()
    def decode(self, input_ids, cache, tau=None, extra_steps=None):
        return self._finish_decode(self.final_states(input_ids, cache), input_ids, cache, input_ids.shape[1],
                                   extra_steps)

    def inference_flops(self, extra_steps: torch.Tensor) -> float:
        return multipass_inference_flops(self.config.model, self.num_matmul_params(), extra_steps,
                                         self.per_token_flops())

    def training_flops_per_token(self) -> float:
        T = self.config.data.seq_len
        forward = (self.max_extra_steps + 1) * causal_pass_flops(self.config.model, self.num_matmul_params(), T)
        return 3 * (forward + T * self.per_token_flops()) / T


class PonderLM1(Loop):
    name = "ponderlm1"

    def final_states(self, input_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """K soft-embedding refinement passes, then the last pass; final-norm states (B, T, d)."""
        base = self.backbone.embed(input_ids)
        scaled_embeddings = self.backbone.embed_tokens.weight * self.backbone.embed_scale
        inputs = base
        for refinement in range(self.max_extra_steps + 1):
            hidden = self.backbone.hidden_states(inputs, cache=cache, cache_pass=refinement)
            if refinement < self.max_extra_steps:
                probs = self.backbone.lm_head(hidden).float().softmax(-1)
                inputs = base + (probs.to(scaled_embeddings.dtype) @ scaled_embeddings).to(base.dtype)
        return hidden

    def per_token_flops(self) -> float:
        """An lm-head per pass, and the soft embedding (V x d) after each refinement pass."""
        m, K = self.config.model, self.max_extra_steps
        return (K + 1) * super().per_token_flops() + K * 2 * m.vocab_size * m.hidden_size
