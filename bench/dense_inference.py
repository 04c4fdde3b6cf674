"""Benchmark of the one dense-inference path: time overhead over the CLIP forwards, and memory.

Prints, for ViT-B/16 ``maskclip`` at 448 short side on a 1024x768 image (random weights):
the per-image time with batched windows, the time of the CLIP forwards alone on the same
windows, their ratio, and the peak memory of a 1024^2 vs a 4096^2 image (each in a fresh child
process, so runs do not pollute each other).

    python bench/dense_inference.py [--device cuda] [--repeats 3] [--arch ViT-B-16]
        [--precision fp32|fp16|bf16]
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
from _memory import print_peak_memory_of_predict

import ovseg
from ovseg.encoders.precision import PRECISIONS
from ovseg.layers import rescale_size, resize_image, window_grid
from ovseg.layers.attention import maskclip_last_block

VOCABULARY = "cat, dog, sky, grass, road"


def build(arch: str, device: str, short_side: int, precision: str = "fp32"):
    overrides = [
        "model.clip.arch", arch, "model.clip.weights", "random", "model.dense_clip.mode",
        "maskclip", "model.inference.short_side", str(short_side), "model.device", device,
        "model.precision", precision,
    ]
    return ovseg.build_model(ovseg.get_config("dense_clip/maskclip_vitb16.yaml", overrides))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clip_forwards_only(model, image: np.ndarray, device: str) -> float:
    """Seconds spent in the CLIP forwards of ``predict`` (last block as MaskCLIP, ln_post,
    proj): the same windows, the same batches."""
    settings = model.inference
    size = rescale_size(*image.shape[:2], settings.short_side, settings.max_long_side)
    pixels = torch.from_numpy(resize_image(image, size)).to(model.device)
    x = model.clip.normalize(pixels.permute(2, 0, 1)[None])
    grid = window_grid(*size, settings.crop, settings.stride)
    windows = torch.cat([x[:, :, y0:y1, x0:x1] for y0, x0, y1, x1 in grid])
    batches = windows.split(settings.window_batch)
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            tokens, _ = maskclip_last_block(model.clip(batch), model.clip)
            model.clip.project(tokens)
    synchronize(device)
    return time.perf_counter() - start


def time_predict(model, image: np.ndarray, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    model.predict(image, VOCABULARY)
    synchronize(device)
    return time.perf_counter() - start


def peak_memory_child(args, side: int) -> float:
    """Run one predict on a side x side image in a fresh process; its peak memory in MiB."""
    command = [sys.executable, __file__, "--child-side", str(side), "--device", args.device,
               "--arch", args.arch, "--short-side", str(args.short_side),
               "--precision", args.precision]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_mib"]


def child(args) -> None:
    model = build(args.arch, args.device, args.short_side, args.precision)
    print_peak_memory_of_predict(model, args.child_side, VOCABULARY, args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--short-side", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                        help="model.precision: dtype of the image encoders")
    parser.add_argument("--child-side", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_side:
        return child(args)
    torch.manual_seed(0)
    model = build(args.arch, args.device, args.short_side, args.precision)
    image = np.random.default_rng(0).integers(0, 256, (768, 1024, 3), np.uint8)
    model.predict(image, VOCABULARY)  # warm-up; also fills the text-classifier cache
    totals, forwards = [], []
    for _ in range(args.repeats):
        totals.append(time_predict(model, image, args.device))
        forwards.append(clip_forwards_only(model, image, args.device))
    total, forward = statistics.median(totals), statistics.median(forwards)
    print(f"device: {args.device}")
    print(f"model: {args.arch} maskclip, short side {args.short_side}, 1024x768 image, "
          f"window batch {model.inference.window_batch}, precision {args.precision}")
    print(f"per-image time (s): {total:.3f}")
    print(f"clip forwards alone (s): {forward:.3f}")
    print(f"time ratio: {total / forward:.3f} (goal <= 1.10)")
    small, large = peak_memory_child(args, 1024), peak_memory_child(args, 4096)
    print(f"peak memory 1024^2 (MiB): {small:.0f}")
    print(f"peak memory 4096^2 (MiB): {large:.0f}")
    print(f"memory ratio: {large / small:.3f} (goal <= 1.5)")


if __name__ == "__main__":
    main()
