"""Mask-adapted CLIP: per-image time with batched crops vs one by one, the share of time in the
proposals vs CLIP, and the peak memory of one prediction.

    python bench/mask_adapted.py                       # tiny random model, 100 queries, CPU
    python bench/mask_adapted.py --config mask_adapted/ade20k_150.yaml --device cuda

Random weights (only time and memory are measured). Batched and one-by-one crops must give the
same labels (asserted). Peak memory is measured in a child process (CPU: max resident set;
CUDA: peak allocated), with ``crop_batch`` bounding the crops held at once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import ovseg
from ovseg.layers.resize import image_tensor, rescale_size

TINY = "tiny/mask_adapted_tiny.yaml"
VOCABULARY = "wall, floor, ceiling, bed, window, cabinet, person, door, table, plant"


def build(args, crop_batch: int):
    overrides = ["model.device", args.device, "model.mask_adapted.crop_batch", str(crop_batch),
                 "model.mask_adapted.num_queries", str(args.queries),
                 "model.mask_adapted.mask_threshold", str(args.threshold),
                 "model.inference.short_side", str(args.short_side)]
    if args.config == TINY:
        overrides += ["model.inference.max_long_side", str(4 * args.short_side)]
    return ovseg.build_model(ovseg.get_config(args.config, overrides))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(function, device: str, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_child(args, height: int, width: int, short_side: int | None = None) -> float:
    """Peak memory (MiB) of one height x width prediction in a fresh process."""
    command = [sys.executable, __file__, "--peak-only", "--config", args.config, "--device",
               args.device, "--queries", str(args.queries), "--threshold", str(args.threshold),
               "--short-side", str(short_side or args.short_side),
               "--crop-batch", str(args.crop_batch),
               "--height", str(height), "--width", str(width)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"])


def image_of(args) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), np.uint8)


def peak_only(args) -> None:
    import resource

    model = build(args, args.crop_batch)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model.predict(image_of(args), VOCABULARY)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": peak}))


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
    parser.add_argument("--peak-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_only:
        peak_only(args)
        return
    image = image_of(args)
    batched, single = build(args, args.crop_batch), build(args, 1)
    state = batched.encode(image)
    valid = int(state.valid.sum())
    labels = batched.predict(state, VOCABULARY).labels
    assert np.array_equal(labels, single.predict(image, VOCABULARY).labels), \
        "batched and one-by-one crops disagree"
    batched_time = timed(lambda: batched.predict(image, VOCABULARY), args.device, args.repeats)
    single_time = timed(lambda: single.predict(image, VOCABULARY), args.device, args.repeats)

    size = rescale_size(args.height, args.width, batched.inference.short_side,
                        batched.inference.max_long_side)
    resized = image_tensor(image, size, batched.device)
    with torch.inference_mode():
        propose = timed(lambda: batched.propose(resized), args.device, args.repeats)
        _, probs = batched.propose(resized)
        clip = timed(lambda: batched.region_embeddings(resized[0], probs), args.device,
                     args.repeats)
    print(f"valid queries: {valid} of {args.queries}")
    print(f"per-image time, crops batched by {args.crop_batch}: {batched_time:.3f} s")
    print(f"per-image time, crops one by one: {single_time:.3f} s")
    print(f"batched crops speedup: {single_time / batched_time:.2f}x (goal >= 1x)")
    print(f"share of time in proposals: {propose / batched_time:.0%}")
    print(f"share of time in masked crops + CLIP: {clip / batched_time:.0%}")
    # the goal: the model and libraries (a 64 x 64 prediction) plus a few (Q, h, w) float maps
    # (the state's mask probabilities, a chunk of upsampled logits, a band), never Q full-size
    # crops or masks per query beyond that
    mask_map = args.queries * size[0] * size[1] * 4 / 2**20
    baseline = peak_child(args, 64, 64, short_side=64)
    peak = peak_child(args, args.height, args.width)
    print(f"peak memory of a 64x64 prediction (model + libraries): {baseline:.0f} MiB")
    print(f"peak memory of one prediction: {peak:.0f} MiB")
    print(f"peak memory above the 64x64 run: {peak - baseline:.0f} MiB "
          f"(goal <= {4 * mask_map:.0f}, four (Q, h, w) float32 maps)")


if __name__ == "__main__":
    main()
