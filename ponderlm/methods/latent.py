"""Latent thoughts: `ponderlm2` (K fixed latent slots per token) and `ponderlm3` (a learned share of K).

Layout (docs/design.md §4.1): slots interleave as [x_1, z_1^1..z_1^K, x_2, ...]; every slot of token t sits at
RoPE position t; latent slot (t, k) takes as input the final-norm output h_t^(k-1) of the slot before it. Training
solves this recurrence in parallel by Jacobi iteration: growth passes with 1..K slots per token, then refinement
passes over all K + 1 slots; each pass feeds the previous pass's outputs in as latent inputs. Decoding with a KV
cache runs the slots of each token one after another, which is the fixed point the Jacobi passes approach.

`AdaptiveLatent` is the family of learned allocations over those slots (PonderLM-3 here, `halting` in halting.py).
PonderLM-3 (docs/design.md §4.2) adds a router on h^(0): s = softmax(router(h^(0))) over k = 0..K and the tail
mass w_k = sum_{j>=k} s_j. log w_k is added to every query's attention logit for latent key (t, k) (a soft mask),
and the output is the mixture sum_k s_k h^(k). At inference, slots with w_k < tau are pruned: never computed,
never cached; the mixture is truncated there and renormalised over the kept slots (`ponder.renormalize_pruned`).
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from ponderlm.schema import Config
from ponderlm.flops import causal_pass_flops, interleaved_inference_flops
from ponderlm.methods.base import SOURCE_MARGIN, DecodeState, Inspection, Method
from ponderlm.model import HARD_MASK



def log_tail_mass(router_logits: torch.Tensor) -> torch.Tensor:
    """log w_k = log sum_{j>=k} softmax(logits)_j for k = 0..K, as logsumexp(tail) - logsumexp(all).

    Never the log of a small sum: stays finite for any finite logits.
    """
    tails = torch.logcumsumexp(router_logits.flip(-1), dim=-1).flip(-1)
    return tails - tails[..., :1]


class PonderLM2(Method):
    name = "ponderlm2"
    settings = ("extra_steps", "train_refine_passes", "eval_refine_passes", "backprop_passes")
    latent_slots = True
    exact_parallel = False  # Jacobi passes approach the sequential recurrence; the engine computes it exactly

    # ----- parallel forward (training and evaluation) -----

    def _slot_bias(self, states: torch.Tensor, slots: int, tau: float | None, warming_up: bool
                   ) -> torch.Tensor | None:
        """Per-key attention bias (B, T * slots) for a pass with `slots` slots per token, from the previous
        pass's states (B, T, slots - 1, d); None: no bias. warming_up: a training step of the router warm-up."""
        return None

    def _pass(self, token_embeds: torch.Tensor, latent_inputs: torch.Tensor, bias: torch.Tensor | None):
        """One Jacobi pass: token slots plus latent slots (B, T, j-1, d) -> final-norm outputs (B, T, j, d)."""
        batch, tokens, dim = token_embeds.shape
        slots = torch.cat((token_embeds[:, :, None], latent_inputs), dim=2)
        per_token = slots.shape[2]
        positions = torch.arange(tokens, device=token_embeds.device).repeat_interleave(per_token)
        hidden = self.backbone.hidden_states(slots.flatten(1, 2), positions, key_bias=bias)
        return hidden.view(batch, tokens, per_token, dim)

    def jacobi(self, input_ids: torch.Tensor, refine_passes: int, tau: float | None = None,
               warming_up: bool = False) -> torch.Tensor:
        """Final-pass states h_t^(k), shape (B, T, K + 1, d), after K growth, R refinement and one final pass.

        tau: hard-mask the slots that inference would prune (prunable methods; None: the soft training mask).
        """
        token_embeds = self.backbone.embed(input_ids)
        widths = list(range(1, self.max_extra_steps + 1)) + [self.max_extra_steps + 1] * (refine_passes + 1)
        backprop = self.config.ponder.backprop_passes
        first_with_grad = len(widths) - backprop if backprop else 0
        hidden = token_embeds.new_zeros(*token_embeds.shape[:2], 0, token_embeds.shape[2])
        for index, width in enumerate(widths):
            with torch.set_grad_enabled(torch.is_grad_enabled() and index >= first_with_grad):
                if index == first_with_grad:
                    hidden = hidden.detach()
                bias = self._slot_bias(hidden, width, tau, warming_up) if width > 1 else None
                hidden = self._pass(token_embeds, hidden[:, :, : width - 1], bias)
        return hidden

    def _output_states(self, states: torch.Tensor, tau: float | None = None, warming_up: bool = False):
        """The state each token predicts from (B, T, d), the latent slots it used (B, T), and statistics.

        Statistics whose names start with "_" are tensors for the objective and `inspect`, not for logging:
        `_step_distribution` (B, T, K + 1), each slot's weight in the output; `_expected_extra` (B, T).
        """
        used = torch.full(states.shape[:2], self.max_extra_steps, device=states.device)
        one_hot = F.one_hot(used, self.max_extra_steps + 1).float()
        return states[:, :, -1], used, {"_step_distribution": one_hot, "_expected_extra": used.float()}

    def inspect(self, input_ids: torch.Tensor, tau: float | None = None) -> Inspection:
        """The inference path in parallel; tau = 0 keeps every slot (the soft forward)."""
        tau = self.resolve_tau(tau)
        states = self.jacobi(input_ids, self.config.ponder.eval_refine_passes, tau)
        output, used, stats = self._output_states(states, tau)
        return Inspection(self.backbone.lm_head(output), used, stats["_expected_extra"], states,
                          stats["_step_distribution"])

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, train_step: int | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        options = self.config.ponder.train_refine_passes
        refine = options[int(torch.randint(len(options), ()))]  # torch's RNG: checkpointed, so resume is exact
        warming_up = train_step is not None and train_step <= self.config.ponder.router_warmup_steps
        states = self.jacobi(input_ids, refine, warming_up=warming_up)
        output, _, stats = self._output_states(states, warming_up=warming_up)
        logged = {k: v.item() if torch.is_tensor(v) else v for k, v in stats.items() if not k.startswith("_")}
        return self._regularise(self.lm_loss(output, targets), stats), logged

    def _regularise(self, loss: torch.Tensor, stats: dict) -> torch.Tensor:
        return loss

    # ----- sequential decoding, through the engine -----

    def decode_state(self, capacity: int) -> DecodeState:
        return LatentState(self, capacity)

    # ----- FLOPs -----

    def inference_flops(self, extra_steps: torch.Tensor) -> float:
        return interleaved_inference_flops(self.config.model, self.num_matmul_params(), extra_steps,
                                           self.per_token_flops())

    def mask_flops_per_token(self) -> float:
        """FLOPs per token to compute the soft mask a Jacobi pass feeds to the next (none without a mask)."""
        return 0.0

    def training_flops_per_token(self) -> float:
        """Every Jacobi pass forward: K growth passes of 1..K slots per token, then R refinement passes + 1 over all
        K + 1 slots, each over the interleaved causal sequence, with the mask on every pass that has one; the
        backward (2x forward) through the last `ponder.backprop_passes` of them (all if 0). Averaged over the R
        that training draws from.
        """
        T, K, p = self.config.data.seq_len, self.max_extra_steps, self.config.ponder
        model, n_mm = self.config.model, self.num_matmul_params()

        def step_flops(refine: int) -> float:
            widths = list(range(1, K + 1)) + [K + 1] * (refine + 1)
            forward = [causal_pass_flops(model, n_mm, width * T) + (width > 1) * T * self.mask_flops_per_token()
                       for width in widths]
            with_grad = forward[-p.backprop_passes:] if p.backprop_passes else forward
            return sum(forward) + 2 * sum(with_grad)

        per_sequence = sum(map(step_flops, p.train_refine_passes)) / len(p.train_refine_passes)
        return (per_sequence + 3 * T * self.per_token_flops()) / T


