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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ponderlm.config import Config
from ponderlm.errors import PonderError
from ponderlm.flops import interleaved_inference_flops, lm_head_flops
from ponderlm.methods.latent import HARD_MASK, PonderLM3
from ponderlm.model import KVCache

OPEN_GATE = 1e4  # a continue logit whose log-sigmoid is 0 in float32: the gate of a bypassed (warm-up) step


@dataclass
class HaltingOptions:
    gate: str = "per_step"  # per_step: one Linear(d, 1) per latent step; shared: one Linear(d, 1) + a step embedding

    def __post_init__(self):
        if self.gate not in ("per_step", "shared"):
            raise PonderError(f"options.halting.gate must be per_step or shared, not {self.gate!r}")


class Halting(PonderLM3):
    name = "halting"
    Options = HaltingOptions

    def __init__(self, config: Config):
        super(PonderLM3, self).__init__(config)  # PonderLM-2's backbone and slots; gates instead of a router
        if config.ponder.router_fixed:
            raise PonderError(f"ponder.router_fixed is an ablation of {PonderLM3.name}'s router; {self.name} has "
                              "gates instead")
        K, d = self.max_extra_steps, config.model.hidden_size
        count = K if self.options.gate == "per_step" else 1
        self.gates = nn.ModuleList(nn.Linear(d, 1) for _ in range(count))
        for gate in self.gates:
            nn.init.zeros_(gate.weight)
            nn.init.constant_(gate.bias, config.ponder.router_init_bias)
        self.step_embedding = nn.Parameter(torch.zeros(K, d)) if self.options.gate == "shared" else None
        self._router_bypassed = False

    def continue_logit(self, step: int, state: torch.Tensor) -> torch.Tensor:
        """g_k(h^(k-1)) for latent step k = `step` (1..K) from the previous slot's state (..., d) -> (...)."""
        if self.step_embedding is None:
            logit = self.gates[step - 1](state)
        else:
            logit = self.gates[0](state + self.step_embedding[step - 1].to(state.dtype))
        logit = logit[..., 0].float()
        if self._router_bypassed:  # every gate open; `0 * logit` keeps the gates in the graph for DDP
            logit = 0 * logit + OPEN_GATE
        return logit

    def route(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """s and log w from the slot states known so far (..., j, d): w_k for k = 0..min(j, K).

        s is complete (w_{K+1} = 0) only once all K + 1 states are known; the soft mask needs log w alone.
        """
        known = min(states.shape[-2], self.max_extra_steps)
        log_continue = [F.logsigmoid(self.continue_logit(k, states[..., k - 1, :])) for k in range(1, known + 1)]
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

    def _decode_token(self, token_ids: torch.Tensor, cache: KVCache, tau: float):
        """The token slot, then latent slots while w_k >= tau for some row; rows already stopped hard-mask."""
        threshold = math.log(tau) if tau > 0 else float("-inf")
        no_bias = torch.zeros(len(token_ids), device=token_ids.device)
        hidden = self._slot(self.backbone.embed(token_ids[:, None]), cache, no_bias)  # the token slot: never masked
        states, log_w = [hidden], [no_bias]
        for k in range(1, self.max_extra_steps + 1):
            log_w.append(log_w[-1] + F.logsigmoid(self.continue_logit(k, hidden[:, 0])))
            kept = log_w[-1] >= threshold
            if not kept.any():
                break
            hidden = self._slot(hidden, cache, log_w[-1].masked_fill(~kept, HARD_MASK))
            states.append(hidden)
        log_w = torch.stack(log_w, dim=-1)
        keep = self.kept_slots(log_w, tau)
        s = self._slot_weights(log_w, complete=log_w.shape[1] == len(states))  # one weight per state run
        s = self.truncate(s, torch.arange(len(states), device=s.device) <= keep[:, None])
        return (s[..., None].to(hidden.dtype) * torch.cat(states, dim=1)).sum(dim=1), keep

    def mask_flops_per_token(self) -> float:
        """The K gates (an upper bound for the growth passes, which know fewer states)."""
        return 2 * self.config.model.hidden_size * self.max_extra_steps

    def inference_flops(self, extra_steps: torch.Tensor) -> float:
        """Gates run before each latent step until one stops: min(K_hat + 1, K) per token."""
        gates = (extra_steps + 1).clamp(max=self.max_extra_steps).double() * 2 * self.config.model.hidden_size
        return interleaved_inference_flops(self.config.model, self.num_matmul_params(), extra_steps,
                                           lm_head_flops(self.config.model) + gates)
