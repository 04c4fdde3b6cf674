"""Tests of ovseg.data.samplers: the seeded endless stream, its sharding and its position."""

from __future__ import annotations

import os
import random
from itertools import islice

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ovseg.data.samplers import InfiniteSampler, epoch_permutation, seed_worker, worker_seed


def take(sampler: InfiniteSampler, count: int) -> list[int]:
    return list(islice(iter(sampler), count))


def test_each_epoch_is_a_permutation_seeded_by_seed_and_epoch():
    stream = take(InfiniteSampler(7, seed=3, rank=0, world_size=1), 21)
    epochs = [stream[i : i + 7] for i in range(0, 21, 7)]
    for epoch, order in enumerate(epochs):
        assert sorted(order) == list(range(7))
        assert order == epoch_permutation(7, 3, epoch).tolist()
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    assert take(InfiniteSampler(7, seed=3, rank=0, world_size=1), 21) == stream
    assert take(InfiniteSampler(7, seed=4, rank=0, world_size=1), 21) != stream


def test_without_shuffle_the_stream_is_in_order():
    assert take(InfiniteSampler(3, shuffle=False, rank=0, world_size=1), 7) == [0, 1, 2, 0, 1,
                                                                                 2, 0]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_interleave_into_the_one_process_stream(world):
    size, steps, per_rank = 10, 5, 3
    single = take(InfiniteSampler(size, seed=1, rank=0, world_size=1), steps * per_rank * world)
    shards = [take(InfiniteSampler(size, seed=1, rank=r, world_size=world), steps * per_rank)
              for r in range(world)]
    for step in range(steps):
        # one step: each rank's next per_rank items = the next per_rank*world of the stream
        batch = single[step * per_rank * world : (step + 1) * per_rank * world]
        shard_batches = [s[step * per_rank : (step + 1) * per_rank] for s in shards]
        assert sorted(sum(shard_batches, [])) == sorted(batch)
        for rank in range(world):
            assert shard_batches[rank] == batch[rank::world]


@pytest.mark.parametrize("world", [1, 2])
def test_a_restored_position_continues_the_stream_exactly(world):
    size, consumed = 9, 14  # consumed positions over all ranks, mid-epoch
    for rank in range(world):
        full = take(InfiniteSampler(size, seed=5, rank=rank, world_size=world), 30)
        saved = InfiniteSampler(size, seed=5, rank=rank, world_size=world)
        saved.advance(consumed)
        restored = InfiniteSampler(size, seed=5, rank=rank, world_size=world)
        restored.load_state_dict(saved.state_dict())
        assert restored.position == consumed
        assert take(restored, 10) == full[consumed // world : consumed // world + 10]


def test_loading_the_state_of_another_dataset_is_an_error():
    state = InfiniteSampler(9, seed=5, rank=0, world_size=1).state_dict()
    with pytest.raises(ValueError, match="size=9"):
        InfiniteSampler(10, seed=5, rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        InfiniteSampler(9, seed=6, rank=0, world_size=1).load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        InfiniteSampler(0)
    with pytest.raises(ValueError, match="rank 2"):
        InfiniteSampler(3, rank=2, world_size=2)


class _Draws(torch.utils.data.Dataset):
    """Returns what python, numpy and torch draw in the worker that loads the sample."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        info = torch.utils.data.get_worker_info()
        return (info.id if info else -1, random.random(), float(np.random.rand()),
                float(torch.rand(())))


def _worker_draws(seed: int) -> dict[int, tuple]:
    loader = DataLoader(_Draws(), batch_size=None, num_workers=2, worker_init_fn=seed_worker,
                        generator=torch.Generator().manual_seed(seed),
                        multiprocessing_context="fork")
    return {int(d[0]): tuple(d[1:]) for d in loader}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forked workers start fast")
def test_workers_draw_different_numbers_reproducibly():
    draws = _worker_draws(7)
    assert set(draws) == {0, 1}
    # python and numpy would be copies of the parent's state without seed_worker
    assert draws[0][0] != draws[1][0] and draws[0][1] != draws[1][1]
    assert _worker_draws(7) == draws
    assert _worker_draws(8) != draws


def test_worker_seed_is_32_bit_and_depends_on_both_inputs():
    seeds = {worker_seed(base, worker) for base in (0, 1, 2**62) for worker in (0, 1)}
    assert len(seeds) == 6 and all(0 <= s < 2**32 for s in seeds)
