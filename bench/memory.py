"""Benchmark of output memory: peak RSS of a 12000x12000 image against a 1024x1024 one.

Prints, for every 2D method at its paper size, all with random weights and the 150 ADE20K
classes (one template each, so the text encoder does not dominate the run), the peak memory of
one predict on a 1024^2 and a 12000^2 image, each in a fresh child process, and their ratio:
dense_clip (MaskCLIP, CLIP ViT-B/16), Trident (CLIP ViT-B/16 + DINO ViT-B/16 + SAM ViT-B,
coarse prediction: refinement off), CLIP-DINOiser (ViT-B/16), mask-adapted CLIP (R101c
proposals + ViT-B/16) and CLOC (ViT-B/16). The input image (3 bytes a pixel) and the label map
that ``predict`` returns (1 byte a pixel for 150 classes) are part of every peak; a second
ratio leaves those two out. (The linear probe has no full-size config: it is dense_clip's
window pipeline with a trained 1x1 head.)

    python bench/memory.py [--device cuda] [--sides 1024 12000] [--methods dense_clip trident]
        [--precision fp32|fp16|bf16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import ovseg
from ovseg.encoders.precision import PRECISIONS

CONFIGS = {
    "dense_clip": ("dense_clip/maskclip_vitb16.yaml", ["model.clip.weights", "random"]),
    "trident": ("trident/voc_21.yaml", [
        "model.clip.weights", "random", "model.dino.weights", "random",
        "model.sam.weights", "random", "model.refine.enabled", "false",
    ]),
    "clip_dinoiser": ("clip_dinoiser/ade20k_150.yaml", [
        "model.clip.weights", "random", "model.dino.weights", "random",
    ]),
    "mask_adapted": ("mask_adapted/ade20k_150.yaml", [
        "model.clip.weights", "random", "model.mask_adapted.checkpoint", "",
    ]),
    "cloc": ("cloc/base_vitb16.yaml", ["model.clip.weights", "random"]),
}
CLASS_FILE = Path(ovseg.__file__).parent / "data" / "classes" / "ade20k_150.txt"


def build(method: str, device: str, cache_dir: str, precision: str = "fp32"):
    path, overrides = CONFIGS[method]
    overrides = [*overrides, "model.device", device, "text.templates", "single",
                 "text.cache_dir", cache_dir, "model.precision", precision]
    return ovseg.build_model(ovseg.get_config(path, overrides))


def random_image(side: int) -> np.ndarray:
    """A side x side uint8 RGB image made by tiling a random 1000^2 one (no big temporaries)."""
    tile = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    reps = -(-side // 1000)
    return np.ascontiguousarray(np.tile(tile, (reps, reps, 1))[:side, :side])


def child(args) -> None:
    model = build(args.method, args.device, args.cache_dir, args.precision)
    classes = CLASS_FILE.read_text(encoding="utf-8").split("\n")
    classes = [c for c in classes if c.strip()]
    # the text classifiers are built (and cached) by a prediction on a small image first, so
    # the peak is that of the image, whichever way the method keeps its text embeddings
    model.predict(random_image(64), classes)
    image = random_image(args.child_side)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = model.predict(image, classes)
    assert result.labels.shape == image.shape[:2]
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_mib": peak, "io_mib": (image.nbytes + result.labels.nbytes) / 2**20}))


def peak_memory(args, method: str, side: int) -> dict:
    command = [sys.executable, __file__, "--child-side", str(side), "--method", method,
               "--device", args.device, "--cache-dir", args.cache_dir,
               "--precision", args.precision]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sides", type=int, nargs=2, default=[1024, 12000])
    parser.add_argument("--methods", nargs="+", default=sorted(CONFIGS), choices=sorted(CONFIGS))
    parser.add_argument("--cache-dir", default="")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                        help="model.precision: dtype of the image encoders")
    parser.add_argument("--method", default="dense_clip", help=argparse.SUPPRESS)
    parser.add_argument("--child-side", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_side:
        return child(args)
    with tempfile.TemporaryDirectory() as cache:
        args.cache_dir = args.cache_dir or cache
        small_side, large_side = args.sides
        print(f"device: {args.device}; 150 classes; random weights; precision {args.precision}")
        for method in args.methods:
            small = peak_memory(args, method, small_side)
            large = peak_memory(args, method, large_side)
            print(f"{method} peak memory {small_side}^2 (MiB): {small['peak_mib']:.0f}")
            print(f"{method} peak memory {large_side}^2 (MiB): {large['peak_mib']:.0f}")
            print(f"{method} input image + labels {large_side}^2 (MiB): "
                  f"{large['io_mib']:.0f}")
            ratio = large["peak_mib"] / small["peak_mib"]
            print(f"{method} memory ratio: {ratio:.3f} (goal <= 1.5)")
            inner = ((large["peak_mib"] - large["io_mib"])
                     / (small["peak_mib"] - small["io_mib"]))
            print(f"{method} memory ratio without image and labels: {inner:.3f}")


if __name__ == "__main__":
    main()
