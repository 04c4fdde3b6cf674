"""Converter of the PASCAL-Context full annotations to the PC-59 and PC-459 benchmark labels.

Input: ``VOCdevkit/VOC2010/trainval/<id>.mat`` (the full annotations, ``LabelMap`` uint16 with
the 459 label ids of ``labels.txt``, 1..459, and 0 = unlabeled) for the ids listed in
``VOCdevkit/VOC2010/pascalcontext_<split>.txt``. Output, per id:
- ``annotations_detectron2/pc59_<split>/<id>.png`` uint8: the 59 classes as 0..58 in the order
  of their sorted 459-ids (mmseg / FC-CLIP / CAT-Seg order: aeroplane, bag, bed, ...),
  everything else 255 (ignore). PC-60 reads the same files (255 -> background);
- ``annotations_detectron2/pc459_<split>/<id>.tif`` uint16: ``LabelMap - 1`` (0..458),
  unlabeled -> 65535 (ignore).

Usage:
    python datasets/prepare_pascal_context.py [--root DATASETS] [--split val]
        [--voc-archive VOCtrainval_03-May-2010.tar] [--archive trainval.tar.gz] [--ids FILE]
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io
from _prepare_common import (
    Job,
    PrepareError,
    extract_archive,
    lookup_table,
    make_parser,
    require_dir,
    require_file,
    resolve_root,
    run_command,
    run_jobs,
    write_uint8_png,
    write_uint16_tif,
)
from scipy.io.matlab import MatReadError

VOC2010_DIR = Path("VOCdevkit") / "VOC2010"
NUM_FULL_CLASSES = 459
IGNORE_59 = 255
IGNORE_459 = 65535

# The 59 classes and their ids in the 459-label list (labels.txt of the full annotations),
# sorted by id, so position = trainId: the order mmseg, FC-CLIP and CAT-Seg write PC-59 in
# (ov-seg's 59_labels.txt order differs; never mix the two).
PC59_CLASSES: tuple[tuple[str, int], ...] = (
    ("aeroplane", 2), ("bag", 9), ("bed", 18), ("bedclothes", 19), ("bench", 22),
    ("bicycle", 23), ("bird", 25), ("boat", 31), ("book", 33), ("bottle", 34),
    ("building", 44), ("bus", 45), ("cabinet", 46), ("car", 59), ("cat", 65),
    ("ceiling", 68), ("chair", 72), ("cloth", 80), ("computer", 85), ("cow", 98),
    ("cup", 104), ("curtain", 105), ("dog", 113), ("door", 115), ("fence", 144),
    ("floor", 158), ("flower", 159), ("food", 162), ("grass", 187), ("ground", 189),
    ("horse", 207), ("keyboard", 220), ("light", 232), ("motorbike", 258), ("mountain", 259),
    ("mouse", 260), ("person", 284), ("plate", 295), ("platform", 296), ("pottedplant", 308),
    ("road", 324), ("rock", 326), ("sheep", 347), ("shelves", 349), ("sidewalk", 354),
    ("sign", 355), ("sky", 360), ("snow", 366), ("sofa", 368), ("table", 397),
    ("track", 415), ("train", 416), ("tree", 420), ("truck", 424), ("tvmonitor", 427),
    ("wall", 440), ("water", 445), ("window", 454), ("wood", 458),
)  # fmt: skip


def pc59_table() -> np.ndarray:
    """(65536,) uint8: 459-id -> PC-59 trainId, 255 for every other value."""
    mapping = {full_id: index for index, (_, full_id) in enumerate(PC59_CLASSES)}
    return lookup_table(mapping, 65536, IGNORE_59, np.uint8)


def pc459_labels(label_map: np.ndarray) -> np.ndarray:
    """(H, W) uint16 LabelMap -> (H, W) uint16 0..458, unlabeled 0 -> 65535."""
    # uint16 wrap-around does exactly this (0 - 1 = 65535); written out so it reads as meant
    return np.where(label_map == 0, IGNORE_459, label_map.astype(np.int32) - 1).astype(np.uint16)


def check_labels_txt(path: Path) -> None:
    """Check that ``labels.txt`` (``id: name`` lines) gives the 59 classes the ids used here.

    A different label list would silently scramble PC-59; the official one agrees.
    """
    names: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        number, separator, name = line.partition(":")
        if separator and number.strip().isdigit():
            names[int(number)] = name.strip()
    for name, full_id in PC59_CLASSES:
        if names.get(full_id) != name:
            raise PrepareError(
                f"{path} names id {full_id} {names.get(full_id)!r}, but PC-59 expects {name!r}; "
                "it is not the labels.txt of the PASCAL-Context full annotations (trainval.tar.gz)"
            )


def read_label_map(path: Path) -> np.ndarray:
    """``LabelMap`` of a full-annotation ``.mat`` as (H, W) uint16 with values 0..459."""
    try:
        label_map = scipy.io.loadmat(str(path))["LabelMap"]
    except (KeyError, ValueError, OSError, MatReadError) as error:
        raise PrepareError(f"cannot read LabelMap from {path}: {error}") from error
    if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer):
        raise PrepareError(f"LabelMap in {path} has shape {label_map.shape}; expected (H, W)")
    if label_map.size and (label_map.min() < 0 or label_map.max() > NUM_FULL_CLASSES):
        raise PrepareError(
            f"LabelMap in {path} spans [{label_map.min()}, {label_map.max()}]; expected 0..459"
        )
    return label_map.astype(np.uint16)


def convert_one(mat_path: Path, out_59: Path, out_459: Path, table_59: np.ndarray) -> None:
    """Write the PC-59 PNG and the PC-459 TIFF of one annotation file."""
    label_map = read_label_map(mat_path)
    write_uint8_png(out_59, table_59[label_map])
    write_uint16_tif(out_459, pc459_labels(label_map))


def read_ids(path: Path) -> list[str]:
    """Image ids, one a line (blank lines skipped)."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _convert(args: argparse.Namespace) -> None:
    root = resolve_root(args)
    voc2010 = root / VOC2010_DIR
    if args.voc_archive is not None:
        # the VOC tar holds VOCdevkit/VOC2010/ at its top
        extract_archive(Path(args.voc_archive), root)
    if args.archive is not None:
        # trainval.tar.gz holds trainval/*.mat and labels.txt, which belong in VOC2010/
        extract_archive(Path(args.archive), voc2010)
    ids_path = args.ids if args.ids is not None else voc2010 / f"pascalcontext_{args.split}.txt"
    require_file(
        ids_path,
        f"PASCAL-Context {args.split} id list",
        "the pascalcontext_val.txt list of the CAT-Seg / ov-seg dataset instructions, "
        "or pass --ids",
    )
    mat_dir = require_dir(
        voc2010 / "trainval",
        "PASCAL-Context full annotations",
        f"extract trainval.tar.gz into {voc2010}, or pass --archive",
    )
    if (voc2010 / "labels.txt").is_file():
        check_labels_txt(voc2010 / "labels.txt")
    ids = read_ids(ids_path)
    if not ids:
        raise PrepareError(f"the id list {ids_path} is empty")
    # check every input first: a missing one should stop the run before it writes anything
    for image_id in ids:
        require_file(mat_dir / f"{image_id}.mat", "annotation", f"listed in {ids_path}")
    out_59_dir = voc2010 / "annotations_detectron2" / f"pc59_{args.split}"
    out_459_dir = voc2010 / "annotations_detectron2" / f"pc459_{args.split}"
    table_59 = pc59_table()
    jobs = []
    for image_id in ids:
        out_59 = out_59_dir / f"{image_id}.png"
        out_459 = out_459_dir / f"{image_id}.tif"
        convert = functools.partial(
            convert_one, mat_dir / f"{image_id}.mat", out_59, out_459, table_59
        )
        jobs.append(Job((out_59, out_459), convert))
    run_jobs(jobs, f"pascal_context {args.split}", args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("Convert the PASCAL-Context full annotations to PC-59 / PC-459 labels.")
    parser.add_argument(
        "--archive",
        type=Path,
        help="the full annotations trainval.tar.gz, extracted into VOCdevkit/VOC2010 first",
    )
    parser.add_argument(
        "--voc-archive",
        type=Path,
        help="the VOC2010 VOCtrainval_03-May-2010.tar, extracted into --root first",
    )
    parser.add_argument(
        "--ids",
        type=Path,
        help="id list to convert (default: VOCdevkit/VOC2010/pascalcontext_<split>.txt)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _convert, argv)


if __name__ == "__main__":
    sys.exit(main())
