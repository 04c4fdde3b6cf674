"""Process-group helpers: rank, world size, barriers, sums and sharding across processes.

Every function works without torch.distributed (one process: rank 0 of a world of 1), so the
same code runs under ``launch`` with one process, several, or ``torchrun``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

# the local process group (processes of this machine), made by ``launch``
_LOCAL_GROUP: dist.ProcessGroup | None = None


def is_distributed() -> bool:
    """True when a default process group is initialised (with any world size)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes of the job; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    """Rank of this process among those of its machine (its GPU index); 0 alone."""
    if not is_distributed():
        return 0
    if _LOCAL_GROUP is not None:
        return dist.get_rank(group=_LOCAL_GROUP)
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on global rank 0, the process that writes files and logs."""
    return get_rank() == 0


def set_local_group(group: dist.ProcessGroup | None) -> None:
    """Remember the process group of this machine's processes (called by ``launch``)."""
    global _LOCAL_GROUP
    _LOCAL_GROUP = group


def _collective_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo takes CPU tensors
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def synchronize() -> None:
    """Barrier across all processes; a no-op with one process."""
    if get_world_size() <= 1:
        return
    if dist.get_backend() == "nccl":
        # without device_ids NCCL guesses the device from the rank, wrong on multi-node jobs
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; returns it (any shape, any device).

    A CPU tensor under NCCL travels to this process's GPU and back.
    """
    if get_world_size() <= 1:
        return tensor
    device = _collective_device()
    if tensor.device == device:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    tensor.copy_(moved)
    return tensor


def all_gather_objects(obj: object) -> list[object]:
    """``obj`` of every process, in rank order (picklable objects; a list of one alone)."""
    if get_world_size() <= 1:
        return [obj]
    gathered: list[object] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` of process ``src`` on every process."""
    if get_world_size() <= 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def shard_indices(n: int, rank: int, world: int) -> range:
    """The indices in [0, n) that process ``rank`` of ``world`` handles.

    Contiguous blocks whose sizes differ by at most one, so every index is handled exactly
    once over the ranks for any ``n`` (also ``n < world``: some ranks get none), and the split
    depends only on (n, rank, world).
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} processes")
    if n < 0:
        raise ValueError(f"cannot shard a negative number of items ({n})")
    return range(n * rank // world, n * (rank + 1) // world)
