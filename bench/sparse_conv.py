"""Benchmark of the sparse convolution: ours (pure torch) vs spconv, and a MinkUNet14A step.

On a synthetic 100k-point room (floor, ceiling, four walls and two boxes, 8 x 6 x 3 m) at 5 cm,
prints the forward time of one 3x3x3 convolution 32 -> 32 with the torch backend (cold: kernel
map built; warm: map cached, as inside a network), the same convolution through spconv's
forward when spconv is installed (its rule building included; goal: ours cold <= 3x spconv),
and the time of one MinkUNet14A training step (forward, both heads, backward, SGD step).

    python bench/sparse_conv.py [--points 100000] [--repeats 3] [--device cpu|cuda]

About a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ovseg.layers.sparse import SparseTensor, sparse_conv, spconv_available
from ovseg.modeling.minkunet import MINKUNET_14A, MinkUNet, student_input


def room(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, 3) points on the surfaces of a room with two boxes, and (count, 3) colours."""
    generator = torch.Generator().manual_seed(seed)
    size = torch.tensor([8.0, 6.0, 3.0])
    points = torch.rand(count, 3, generator=generator) * size
    on_room = torch.rand(count, generator=generator) < 0.8
    axis = torch.randint(0, 3, (count,), generator=generator)
    side = (torch.rand(count, generator=generator) < 0.5).float()
    rows = torch.nonzero(on_room).squeeze(1)
    points[rows, axis[rows]] = side[rows] * size[axis[rows]]
    boxes = torch.nonzero(~on_room).squeeze(1)
    # the rest on the surface of two 1 m boxes on the floor
    corner = torch.where(torch.rand(len(boxes), 1, generator=generator) < 0.5,
                         torch.tensor([2.0, 2.0, 0.0]), torch.tensor([5.0, 3.0, 0.0]))
    local = torch.rand(len(boxes), 3, generator=generator)
    face = torch.randint(0, 3, (len(boxes),), generator=generator)
    local[torch.arange(len(boxes)), face] = torch.randint(
        0, 2, (len(boxes),), generator=generator).float()
    points[boxes] = corner + local
    colors = torch.randint(0, 256, (count, 3), generator=generator)
    return points, colors


def seconds(function, repeats: int, device: str) -> float:
    """Median wall time of ``function()`` over ``repeats`` runs after one warm-up."""
    function()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    points, colors = room(args.points)
    x, _ = student_input([points], [colors])
    coords = x.coords.to(args.device)
    feats = torch.randn(len(coords), 32, device=args.device)
    kernel = torch.randn(27, 32, 32, device=args.device) / 30
    print(f"device: {args.device}, threads: {torch.get_num_threads()}")
    print(f"scene: {args.points} points, {len(coords)} voxels at 5 cm")

    with torch.no_grad():
        cold = seconds(lambda: sparse_conv(SparseTensor(coords, feats), kernel, 3),
                       args.repeats, args.device)
        warm_input = SparseTensor(coords, feats)
        warm = seconds(lambda: sparse_conv(warm_input, kernel, 3), args.repeats, args.device)
    print(f"ours conv 3x3x3 32->32 forward, kernel map built (s): {cold:.4f}")
    print(f"ours conv 3x3x3 32->32 forward, kernel map cached (s): {warm:.4f}")
    if spconv_available():
        with torch.no_grad():
            theirs = seconds(
                lambda: sparse_conv(SparseTensor(coords, feats), kernel, 3, backend="spconv"),
                args.repeats, args.device)
        print(f"spconv conv 3x3x3 32->32 forward (s): {theirs:.4f}")
        print(f"ours / spconv forward time: {cold / theirs:.2f} (goal <= 3)")
    else:
        print("spconv conv 3x3x3 32->32 forward: spconv not installed")

    net = MinkUNet(MINKUNET_14A).to(args.device).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, dampening=0.1,
                                weight_decay=1e-4)
    batch = SparseTensor(coords, x.feats.to(args.device))
    targets = torch.randn(len(coords), 512, device=args.device)

    def step() -> None:
        # a fresh input: the kernel maps are built inside the step, as in training
        out = net(SparseTensor(batch.coords, batch.feats))
        loss = (out.final - targets).square().mean() + (1 - torch.cosine_similarity(
            out.local, targets, dim=1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    print(f"MinkUNet14A training step, {len(coords)} voxels (s): "
          f"{seconds(step, args.repeats, args.device):.3f}")


if __name__ == "__main__":
    main()
