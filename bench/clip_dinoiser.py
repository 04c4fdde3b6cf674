"""Benchmark of CLIP-DINOiser: inference time over MaskCLIP alone, training speed with and
without the teacher-target cache.

Inference: CLIP-DINOiser and dense_clip ``maskclip`` on the same CLIP ViT-B/16 (random weights),
short side 448, windows 448/224, on a 1024x768 image; the per-image time of each and their
ratio (the heads and the pooling on top of the one CLIP pass).
Training: the ViT-B/16 model with ViT-B/16 and ViT-S/8 teachers (random weights, a random FOUND
decoder) on small crops of generated images, through the engine's Trainer; iterations/s with
the teachers run every step and with every target read from a warm cache
(``target_cache_dir`` + ``augment_variants 1``).

    python bench/clip_dinoiser.py [--device cuda] [--repeats 3] [--crop 224] [--batch 4]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

import ovseg
from ovseg.engine.trainer import build_trainer
from ovseg.modeling.found import FoundDecoder

VOCABULARY = "cat, dog, sky, grass, road"
INFERENCE = ["model.inference.short_side", "448", "model.inference.crop", "448",
             "model.inference.stride", "224", "text.templates", "single"]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_predict(model, image: np.ndarray, device: str, repeats: int) -> float:
    """Median seconds of ``model.predict`` (after one warm-up call)."""
    model.predict(image, VOCABULARY)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        model.predict(image, VOCABULARY)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inference(args) -> None:
    common = ["model.clip.weights", "random", "model.device", args.device, *INFERENCE]
    dinoiser = ovseg.build_model(ovseg.get_config("clip_dinoiser/base_vitb16.yaml", common))
    maskclip = ovseg.build_model(ovseg.get_config("dense_clip/maskclip_vitb16.yaml", [
        *common, "model.clip.arch", "ViT-B-16", "model.clip.pos_embed_resize", "size",
        "model.inference.window_batch", str(dinoiser.inference.window_batch)]))
    image = np.random.default_rng(0).integers(0, 256, (768, 1024, 3), np.uint8)
    # interleaved repeats: both see the same machine load
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(time_predict(dinoiser, image, args.device, 1))
        theirs.append(time_predict(maskclip, image, args.device, 1))
    ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
    print(f"device: {args.device}")
    print("inference: ViT-B/16 random weights, short side 448, windows 448/224, 1024x768 image, "
          f"window batch {dinoiser.inference.window_batch}")
    print(f"clip_dinoiser per-image time (s): {ours_s:.3f}")
    print(f"maskclip per-image time (s): {theirs_s:.3f}")
    print(f"clip_dinoiser / maskclip time ratio: {ours_s / theirs_s:.3f} (goal <= 1.15)")


def make_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"{index:03d}.png"), image)


def training_speed(args, work: Path, cache: bool) -> float:
    """Iterations/s of ``args.iterations`` training steps (after the warm-up steps that run
    every image's teachers once, which also fill the cache when it is on)."""
    found = work / "decoder_weights.pt"
    torch.save({"decoder": FoundDecoder(384).decoder.state_dict()}, found)
    overrides = [
        "model.clip.weights", "random", "model.dino.weights", "random",
        "model.clip_dinoiser.found_dino_weights", "random",
        "model.clip_dinoiser.found_weights", str(found),
        "model.clip_dinoiser.image_dir", str(work / "images"),
        "model.clip_dinoiser.subset_size", str(args.images),
        "model.clip_dinoiser.augment_variants", "1" if cache else "0",
        "model.clip_dinoiser.target_cache_dir", str(work / "cache") if cache else "",
        "dataloader.crop_size", str(args.crop), "dataloader.num_workers", "0",
        "solver.ims_per_batch", str(args.batch), "model.device", args.device,
        "output_dir", str(work / "output"),
    ]
    cfg = ovseg.get_config("clip_dinoiser/train_imagenet1k.yaml", overrides)
    model = ovseg.build_model(cfg)
    trainer = build_trainer(cfg, model)
    warmup = -(-args.images // args.batch)  # one pass over the images: the cache is full
    trainer.train(0, warmup)
    synchronize(args.device)
    start = time.perf_counter()
    trainer.train(warmup, warmup + args.iterations)
    synchronize(args.device)
    return args.iterations / (time.perf_counter() - start)


def training(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_images(work / "images", args.images)
        without = training_speed(args, work, cache=False)
        with_cache = training_speed(args, work, cache=True)
    print(f"training: ViT-B/16 heads, teachers DINO ViT-B/16 + ViT-S/8 (random weights), "
          f"crop {args.crop}, batch {args.batch}")
    print(f"training iterations/s without target cache: {without:.3f}")
    print(f"training iterations/s with warm target cache: {with_cache:.3f}")
    print(f"target cache speedup: {with_cache / without:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crop", type=int, default=224, help="training crop (448 in the paper)")
    parser.add_argument("--batch", type=int, default=4, help="training images per step")
    parser.add_argument("--images", type=int, default=8, help="training images")
    parser.add_argument("--iterations", type=int, default=6, help="timed training steps")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    logging.getLogger("ovseg").setLevel(logging.WARNING)
    torch.manual_seed(0)
    inference(args)
    if not args.skip_training:
        training(args)


if __name__ == "__main__":
    main()
