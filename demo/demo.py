"""The demo command line: segment images with an open vocabulary and write labels, overlays, JSON.

    python demo/demo.py --config-file configs/trident/trident_vitb16.yaml \\
        --input "photos/*.jpg" more/ one.png --output out/ --vocab "cat,dog;puppy,grass,sky" \\
        --opts model.inference.crop 448

For every input image ``<stem>`` it writes, into ``--output``:
- ``<stem>_labels.png``: class indices (8-bit, or 16-bit for more than 255 classes);
- ``<stem>_overlay.png``: class colours over the image, with a legend of the classes present;
- ``<stem>.json``: ``{"image", "classes", "fractions", "height", "width"}``.
Images with the same stem (``a/x.jpg``, ``b/x.png``) get ``x``, ``x_1``, ... in input order.

Exit status: 0 all images done; 1 some images failed (one ``error:`` line each, the others are
done); 2 a mistake that stops everything (vocabulary, inputs, config, weights, output folder),
reported as one ``error:`` line; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

import ovseg
from ovseg.data.image_io import list_images, read_image
from ovseg.errors import ConfigError, ImageReadError, OvsegError
from ovseg.text.vocabulary import Vocabulary, parse_vocabulary, read_vocabulary_file
from ovseg.vis import (
    class_fractions,
    draw_legend,
    overlay,
    palette,
    write_json,
    write_label_png,
    write_rgb_png,
)

EXIT_OK = 0
EXIT_SOME_IMAGES_FAILED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

# weight of the class colour in the overlay; the image stays recognisable underneath
OVERLAY_ALPHA = 0.5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="demo.py",
        description="Open-vocabulary segmentation of images: writes label PNGs, overlays with "
        "legends and per-image JSON summaries.",
        epilog="Config overrides go last, as KEY VALUE pairs (model.inference.crop 448), "
        "after --opts or after any option but --input (which would take them as inputs).",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config YAML")
    parser.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="PATH",
        help="image files, directories (their images, not recursive) or glob patterns",
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="output directory (created if needed)"
    )
    vocabulary = parser.add_mutually_exclusive_group(required=True)
    vocabulary.add_argument(
        "--vocab",
        metavar="CLASSES",
        help='classes separated by ",", synonyms of a class by ";": "person;man,dog,sky"',
    )
    vocabulary.add_argument(
        "--vocab-file",
        metavar="FILE",
        help="class file: one class per line, synonyms separated by ',' or ';'",
    )
    parser.add_argument("--boxes", metavar="X1,Y1,X2,Y2;...", default=None,
                        help="box prompts in pixels: classify these regions instead (methods "
                        "with region prompts, e.g. cloc); writes <stem>_regions.png/.json")
    parser.add_argument("--points", metavar="X,Y;...", default=None,
                        help="point prompts in pixels, like --boxes")
    parser.add_argument(
        "--device",
        default=None,
        help="torch device (sets model.device); default: cuda if available, else cpu",
    )
    parser.add_argument(
        "--opts",
        dest="opts_flag",
        default=[],
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides, e.g. --opts model.inference.crop 448",
    )
    parser.add_argument(
        "opts",
        default=[],
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides, detectron2 style, at the end of the command line",
    )
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _print_error(message: str) -> None:
    # tqdm.write keeps a running progress bar intact and prints plainly when there is none
    tqdm.write(f"error: {_one_line(message)}", file=sys.stderr)


def _read_vocabulary(args: argparse.Namespace) -> Vocabulary:
    if args.vocab_file is not None:
        return read_vocabulary_file(args.vocab_file)
    return parse_vocabulary(args.vocab)


def _prompts(text: str | None, size: int) -> np.ndarray | None:
    """'1,2,3,4;5,6,7,8' -> (R, size) float64; None when not given."""
    if text is None:
        return None
    try:
        rows = [[float(v) for v in part.split(",")] for part in text.split(";") if part.strip()]
    except ValueError as error:
        raise ConfigError(f"prompts {text!r}: {error}") from error
    if any(len(row) != size for row in rows):
        raise ConfigError(f"prompts {text!r}: each needs {size} numbers separated by ','")
    return np.asarray(rows, dtype=np.float64).reshape(-1, size)


def _write_regions(output_dir: Path, stem: str, image: np.ndarray, boxes, points,
                   labels: list[int], classes: list[str]) -> None:
    """Draw each prompt with its best class into <stem>_regions.png; list them in .json."""
    import cv2

    shown = np.ascontiguousarray(image.copy())
    colors = palette(classes)
    prompts = [("box", b) for b in (boxes if boxes is not None else [])]
    prompts += [("point", q) for q in (points if points is not None else [])]
    entries = []
    for (kind, coords), label in zip(prompts, labels, strict=True):
        color = tuple(int(c) for c in colors[label])
        xy = tuple(int(round(v)) for v in coords)
        if kind == "box":
            cv2.rectangle(shown, xy[:2], xy[2:], color, 2)
        else:
            cv2.circle(shown, xy, 4, color, -1)
        cv2.putText(shown, classes[label], (xy[0] + 2, xy[1] + 12), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4, color, 1)
        entries.append({"kind": kind, "coords": [float(v) for v in coords],
                        "class": classes[label]})
    write_rgb_png(output_dir / f"{stem}_regions.png", shown)
    write_json(output_dir / f"{stem}_regions.json", {"regions": entries})


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def output_stems(paths: Sequence[Path]) -> list[str]:
    """A distinct output stem per input path: the file stem, then ``_1``, ``_2``, ... on repeats.

    Compared case-insensitively, because case-insensitive file systems (macOS, Windows) would
    otherwise let ``A.jpg`` and ``a.png`` overwrite each other's outputs.
    """
    used: set[str] = set()
    stems: list[str] = []
    for path in paths:
        stem = path.stem
        candidate, suffix = stem, 0
        while candidate.casefold() in used:
            suffix += 1
            candidate = f"{stem}_{suffix}"
        used.add(candidate.casefold())
        stems.append(candidate)
    return stems


def _write_outputs(
    output_dir: Path,
    stem: str,
    image_path: Path,
    image: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
) -> None:
    """Write the three outputs of one image; on a failure, none of them is left behind.

    Args:
        image: (H, W, 3) uint8 RGB input.
        labels: (H, W) integer indices into ``classes``.
    """
    fractions = class_fractions(labels, classes)
    index_of = {name: i for i, name in reversed(list(enumerate(classes)))}
    present = [index_of[name] for name in fractions]  # largest area first in the legend
    colors = palette(classes)
    shown = draw_legend(overlay(image, labels, colors, OVERLAY_ALPHA), classes, colors, present)
    summary = {
        "image": str(image_path),
        "classes": list(classes),
        "fractions": fractions,
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
    }
    # everything is computed above, so only I/O can fail from here on
    targets = [
        output_dir / f"{stem}_labels.png",
        output_dir / f"{stem}_overlay.png",
        output_dir / f"{stem}.json",
    ]
    written: list[Path] = []
    try:
        write_label_png(targets[0], labels, len(classes))
        written.append(targets[0])
        write_rgb_png(targets[1], shown)
        written.append(targets[1])
        write_json(targets[2], summary)
        written.append(targets[2])
    except BaseException:
        # each file is atomic on its own; remove the finished ones so the image's outputs
        # are all there or all absent
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _run(args: argparse.Namespace) -> int:
    # the vocabulary and the inputs are checked before the (slow) model build
    vocabulary = _read_vocabulary(args)
    image_paths = list_images(args.input)
    output_dir = Path(args.output).expanduser()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _print_error(f"cannot create output directory {output_dir}: {error.strerror or error}")
        return EXIT_ERROR

    device = args.device if args.device is not None else _default_device()
    # --device first, so that an explicit model.device override still wins
    overrides = ["model.device", device, *args.opts_flag, *args.opts]
    cfg = ovseg.get_config(args.config_file, overrides)
    model = ovseg.build_model(cfg)
    boxes, points = _prompts(args.boxes, 4), _prompts(args.points, 2)
    prompted = boxes is not None or points is not None
    if prompted and not callable(getattr(model, "classify_regions", None)):
        raise ConfigError(f"--boxes/--points need a method with region prompts (cloc); "
                          f"{cfg.model.name} has none")

    stems = output_stems(image_paths)
    failures = 0
    progress = tqdm(
        list(zip(image_paths, stems, strict=True)),
        desc="segmenting",
        unit="image",
        disable=None,
    )
    for image_path, stem in progress:
        try:
            image = read_image(image_path)
            if prompted:
                labels, _ = model.classify_regions(image, vocabulary, boxes=boxes, points=points)
                _write_regions(output_dir, stem, image, boxes, points, labels.tolist(),
                               vocabulary.class_names)
                continue
            prediction = model.predict(image, vocabulary)
        except ImageReadError as error:
            failures += 1
            _print_error(str(error))  # the message names the file
            continue
        except OvsegError as error:
            failures += 1
            _print_error(f"{image_path}: {error}")
            continue
        try:
            _write_outputs(
                output_dir, stem, image_path, image, prediction.labels, list(prediction.classes)
            )
        except OSError as error:
            # a full disk or a read-only folder fails every image alike: stop here
            progress.close()
            _print_error(
                f"cannot write the outputs of {image_path} to {output_dir}: "
                f"{error.strerror or error}"
            )
            return EXIT_ERROR
    progress.close()
    if failures:
        if len(image_paths) > 1:  # one image keeps its one-line error
            print(f"{failures} of {len(image_paths)} images failed", file=sys.stderr)
        return EXIT_SOME_IMAGES_FAILED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the demo on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        # argparse exits on --help (0) and on usage errors (2, message already printed)
        return int(exit_request.code or 0)
    try:
        return _run(args)
    except OvsegError as error:
        _print_error(str(error))
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
