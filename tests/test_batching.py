"""Which tokens each training step and each evaluation sees: pure functions of (seed, index), every token once."""

import numpy as np
import pytest
import torch

from ponderlm.batching import WindowSampler, eval_batches
from ponderlm.data import TokenShards
from ponderlm.errors import PonderError


@pytest.fixture(scope="module")
def shards(tiny_data_dir):
    return TokenShards(tiny_data_dir, "train")


def test_a_batch_is_a_pure_function_of_seed_and_index_and_slices_compose(shards):
    a, b = WindowSampler(shards, 32, seed=3), WindowSampler(shards, 32, seed=3)
    whole = a.batch(10, 6)
    assert torch.equal(whole[0], b.batch(10, 6)[0])
    # Ranks and micro-batches take contiguous slices of a step's samples: any split gives the same windows.
    parts = [b.batch(10, 2), b.batch(12, 4)]
    assert torch.equal(whole[0], torch.cat([p[0] for p in parts])) and torch.equal(whole[1], torch.cat([p[1] for p in parts]))
    assert not torch.equal(whole[0], WindowSampler(shards, 32, seed=4).batch(10, 6)[0])


def test_targets_are_the_inputs_shifted_by_one_token_of_the_split(shards):
    inputs, targets = WindowSampler(shards, 16, seed=0).batch(0, 3)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    tokens = torch.from_numpy(shards.read(0, len(shards)).astype(np.int64))
    for row in range(3):  # each row is a real window of the split, starting on a window boundary
        start = next(s for s in range(0, len(shards) - 16, 16) if torch.equal(tokens[s:s + 16], inputs[row]))
        assert torch.equal(tokens[start + 1:start + 17], targets[row])


def test_an_epoch_visits_every_window_once_then_reshuffles(shards):
    sampler = WindowSampler(shards, 64, seed=0)
    n = sampler.num_windows
    first = [tuple(sampler.sample(i)) for i in range(n)]
    second = [tuple(sampler.sample(i)) for i in range(n, 2 * n)]
    assert len(set(first)) == n and set(first) == set(second) and first != second


def test_a_split_shorter_than_one_window_is_refused(shards):
    with pytest.raises(PonderError, match="fewer than one window"):
        WindowSampler(shards, len(shards), seed=0)


def test_evaluation_scores_every_token_once_in_order(shards):
    limit = 1000  # 15 windows of 64 and a ragged one of 40
    batches = list(eval_batches(shards, 64, batch_size=4, max_tokens=limit))
    inputs = torch.cat([b[0].flatten() for b in batches])
    targets = torch.cat([b[1].flatten() for b in batches])
    tokens = torch.from_numpy(shards.read(0, limit + 1).astype(np.int64))
    assert torch.equal(inputs, tokens[:-1]) and torch.equal(targets, tokens[1:])
    assert [tuple(b[0].shape) for b in batches][-2:] == [(3, 64), (1, 40)]  # the ragged window goes alone