class AdaptiveLatent(PonderLM2):
    """PonderLM-2's slots with a learned allocation: tail masses w_k over the K latent slots as the soft mask
    (log w_k on latent key k), the mixture sum_k s_k h^(k) as the output, the penalty on sum_{k>=1} w_k, and the hard
    rule K_hat = max{k : w_k >= tau} at inference. Its members differ in where w comes from (`route`): PonderLM-3's
    router, upfront from h^(0); halting's gates, online from each latent state."""

    prunable = True
    adaptive = True
    settings = (*PonderLM2.settings, "router_init_bias", "router_warmup_steps", "penalty", "tau", "renormalize_pruned")

    @abstractmethod
    def route(self, states: torch.Tensor, warming_up: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Step distribution s (..., K + 1) and log tail mass log w from the slot states known so far (..., j, d).
        warming_up (`ponder.router_warmup_steps`): every latent slot fully open, as PonderLM-2 trains. Router warm-up
        exists because early in training h^(0) predicts better than the untrained latent slots, and the
        cross-entropy through the mixture moves all mass to k = 0 within tens of steps (measured, with and without
        the penalty); on the CPU budget of recipes/pareto-cpu.yaml it only delayed that (docs/results/pareto-cpu/)."""

    @staticmethod
    def overridden(computed: torch.Tensor, value: torch.Tensor | float) -> torch.Tensor:
        """`value` in place of `computed`, with `computed` kept in the graph (zero gradient), so that DDP sees every
        parameter used."""
        return 0 * computed + value

    def truncate(self, s: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The inference mixture weights: s on the kept slots (kept: bool, like s), renormalised to sum to 1.

        Without renormalising (`ponder.renormalize_pruned=false`, an ablation) the output shrinks by the pruned
        mass, which the final norm does not undo since the lm-head reads the mixture directly.
        """
        s = s.masked_fill(~kept, 0.0)
        return s / s.sum(-1, keepdim=True) if self.config.ponder.renormalize_pruned else s

    def kept_slots(self, log_w: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
        """K_hat = max{k : w_k >= tau}; w_0 = 1, so at least 0. tau: a number, or log tau per row (...,)."""
        threshold = (math.log(tau) if tau > 0 else float("-inf")) if isinstance(tau, float | int) else tau[..., None]
        return (log_w[..., 1:] >= threshold).sum(-1)  # w is non-increasing in k, so a count is the max k

    def _slot_bias(self, states, slots, tau, warming_up):
        _, log_w = self.route(states, warming_up)
        bias = log_w[..., :slots].clone()
        bias[..., 0] = 0.0  # the token slot is never masked
        if tau is not None:
            pruned = torch.arange(slots, device=bias.device) > self.kept_slots(log_w, tau)[..., None]
            bias = bias.masked_fill(pruned, HARD_MASK)
        return bias.flatten(1, 2)

    def _output_states(self, states, tau=None, warming_up=False):
        s, log_w = self.route(states, warming_up)
        keep = torch.full(states.shape[:2], self.max_extra_steps, device=states.device)
        if tau is not None:  # truncate the mixture at K_hat
            keep = self.kept_slots(log_w, tau)
            s = self.truncate(s, torch.arange(self.max_extra_steps + 1, device=s.device) <= keep[..., None])
        mixture = (s.to(states.dtype)[..., None] * states).sum(dim=2)
        expected_extra = log_w[..., 1:].exp().sum(-1)  # sum_{k>=1} w_k = expected extra steps
        stats = {"_expected_extra": expected_extra, "_step_distribution": s,
                 "expected_extra_steps": expected_extra.mean().detach(),
                 "router_entropy": -(s * s.clamp_min(1e-12).log()).sum(-1).mean().detach()}
        for k in range(self.max_extra_steps + 1):
            stats[f"step_mass_{k}"] = s[..., k].mean().detach()
        return mixture, keep, stats

    def _regularise(self, loss, stats):
        return loss + self.config.ponder.penalty * stats["_expected_extra"].mean()

    def per_token_flops(self) -> float:
        return super().per_token_flops() + self.mask_flops_per_token()


class PonderLM3(AdaptiveLatent):
    name = "ponderlm3"
    settings = (*AdaptiveLatent.settings, "router_fixed")

    def __init__(self, config: Config):
        super().__init__(config)
        self.router = nn.Linear(config.model.hidden_size, self.max_extra_steps + 1)
        nn.init.zeros_(self.router.weight)
        with torch.no_grad():
            self.router.bias.zero_()
            self.router.bias[-1] = config.ponder.router_init_bias

    def route(self, states, warming_up=False):
        """The router reads h^(0) only."""
        logits = self.router(states[..., 0, :]).float()
        if warming_up:  # s = one-hot(K): every slot fully visible, output h^(K), i.e. ponderlm2
            logits = self.overridden(logits, torch.full_like(logits, -1e4).index_fill_(
                -1, torch.tensor(self.max_extra_steps), 0.0))
        elif self.config.ponder.router_fixed:  # the ablation: one s for every token, nothing learned
            logits = self.overridden(logits, torch.tensor(self.config.ponder.router_fixed, device=logits.device).log())
        return logits.softmax(-1), log_tail_mass(logits)

    def start_as_source(self) -> bool:
        """All router mass on k = 0: latent slot k gets w_k < K e^-12, so no query sees a latent key and the output is
        h^(0), the backbone's; at the default tau no latent slot even runs. The router ablation cannot."""
        if self.config.ponder.router_fixed:
            return False
        with torch.no_grad():
            self.router.weight.zero_()
            self.router.bias.zero_()
            self.router.bias[0] = SOURCE_MARGIN
        return True

    def decode_state(self, capacity: int) -> DecodeState:
        return RoutedState(self, capacity)

    def mask_flops_per_token(self) -> float:
        return 2 * self.config.model.hidden_size * (self.max_extra_steps + 1)  # the router


class LatentState(DecodeState):
    """PonderLM-2: the token's slot, then K latent slots, each fed the previous slot's final-norm state; group 0."""

    def absorb(self, hidden):
        rows, K = len(hidden), self.method.max_extra_steps
        states = self.backbone.norm(hidden)
        self.previous[:rows] = states
        return self.phase[:rows] == K, states, torch.full_like(self.phase[:rows], K)


class RoutedState(LatentState):
    """PonderLM-3: after the token's slot the router fixes K_hat; latent slot k runs only if k <= K_hat, with its
    key biased by log w_k; the output accumulates the truncated, renormalised mixture as the slots run."""

    def __init__(self, method: PonderLM3, capacity: int):
        super().__init__(method, capacity)
        K = method.max_extra_steps
        self.log_w = torch.zeros(capacity, K + 1, device=self.phase.device)
        self.weights = torch.zeros(capacity, K + 1, device=self.phase.device)
        self.keep = torch.zeros_like(self.phase)
        self.mixture = torch.zeros_like(self.previous)

    def next_slots(self, rows, starting, token_embeds):
        inputs, group, _ = super().next_slots(rows, starting, token_embeds)
        bias = self.log_w[:rows].gather(1, self.phase[:rows, None])[:, 0].masked_fill(starting, 0.0)
        return inputs, group, bias  # the token slot is never masked

    def absorb(self, hidden):
        rows, method = len(hidden), self.method
        states = self.backbone.norm(hidden)
        self.previous[:rows] = states
        phase = self.phase[:rows]
        routed = (phase == 0).nonzero()[:, 0]  # the router runs once per token, on h^(0)
        if len(routed):
            s, log_w = method.route(states[routed, None])
            keep = method.kept_slots(log_w, self.log_tau[routed])
            kept = torch.arange(method.max_extra_steps + 1, device=s.device) <= keep[:, None]
            self.log_w[routed], self.weights[routed], self.keep[routed] = log_w, method.truncate(s, kept), keep
            self.mixture[routed] = 0.0
        weight = self.weights[:rows].gather(1, phase[:, None]).to(states.dtype)
        self.mixture[:rows] += weight * states
        keep = self.keep[:rows]
        return phase == keep, self.mixture[:rows].clone(), keep.clone()

    def expected_extra_steps(self, rows):
        return self.log_w[rows, 1:].exp().sum(-1)
