"""Fixed-compute baselines (DESIGN §3), each K extra steps per token on the shared backbone.

- `pause`: K copies of one learned pause embedding after every token, all at the token's RoPE position; the next
  token is predicted from the last pause slot.
- `loop`: the whole layer stack applied K + 1 times with shared weights, final norm once.
- `ponderlm1`: K refinement passes that feed back the predicted distribution as a soft embedding,
  e = e0 + softmax(lm_head(h)) @ (c E), then a last pass for the logits.
"""

from __future__ import annotations

import torch
from torch import nn

from ponderlm.config import Config
from ponderlm.methods.vanilla import Vanilla
from ponderlm.model import KVCache


class FixedSteps(Vanilla):
    """Shared plumbing: every token runs exactly K extra steps."""

    def __init__(self, config: Config):
        super().__init__(config)
        self.steps = config.ponder.steps

    def infer(self, input_ids: torch.Tensor, tau: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self(input_ids), torch.full(input_ids.shape, self.steps, dtype=torch.long, device=input_ids.device)

    def _finish_decode(self, hidden: torch.Tensor, input_ids: torch.Tensor, cache: KVCache, slots: int,
                       steps_used: list | None) -> torch.Tensor:
        """Commit the `slots` new cache entries, advance the token count, record K steps per token; next logits."""
        cache.commit(slots)
        cache.tokens += input_ids.shape[1]
        if steps_used is not None:
            steps_used += [torch.full((input_ids.shape[0],), self.steps, dtype=torch.long)] * input_ids.shape[1]
        return self.backbone.lm_head(hidden[:, -1])


class Pause(FixedSteps):
    def __init__(self, config: Config):
        super().__init__(config)
        self.pause_embedding = nn.Parameter(torch.empty(config.model.hidden_size))
        std = (2.0 / (5 * config.model.hidden_size)) ** 0.5  # initialised and scaled like a token embedding
        nn.init.trunc_normal_(self.pause_embedding, std=std, a=-2 * std, b=2 * std)

    def _slots(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Interleaved inputs (B, T * (K + 1), d) and their positions, relative to the first token."""
        batch, tokens = input_ids.shape
        token_embeds = self.backbone.embed(input_ids)[:, :, None]
        pauses = (self.pause_embedding * self.backbone.embed_scale).expand(batch, tokens, self.steps, -1)
        slots = torch.cat((token_embeds, pauses.to(token_embeds.dtype)), dim=2).flatten(1, 2)
        positions = torch.arange(tokens, device=input_ids.device).repeat_interleave(self.steps + 1)
        return slots, positions

    def forward(self, input_ids: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        slots, positions = self._slots(input_ids)
        hidden = self.backbone.hidden_states(slots, positions)
        return self.backbone.lm_head(hidden.view(*input_ids.shape, self.steps + 1, -1)[:, :, -1])

    def new_cache(self, batch_size: int, max_tokens: int, dtype: torch.dtype = torch.float32) -> KVCache:
        device = self.backbone.lm_head.weight.device
        return KVCache(self.config.model, batch_size, max_tokens * (self.steps + 1), dtype, device)

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, cache: KVCache, steps_used: list | None = None) -> torch.Tensor:
        # The pause slots' inputs are known in advance, so all slots of the new tokens go in one causal chunk.
        slots, positions = self._slots(input_ids)
        hidden = self.backbone.hidden_states(slots, positions + cache.tokens, cache=cache)
        return self._finish_decode(hidden, input_ids, cache, slots.shape[1], steps_used)


class Loop(FixedSteps):
    def _final_states(self, input_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        return self.backbone.hidden_states(self.backbone.embed(input_ids), cache=cache, repeats=self.steps + 1)

    def forward(self, input_ids: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        return self.backbone.lm_head(self._final_states(input_ids, None))

    def new_cache(self, batch_size: int, max_tokens: int, dtype: torch.dtype = torch.float32) -> KVCache:
        device = self.backbone.lm_head.weight.device
        return KVCache(self.config.model, batch_size, max_tokens, dtype, device, passes=self.steps + 1)

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, cache: KVCache, steps_used: list | None = None) -> torch.Tensor:
        return self._finish_decode(self._final_states(input_ids, cache), input_ids, cache, input_ids.shape[1],
                                   steps_used)


class PonderLM1(Loop):
    def _final_states(self, input_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """K soft-embedding refinement passes, then the last pass; final-norm states (B, T, d)."""
        base = self.backbone.embed(input_ids)
        scaled_embeddings = self.backbone.embed_tokens.weight * self.backbone.embed_scale
        inputs = base
        for step in range(self.steps + 1):
            hidden = self.backbone.hidden_states(inputs, cache=cache, cache_pass=step)
            if step < self.steps:
                probs = self.backbone.lm_head(hidden).float().softmax(-1)
                inputs = base + (probs.to(scaled_embeddings.dtype) @ scaled_embeddings).to(base.dtype)
        return hidden
