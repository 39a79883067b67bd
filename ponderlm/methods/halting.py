"""`halting`: PonderLM-2's latent slots with online halting instead of PonderLM-3's upfront router.

docs/design.md §4.3. Before latent step k = 1..K a gate reads the previous slot's state and gives a continue
probability c_{t,k} = sigmoid(g_k(h_t^(k-1))); w_{t,0} = 1, w_{t,k} = c_{t,1} ... c_{t,k}, and
s_{t,k} = w_{t,k} - w_{t,k+1} (w_{t,K+1} = 0). Everything else is PonderLM-3's: log w_k on latent key k as the soft
mask, the mixture sum_k s_k h^(k), the penalty on sum_{k>=1} w_k, and the hard rule K_hat = max{k : w_k >= tau}.
At inference the rule is applied step by step, since w_k is known only once slot k - 1 has run. In Jacobi
training the gates read the previous pass's states. The one difference from PonderLM-3 is where the decision is
made: online, from the latest latent state, rather than upfront from h^(0) (the family of AdaPonderLM,
arXiv 2603.01914, and token-level adaptive latent CoT, arXiv 2602.08220).

`ponder.router_init_bias` is the gates' initial continue logit (> 0 starts near PonderLM-2, as for PonderLM-3's
router) and `ponder.router_warmup_steps` holds every gate open for the first steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ponderlm.schema import Config
from ponderlm.errors import PonderError
from ponderlm.flops import interleaved_inference_flops, lm_head_flops
from ponderlm.methods.base import SOURCE_MARGIN, DecodeState
from ponderlm.methods.latent import AdaptiveLatent, LatentState

OPEN_GATE = 1e4  # a continue logit whose log-sigmoid is 0 in float32: the gate of a bypassed (warm-up) step


@dataclass
class HaltingOptions:
    gate: str = "per_step"  # per_step: one Linear(d, 1) per latent step; shared: one Linear(d, 1) + a step embedding

    def __post_init__(self):
        if self.gate not in ("per_step", "shared"):
            raise PonderError(f"options.halting.gate must be per_step or shared, not {self.gate!r}")


class Halting(AdaptiveLatent):
    name = "halting"
    Options = HaltingOptions

    def __init__(self, config: Config):
        super().__init__(config)
        K, d = self.max_extra_steps, config.model.hidden_size
        count = K if self.options.gate == "per_step" else 1
        self.gates = nn.ModuleList(nn.Linear(d, 1) for _ in range(count))
        for gate in self.gates:
            nn.init.zeros_(gate.weight)
            nn.init.constant_(gate.bias, config.ponder.router_init_bias)
        self.step_embedding = nn.Parameter(torch.zeros(K, d)) if self.options.gate == "shared" else None

    def start_as_source(self) -> bool:
        """Every gate closed by the margin: w_1 = sigmoid(-12), so the output is h^(0), the backbone's."""
        with torch.no_grad():
            for gate in self.gates:
                gate.weight.zero_()
                gate.bias.fill_(-SOURCE_MARGIN)
            if self.step_embedding is not None:
                self.step_embedding.zero_()
        return True

    def continue_logit(self, step: int, state: torch.Tensor, warming_up: bool = False) -> torch.Tensor:
        """g_k(h^(k-1)) for latent step k = `step` (1..K) from the previous slot's state (..., d) -> (...); open
        while warming up."""
        if self.step_embedding is None:
            logit = self.gates[step - 1](state)
        else:
            logit = self.gates[0](state + self.step_embedding[step - 1].to(state.dtype))
        logit = logit[..., 0].float()
        return self.overridden(logit, OPEN_GATE) if warming_up else logit

    def route(self, states, warming_up=False):
        """s and log w from the slot states known so far (..., j, d): w_k for k = 0..min(j, K).

        s is complete (w_{K+1} = 0) only once all K + 1 states are known; the soft mask needs log w alone.
        """
        known = min(states.shape[-2], self.max_extra_steps)
        log_continue = [F.logsigmoid(self.continue_logit(k, states[..., k - 1, :], warming_up))
                        for k in range(1, known + 1)]
        zero = states.new_zeros(states.shape[:-2], dtype=torch.float32)
        log_w = torch.stack([zero, *log_continue], dim=-1).cumsum(-1)
        return self._slot_weights(log_w, complete=known == self.max_extra_steps), log_w

    @staticmethod
    def _slot_weights(log_w: torch.Tensor, complete: bool) -> torch.Tensor:
        """s_k = w_k - w_{k+1} from log w (..., n); complete: w_n = 0 follows (all K steps known), else s has n - 1."""
        w = log_w.exp()
        if complete:
            w = torch.cat((w, torch.zeros_like(w[..., :1])), dim=-1)
        return w[..., :-1] - w[..., 1:]

    def continue_logits_at(self, steps: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """g_k(h^(k-1)) for a different latent step k = steps[i] (1..K) per row i, from states (rows, d)."""
        if self.step_embedding is None:  # each row's own gate: (rows, 1, d) @ (rows, d, 1)
            weight = torch.cat([gate.weight for gate in self.gates])[steps - 1]
            bias = torch.cat([gate.bias for gate in self.gates])[steps - 1]
            logits = torch.bmm(states[:, None], weight[:, :, None].to(states.dtype))[:, 0, 0] + bias
        else:
            logits = self.gates[0](states + self.step_embedding[steps - 1].to(states.dtype))[:, 0]
        return logits.float()

    def decode_state(self, capacity: int) -> DecodeState:
        return HaltingState(self, capacity)

    def mask_flops_per_token(self) -> float:
        """The K gates (an upper bound for the growth passes, which know fewer states)."""
        return 2 * self.config.model.hidden_size * self.max_extra_steps

    def inference_flops(self, extra_steps: torch.Tensor) -> float:
        """Gates run before each latent step until one stops: min(K_hat + 1, K) per token."""
        gates = (extra_steps + 1).clamp(max=self.max_extra_steps).double() * 2 * self.config.model.hidden_size
        return interleaved_inference_flops(self.config.model, self.num_matmul_params(), extra_steps,
                                           lm_head_flops(self.config.model) + gates)


class HaltingState(LatentState):
    """After slot k runs, gate k + 1 reads its state: w_{k+1} = w_k c_{k+1}; slot k + 1 runs if w_{k+1} >= tau (and
    k < K), with its key biased by log w_{k+1}. s_k = w_k - w_{k+1} is known once slot k runs, so the mixture
    accumulates as the slots run and is renormalised by the kept mass 1 - w_{K_hat + 1} at the end."""

    def __init__(self, method: Halting, capacity: int):
        super().__init__(method, capacity)
        self.log_w = torch.zeros(capacity, device=self.phase.device)  # log w of the slot that runs now
        self.kept_mass = torch.zeros(capacity, device=self.phase.device)
        self.expected = torch.zeros(capacity, device=self.phase.device)  # sum of the w_k computed so far, k >= 1
        self.mixture = torch.zeros_like(self.previous)

    def next_slots(self, rows, starting, token_embeds):
        inputs, group, _ = super().next_slots(rows, starting, token_embeds)
        self.log_w[:rows].masked_fill_(starting, 0.0)  # w_0 = 1: the token slot is never masked
        return inputs, group, self.log_w[:rows].clone()

    def absorb(self, hidden):
        rows, method, K = len(hidden), self.method, self.method.max_extra_steps
        states = self.backbone.norm(hidden)
        self.previous[:rows] = states
        phase, log_w = self.phase[:rows], self.log_w[:rows]
        started = phase == 0
        next_log_w = torch.full_like(log_w, float("-inf"))  # w_{K+1} = 0
        gated = (phase < K).nonzero()[:, 0]  # gate k + 1 runs after slot k, k < K
        if len(gated):
            next_log_w[gated] = log_w[gated] + F.logsigmoid(method.continue_logits_at(phase[gated] + 1, states[gated]))
        last = phase == K
        s = log_w.exp() - next_log_w.exp()
        mixture = torch.where(started[:, None], 0.0, self.mixture[:rows]) + s[:, None].to(states.dtype) * states
        kept_mass = torch.where(started, 0.0, self.kept_mass[:rows]) + s
        self.expected[:rows] = torch.where(started, 0.0, self.expected[:rows]) + next_log_w.exp()
        finished = last | (next_log_w < self.log_tau[:rows])
        self.mixture[:rows], self.kept_mass[:rows], self.log_w[:rows] = mixture, kept_mass, next_log_w
        if method.config.ponder.renormalize_pruned:
            mixture = mixture / kept_mass[:, None].to(mixture.dtype)
        return finished, mixture, phase.clone()

    def expected_extra_steps(self, rows):
        """sum_k w_k over the gates run: a stopped token's later w_k (each below tau) were never computed."""
        return self.expected[rows]
