"""CLOC's region-text loss across 2 gloo processes (issue 21): negatives from every region of
the global batch, processes holding different numbers of regions.

Each process computes the loss through ``contrastive_loss`` (the real gather); it must equal
the one-process loss over the concatenated batch, and the gradient of each process's own
features must be the world size x the matching rows of the one-process gradient, so that
DDP's average over processes is the whole batch's gradient.
"""

from __future__ import annotations

import datetime
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ovseg.methods.cloc.training import contrastive_loss

SIZES = (3, 5)  # regions per process: uneven on purpose
DIM = 16
THRESHOLD = 0.9
SCALE = float(np.log(1 / 0.07))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) region and caption embeddings, L2-normalised; caption 6 (process 1) is a
    near-duplicate of caption 1 (process 0), so the 0.9 filter drops a pair across processes."""
    gen = torch.Generator().manual_seed(0)
    texts = torch.randn(sum(SIZES), DIM, generator=gen, dtype=torch.float64)
    texts[6] = texts[1] + 0.01 * torch.randn(DIM, generator=gen, dtype=torch.float64)
    regions = texts + 0.8 * torch.randn(sum(SIZES), DIM, generator=gen, dtype=torch.float64)
    return F.normalize(regions, dim=-1), F.normalize(texts, dim=-1)


def _loss_and_grads(regions, texts, scale):
    regions = regions.clone().requires_grad_(True)
    texts = texts.clone().requires_grad_(True)
    scale = scale.clone().requires_grad_(True)
    loss = contrastive_loss(regions, texts, scale, THRESHOLD)
    loss.backward()
    return loss.detach(), regions.grad, texts.grad, scale.grad


def _worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=len(SIZES), timeout=datetime.timedelta(seconds=60))
    try:
        regions, texts = _batch()
        start = sum(SIZES[:rank])
        rows = slice(start, start + SIZES[rank])
        result = _loss_and_grads(regions[rows], texts[rows], torch.tensor(SCALE,
                                                                          dtype=torch.float64))
        out[rank] = [t.clone() for t in result]
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_region_loss_equals_one_process_over_the_global_batch():
    regions, texts = _batch()
    loss, region_grad, text_grad, scale_grad = _loss_and_grads(
        regions, texts, torch.tensor(SCALE, dtype=torch.float64))
    # the filter really drops the cross-process pair (1, 6): the loss differs without it
    assert not torch.isclose(loss, contrastive_loss(regions, texts, torch.tensor(SCALE), None))

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=len(SIZES), join=True)
        per_rank = dict(out)
    world = len(SIZES)
    for rank, (rank_loss, rank_region_grad, rank_text_grad, rank_scale_grad) in \
            per_rank.items():
        start = sum(SIZES[:rank])
        rows = slice(start, start + SIZES[rank])
        assert rank_loss.item() == pytest.approx(loss.item(), abs=1e-6), rank
        # own rows: world x the one-process gradient (DDP divides the sum by the world size)
        torch.testing.assert_close(rank_region_grad, world * region_grad[rows], atol=1e-6,
                                   rtol=1e-6)
        torch.testing.assert_close(rank_text_grad, world * text_grad[rows], atol=1e-6,
                                   rtol=1e-6)
        # the temperature is replicated: each process already holds its whole gradient
        torch.testing.assert_close(rank_scale_grad, scale_grad, atol=1e-6, rtol=1e-6)
