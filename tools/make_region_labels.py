"""VESL-style region labels for CLOC (cloc.md "Data"): caption noun phrases + detector boxes.

    # 1. the text queries: at most 20 noun phrases per image from its captions
    python tools/make_region_labels.py --captions captions_train2017.json \\
        --queries-out queries.json
    # 2. run any open-vocabulary detector (OWLv2 L/14 in the paper) with each image's queries;
    #    write its boxes in COCO results format
    # 3. the region file: boxes with confidence > 0.1, each captioned by its best phrase
    python tools/make_region_labels.py --captions captions_train2017.json \\
        --detections detections.json --output regions.json

Steps, as the paper's VESL pipeline (the re-captioning step 1 is not here: give the captions
you have):

- noun phrases from each image's captions (``ovseg.text.noun_phrases``: nltk POS tags + the
  regexp chunker ``NP: {<DT>?<JJ.*>*<NN.*>+}`` when nltk and its tagger data are installed,
  else our vocabulary fallback; the backend is logged and stored in the output's ``info``),
  repeats dropped, at most ``--max-phrases`` (20) per image;
- detections: a JSON list of ``{image_id, bbox: [x, y, w, h] pixels, score, phrase}`` or
  ``category_id`` in place of ``phrase``: the 0-based index of the phrase in that image's query
  list (``--queries-out``), as OWL-ViT's label index is. Entries with the same image and bbox
  are one box with a score per phrase;
- a box is kept when its best score is **strictly above** ``--threshold`` (0.1; a box at
  exactly 0.1 is dropped, cloc.md "confidence > 0.1") and captioned by its most confident
  phrase (ties: the first in the file).

Output: a COCO-format region JSON that ``ovseg.methods.cloc.data`` reads (as a
``model.cloc.region_sets`` entry, with the same captions JSON as its ``captions``):
``images`` (every captioned image), ``annotations`` (``id``, ``image_id``, ``bbox``, ``area``,
``iscrowd`` 0, ``category_id``, ``caption``, ``score``) and ``categories`` (one per distinct
caption, in order of first use), written atomically.

Exit status: 0 done; 2 a missing or malformed input (one ``error:`` line); 1 writing failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ovseg.data.coco_captions import CaptionedImage, read_coco_captions, read_json
from ovseg.errors import DatasetError, OvsegError
from ovseg.io import atomic_write_text
from ovseg.text.noun_phrases import MAX_PHRASES, extract_noun_phrases, noun_phrase_backend

EXIT_OK = 0
EXIT_WRITE_ERROR = 1
EXIT_INPUT_ERROR = 2
THRESHOLD = 0.1  # cloc.md: keep boxes with confidence > 0.1

logger = logging.getLogger("ovseg.make_region_labels")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make_region_labels.py",
        description="Noun-phrase queries from captions and a CLOC region JSON from an "
        "open-vocabulary detector's boxes (the VESL pseudo-labels).")
    parser.add_argument("--captions", required=True, type=Path, metavar="JSON",
                        help="COCO captions JSON (captions_train2017.json format)")
    parser.add_argument("--detections", type=Path, metavar="JSON",
                        help="the detector's COCO results: [{image_id, bbox, score, phrase or "
                        "category_id}]")
    parser.add_argument("--output", type=Path, metavar="JSON",
                        help="the region JSON to write (needs --detections)")
    parser.add_argument("--queries-out", type=Path, metavar="JSON",
                        help="also write each image's noun-phrase queries for the detector")
    parser.add_argument("--threshold", type=float, default=THRESHOLD,
                        help="keep boxes whose best score is > this (default 0.1)")
    parser.add_argument("--max-phrases", type=int, default=MAX_PHRASES,
                        help="noun phrases per image at most (default 20)")
    parser.add_argument("--backend", choices=("nltk", "vocabulary"), default=None,
                        help="noun-phrase extractor (default: nltk when its tagger data is "
                        "installed, else the vocabulary fallback)")
    return parser


def image_phrases(images: Sequence[CaptionedImage], max_phrases: int,
                  backend: str) -> dict[int, list[str]]:
    """Each image's queries: the noun phrases of its captions in order, repeats dropped, at
    most ``max_phrases``."""
    return {image.id: extract_noun_phrases(". ".join(image.captions), max_phrases,
                                           backend=backend)
            for image in images}


def _detection_phrase(index: int, detection: Any, phrases: dict[int, list[str]]) -> str:
    where = f"detections[{index}]"
    if not isinstance(detection, dict):
        raise DatasetError(f"{where} is not an object with image_id, bbox, score and phrase "
                           "or category_id")
    image_id = detection.get("image_id")
    if isinstance(image_id, bool) or not isinstance(image_id, int) or image_id not in phrases:
        raise DatasetError(f"{where}: image_id {image_id!r} is not in the captions JSON; "
                           "were the detections made on another image set?")
    if isinstance(detection.get("phrase"), str) and detection["phrase"].strip():
        return " ".join(detection["phrase"].split())
    category = detection.get("category_id")
    queries = phrases[image_id]
    if isinstance(category, int) and not isinstance(category, bool) \
            and 0 <= category < len(queries):
        return queries[category]
    raise DatasetError(f"{where}: needs a 'phrase', or a 'category_id' that indexes image "
                       f"{image_id}'s {len(queries)} queries from 0 (got {category!r})")


def region_labels(images: Sequence[CaptionedImage], phrases: dict[int, list[str]],
                  detections: Any, threshold: float = THRESHOLD) -> dict[str, Any]:
    """The COCO-format region JSON (module docstring) of the detections.

    Args:
        images: the captioned images (all become ``images`` entries).
        phrases: each image's queries (:func:`image_phrases`).
        detections: the parsed detections list.
        threshold: a box is kept when its best score is > this.

    Raises:
        DatasetError: a detection that is malformed or names an unknown image or query.
    """
    if not isinstance(detections, list):
        raise DatasetError("detections JSON is not a list of {image_id, bbox, score, phrase or "
                           "category_id} (COCO results format)")
    # (image_id, bbox) -> [best score, phrase]; dict order = first appearance
    boxes: dict[tuple[int, tuple[float, ...]], list[Any]] = {}
    for index, detection in enumerate(detections):
        phrase = _detection_phrase(index, detection, phrases)
        try:
            bbox = tuple(float(v) for v in detection["bbox"])
            score = float(detection["score"])
        except (KeyError, TypeError, ValueError) as error:
            raise DatasetError(f"detections[{index}]: needs bbox [x, y, w, h] and a numeric "
                               f"score ({error!r})") from error
        if len(bbox) != 4:
            raise DatasetError(f"detections[{index}]: bbox has {len(bbox)} values, expected "
                               "4 (x, y, w, h)")
        key = (detection["image_id"], bbox)
        best = boxes.get(key)
        if best is None or score > best[0]:
            boxes[key] = [score, phrase]
    order = {image.id: rank for rank, image in enumerate(images)}
    kept = sorted(((key, best) for key, best in boxes.items()
                   if best[0] > threshold and key[1][2] > 0 and key[1][3] > 0),
                  key=lambda item: order[item[0][0]])  # stable: file order within an image
    category_ids: dict[str, int] = {}
    annotations = []
    for number, ((image_id, bbox), (score, phrase)) in enumerate(kept, start=1):
        category = category_ids.setdefault(phrase, len(category_ids) + 1)
        annotations.append({"id": number, "image_id": image_id, "bbox": list(bbox),
                            "area": bbox[2] * bbox[3], "iscrowd": 0, "category_id": category,
                            "caption": phrase, "score": score})
    dropped = len(boxes) - len(kept)
    logger.info("%d boxes kept, %d at or below %.3g (or of zero area) dropped", len(kept),
                dropped, threshold)
    return {"images": [image.info() for image in images], "annotations": annotations,
            "categories": [{"id": i, "name": name} for name, i in category_ids.items()]}


def run(args: argparse.Namespace) -> None:
    if args.output is None and args.queries_out is None:
        raise DatasetError("nothing to do: give --queries-out, or --detections and --output")
    if (args.output is None) != (args.detections is None):
        raise DatasetError("--output and --detections go together")
    if args.max_phrases < 1:
        raise DatasetError(f"--max-phrases must be >= 1, got {args.max_phrases}")
    images = read_coco_captions(args.captions)
    # read every input before writing anything
    detections = read_json(args.detections, "detections JSON") if args.detections else None
    backend = noun_phrase_backend(args.backend)
    logger.info("noun phrases of %d images with the %s extractor", len(images), backend)
    phrases = image_phrases(images, args.max_phrases, backend)
    if args.queries_out is not None:
        queries = [{"image_id": image.id, "file_name": image.file_name,
                    "phrases": phrases[image.id]} for image in images]
        atomic_write_text(args.queries_out, json.dumps(
            {"noun_phrases": backend, "images": queries}, indent=1) + "\n")
        logger.info("wrote %s", args.queries_out)
    if detections is not None:
        regions = region_labels(images, phrases, detections, args.threshold)
        regions["info"] = {"description": "VESL-style region labels (tools/make_region_labels"
                           ".py)", "noun_phrases": backend, "threshold": args.threshold}
        atomic_write_text(args.output, json.dumps(regions) + "\n")
        logger.info("wrote %s: %d regions on %d images", args.output,
                    len(regions["annotations"]), len(regions["images"]))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger("ovseg").handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        run(args)
    except (OvsegError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_WRITE_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
