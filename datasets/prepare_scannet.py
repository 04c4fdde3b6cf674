"""Exporter of ScanNet ``.sens`` streams to frame files: every k-th frame, checked, all or nothing.

For every scene ``scannet/scans/<scene>/<scene>.sens`` it writes frames 0, k, 2k, ... in one of
the two layouts ``ovseg.data.scannet`` reads:

- ``export`` (default; ScanNet SensReader's layout) into the scene folder itself:
  ``color/<N>.jpg``, ``depth/<N>.png``, ``pose/<N>.txt``,
  ``intrinsic/{intrinsic,extrinsic}_{color,depth}.txt``;
- ``frames_25k`` into ``scannet/scannet_frames_25k/<scene>/``: ``color/<NNNNNN>.jpg`` ...,
  ``intrinsics_color.txt`` and ``intrinsics_depth.txt`` at the top (k = 100 gives the frame
  numbers of ScanNet's 25k subset).

Colour frames are the stream's JPEG bytes, copied unchanged (decoded once to check them); depth
frames are the zlib-decompressed uint16 values (units of 1/depth_shift m, ScanNet: mm) as
16-bit PNGs; poses are the 4x4 camera-to-world matrices. A scene is written into a hidden
staging folder, read back with ``ovseg.data.scannet``'s readers and only then moved into place,
so a bad stream (wrong version, truncated, undecodable frame, NaN/Inf pose) is one error line
naming the file and leaves nothing behind. A scene whose intrinsics file exists is complete
(it is moved last) and skipped unless ``--overwrite``.

Usage:
    python datasets/prepare_scannet.py [--root DATASETS] [--split all|train|val|test]
        [--scenes scene0000_00 ...] [--every 100] [--layout export|frames_25k]
        [--skip-invalid-poses] [--overwrite]

``--split train|val|test`` exports the scenes listed in ``scannet/scannetv2_<split>.txt`` (the
benchmark's split files); ``all`` (default) every scene folder with a ``.sens`` file.
"""

from __future__ import annotations

import argparse
import functools
import io
import shutil
import struct
import sys
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from _prepare_common import (
    Job,
    PrepareError,
    make_parser,
    require_file,
    resolve_root,
    run_command,
    run_jobs,
)
from PIL import Image

from ovseg.data import scannet
from ovseg.data.image_io import read_image
from ovseg.errors import DatasetError, ImageReadError

SCANS_DIR = Path("scannet") / "scans"
FRAMES_25K_DIR = Path("scannet") / "scannet_frames_25k"
SENS_VERSION = 4
# SensorData.h's compression enums: colour 2 = JPEG; depth 0 = raw ushort, 1 = zlib ushort
COLOR_JPEG = 2
DEPTH_RAW, DEPTH_ZLIB = 0, 1
DEFAULT_EVERY = 100
_MATRIX = struct.Struct("<16f")
_FRAME_HEADER = struct.Struct("<16fQQQQ")  # camera_to_world, two timestamps, two byte sizes
_MAX_NAME = 1 << 12  # a sensor name longer than this means the file is not a .sens stream
_FRAME_SUBFOLDERS = ("color", "depth", "pose")


@dataclass(frozen=True)
class SensHeader:
    """The header of a ``.sens`` stream and where each frame's record starts."""

    version: int
    sensor_name: str
    intrinsic_color: np.ndarray  # (4, 4) float64
    extrinsic_color: np.ndarray
    intrinsic_depth: np.ndarray
    extrinsic_depth: np.ndarray
    color_compression: int
    depth_compression: int
    color_size: tuple[int, int]  # (H, W)
    depth_size: tuple[int, int]  # (H, W)
    depth_shift: float
    frame_offsets: tuple[int, ...]  # file offset of each frame record


def _read_exact(handle: BinaryIO, size: int, path: Path, what: str) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise PrepareError(f"{path} is truncated: it ends inside {what}")
    return data


