"""Converter of the COCO-Stuff-164k label maps to the 171-class COCO-Stuff benchmark labels.

Input: ``coco/stuffthingmaps_trainval2017/<split>2017/<stem>.png`` (uint8: COCO category id - 1,
so 0..181, of which 11 ids have no class; 255 = unlabeled). Output:
``coco/stuffthingmaps_detectron2/<split>2017/<stem>.png`` uint8 with the 171 used ids made
contiguous 0..170 in id order (80 things 0..79, then 91 stuff 80..170); unused ids and 255
become 255 (ignore).

Usage:
    python datasets/prepare_coco_stuff.py [--root DATASETS] [--split val]
        [--archive stuffthingmaps_trainval2017.zip]
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

COCO_DIR = Path("coco")
STUFFTHINGMAPS_DIR = COCO_DIR / "stuffthingmaps_trainval2017"
IGNORE_LABEL = 255

# Ids in the stuffthingmaps (COCO category id - 1) that name no class: the COCO category ids
# 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 never got a thing class, and 91 separates things
# (1..90) from stuff (92..182).
UNUSED_IDS = frozenset({11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90})
# things: ids 0..89, 80 of them used; stuff: ids 91..181, all 91 used
THING_IDS: tuple[int, ...] = tuple(i for i in range(90) if i not in UNUSED_IDS)
STUFF_IDS: tuple[int, ...] = tuple(range(91, 182))


def stuff_table() -> np.ndarray:
    """(256,) uint8: stuffthingmaps id -> COCO-Stuff-171 trainId, 255 elsewhere."""
    mapping = {full_id: index for index, full_id in enumerate(THING_IDS + STUFF_IDS)}
    return lookup_table(mapping, 256, IGNORE_LABEL, np.uint8)


def split_folder(split: str) -> str:
    """COCO's folder name of a split: ``val`` -> ``val2017``."""
    return f"{split}2017"


def list_stuffthingmaps(root: Path, split: str) -> list[Path]:
    """The stuffthingmaps PNGs of ``split``; a one-line error when they are missing."""
    return list_inputs(
        root / STUFFTHINGMAPS_DIR / split_folder(split),
        "*.png",
        "COCO-Stuff label maps",
        f"unzip stuffthingmaps_trainval2017.zip into {root / STUFFTHINGMAPS_DIR}, "
        "or pass --archive",
    )


def _convert(args: argparse.Namespace) -> None:
    root = resolve_root(args)
    if args.archive is not None:
        # the official zip holds train2017/ and val2017/ at its top
        extract_archive(Path(args.archive), root / STUFFTHINGMAPS_DIR)
    sources = list_stuffthingmaps(root, args.split)
    out_dir = root / COCO_DIR / "stuffthingmaps_detectron2" / split_folder(args.split)
    table = stuff_table()
    jobs = []
    for source in sources:
        output = out_dir / source.name
        jobs.append(Job((output,), functools.partial(remap_label_png, source, output, table)))
    run_jobs(jobs, f"coco_stuff_171 {args.split}", args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("Convert COCO-Stuff-164k label maps to the 171-class benchmark labels.")
    parser.add_argument(
        "--archive",
        type=Path,
        help="the official stuffthingmaps_trainval2017.zip, extracted first",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _convert, argv)


if __name__ == "__main__":
    sys.exit(main())
