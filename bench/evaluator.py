"""Benchmark of confusion-matrix updates: ours vs mmseg's IoUMetric, 512x512 maps.

Prints ``name: value`` lines: updates (images) per second at 150 and 847 classes for our
``SemSegEvaluator.process`` and for mmseg's per-image ``IoUMetric.intersect_and_union`` on the
same int64 tensors, a check that both count the same areas, and our speedup. Each figure is the
median of several repeats, ours and mmseg's interleaved so both see the same machine load.

    python bench/evaluator.py [--device cuda] [--images 16] [--repeats 9] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from ovseg.evaluation import SemSegEvaluator

SIZE = 512
CLASS_COUNTS = (150, 847)
IGNORE_FRACTION = 0.1
SPEEDUP_GOAL = 3.0


def _iou_metric_class() -> tuple[type | None, str]:
    """mmseg's IoUMetric, or None and why it cannot be imported."""
    try:
        from mmseg.evaluation.metrics.iou_metric import IoUMetric
    except (ImportError, AssertionError) as error:  # mmseg asserts its mmcv version range
        return None, f"{type(error).__name__}: {error}"
    return IoUMetric, ""


def _data(
    num_classes: int, num_images: int, device: torch.device, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prediction, label) pairs of (512, 512) int64 tensors, ~10 % of labels ignore."""
    ignore_value = _ignore_value(num_classes)
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(num_images):
        label = torch.randint(0, num_classes, (SIZE, SIZE), generator=generator)
        label[torch.rand((SIZE, SIZE), generator=generator) < IGNORE_FRACTION] = ignore_value
        # half right, half random: a realistic spread over the matrix
        noise = torch.randint(0, num_classes, (SIZE, SIZE), generator=generator)
        keep = torch.rand((SIZE, SIZE), generator=generator) < 0.5
        prediction = torch.where(keep & (label != ignore_value), label, noise)
        pairs.append((prediction.to(device), label.to(device)))
    return pairs


def _ignore_value(num_classes: int) -> int:
    # the benchmarks' own: 255 for 8-bit label files, 65535 for the 16-bit 847-class ones
    return 255 if num_classes < 255 else 65535


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_ours(evaluator: SemSegEvaluator, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Seconds to add ``pairs`` to a long-lived evaluator, as in an evaluation loop."""
    device = pairs[0][0].device
    _synchronize(device)
    start = time.perf_counter()
    for prediction, label in pairs:
        evaluator.process(prediction, label)
    _synchronize(device)
    return time.perf_counter() - start


def _run_mmseg(
    iou_metric: type, pairs: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int
) -> tuple[float, list[np.ndarray]]:
    ignore_value = _ignore_value(num_classes)
    device = pairs[0][0].device
    _synchronize(device)
    start = time.perf_counter()
    # IoUMetric.process calls this per image, then compute_metrics sums the areas
    results = [
        iou_metric.intersect_and_union(prediction, label, num_classes, ignore_value)
        for prediction, label in pairs
    ]
    areas = [sum(column) for column in zip(*results, strict=True)]
    elapsed = time.perf_counter() - start
    return elapsed, [area.numpy() for area in areas]


def _areas_from_matrix(matrix: np.ndarray) -> list[np.ndarray]:
    """mmseg's (intersect, union, pred, label) areas from our rows = GT, cols = pred matrix."""
    intersect = np.diag(matrix)
    pred = matrix.sum(axis=0)
    label = matrix.sum(axis=1)
    return [intersect, pred + label - intersect, pred, label]


def _median_rate(runs: list[Callable[[], float]], num_images: int, repeats: int) -> list[float]:
    """Median images/s of each run; the runs are interleaved within each repeat."""
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for index, run in enumerate(runs):
            times[index].append(run())
    return [num_images / statistics.median(elapsed) for elapsed in times]


def _bench(
    num_classes: int, device: torch.device, num_images: int, repeats: int, iou_metric: type | None
) -> None:
    """Print the figures of one class count."""
    pairs = _data(num_classes, num_images, device, seed=num_classes)
    evaluator = SemSegEvaluator(num_classes, _ignore_value(num_classes), distributed=False)
    # one untimed pass each: first-call allocations, CUDA kernels, lazy imports
    _run_ours(evaluator, pairs)
    matrix = evaluator.confusion_matrix
    runs: list[Callable[[], float]] = [lambda: _run_ours(evaluator, pairs)]
    if iou_metric is not None:
        _, mmseg_areas = _run_mmseg(iou_metric, pairs, num_classes)
        identical = all(
            np.array_equal(ours.astype(np.float64), theirs.astype(np.float64))
            for ours, theirs in zip(_areas_from_matrix(matrix), mmseg_areas, strict=True)
        )
        runs.append(lambda: _run_mmseg(iou_metric, pairs, num_classes)[0])
    rates = _median_rate(runs, num_images, repeats)
    print(f"ours updates/s {num_classes} classes: {rates[0]:.1f}")
    if iou_metric is not None:
        print(f"mmseg updates/s {num_classes} classes: {rates[1]:.1f}")
        print(f"areas identical to mmseg {num_classes} classes: {'yes' if identical else 'NO'}")
        print(
            f"speedup vs mmseg {num_classes} classes: {rates[0] / rates[1]:.1f}x "
            f"(goal >= {SPEEDUP_GOAL:g}x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--images", type=int, default=16, help="images per timed run")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs; the median counts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    iou_metric, why_not = _iou_metric_class()
    print(f"device: {device} (torch threads: {torch.get_num_threads()})")
    print(f"maps: {SIZE}x{SIZE}, {args.images} images per run, median of {args.repeats} runs")
    if iou_metric is None:
        print(f"mmseg: not importable ({why_not})")

    for num_classes in CLASS_COUNTS:
        _bench(num_classes, device, args.images, args.repeats, iou_metric)


if __name__ == "__main__":
    main()
