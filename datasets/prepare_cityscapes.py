"""Converter of Cityscapes fine annotations to the 19-class benchmark labels (trainIds).

For every ``cityscapes/gtFine/<split>/<city>/<x>_gtFine_labelIds.png`` it writes
``<x>_gtFine_labelTrainIds.png`` beside it: the official labelId -> trainId table of the
Cityscapes scripts (``helpers/labels.py``), every labelId without a trainId -> 255 (ignore).

Usage:
    python datasets/prepare_cityscapes.py [--root DATASETS] [--split val]
        [--archive gtFine_trainvaltest.zip] [--archive leftImg8bit_trainvaltest.zip]
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _prepare_common import (
    Job,
    extract_archive,
    list_inputs,
    lookup_table,
    make_parser,
    remap_label_png,
    resolve_root,
    run_command,
    run_jobs,
)

CITYSCAPES_DIR = "cityscapes"
IGNORE_LABEL = 255
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"

# labelId -> trainId of the 19 evaluated classes (Cityscapes scripts, helpers/labels.py); the
# other ids 0..33 (unlabeled, ego vehicle, ..., caravan, trailer) have trainId 255, and
# license plate (id -1) never appears in a labelIds image.
TRAIN_IDS: dict[int, int] = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}


def train_id_table() -> np.ndarray:
    """(256,) uint8: labelId -> trainId, 255 for every id without one."""
    return lookup_table(TRAIN_IDS, 256, IGNORE_LABEL, np.uint8)


def _convert(args: argparse.Namespace) -> None:
    root = resolve_root(args)
    cityscapes = root / CITYSCAPES_DIR
    for archive in args.archive or ():
        # the official zips hold gtFine/ and leftImg8bit/ at their top
        extract_archive(Path(archive), cityscapes)
    sources = list_inputs(
        cityscapes / "gtFine" / args.split,
        f"*{LABEL_IDS_SUFFIX}",
        "Cityscapes fine annotations",
        f"unzip gtFine_trainvaltest.zip into {cityscapes}, or pass --archive",
    )
    table = train_id_table()
    jobs = []
    for source in sources:
        output = source.with_name(source.name[: -len(LABEL_IDS_SUFFIX)] + TRAIN_IDS_SUFFIX)
        jobs.append(Job((output,), functools.partial(remap_label_png, source, output, table)))
    run_jobs(jobs, f"cityscapes_19 {args.split}", args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "Convert Cityscapes labelIds to 19-class trainIds.", splits=("val", "train", "test")
    )
    parser.add_argument(
        "--archive",
        type=Path,
        action="append",
        help="an official zip (gtFine_trainvaltest.zip, leftImg8bit_trainvaltest.zip), "
        "extracted into <root>/cityscapes first; may be given more than once",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _convert, argv)


if __name__ == "__main__":
    sys.exit(main())
