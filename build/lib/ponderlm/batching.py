"""Which tokens each step trains on: a pure function of (seed, sample index), so resuming needs no data state.

The training split is cut into non-overlapping windows of seq_len + 1 tokens; each epoch visits them in a fresh
seeded permutation. The global batch of step s is samples [s*G, (s+1)*G); ranks and micro-batches take
contiguous slices of it, so the same step trains on the same tokens at any world size.
"""

from __future__ import annotations

import numpy as np
import torch

from ponderlm.data import TokenShards
from ponderlm.errors import PonderError


class WindowSampler:
    def __init__(self, shards: TokenShards, seq_len: int, seed: int):
        self.shards = shards
        self.seq_len = seq_len
        self.seed = seed
        self.num_windows = (len(shards) - 1) // seq_len
        if self.num_windows < 1:
            raise PonderError(f"the training split has {len(shards)} tokens, fewer than one window of "
                              f"data.seq_len + 1 = {seq_len + 1}")
        self._epoch = -1
        self._order: torch.Tensor | None = None

    def _window_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(self.num_windows, generator=generator)
            self._epoch = epoch
        return self._order

    def sample(self, index: int) -> np.ndarray:
        epoch, position = divmod(index, self.num_windows)
        start = int(self._window_order(epoch)[position]) * self.seq_len
        return self.shards.read(start, self.seq_len + 1)

    def batch(self, first_index: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        windows = torch.from_numpy(np.stack([self.sample(first_index + i) for i in range(size)]))
        return windows[:, :-1], windows[:, 1:]


def eval_batches(shards: TokenShards, seq_len: int, batch_size: int, max_tokens: int | None = None):
    """Consecutive windows from the start of a split, each predicting seq_len tokens; every token is scored once."""
    total = len(shards) - 1
    if max_tokens is not None:
        total = min(total, max_tokens)
    starts = list(range(0, total, seq_len))
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        length = min(seq_len, total - chunk[-1])
        if length < seq_len:  # the ragged last window goes alone so every row in a batch has one length
            if len(chunk) > 1:
                yield _stack(shards, chunk[:-1], seq_len)
            yield _stack(shards, chunk[-1:], length)
        else:
            yield _stack(shards, chunk, seq_len)


def _stack(shards: TokenShards, starts: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    windows = torch.from_numpy(np.stack([shards.read(s, length + 1) for s in starts]))
    return windows[:, :-1], windows[:, 1:]
