"""Mask-adapted CLIP: per-image time with batched crops vs one by one, the share of time in the
proposals vs CLIP, and the peak memory of a large vs a small image.

    python bench/mask_adapted.py                       # tiny random model, 100 queries, CPU
    python bench/mask_adapted.py --config mask_adapted/ade20k_150.yaml --device cuda

Random weights (only time and memory are measured). Batched and one-by-one crops must give the
same labels (asserted). The shares are parts of the same ``predict`` calls whose wall time is
the per-image time: ``propose`` and ``region_embeddings`` (the masked crops through CLIP) are
timed inside ``encode``. Peak memory is measured in child processes (CPU: max resident set;
CUDA: peak allocated), with ``crop_batch`` bounding the crops held at once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch
from _memory import print_peak_memory_of_predict

import ovseg

TINY = "tiny/mask_adapted_tiny.yaml"
VOCABULARY = "wall, floor, ceiling, bed, window, cabinet, person, door, table, plant"
PARTS = ("propose", "region_embeddings")


def build(args, crop_batch: int, short_side: int | None = None):
    short_side = short_side or args.short_side
    overrides = ["model.device", args.device, "model.mask_adapted.crop_batch", str(crop_batch),
                 "model.mask_adapted.num_queries", str(args.queries),
                 "model.mask_adapted.mask_threshold", str(args.threshold),
                 "model.inference.short_side", str(short_side)]
    if args.config == TINY:
        overrides += ["model.inference.max_long_side", str(4 * short_side)]
    return ovseg.build_model(ovseg.get_config(args.config, overrides))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PartTimes:
    """Seconds spent in the model's ``propose`` and ``region_embeddings`` during ``predict``.

    Instance attributes shadow the two methods, so the ``encode`` inside ``predict`` calls the
    timed versions: the parts and the whole are measured in the same call.
    """

    def __init__(self, model, device: str):
        self.device = device
        self.seconds = dict.fromkeys(PARTS, 0.0)
        for name in PARTS:
            setattr(model, name, self._timed(name, getattr(model, name)))

    def _timed(self, name: str, method):
        def timed_method(*args, **kwargs):
            synchronize(self.device)
            start = time.perf_counter()
            out = method(*args, **kwargs)
            synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start
            return out

        return timed_method


def time_predict(model, image: np.ndarray, device: str, repeats: int) -> tuple[float, dict]:
    """Mean per-image seconds of ``repeats`` predicts after one warm-up, and the seconds of
    each part summed over the same predicts divided by their total (the shares)."""
    parts = PartTimes(model, device)
    model.predict(image, VOCABULARY)
    parts.seconds = dict.fromkeys(PARTS, 0.0)
    total = 0.0
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        model.predict(image, VOCABULARY)
        synchronize(device)
        total += time.perf_counter() - start
    return total / repeats, {name: seconds / total for name, seconds in parts.seconds.items()}


def peak_child(args, side: int) -> float:
    """Peak memory (MiB) of one side x side prediction in a fresh process."""
    command = [sys.executable, __file__, "--child-side", str(side), "--config", args.config,
               "--device", args.device, "--queries", str(args.queries),
               "--threshold", str(args.threshold), "--short-side", str(args.short_side),
               "--crop-batch", str(args.crop_batch)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=TINY)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--short-side", type=int, default=512)
    parser.add_argument("--crop-batch", type=int, default=32)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small-side", type=int, default=512, help="memory: the small image")
    parser.add_argument("--large-side", type=int, default=2048, help="memory: the large image")
    parser.add_argument("--child-side", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_side:
        model = build(args, args.crop_batch)
        print_peak_memory_of_predict(model, args.child_side, VOCABULARY, args.device)
        return
    image = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), np.uint8)
    batched, single = build(args, args.crop_batch), build(args, 1)
    state = batched.encode(image)
    labels = batched.predict(state, VOCABULARY).labels
    assert np.array_equal(labels, single.predict(image, VOCABULARY).labels), \
        "batched and one-by-one crops disagree"
    batched_time, shares = time_predict(batched, image, args.device, args.repeats)
    single_time, _ = time_predict(single, image, args.device, args.repeats)
    small, large = peak_child(args, args.small_side), peak_child(args, args.large_side)
    print(f"device: {args.device}; config {args.config}, {args.queries} queries, short side "
          f"{args.short_side}, {args.width}x{args.height} image")
    print(f"valid queries: {int(state.valid.sum())} of {args.queries}")
    print("batched and one-by-one labels identical: True")
    print(f"per-image time, crops batched by {args.crop_batch}: {batched_time:.3f} s")
    print(f"per-image time, crops one by one: {single_time:.3f} s")
    print(f"batched / one-by-one time ratio: {batched_time / single_time:.3f} (goal <= 1.0)")
    print(f"proposal share: {shares['propose']:.3f}")
    print(f"clip share: {shares['region_embeddings']:.3f}")
    rest = 1 - sum(shares.values())
    print(f"rest share (resize, text, ensemble, label map): {rest:.3f} (goal >= 0: shares "
          "sum to <= 1)")
    print(f"peak memory {args.small_side}^2 (MiB): {small:.0f}")
    print(f"peak memory {args.large_side}^2 (MiB): {large:.0f}")
    print(f"memory ratio: {large / small:.3f} (goal <= 1.5)")


if __name__ == "__main__":
    main()
