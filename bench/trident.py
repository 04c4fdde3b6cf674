"""Benchmark of Trident: time over the encoder forwards, and memory against the image size.

Prints, for Trident ViT-B/16 (CLIP ViT-B-16 + DINO ViT-B/16 + SAM ViT-B, random weights; the
VOC-21 settings, short side 448) on a 1024x768 image, with refinement off and on: the per-image
time, the time inside the encoder forwards (CLIP, DINO, SAM encoder, SAM decoder calls), their
ratio, and the peak memory of a 1024^2 vs a 4096^2 image (each in a fresh child process).

    python bench/trident.py [--device cuda] [--repeats 3] [--config trident/voc_21.yaml]
        [--precision fp32|fp16|bf16]

On a 2-core CPU one predict takes 15-30 s (SAM ViT-B at 1024 most of it) and the whole run a
few minutes; `--repeats 1` shortens it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from _memory import print_peak_memory_of_predict

import ovseg
from ovseg.encoders.precision import PRECISIONS
from ovseg.methods import trident as trident_method
from ovseg.text import as_vocabulary

VOCABULARY = "cat, dog, sky, grass, road"


def build(args, refine: bool):
    overrides = [
        "model.clip.weights", "random", "model.dino.weights", "random",
        "model.sam.weights", "random", "model.device", args.device,
        "model.precision", args.precision,
        "model.refine.enabled", str(refine).lower(), "text.cache_dir", args.cache_dir,
    ]
    return ovseg.build_model(ovseg.get_config(args.config, overrides))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class EncoderTimer:
    """Wraps the encoder calls of one model and adds up the seconds spent inside them."""

    def __init__(self, model, device: str) -> None:
        self.device = device
        self.seconds = 0.0
        self.calls: dict[str, int] = {}
        self._originals: list[tuple[object, str, Callable]] = []
        self._wrap(model.clip, "forward", "clip")
        # CLIP's last block with DINO's attention runs outside the encoder (layers/attention.py)
        self._wrap(trident_method, "proxy_last_block", "clip last block")
        self._wrap(model.dino, "forward", "dino")
        self._wrap(model.sam, "forward", "sam encoder")
        self._wrap(model.sam, "predict_masks", "sam decoder")

    def _wrap(self, owner, attribute: str, name: str) -> None:
        original: Callable = getattr(owner, attribute)
        self._originals.append((owner, attribute, original))

        def timed(*args, **kwargs):
            synchronize(self.device)
            start = time.perf_counter()
            out = original(*args, **kwargs)
            synchronize(self.device)
            self.seconds += time.perf_counter() - start
            self.calls[name] = self.calls.get(name, 0) + 1
            return out

        setattr(owner, attribute, timed)  # an instance attribute: nn.Module.__call__ finds it

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls = {}

    def restore(self) -> None:
        """Put the wrapped calls back (the module-level one outlives the model)."""
        for owner, attribute, original in reversed(self._originals):
            setattr(owner, attribute, original)
        self._originals = []


def time_predict(model, timer: EncoderTimer, image: np.ndarray, device: str) -> tuple[float, float]:
    timer.reset()
    synchronize(device)
    start = time.perf_counter()
    model.predict(image, VOCABULARY)
    synchronize(device)
    return time.perf_counter() - start, timer.seconds


def peak_memory_child(args, side: int, refine: bool) -> float:
    """One predict on a side x side image in a fresh process; its peak memory in MiB."""
    command = [
        sys.executable, __file__, "--child-side", str(side), "--device", args.device,
        "--config", args.config, "--cache-dir", args.cache_dir, "--precision", args.precision,
    ]
    if refine:
        command.append("--child-refine")
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_mib"]


def child(args) -> None:
    model = build(args, args.child_refine)
    print_peak_memory_of_predict(model, args.child_side, VOCABULARY, args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", default="trident/voc_21.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                        help="model.precision: dtype of the image encoders")
    parser.add_argument("--cache-dir", default="", help="text-classifier cache (default: temp)")
    parser.add_argument("--child-side", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child-refine", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_side:
        return child(args)
    with tempfile.TemporaryDirectory() as cache:
        args.cache_dir = args.cache_dir or cache
        run(args)


def run(args) -> None:
    torch.manual_seed(0)
    image = np.random.default_rng(0).integers(0, 256, (768, 1024, 3), np.uint8)
    print(f"device: {args.device}")
    print(f"model: {args.config}, CLIP ViT-B-16 + DINO ViT-B/16 + SAM vit_b, random weights, "
          f"1024x768 image, precision {args.precision}")
    for refine in (False, True):
        model = build(args, refine)
        model.text_classifier(as_vocabulary(VOCABULARY).names)  # fill the text cache first
        timer = EncoderTimer(model, args.device)
        runs = [time_predict(model, timer, image, args.device) for _ in range(args.repeats)]
        total = statistics.median(r[0] for r in runs)
        encoders = statistics.median(r[1] for r in runs)
        tag = "refine" if refine else "no refine"
        calls = ", ".join(f"{name} {count}" for name, count in timer.calls.items())
        print(f"[{tag}] encoder calls per image: {calls}")
        print(f"[{tag}] per-image time (s): {total:.3f}")
        print(f"[{tag}] encoder forwards (s): {encoders:.3f}")
        print(f"[{tag}] time ratio: {total / encoders:.3f} (goal <= 1.10)")
        timer.restore()
        del model, timer
    for refine in (False, True):
        tag = "refine" if refine else "no refine"
        small = peak_memory_child(args, 1024, refine)
        large = peak_memory_child(args, 4096, refine)
        print(f"[{tag}] peak memory 1024^2 (MiB): {small:.0f}")
        print(f"[{tag}] peak memory 4096^2 (MiB): {large:.0f}")
        print(f"[{tag}] memory ratio: {large / small:.3f} (goal <= 1.5)")


if __name__ == "__main__":
    main()
