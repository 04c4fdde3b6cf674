"""Converter of COCO annotations to the 81-class COCO-Object benchmark labels (0 = background).

Output: ``coco/object_detectron2/<split>2017/<stem>_instanceTrainIds.png`` uint8 0..80, with no
ignore pixels: unlabeled counts as background. Two sources:
- default, the COCO-Stuff-164k label maps ``coco/stuffthingmaps_trainval2017/<split>2017``:
  the 80 used thing ids of 0..89 -> 1..80 in id order; stuff ids 91..181 and unlabeled 255 -> 0
  (the SCLIP preparation);
- ``--instances coco/annotations/instances_<split>2017.json``: the instance masks (polygons
  and RLE, crowd regions included) painted largest first, so a smaller instance overlapping a
  larger one stays visible; category ids -> 1..80 in sorted id order; no instance -> 0.

The two sources differ at instance borders and overlaps; the output folder remembers which one
wrote it (``.ovseg_source``) and a run from the other source stops unless ``--overwrite``.

Usage:
    python datasets/prepare_coco_object.py [--root DATASETS] [--split val]
        [--archive stuffthingmaps_trainval2017.zip] [--instances FILE] [--overwrite]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _prepare_common import (
    Job,
    PrepareError,
    extract_archive,
    lookup_table,
    make_parser,
    remap_label_png,
    require_file,
    resolve_root,
    run_command,
    run_jobs,
    write_text,
    write_uint8_png,
)
from prepare_coco_stuff import (
    COCO_DIR,
    STUFFTHINGMAPS_DIR,
    THING_IDS,
    list_stuffthingmaps,
    split_folder,
)
from pycocotools.coco import COCO

BACKGROUND = 0
NUM_THING_CLASSES = 80
OUTPUT_SUFFIX = "_instanceTrainIds.png"
# which source wrote an output folder; the reader lists only *_instanceTrainIds.png
SOURCE_MARKER = ".ovseg_source"


def object_table() -> np.ndarray:
    """(256,) uint8: stuffthingmaps id -> COCO-Object trainId (things 1..80, all else 0)."""
    mapping = {full_id: index + 1 for index, full_id in enumerate(THING_IDS)}
    return lookup_table(mapping, 256, BACKGROUND, np.uint8)


def instance_labels(coco: COCO, image_id: int, category_to_train: dict[int, int]) -> np.ndarray:
    """(H, W) uint8 COCO-Object labels of one image from its instance annotations.

    Instances are painted by decreasing area (ties in annotation order), so where two
    overlap the smaller one, usually the one in front, keeps its pixels.
    """
    info = coco.imgs[image_id]
    labels = np.full((info["height"], info["width"]), BACKGROUND, dtype=np.uint8)
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))
    masks = [(coco.annToMask(annotation), annotation) for annotation in annotations]
    # "area" is COCO's own pixel area; fall back to the mask where a file omits it
    masks.sort(key=lambda pair: -float(pair[1].get("area", pair[0].sum())))
    for mask, annotation in masks:
        train_id = category_to_train.get(annotation["category_id"])
        if train_id is None:
            raise PrepareError(
                f"annotation {annotation.get('id')} of image {image_id} has the category "
                f"{annotation['category_id']}, which the file's categories do not list"
            )
        labels[mask.astype(bool)] = train_id
    return labels


def convert_instances(
    coco: COCO, image_id: int, output: Path, category_to_train: dict[int, int]
) -> None:
    """Paint one image's instances and write the label PNG."""
    write_uint8_png(output, instance_labels(coco, image_id, category_to_train))


def load_instances(path: Path) -> COCO:
    """Load a COCO instances JSON with pycocotools (its progress prints kept off stdout)."""
    require_file(path, "COCO instances annotations", "unzip annotations_trainval2017.zip")
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return COCO(str(path))
        except (ValueError, KeyError, TypeError) as error:
            raise PrepareError(f"cannot read COCO annotations {path}: {error}") from error


def _read_source(out_dir: Path) -> str | None:
    marker = out_dir / SOURCE_MARKER
    return marker.read_text(encoding="utf-8").strip() if marker.is_file() else None


def check_source(out_dir: Path, source: str, overwrite: bool) -> None:
    """Refuse to mix label files from two sources in one folder (unless ``overwrite``)."""
    previous = _read_source(out_dir)
    if previous == source:
        return
    if previous is not None and not overwrite:
        raise PrepareError(
            f"{out_dir} holds labels made from {previous}; this run would make them from "
            f"{source}. Pass --overwrite to rebuild them all from {source}"
        )
    # while a rebuild runs the folder is marked unfinished: were it killed, a rerun without
    # --overwrite must not skip the files the other source wrote
    pending = source if previous is None else f"{source}, unfinished"
    write_text(out_dir / SOURCE_MARKER, pending + "\n")


def finish_source(out_dir: Path, source: str) -> None:
    """Record that every label file in ``out_dir`` now comes from ``source``."""
    if _read_source(out_dir) != source:
        write_text(out_dir / SOURCE_MARKER, source + "\n")


def _stuffthingmaps_jobs(root: Path, split: str, out_dir: Path) -> list[Job]:
    table = object_table()
    jobs = []
    for source in list_stuffthingmaps(root, split):
        output = out_dir / f"{source.stem}{OUTPUT_SUFFIX}"
        jobs.append(Job((output,), functools.partial(remap_label_png, source, output, table)))
    return jobs


def _instances_jobs(path: Path, out_dir: Path) -> list[Job]:
    coco = load_instances(path)
    category_ids = sorted(coco.getCatIds())
    if len(category_ids) != NUM_THING_CLASSES:
        raise PrepareError(
            f"{path} has {len(category_ids)} categories; COCO-Object needs the "
            f"{NUM_THING_CLASSES} COCO thing categories"
        )
    category_to_train = {category: index + 1 for index, category in enumerate(category_ids)}
    jobs = []
    for image_id in sorted(coco.imgs):
        output = out_dir / f"{Path(coco.imgs[image_id]['file_name']).stem}{OUTPUT_SUFFIX}"
        convert = functools.partial(convert_instances, coco, image_id, output, category_to_train)
        jobs.append(Job((output,), convert))
    return jobs


def _convert(args: argparse.Namespace) -> None:
    root = resolve_root(args)
    if args.archive is not None:
        extract_archive(Path(args.archive), root / STUFFTHINGMAPS_DIR)
    out_dir = root / COCO_DIR / "object_detectron2" / split_folder(args.split)
    if args.instances is None:
        jobs = _stuffthingmaps_jobs(root, args.split, out_dir)
        source = "stuffthingmaps"
    else:
        jobs = _instances_jobs(Path(args.instances), out_dir)
        source = f"instances {Path(args.instances).name}"
    check_source(out_dir, source, args.overwrite)
    run_jobs(jobs, f"coco_object_81 {args.split}", args.overwrite)
    finish_source(out_dir, source)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("Convert COCO annotations to the 81-class COCO-Object benchmark labels.")
    parser.add_argument(
        "--archive",
        type=Path,
        help="the official stuffthingmaps_trainval2017.zip, extracted first",
    )
    parser.add_argument(
        "--instances",
        type=Path,
        help="build the labels from this COCO instances JSON instead of the stuffthingmaps",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _convert, argv)


if __name__ == "__main__":
    sys.exit(main())
