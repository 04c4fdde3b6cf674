"""Training samplers: an endless, seeded stream of dataset indices, sharded across processes.

The stream is the same for any number of processes: epoch ``e`` is a permutation of the
dataset seeded by ``(seed, e)``, epochs follow one another, and process ``r`` of ``w`` takes the
stream's positions ``r, r + w, r + 2w, ...``. So a step that consumes the next ``B * w`` stream
positions sees the same images whether it runs as one process with batch ``B * w`` or as ``w``
processes with batch ``B``. The position in the stream is the sampler's whole state; a
resumed run restores it and continues exactly where the saved run was.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def _distributed_rank_and_world() -> tuple[int, int]:
    # read from torch.distributed itself: data/ sits below engine/ and does not import it
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def epoch_permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    """(size,) int64: the order of epoch ``epoch``, a function of (size, seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(size)


class InfiniteSampler(Sampler[int]):
    """Endless seeded index stream, this process's share of it (see the module docstring).

    Args:
        size: number of samples in the dataset (> 0).
        seed: seeds every epoch's permutation, together with the epoch number.
        shuffle: False streams 0, 1, ..., size - 1 again and again.
        rank, world_size: this process and the number of processes; default from
            torch.distributed.
        position: the stream position to start from (see :meth:`advance`).

    The sampler does not know what the data loader has prefetched, so the trainer reports
    what it consumed with :meth:`advance`; ``state_dict`` holds that position, and the next
    ``iter(sampler)`` starts there.
    """

    def __init__(
        self,
        size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        position: int = 0,
    ) -> None:
        if size <= 0:
            raise ValueError(f"cannot sample from an empty dataset (size {size})")
        self.size = int(size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        default_rank, default_world = _distributed_rank_and_world()
        self.rank = default_rank if rank is None else int(rank)
        self.world_size = default_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world_size}")
        self.position = int(position)

    def _epoch(self, epoch: int) -> np.ndarray:
        if self.shuffle:
            return epoch_permutation(self.size, self.seed, epoch)
        return np.arange(self.size)

    def __iter__(self) -> Iterator[int]:
        # positions start at the next one that belongs to this rank
        stream = self.position + (self.rank - self.position) % self.world_size
        epoch, order = -1, np.empty(0, dtype=np.int64)
        while True:
            if stream // self.size != epoch:
                epoch = stream // self.size
                order = self._epoch(epoch)
            yield int(order[stream % self.size])
            stream += self.world_size

    def advance(self, count: int) -> None:
        """Mark ``count`` more stream positions consumed (over all processes together)."""
        self.position += int(count)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "size": self.size, "seed": self.seed,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at a saved position; a dataset of another size or another seed is an error,
        since the position would then point into a different stream."""
        for key in ("size", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"the saved sampler has {key}={state[key]!r} but this one has "
                    f"{key}={getattr(self, key)!r}; the training data or seed changed since "
                    "the checkpoint"
                )
        self.position = int(state["position"])


def worker_seed(base_seed: int, worker_id: int) -> int:
    """The 32-bit seed of a loader worker, from the loader's base seed and its id."""
    return int(np.random.SeedSequence([base_seed % (1 << 63), worker_id]).generate_state(1)[0])


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed python, numpy and torch in a loader worker.

    torch seeds each worker with ``base_seed + worker_id`` (the base seed drawn from the
    loader's generator), but python's ``random`` and numpy start from a copy of the parent's
    state, so every worker would draw the same numbers; this derives both from torch's seed.
    """
    seed = worker_seed(torch.initial_seed(), worker_id)
    random.seed(seed)
    np.random.seed(seed)
