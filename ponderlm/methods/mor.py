"""`mor`: Mixture-of-Recursions with token-choice routing (Bae et al. 2025), the recursive adaptive baseline.

docs/design.md §4.3. The layer stack is one shared recursion block, applied up to N_r = K + 1 times. After the
first recursion a router (a linear map of the residual stream x_1) gives g_t, a distribution over depths 1..N_r;
each token takes its argmax depth d_t (top-1). Tokens with d_t < r are not computed in recursion r, and in
recursion r a query attends only to the keys of tokens active there ("recursion-wise KV caching"). The token's
output scales everything its recursions added by the router weight of its depth (MoR's gating, so the router
learns through the routed output): out_t = x_0 + g_{t,d_t} (x_{d_t} - x_0), then the final norm and the lm-head.
The loss adds MoR's balancing term N_r sum_i f_i P_i (f_i: share of tokens at depth i, P_i: mean router weight),
weighted by `options.mor.balance_weight`, and (ours, the dial shared with the latent methods) `ponder.penalty`
times the expected extra recursions sum_i g_{t,i} (i - 1). Routing is causal, so training and decoding agree;
tau plays no role. Two ablation options take the routing apart: `fixed_depth` sends every token to one depth and
bypasses the router (it neither scales the output nor enters the loss, so depth 1 trains as vanilla and K + 1 as
`loop`, through this code, gradients included), `scale_output: false` keeps the gate's gradient to the router but
not its scaling of the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ponderlm.schema import Config
from ponderlm.errors import PonderError
from ponderlm.flops import block_flops, lm_head_flops
from ponderlm.methods.base import SOURCE_MARGIN, DecodeState, Inspection, Method
from ponderlm.model import init_normal_, init_std


@dataclass
class MoROptions:
    balance_weight: float = 0.01  # weight of MoR's balancing loss (ours: MoR tunes it per setting)
    fixed_depth: int = 0  # ablation: every token takes this depth (1..K + 1), the router bypassed; 0 routes
    scale_output: bool = True  # ablation: false gives the gate the value 1 and keeps its gradient to the router


class MoR(Method):
    name = "mor"
    settings = ("extra_steps", "penalty")
    adaptive = True
    parallel_prefill = True
    Options = MoROptions

    def __init__(self, config: Config):
        super().__init__(config)
        self.router = nn.Linear(config.model.hidden_size, self.max_extra_steps + 1)
        # The backbone's init: a zero router would tie every depth and send all to depth 1.
        init_normal_(self.router.weight, init_std(config.model.hidden_size))
        nn.init.zeros_(self.router.bias)
        if not 0 <= self.options.fixed_depth <= self.max_extra_steps + 1:
            raise PonderError(f"options.mor.fixed_depth={self.options.fixed_depth}: a depth is 1..K + 1 = "
                              f"{self.max_extra_steps + 1} recursions (0: the router chooses)")

    def start_as_source(self) -> bool:
        """Every token at depth 1 with gate 1 - O(e^-12): the output is the first recursion's, the backbone's. A
        fixed depth above 1 cannot."""
        if self.options.fixed_depth:
            return self.options.fixed_depth == 1
        with torch.no_grad():
            self.router.weight.zero_()
            self.router.bias.zero_()
            self.router.bias[0] = SOURCE_MARGIN
        return True

    def choose_depths(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router weights g (..., N_r) over depths 1..N_r and the chosen depth d (...), from x_1. With a fixed depth
        g is only reported: computed without gradient, so no loss reaches the router or, through it, the backbone."""
        if self.options.fixed_depth:
            with torch.no_grad():
                g = self.router(x1).float().softmax(-1)
            return g, torch.full(g.shape[:-1], self.options.fixed_depth, dtype=torch.long, device=g.device)
        g = self.router(x1).float().softmax(-1)
        return g, g.argmax(-1) + 1

    def gate(self, g: torch.Tensor, depth: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The weight (..., 1) that scales what a token's recursions added: the router weight of its depth."""
        weight = g.gather(-1, (depth - 1)[..., None])
        if self.options.fixed_depth:
            return torch.ones_like(weight, dtype=dtype)
        if not self.options.scale_output:
            weight = weight - weight.detach() + 1
        return weight.to(dtype)

    def recurse(self, input_ids: torch.Tensor, cache=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Output states (B, T, d) before the final norm, router weights g (B, T, N_r), depths d (B, T); with a
        prefill view of the engine's cache, recursion r stores its tokens' keys in group r - 1."""
        x0 = self.backbone.embed(input_ids)
        x = self.backbone.hidden_states(x0, final_norm=False, cache=cache)
        g, depth = self.choose_depths(x)
        for recursion in range(2, self.max_extra_steps + 2):
            active = depth >= recursion
            if not active.any():
                break
            x = self._recurse_active(x, active, recursion, cache)
        return x0 + self.gate(g, depth, x.dtype) * (x - x0), g, depth

    def _recurse_active(self, x: torch.Tensor, active: torch.Tensor, recursion: int, cache) -> torch.Tensor:
        """One recursion over the active tokens only: each row's active tokens, gathered in order (padding after
        them, which no real query can see), at their own RoPE positions; the others keep their state."""
        counts = active.sum(-1)
        order = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)[:, : int(counts.max())]
        index = order[..., None].expand(-1, -1, x.shape[-1])
        updated = self.backbone.hidden_states(x.gather(1, index), positions=order, final_norm=False, cache=cache,
                                              cache_pass=recursion - 1, slot_mask=active.gather(1, order))
        return torch.where(active[..., None], x.scatter(1, index, updated), x)

    def inspect(self, input_ids: torch.Tensor, tau: float | None = None) -> Inspection:
        out, g, depth = self.recurse(input_ids)
        expected = (g * torch.arange(g.shape[-1], device=g.device)).sum(-1)
        return Inspection(self.backbone.lm_head(self.backbone.norm(out)), depth - 1, expected,
                          step_distribution=g)

    def loss(self, input_ids, targets, train_step=None):
        out, g, depth = self.recurse(input_ids)
        loss = self.lm_loss(self.backbone.norm(out), targets)
        depths = g.shape[-1]
        share = F.one_hot(depth - 1, depths).float().flatten(0, -2).mean(0)  # f_i: not differentiable
        balance = depths * (share * g.flatten(0, -2).mean(0)).sum()
        expected_extra = (g * torch.arange(depths, device=g.device)).sum(-1).mean()
        total = loss
        if not self.options.fixed_depth:  # else both terms are constants of an untrained router
            total = total + self.options.balance_weight * balance + self.config.ponder.penalty * expected_extra
        stats = {"expected_extra_steps": expected_extra.item(), "balance_loss": balance.item(),
                 **{f"depth_share_{i + 1}": share[i].item() for i in range(depths)}}
        return total, stats

    # ----- decoding, through the engine -----

    def prefill(self, input_ids, cache):
        out, _, depth = self.recurse(input_ids, cache)
        return self.backbone.norm(out), depth - 1

    def decode_state(self, capacity: int) -> DecodeState:
        return RecursionState(self, capacity)

    # ----- FLOPs -----

    def per_token_flops(self) -> float:
        return lm_head_flops(self.config.model) + 2 * self.config.model.hidden_size * (self.max_extra_steps + 1)

    def inference_flops(self, extra_steps: torch.Tensor) -> float:
        """Each token pays for the recursions it ran; in recursion r it attends to the tokens so far active in r."""
        depth = extra_steps + 1
        total = torch.zeros(extra_steps.shape, dtype=torch.float64)
        for recursion in range(1, self.max_extra_steps + 2):
            active = (depth >= recursion).double()
            keys = active.cumsum(-1)
            total += active * block_flops(self.config.model, self.num_matmul_params(), 1, keys)
        return (total + self.per_token_flops()).sum().item()

    def training_flops_per_token(self) -> float:
        """Under balanced routing (the balancing loss's target): a share (N_r - r + 1) / N_r of the tokens runs
        recursion r, attending causally among themselves; with a fixed depth d, all of them run recursions 1..d."""
        T, depths, fixed = self.config.data.seq_len, self.max_extra_steps + 1, self.options.fixed_depth
        forward = 0.0
        for recursion in range(1, depths + 1):
            n = T * (recursion <= fixed if fixed else (depths - recursion + 1) / depths)
            forward += block_flops(self.config.model, self.num_matmul_params(), n, n * (n + 1) / 2)
        return self.backprop_flops_per_token(forward)


class RecursionState(DecodeState):
    """Recursion 1 of a token is slot 0 (group 0); the router then fixes its depth d, and recursion r = 2..d runs
    as slot r - 1 in group r - 1, fed the residual stream. Rows whose token is done need no slot for it: a token
    that stops early costs nothing in later recursions."""

    passes = True

    def __init__(self, method: MoR, capacity: int):
        super().__init__(method, capacity)
        self.token_embeds = torch.zeros_like(self.previous)
        self.depth = torch.ones_like(self.phase)
        self.gate = torch.zeros(capacity, 1, dtype=self.previous.dtype, device=self.phase.device)

    def next_slots(self, rows, starting, token_embeds):
        self.token_embeds[:rows] = torch.where(starting[:, None], token_embeds, self.token_embeds[:rows])
        return super().next_slots(rows, starting, token_embeds)

    def absorb(self, hidden):
        rows, method = len(hidden), self.method
        self.previous[:rows] = hidden
        phase = self.phase[:rows]
        routed = (phase == 0).nonzero()[:, 0]  # the router reads x_1, once per token
        if len(routed):
            g, depth = method.choose_depths(hidden[routed])
            self.depth[routed], self.gate[routed] = depth, method.gate(g, depth, self.gate.dtype)
        x0, depth = self.token_embeds[:rows], self.depth[:rows]
        out = self.backbone.norm(x0 + self.gate[:rows].to(hidden.dtype) * (hidden - x0))
        return phase == depth - 1, out, depth - 1