def read_sens_header(handle: BinaryIO, path: Path) -> SensHeader:
    """Parse the header and walk the frame records (sizes only) of an open ``.sens`` file.

    Raises:
        PrepareError: not a version-4 stream, unsupported compression, or truncated.
    """
    version, name_length = struct.unpack("<IQ", _read_exact(handle, 12, path, "the header"))
    if version != SENS_VERSION:
        raise PrepareError(
            f"{path} is not a ScanNet .sens stream of version {SENS_VERSION} (version field "
            f"{version})"
        )
    if name_length > _MAX_NAME:
        raise PrepareError(f"{path} is not a ScanNet .sens stream (sensor name of {name_length} "
                           "bytes)")
    name = _read_exact(handle, name_length, path, "the header").decode("utf-8", "replace")
    matrices = [
        np.array(_MATRIX.unpack(_read_exact(handle, _MATRIX.size, path, "the header")),
                 dtype=np.float64).reshape(4, 4)
        for _ in range(4)
    ]
    color_compression, depth_compression = struct.unpack(
        "<ii", _read_exact(handle, 8, path, "the header"))
    color_w, color_h, depth_w, depth_h, depth_shift = struct.unpack(
        "<IIIIf", _read_exact(handle, 20, path, "the header"))
    (num_frames,) = struct.unpack("<Q", _read_exact(handle, 8, path, "the header"))
    if color_compression != COLOR_JPEG:
        raise PrepareError(
            f"{path}: colour compression type {color_compression} is not supported; ScanNet "
            f"streams use JPEG ({COLOR_JPEG})"
        )
    if depth_compression not in (DEPTH_RAW, DEPTH_ZLIB):
        raise PrepareError(
            f"{path}: depth compression type {depth_compression} is not supported; expected "
            f"zlib ({DEPTH_ZLIB}) or raw ({DEPTH_RAW}) uint16"
        )
    if depth_shift != scannet.DEPTH_SHIFT:
        raise PrepareError(
            f"{path}: depth shift {depth_shift} is not {scannet.DEPTH_SHIFT:g}; the readers "
            "assume millimetre depth PNGs"
        )
    for what, matrix in (("colour intrinsics", matrices[0]), ("depth intrinsics", matrices[2])):
        if not np.isfinite(matrix).all():
            raise PrepareError(f"{path}: the {what} in its header are NaN or infinite")
    size = handle.seek(0, io.SEEK_END)
    offset = handle.seek(12 + name_length + 4 * _MATRIX.size + 36)
    offsets = []
    for index in range(num_frames):
        handle.seek(offset)
        record = _read_exact(handle, _FRAME_HEADER.size, path, f"frame {index}'s header")
        color_bytes, depth_bytes = _FRAME_HEADER.unpack(record)[-2:]
        offsets.append(offset)
        offset += _FRAME_HEADER.size + color_bytes + depth_bytes
        if offset > size:
            raise PrepareError(
                f"{path} is truncated: frame {index} of {num_frames} needs bytes up to "
                f"{offset}, the file has {size}"
            )
    return SensHeader(
        version, name, *matrices, color_compression, depth_compression,
        (color_h, color_w), (depth_h, depth_w), float(depth_shift), tuple(offsets),
    )


@dataclass(frozen=True)
class SensFrame:
    """One decoded frame record."""

    camera_to_world: np.ndarray  # (4, 4) float64
    color_jpeg: bytes
    depth: np.ndarray  # (H, W) uint16


def read_sens_frame(handle: BinaryIO, header: SensHeader, index: int, path: Path) -> SensFrame:
    """Read and check frame ``index``: JPEG of the header's colour size, depth of its size.

    Raises:
        PrepareError: undecodable colour or depth data, or the wrong size.
    """
    handle.seek(header.frame_offsets[index])
    record = _FRAME_HEADER.unpack(_read_exact(handle, _FRAME_HEADER.size, path, "a frame"))
    pose = np.array(record[:16], dtype=np.float64).reshape(4, 4)
    color_bytes, depth_bytes = record[-2:]
    color = _read_exact(handle, color_bytes, path, f"frame {index}'s colour")
    depth_data = _read_exact(handle, depth_bytes, path, f"frame {index}'s depth")
    try:
        with Image.open(io.BytesIO(color)) as image:
            image.load()
            color_size = (image.height, image.width)
    except Exception as error:  # PIL raises many types for corrupt data
        raise PrepareError(f"{path}: frame {index}'s colour is not a JPEG PIL can decode "
                           f"({' '.join(str(error).split())})") from None
    if color_size != header.color_size:
        raise PrepareError(
            f"{path}: frame {index}'s colour is {color_size[1]}x{color_size[0]}, the header "
            f"says {header.color_size[1]}x{header.color_size[0]}"
        )
    if header.depth_compression == DEPTH_ZLIB:
        try:
            depth_data = zlib.decompress(depth_data)
        except zlib.error as error:
            raise PrepareError(
                f"{path}: frame {index}'s depth is not zlib data ({error})"
            ) from None
    height, width = header.depth_size
    if len(depth_data) != 2 * height * width:
        raise PrepareError(
            f"{path}: frame {index}'s depth holds {len(depth_data)} bytes; a {width}x{height} "
            f"uint16 frame has {2 * height * width}"
        )
    depth = np.frombuffer(depth_data, dtype="<u2").reshape(height, width).astype(np.uint16)
    return SensFrame(pose, color, depth)


