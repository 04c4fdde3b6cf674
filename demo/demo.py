"""The demo command line: segment images with an open vocabulary and write labels, overlays, JSON.

    python demo/demo.py --config-file configs/trident/trident_vitb16.yaml \\
        --input "photos/*.jpg" more/ one.png --output out/ --vocab "cat,dog;puppy,grass,sky" \\
        --opts model.inference.crop 448

For every input image ``<stem>`` it writes, into ``--output``:
- ``<stem>_labels.png``: class indices (8-bit, or 16-bit for more than 255 classes);
- ``<stem>_overlay.png``: class colours over the image, with a legend of the classes present;
- ``<stem>.json``: ``{"image", "classes", "fractions", "height", "width"}``.
Images with the same stem (``a/x.jpg``, ``b/x.png``) get ``x``, ``x_1``, ... in input order.
Each file is written atomically (a temporary file renamed into place), and an image's files are
all there or all absent.

Output: one line per image done on stdout (``<image> -> <its output files>``); on stderr a
progress bar when there are several images (on a terminal), the library's progress lines
(e.g. "building the text classifier ..." while the text encoder embeds a new vocabulary) and
the errors.

Exit status: 0 all images done; 1 some images failed (one ``error:`` line each, the others are
done); 2 a mistake that stops everything (vocabulary, inputs, config, weights, output folder),
reported as one ``error:`` line before any output folder is created; 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

import ovseg
from ovseg.console import library_log_lines
from ovseg.data.image_io import list_images, read_image
from ovseg.errors import ConfigError, ImageReadError, OvsegError
from ovseg.text.vocabulary import Vocabulary, parse_vocabulary, read_vocabulary_file
from ovseg.vis import (
    class_fractions,
    draw_regions,
    legend_overlay,
    write_json,
    write_label_png,
    write_rgb_png,
)

EXIT_OK = 0
EXIT_SOME_IMAGES_FAILED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


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


Output = tuple[Path, Callable[[Path], None]]
"""A file to write and the function writing it there."""


def _region_outputs(output_dir: Path, stem: str, image: np.ndarray, boxes, points,
                    labels: list[int], classes: list[str]) -> list[Output]:
    """Each prompt drawn with its best class (<stem>_regions.png) and listed (.json)."""
    shown, entries = draw_regions(image, boxes, points, labels, classes)
    return [
        (output_dir / f"{stem}_regions.png", lambda path: write_rgb_png(path, shown)),
        (output_dir / f"{stem}_regions.json", lambda path: write_json(path, {"regions": entries})),
    ]


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


def _segmentation_outputs(
    output_dir: Path,
    stem: str,
    image_path: Path,
    image: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
) -> list[Output]:
    """The three outputs of one image: label PNG, overlay with legend, JSON summary.

    Args:
        image: (H, W, 3) uint8 RGB input.
        labels: (H, W) integer indices into ``classes``.
    """
    fractions = class_fractions(labels, classes)
    shown = legend_overlay(image, labels, classes)
    summary = {
        "image": str(image_path),
        "classes": list(classes),
        "fractions": fractions,
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
    }
    num_classes = len(classes)
    return [
        (output_dir / f"{stem}_labels.png", lambda to: write_label_png(to, labels, num_classes)),
        (output_dir / f"{stem}_overlay.png", lambda path: write_rgb_png(path, shown)),
        (output_dir / f"{stem}.json", lambda path: write_json(path, summary)),
    ]


def _write_all(outputs: list[Output]) -> list[Path]:
    """Write the files of one image; on a failure (or Ctrl-C), none of them is left behind.

    Everything is computed before, so only I/O can fail here. Returns the paths written.
    """
    written: list[Path] = []
    try:
        for path, write in outputs:
            write(path)  # atomic on its own: a temporary file renamed into place
            written.append(path)
    except BaseException:
        # remove the finished ones so the image's outputs are all there or all absent
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def _check_output_dir(output_dir: Path) -> None:
    """Refuse an --output that cannot become a folder, before the (slow) model build; the
    folder itself is created only after it."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"cannot create output directory {output_dir}: a file of that name "
                          "exists; choose another --output")
    existing = next(folder for folder in (output_dir, *output_dir.parents) if folder.exists())
    if not existing.is_dir():
        raise ConfigError(f"cannot create output directory {output_dir}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create output directory {output_dir}: {existing} is not "
                          "writable; choose another --output")


def _run(args: argparse.Namespace) -> int:
    # the vocabulary, the inputs, the prompts and the output path are checked before the
    # (slow) model build, and the output folder is created only after it, so that a mistake
    # leaves nothing behind
    vocabulary = _read_vocabulary(args)
    image_paths = list_images(args.input)
    boxes, points = _prompts(args.boxes, 4), _prompts(args.points, 2)
    output_dir = Path(args.output).expanduser()
    _check_output_dir(output_dir)

    device = args.device if args.device is not None else _default_device()
    # --device first, so that an explicit model.device override still wins
    overrides = ["model.device", device, *args.opts_flag, *args.opts]
    cfg = ovseg.get_config(args.config_file, overrides)
    model = ovseg.build_model(cfg)
    prompted = boxes is not None or points is not None
    if prompted and not callable(getattr(model, "classify_regions", None)):
        raise ConfigError(f"--boxes/--points need a method with region prompts (cloc); "
                          f"{cfg.model.name} has none")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _print_error(f"cannot create output directory {output_dir}: {error.strerror or error}")
        return EXIT_ERROR

    stems = output_stems(image_paths)
    failures = 0
    progress = tqdm(
        list(zip(image_paths, stems, strict=True)),
        desc="segmenting",
        unit="image",
        # a bar for several images, on a terminal only (None: off when stderr is no tty)
        disable=None if len(image_paths) > 1 else True,
    )
    for image_path, stem in progress:
        try:
            image = read_image(image_path)
            if prompted:
                labels, _ = model.classify_regions(image, vocabulary, boxes=boxes, points=points)
                outputs = _region_outputs(output_dir, stem, image, boxes, points,
                                          labels.tolist(), vocabulary.class_names)
            else:
                prediction = model.predict(image, vocabulary)
                outputs = _segmentation_outputs(output_dir, stem, image_path, image,
                                                prediction.labels, list(prediction.classes))
        except ImageReadError as error:
            failures += 1
            _print_error(str(error))  # the message names the file
            continue
        except OvsegError as error:
            failures += 1
            _print_error(f"{image_path}: {error}")
            continue
        try:
            written = _write_all(outputs)
        except OSError as error:
            # a full disk or a read-only folder fails every image alike: stop here
            progress.close()
            _print_error(
                f"cannot write the outputs of {image_path} to {output_dir}: "
                f"{error.strerror or error}"
            )
            return EXIT_ERROR
        tqdm.write(f"{image_path} -> {', '.join(str(path) for path in written)}", file=sys.stdout)
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
        # the library's progress lines ("building the text classifier ...") on stderr
        with library_log_lines():
            return _run(args)
    except OvsegError as error:
        _print_error(str(error))
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
