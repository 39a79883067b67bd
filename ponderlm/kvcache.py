"""The KV cache of the inference engine (docs/design.md §9): one sequence of cached slots per row.

Every row holds its own slots in the order they ran, with its own length. Each cached key carries a *group* and an
additive *bias*:
- the group separates what must not see each other: a query sees only keys of its own group (`loop` and
  `ponderlm1` put pass p in group p, `mor` recursion r in group r - 1; slot methods use group 0 for everything).
  Group -1 marks a position that holds no key (never written, or a freed row);
- the bias is added to every query's logit for that key (PonderLM-3's log w_k on a kept latent slot).
Since a cached key is visible to every later query of its group, the order of keys within a row does not matter,
only which keys are there: a pruned slot is simply never written, and costs neither a forward row nor a position.

The backbone calls `attend(layer, q, k, v)` on a *view* of the cache, which writes the new keys and returns the
attention output. Two views exist: `StepView`, one new slot per row appended at each row's own length (decoding),
and `PrefillView`, whole prompts of rows that start empty, in one causal chunk per pass (methods whose prompt
slots can run in parallel exactly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ponderlm.schema import ModelConfig

NO_KEY = -1  # the group of a position that holds no key


class KVCache:
    """Keys and values (layers, rows, kv heads, slots, head dim), each key's group and bias, per-row lengths."""

    def __init__(self, config: ModelConfig, rows: int, max_slots: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        head_dim = config.hidden_size // config.num_attention_heads
        shape = (config.num_hidden_layers, rows, config.resolved_key_value_heads(), max_slots, head_dim)
        self.layers = config.num_hidden_layers
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.key_bias = torch.zeros(rows, max_slots, dtype=torch.float32, device=device)
        self.key_group = torch.full((rows, max_slots), NO_KEY, dtype=torch.long, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)

    @property
    def max_slots(self) -> int:
        return self.keys.shape[3]

    def step(self, rows: int, group: torch.Tensor, bias: torch.Tensor) -> StepView:
        """A view that appends one slot to each of rows 0..rows-1, with that slot's group and bias (rows,)."""
        return StepView(self, rows, group, bias)

    def prefill(self, first_row: int, lengths: torch.Tensor) -> PrefillView:
        """A view for the prompts of rows first_row.. (empty until now), `lengths` (n,) real tokens each."""
        return PrefillView(self, first_row, lengths)

    def move_row(self, source: int, target: int) -> None:
        """Copy row `source` into row `target` (keeping the rows in use a contiguous prefix)."""
        for tensor in (self.keys, self.values):
            tensor[:, target] = tensor[:, source]
        for tensor in (self.key_bias, self.key_group, self.lengths):
            tensor[target] = tensor[source]

    def clear_row(self, row: int) -> None:
        self.key_group[row] = NO_KEY
        self.key_bias[row] = 0.0
        self.lengths[row] = 0

    def _check_room(self, needed: torch.Tensor) -> None:
        if int(needed.max()) > self.max_slots:
            raise ValueError(f"KV cache full: {int(needed.max())} slots needed, {self.max_slots} allocated per row")


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA with grouped-query heads (each key/value head serves a group of query heads); causal without a mask."""
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                          enable_gqa=gqa)


class StepView:
    """One new slot per row: written at the row's length; it sees the row's keys of its group, plus their bias."""

    def __init__(self, cache: KVCache, rows: int, group: torch.Tensor, bias: torch.Tensor):
        self.cache, self.rows = cache, rows
        self.position = cache.lengths[:rows].clone()
        cache._check_room(self.position + 1)
        self.row_index = torch.arange(rows, device=group.device)
        cache.key_group[self.row_index, self.position] = group
        cache.key_bias[self.row_index, self.position] = bias.float()
        self.width = int(self.position.max()) + 1  # the longest row: shorter rows' tails hold group -1
        visible = cache.key_group[:rows, : self.width] == group[:, None]
        self.mask = torch.where(visible, cache.key_bias[:rows, : self.width], float("-inf"))[:, None, None]

    def begin(self, positions: torch.Tensor, slot_mask: torch.Tensor | None) -> None:
        """Nothing to prepare: the slot of every row is real and its position known."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (rows, heads, 1, head dim) for this layer's new slot of every row."""
        cache = self.cache
        cache.keys[layer, self.row_index, :, self.position] = k[:, :, 0]
        cache.values[layer, self.row_index, :, self.position] = v[:, :, 0]
        keys = cache.keys[layer, : self.rows, :, : self.width]
        values = cache.values[layer, : self.rows, :, : self.width]
        return _attention(q, keys.to(q.dtype), values.to(q.dtype), self.mask.to(q.dtype))

    def commit(self) -> None:
        self.cache.lengths[: self.rows] += 1


class PrefillView:
    """Prompts of rows that start empty: each call of the backbone is one causal chunk (B, S) per pass.

    A slot is real if its position is below its row's prompt length (prompts are right-padded) and, where the
    caller passes `slot_mask`, that mask is true (`mor` gathers a recursion's active tokens, padded with others).
    Real slots are appended to their row in chunk order, in group `pass` (the layer index divided by the number of
    layers: `hidden_states(..., cache_pass=p)` or its p-th repeat).
    """

    def __init__(self, cache: KVCache, first_row: int, lengths: torch.Tensor):
        self.cache, self.lengths = cache, lengths
        self.rows = slice(first_row, first_row + len(lengths))
        self.row_index = torch.arange(first_row, first_row + len(lengths), device=lengths.device)
        self.slot_mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self._pass = None

    def begin(self, positions: torch.Tensor, slot_mask: torch.Tensor | None) -> None:
        """Called by the backbone before each chunk: the chunk's positions (S,) or (B, S) and real-slot mask."""
        self.positions, self.slot_mask, self._pass = positions, slot_mask, None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        chunk_pass, layer_in_stack = divmod(layer, cache.layers)
        if chunk_pass != self._pass:  # the first layer of a pass: where its real slots go
            self._pass = chunk_pass
            positions = self.positions.expand(len(self.lengths), -1)
            real = positions < self.lengths[:, None]
            if self.slot_mask is not None:
                real = real & self.slot_mask
            start = cache.lengths[self.rows]
            cache._check_room(start + real.sum(1))
            self.real = real
            self.target = (start[:, None] + real.cumsum(1) - 1)[real]
            self.target_rows = self.row_index[:, None].expand_as(real)[real]
            cache.key_group[self.target_rows, self.target] = chunk_pass
            cache.key_bias[self.target_rows, self.target] = 0.0
            cache.lengths[self.rows] += real.sum(1)
        cache.keys[layer_in_stack, self.target_rows, :, self.target] = k.transpose(1, 2)[self.real]
        cache.values[layer_in_stack, self.target_rows, :, self.target] = v.transpose(1, 2)[self.real]
        return _attention(q, k, v, None)
