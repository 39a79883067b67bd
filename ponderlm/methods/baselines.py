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

from ponderlm.schema import Config
from ponderlm.flops import causal_pass_flops, interleaved_inference_flops, multipass_inference_flops
from ponderlm.methods.base import DecodeState, Method
from ponderlm.model import init_normal_, init_std


class FixedSteps(Method):
    """Shared plumbing: every token runs exactly K extra steps (K = 0: vanilla)."""

    settings = ("extra_steps",)

    parallel_prefill = True

    def infer(self, input_ids: torch.Tensor, tau: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        extra = torch.full(input_ids.shape, self.max_extra_steps, dtype=torch.long, device=input_ids.device)
        return self.backbone.lm_head(self.output_states(input_ids)), extra

    @abstractmethod
    def output_states(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """The states (B, T, d) the lm-head reads, after the K extra steps of every token; with a prefill view of
        the engine's cache, every slot's keys are stored there."""

    def loss(self, input_ids, targets, train_step=None):
        return self.lm_loss(self.output_states(input_ids), targets), {}

    def prefill(self, input_ids, cache):
        extra = torch.full(input_ids.shape, self.max_extra_steps, dtype=torch.long, device=input_ids.device)
        return self.output_states(input_ids, cache), extra


class PassState(DecodeState):
    """`loop`, `vanilla`, `ponderlm1`: pass p of a token is slot p, in cache group p (each pass has its own keys)."""

    passes = True

    def absorb(self, hidden):
        rows, K = len(hidden), self.method.max_extra_steps
        self.previous[:rows] = hidden  # the residual stream goes on into the next pass
        return self.phase[:rows] == K, self.backbone.norm(hidden), torch.full_like(self.phase[:rows], K)


class Pause(FixedSteps):
    name = "pause"
    latent_slots = True

    def __init__(self, config: Config):
        super().__init__(config)
        self.pause_embedding = nn.Parameter(torch.empty(config.model.hidden_size))
        init_normal_(self.pause_embedding, init_std(config.model.hidden_size))  # initialised like a token embedding

    def slots(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Interleaved inputs (B, T * (K + 1), d) and their positions, relative to the first token."""
        batch, tokens = input_ids.shape
        K = self.max_extra_steps
        token_embeds = self.backbone.embed(input_ids)[:, :, None]
        pauses = (self.pause_embedding * self.backbone.embed_scale).expand(batch, tokens, K, -1)
        slots = torch.cat((token_embeds, pauses.to(token_embeds.dtype)), dim=2).flatten(1, 2)
        positions = torch.arange(tokens, device=input_ids.device).repeat_interleave(K + 1)
        return slots, positions

    def output_states(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        slots, positions = self.slots(input_ids)
        hidden = self.backbone.hidden_states(slots, positions, cache=cache)
        return hidden.view(*input_ids.shape, self.max_extra_steps + 1, -1)[:, :, -1]

    def decode_state(self, capacity: int) -> DecodeState:
        return PauseState(self, capacity)

    def inference_flops(self, extra_steps: torch.Tensor) -> float:
        return interleaved_inference_flops(self.config.model, self.num_matmul_params(), extra_steps,
                                           self.per_token_flops())

    def training_flops_per_token(self) -> float:
        T = self.config.data.seq_len
        return self.backprop_flops_per_token(
            causal_pass_flops(self.config.model, self.num_matmul_params(), (self.max_extra_steps + 1) * T))


class PauseState(DecodeState):
    """The token's slot, then K slots whose input is the pause embedding; all in group 0."""

    def next_slots(self, rows, starting, token_embeds):
        phase = self.advance(rows, starting)
        pause = (self.method.pause_embedding * self.backbone.embed_scale).to(token_embeds.dtype)
        inputs = torch.where(starting[:, None], token_embeds, pause)
        return inputs, torch.zeros_like(phase), torch.zeros(rows, device=phase.device)

    def absorb(self, hidden):
        K = self.method.max_extra_steps
        phase = self.phase[: len(hidden)]
        return phase == K, self.backbone.norm(hidden), torch.full_like(phase, K)


class Loop(FixedSteps):
    name = "loop"

    def output_states(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """Final-norm states (B, T, d) after every pass; with a cache, pass p stores its keys in group p."""
        return self.backbone.hidden_states(self.backbone.embed(input_ids), cache=cache,
                                           repeats=self.max_extra_steps + 1)

    def decode_state(self, capacity: int) -> DecodeState:
        return PassState(self, capacity)

    def inference_flops(self, extra_steps: torch.Tensor) -> float:
        return multipass_inference_flops(self.config.model, self.num_matmul_params(), extra_steps,
                                         self.per_token_flops())

    def training_flops_per_token(self) -> float:
        T = self.config.data.seq_len
        return self.backprop_flops_per_token(
            (self.max_extra_steps + 1) * causal_pass_flops(self.config.model, self.num_matmul_params(), T))


class PonderLM1(Loop):
    name = "ponderlm1"

    def output_states(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """K soft-embedding refinement passes, then the last pass; final-norm states (B, T, d)."""
        base = self.backbone.embed(input_ids)
        inputs = base
        for refinement in range(self.max_extra_steps + 1):
            hidden = self.backbone.hidden_states(inputs, cache=cache, cache_pass=refinement)
            if refinement < self.max_extra_steps:
                inputs = self.refined_inputs(base, hidden)
        return hidden

    def refined_inputs(self, base: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The next pass's inputs e0 + softmax(lm_head(h)) @ (c E), from the token embeddings and this pass's states."""
        scaled_embeddings = self.backbone.embed_tokens.weight * self.backbone.embed_scale
        probs = self.backbone.lm_head(hidden).float().softmax(-1)
        return base + (probs.to(scaled_embeddings.dtype) @ scaled_embeddings).to(base.dtype)

    def decode_state(self, capacity: int) -> DecodeState:
        return SoftEmbeddingState(self, capacity)

    def per_token_flops(self) -> float:
        """An lm-head per pass, and the soft embedding (V x d) after each refinement pass."""
        m, K = self.config.model, self.max_extra_steps
        return (K + 1) * super().per_token_flops() + K * 2 * m.vocab_size * m.hidden_size


class SoftEmbeddingState(PassState):
    """`ponderlm1`: pass p in group p, each pass's input refined from the previous pass's prediction."""

    def __init__(self, method: PonderLM1, capacity: int):
        super().__init__(method, capacity)
        self.token_embeds = torch.zeros_like(self.previous)

    def next_slots(self, rows, starting, token_embeds):
        self.token_embeds[:rows] = torch.where(starting[:, None], token_embeds, self.token_embeds[:rows])
        return super().next_slots(rows, starting, token_embeds)

    def absorb(self, hidden):
        rows, K = len(hidden), self.method.max_extra_steps
        states = self.backbone.norm(hidden)
        going = (self.phase[:rows] < K).nonzero()[:, 0]  # the last pass feeds nothing on
        if len(going):
            self.previous[going] = self.method.refined_inputs(self.token_embeds[going], states[going])
        return self.phase[:rows] == K, states, torch.full_like(self.phase[:rows], K)