# ---------------------------------------------------------------------------------- export


def _matrix_text(matrix: np.ndarray) -> str:
    # single spaces, as SensReader writes them (the reference splits lines on " "); the
    # shortest exact decimal of each (float32) value, so reading it back gives the same number
    return "\n".join(" ".join(repr(float(value)) for value in row) for row in matrix) + "\n"


def _frame_name(frame_id: int, layout: str) -> str:
    return f"{frame_id:06d}" if layout == "frames_25k" else str(frame_id)


def _write_frame(folder: Path, frame_id: int, frame: SensFrame, layout: str) -> None:
    name = _frame_name(frame_id, layout)
    (folder / "color" / f"{name}.jpg").write_bytes(frame.color_jpeg)
    if not cv2.imwrite(str(folder / "depth" / f"{name}.png"), frame.depth):
        raise OSError(f"cannot write {folder / 'depth' / f'{name}.png'}")
    (folder / "pose" / f"{name}.txt").write_text(_matrix_text(frame.camera_to_world))


def _write_intrinsics(folder: Path, header: SensHeader, layout: str) -> None:
    if layout == "frames_25k":
        (folder / "intrinsics_color.txt").write_text(_matrix_text(header.intrinsic_color))
        (folder / "intrinsics_depth.txt").write_text(_matrix_text(header.intrinsic_depth))
        return
    (folder / "intrinsic").mkdir()
    for name, matrix in (
        ("intrinsic_color", header.intrinsic_color),
        ("extrinsic_color", header.extrinsic_color),
        ("intrinsic_depth", header.intrinsic_depth),
        ("extrinsic_depth", header.extrinsic_depth),
    ):
        (folder / "intrinsic" / f"{name}.txt").write_text(_matrix_text(matrix))


def _check_export(folder: Path, frame_ids: Sequence[int], header: SensHeader, layout: str,
                  sens: Path) -> None:
    """Read the staged frames back with the dataset readers; any problem is a PrepareError."""
    try:
        found = scannet.list_frames(folder, layout) if frame_ids else []
        if found != sorted(frame_ids):
            raise PrepareError(f"exporting {sens} wrote frames {found}, expected {frame_ids}")
        _, depth_intrinsics = scannet.intrinsics_paths(folder, layout)
        scannet.read_intrinsics(depth_intrinsics)
        for frame_id in frame_ids:
            color, depth, pose = scannet.frame_paths(folder, frame_id, layout)
            scannet.read_pose(pose)
            scannet.read_depth(depth, size=header.depth_size)
            read_image(color)
    except (DatasetError, ImageReadError) as error:
        raise PrepareError(f"checking the frames exported from {sens}: {error}") from None


