"""Masked-region / noun pairs for mask-adapted CLIP's stages (b) and (c), from COCO Captions.

    python tools/mine_region_nouns.py --config-file configs/mask_adapted/CONFIG.yaml \\
        --captions datasets/coco/annotations/captions_train2017.json \\
        --images datasets/coco/train2017 --output datasets/coco_region_nouns \\
        model.mask_adapted.trained_weights output/stage_a/model_final.safetensors

For each image (mask_adapted.md "Adapting CLIP", data "coco_proposal_1cap"):

1. nouns of its first ``--captions-per-image`` captions (1, as the paper's data; 0 = all):
   ``ovseg.text.noun_phrases.nouns``, which runs **nltk** (POS tags, words tagged NN*) when
   nltk and its tagger data are installed, else our **vocabulary** fallback (known class names,
   multi-word names first). The extractor that ran is logged and stored in ``summary.json``.
2. proposals: the config's mask-adapted model resizes the image as at test time and runs its
   proposal network (``MaskAdapted.propose``); a query is a region when its mask has a pixel
   with probability > ``mask_threshold`` (strict).
3. each region's masked crop (``ovseg.layers.masked_crops``: tight box, outside filled with
   CLIP's mean colour, CLIP-normalised, bicubic 224) goes through the model's CLIP image
   encoder; the nouns through its text encoder, raw (no template, as stage (b) trains).
4. assignment (``--assign``): ``region`` (default; the spec: CLIP picks the best-matching
   caption noun for each region, every region one pair) or ``noun`` (each noun paired with
   its best-matching region; ~3.7 pairs an image, closer to the paper's 442,117 pairs from
   COCO's 118k images; the spec marks the paper's rule unverified).

Output under ``--output``: ``crops/<image id>_<query>.png`` (the box of the resized image,
pixels outside the mask exactly (124, 116, 103), the stored fill stage (c) reads its masks
from), ``pairs.jsonl`` (one object a line: ``image`` (the crop, relative to the file's folder),
``noun``, and for reference ``image_id``, ``query``, ``box`` x1, y1, x2, y2 of the resized
image, x2/y2 exclusive, ``score`` the cosine) that ``model.mask_adapted.region_pairs`` names,
and ``summary.json``. Every file is written atomically; ``pairs.jsonl`` last.

Exit status: 0 done; 2 a missing or malformed input, config or weights (one ``error:`` line);
1 writing failed; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import ovseg
from ovseg.data.coco_captions import CaptionedImage, read_coco_captions
from ovseg.data.image_io import read_image
from ovseg.errors import ConfigError, DatasetError, OvsegError
from ovseg.io import atomic_path, atomic_write_text
from ovseg.layers.masked_crops import binary_masks, crop_region, masked_crop_batches
from ovseg.layers.resize import image_tensor, rescale_size
from ovseg.methods.mask_adapted.training import STORED_FILL
from ovseg.text.noun_phrases import noun_phrase_backend, nouns

EXIT_OK = 0
EXIT_WRITE_ERROR = 1
EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130
ASSIGNMENTS = ("region", "noun")

logger = logging.getLogger("ovseg.mine_region_nouns")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mine_region_nouns.py",
        description="Mine masked-region / noun pairs from COCO Captions with a mask-adapted "
        "model's proposals and CLIP (stage b/c training data).",
        epilog="Config overrides go last, as KEY VALUE pairs: model.device cuda")
    parser.add_argument("--config-file", required=True, metavar="FILE",
                        help="a mask_adapted config (its proposals and CLIP do the mining)")
    parser.add_argument("--captions", required=True, type=Path, metavar="JSON",
                        help="COCO captions JSON (captions_train2017.json format)")
    parser.add_argument("--images", required=True, type=Path, metavar="DIR",
                        help="the folder of the captions' images (file_name inside it)")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR",
                        help="writes crops/, pairs.jsonl and summary.json here")
    parser.add_argument("--limit", type=int, default=0,
                        help="mine the first N images of the captions file only (0 = all)")
    parser.add_argument("--captions-per-image", type=int, default=1,
                        help="nouns from the first N captions of an image (1 = the paper's "
                        "'1cap' data; 0 = all)")
    parser.add_argument("--assign", choices=ASSIGNMENTS, default="region",
                        help="region: each region gets its best noun (default); noun: each "
                        "noun gets its best region")
    parser.add_argument("--backend", choices=("nltk", "vocabulary"), default=None,
                        help="noun extractor (default: nltk when its tagger data is installed,"
                        " else the vocabulary fallback)")
    parser.add_argument("--log-every", type=int, default=100,
                        help="a progress line every N images (default 100)")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, at the end of the command line")
    return parser


def _check_inputs(args: argparse.Namespace) -> list[CaptionedImage]:
    if args.limit < 0 or args.captions_per_image < 0 or args.log_every < 1:
        raise DatasetError("--limit and --captions-per-image must be >= 0, --log-every >= 1")
    if not args.images.is_dir():
        raise DatasetError(f"images folder {args.images} does not exist")
    images = read_coco_captions(args.captions)
    if args.limit:
        images = images[:args.limit]
    missing = [image.file_name for image in images
               if not (args.images / image.file_name).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} images of {args.captions} are not in {args.images} "
                           f"(first: {missing[0]}); check --images")
    return images


def build_miner(config_file: str, opts: Sequence[str]):
    """The mask-adapted model of ``config_file`` (+ overrides), in eval mode."""
    cfg = ovseg.get_config(config_file, list(opts))
    if cfg.model.name != "mask_adapted":
        raise ConfigError(f"{config_file} builds {cfg.model.name!r}; mining needs a "
                          "mask_adapted config (its proposal network and CLIP)")
    return ovseg.build_model(cfg).eval()


def image_nouns(image: CaptionedImage, captions_per_image: int, backend: str) -> list[str]:
    """The nouns of the image's first ``captions_per_image`` captions (0 = all), in order."""
    captions = image.captions[:captions_per_image] if captions_per_image else image.captions
    return nouns(". ".join(captions), backend=backend)


