"""Process-group helpers for CLOC's losses and evaluation (plain torch.distributed: methods sit
below the engine). Every function works without a process group (one process, rank 0)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def _device(tensor: torch.Tensor) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; returns it."""
    if world_size() <= 1:
        return tensor
    moved = tensor.to(_device(tensor))
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    tensor.copy_(moved)
    return tensor


def all_gather_objects(obj: object) -> list[object]:
    """``obj`` of every process, in rank order."""
    if world_size() <= 1:
        return [obj]
    gathered: list[object] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def shard(n: int) -> range:
    """This process's contiguous block of [0, n); every index is in exactly one block."""
    world, me = world_size(), rank()
    return range(n * me // world, n * (me + 1) // world)