def export_scene(
    sens: Path, output: Path, layout: str, every: int, skip_invalid_poses: bool
) -> list[int]:
    """Export frames 0, every, 2 every, ... of ``sens`` into ``output`` (see the module
    docstring), staged and checked first.

    Returns:
        the frame numbers written.

    Raises:
        PrepareError: a bad stream (nothing is written then).
    """
    staging = output.parent / f".{output.name}.export-{uuid.uuid4().hex[:8]}"
    moved: list[Path] = []
    try:
        staging.mkdir(parents=True)
        for sub in _FRAME_SUBFOLDERS:
            (staging / sub).mkdir()
        written = []
        with open(sens, "rb") as handle:
            header = read_sens_header(handle, sens)
            for frame_id in range(0, len(header.frame_offsets), every):
                frame = read_sens_frame(handle, header, frame_id, sens)
                if not np.isfinite(frame.camera_to_world).all():
                    if skip_invalid_poses:
                        continue
                    raise PrepareError(
                        f"{sens}: frame {frame_id} has a NaN/Inf pose (tracking lost); pass "
                        "--skip-invalid-poses to leave such frames out"
                    )
                _write_frame(staging, frame_id, frame, layout)
                written.append(frame_id)
        if not written:
            raise PrepareError(f"{sens}: no frame with a valid pose among every {every}th")
        _write_intrinsics(staging, header, layout)
        _check_export(staging, written, header, layout, sens)
        if layout == "frames_25k":
            if output.exists():
                shutil.rmtree(output)
            staging.rename(output)
        else:
            # the intrinsics folder goes last: its presence marks a complete export
            for sub in (*_FRAME_SUBFOLDERS, "intrinsic"):
                target = output / sub
                if target.exists():
                    shutil.rmtree(target)
                (staging / sub).rename(target)
                moved.append(target)
            staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        # a failure between the renames leaves no partly replaced export behind either
        for target in moved:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return written


def _scene_ids(root: Path, split: str, scenes: Sequence[str] | None) -> list[str]:
    scans = root / SCANS_DIR
    if scenes:
        return sorted(set(scenes))
    if split != "all":
        # guess: the benchmark's split files are copied to <root>/scannet/ (not specified)
        listing = require_file(
            root / "scannet" / f"scannetv2_{split}.txt", f"the ScanNet {split} list",
            "copy it from ScanNet's Tasks/Benchmark folder",
        )
        return sorted({line.strip() for line in listing.read_text().splitlines() if line.strip()})
    if not scans.is_dir():
        raise PrepareError(f"ScanNet scans not found: expected the folder {scans} "
                           "(see datasets/README.md)")
    ids = sorted(p.name for p in scans.iterdir() if (p / f"{p.name}.sens").is_file())
    if not ids:
        raise PrepareError(f"no <scene>/<scene>.sens files under {scans}")
    return ids


def _convert(args: argparse.Namespace) -> None:
    if args.every < 1:
        raise PrepareError(f"--every {args.every}: expected a positive frame step")
    root = resolve_root(args)
    jobs = []
    # every stream is found and its header and frame sizes checked before anything is written
    for scene_id in _scene_ids(root, args.split, args.scenes):
        sens = require_file(root / SCANS_DIR / scene_id / f"{scene_id}.sens",
                            f"the .sens stream of {scene_id}", "download it with ScanNet's script")
        with open(sens, "rb") as handle:  # a bad header or truncated stream stops all scenes
            read_sens_header(handle, sens)
        if args.layout == "frames_25k":
            output = root / FRAMES_25K_DIR / scene_id
            marker = output / "intrinsics_depth.txt"
        else:
            output = root / SCANS_DIR / scene_id
            marker = output / "intrinsic" / "intrinsic_depth.txt"
        convert = functools.partial(
            export_scene, sens, output, args.layout, args.every, args.skip_invalid_poses
        )
        jobs.append(Job((marker,), convert))
    run_jobs(jobs, f"scannet frames ({args.layout}, every {args.every})", args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "Export every k-th frame of ScanNet .sens streams (colour, depth, pose, intrinsics).",
        splits=("all", "train", "val", "test"),
    )
    parser.add_argument("--scenes", nargs="+", default=None,
                        help="export only these scenes (default: the --split's scenes)")
    parser.add_argument("--every", type=int, default=DEFAULT_EVERY,
                        help=f"frame step k (default {DEFAULT_EVERY}, the 25k subset's)")
    parser.add_argument("--layout", choices=("export", "frames_25k"), default="export",
                        help="SensReader layout in the scene folder (default) or the 25k "
                        "subset's layout under scannet/scannet_frames_25k")
    parser.add_argument("--skip-invalid-poses", action="store_true",
                        help="leave out frames whose pose is NaN/Inf instead of failing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _convert, argv)


if __name__ == "__main__":
    sys.exit(main())