@torch.inference_mode()
def mine_image(model, pixels: np.ndarray, noun_list: Sequence[str],
               assign: str = "region") -> tuple[list[dict[str, Any]], dict[int, np.ndarray]]:
    """Pairs of one image.

    Args:
        model: a :class:`ovseg.methods.mask_adapted.model.MaskAdapted`.
        pixels: (H, W, 3) uint8 RGB.
        noun_list: the image's nouns (not empty).
        assign: "region" | "noun" (module docstring).

    Returns:
        the pairs (``noun``, ``query``, ``box``, ``score``) in query order ("region") or noun
        order ("noun"), and per paired query its stored crop, (h, w, 3) uint8 of the resized
        image's box, outside the mask exactly :data:`STORED_FILL`.
    """
    settings, inference = model.settings, model.inference
    size = rescale_size(pixels.shape[0], pixels.shape[1], inference.short_side,
                        inference.max_long_side)
    resized = image_tensor(pixels, size, model.device)
    _, mask_probs = model.propose(resized)
    text = F.normalize(model.clip.encode_text(list(noun_list)).to(model.device), dim=-1)
    queries, boxes, scores = [], [], []
    for crops in masked_crop_batches(resized[0], mask_probs, threshold=settings.mask_threshold,
                                     crop_batch=settings.crop_batch, fill=model.fill):
        # guess: plain CLIP scores the crops (no mask prompts): mining precedes prompt tuning
        regions = F.normalize(model.clip.encode_image(crops.images).float(), dim=-1)
        scores.append(regions @ text.T)
        queries += crops.queries.tolist()
        boxes += crops.boxes.tolist()
    if not queries:
        return [], {}
    similarity = torch.cat(scores)  # (V, N)
    if assign == "region":
        best = similarity.max(dim=1)
        chosen = [(v, int(n), float(s)) for v, (s, n) in
                  enumerate(zip(best.values, best.indices, strict=True))]
    else:
        best = similarity.max(dim=0)
        chosen = [(int(v), n, float(s)) for n, (s, v) in
                  enumerate(zip(best.values, best.indices, strict=True))]
    pairs, stored = [], {}
    for v, n, score in chosen:
        query, box = queries[v], tuple(boxes[v])
        if query not in stored:
            mask = binary_masks(mask_probs[query], settings.mask_threshold)
            region, _ = crop_region(resized[0], mask, box, STORED_FILL)
            stored[query] = region.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0) \
                .cpu().numpy()
        pairs.append({"noun": noun_list[n], "query": query, "box": list(box),
                      "score": round(score, 6)})
    return pairs, stored


def _save_png(path: Path, pixels: np.ndarray) -> None:
    with atomic_path(path) as temporary:
        Image.fromarray(pixels).save(temporary, format="PNG")


def run(args: argparse.Namespace) -> dict[str, Any]:
    images = _check_inputs(args)
    backend = noun_phrase_backend(args.backend)
    model = build_miner(args.config_file, args.opts)
    logger.info("mining %d images with the %s noun extractor, assignment %s", len(images),
                backend, args.assign)
    crops_dir = args.output / "crops"
    lines: list[str] = []
    without_nouns = without_regions = 0
    start = time.monotonic()
    for number, image in enumerate(images, start=1):
        noun_list = image_nouns(image, args.captions_per_image, backend)
        if not noun_list:
            without_nouns += 1
        else:
            pairs, stored = mine_image(model, np.array(read_image(args.images / image.file_name)),
                                       noun_list, args.assign)
            without_regions += not pairs
            for query, pixels in stored.items():
                _save_png(crops_dir / f"{image.id:012d}_{query:03d}.png", pixels)
            for pair in pairs:
                crop = f"crops/{image.id:012d}_{pair['query']:03d}.png"
                lines.append(json.dumps({"image": crop, "noun": pair["noun"],
                                         "image_id": image.id, "query": pair["query"],
                                         "box": pair["box"], "score": pair["score"]}))
        if number % args.log_every == 0 or number == len(images):
            elapsed = time.monotonic() - start
            logger.info("%d/%d images, %d pairs, %.2f s/image", number, len(images),
                        len(lines), elapsed / number)
    summary = {"noun_extractor": backend, "assign": args.assign, "images": len(images),
               "pairs": len(lines), "images_without_nouns": without_nouns,
               "images_without_regions": without_regions, "config": str(args.config_file),
               "captions_per_image": args.captions_per_image}
    atomic_write_text(args.output / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(args.output / "pairs.jsonl", "".join(line + "\n" for line in lines))
    logger.info("wrote %s: %d pairs (%d images without nouns, %d without regions)",
                args.output / "pairs.jsonl", len(lines), without_nouns, without_regions)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger("ovseg").handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (OvsegError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_WRITE_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
