"""ScanNet v2 scenes: meshes with colours and NYU40 labels, RGB-D frames, poses and intrinsics.

A scene folder ``<root>/<scene_id>/`` holds the meshes (``<scene_id>_vh_clean_2.ply``: vertices
and RGB; ``<scene_id>_vh_clean_2.labels.ply``: vertex property ``label`` = NYU40 id). Frames are
read in one of two layouts (``specs/clip2scene.md``, "Data: ScanNet v2"):

- ``export`` (what ScanNet's SensReader and ``datasets/prepare_scannet.py`` write):
  ``color/<N>.jpg``, ``depth/<N>.png``, ``pose/<N>.txt`` and
  ``intrinsic/intrinsic_{color,depth}.txt``;
- ``frames_25k`` (the ``scannet_frames_25k`` subset CLIP2Scene reads, every 100th frame):
  ``color/<NNNNNN>.jpg`` (zero-padded), ``depth/``, ``pose/`` likewise, and
  ``intrinsics_color.txt`` / ``intrinsics_depth.txt`` at the scene folder's top.

Depth PNGs are uint16 in 1/``depth_shift`` metres (ScanNet: 1000, so millimetres) on the
640x480 depth grid; poses are 4x4 camera-to-world matrices (camera: x right, y down, z
forward). ScanNet-20 is the benchmark's 20 valid NYU40 ids mapped to 0..19, every other id to
the ignore value (``IGNORE_LABEL``, the ``scannet_20`` catalog entry's).

PLY files are read by a small numpy reader of our own (ASCII and binary, any element order;
only the ``vertex`` element is decoded), so no ply package is needed. Every problem with a
file is a ``DatasetError`` of one line naming the file.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from ovseg.data.image_io import read_image
from ovseg.errors import DatasetError, ImageReadError
from ovseg.io import atomic_path

__all__ = [
    "DEPTH_SHIFT",
    "DEPTH_SIZE",
    "IGNORE_LABEL",
    "NYU40_TO_SCANNET20",
    "VALID_CLASS_IDS",
    "FrameLayout",
    "ScanNetScene",
    "detect_layout",
    "frame_paths",
    "intrinsics_paths",
    "list_frames",
    "nyu40_to_scannet20",
    "read_depth",
    "read_intrinsics",
    "read_mesh",
    "read_mesh_labels",
    "read_ply_vertices",
    "read_pose",
    "read_scene",
    "write_ply_vertices",
]

# the ScanNet benchmark's VALID_CLASS_IDS (NYU40 ids of the 20 evaluated classes), in the
# order of ovseg/data/classes/scannet_20.txt
VALID_CLASS_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39,
)  # fmt: skip
# the ignore value of the ``scannet_20`` catalog entry; CLIP2Scene's training code uses -100
# (pass ``ignore=-100`` to ``nyu40_to_scannet20``)
IGNORE_LABEL = 255
NUM_NYU40_IDS = 41  # 0 (unannotated) .. 40
# (41,) int64: NYU40 id -> ScanNet-20 index, IGNORE_LABEL for the other 21 ids
NYU40_TO_SCANNET20 = np.full(NUM_NYU40_IDS, IGNORE_LABEL, dtype=np.int64)
NYU40_TO_SCANNET20[list(VALID_CLASS_IDS)] = np.arange(len(VALID_CLASS_IDS))

DEPTH_SHIFT = 1000.0  # raw depth units per metre (ScanNet: millimetres)
DEPTH_SIZE = (480, 640)  # (H, W) of ScanNet's depth frames
MESH_SUFFIX = "_vh_clean_2.ply"
LABELS_SUFFIX = "_vh_clean_2.labels.ply"

FrameLayout = Literal["export", "frames_25k"]
LAYOUTS: tuple[str, ...] = ("export", "frames_25k")


def nyu40_to_scannet20(nyu40: np.ndarray, ignore: int = IGNORE_LABEL) -> np.ndarray:
    """NYU40 ids -> ScanNet-20 class indices.

    Args:
        nyu40: any shape, integer NYU40 ids (0..40; other values count as unknown).
        ignore: the value of every id outside ``VALID_CLASS_IDS``.

    Returns:
        the same shape, int64: ``VALID_CLASS_IDS[k]`` -> k, everything else -> ``ignore``.
    """
    ids = np.asarray(nyu40).astype(np.int64, copy=False)
    known = (ids >= 0) & (ids < NUM_NYU40_IDS)
    mapped = NYU40_TO_SCANNET20[np.where(known, ids, 0)]
    return np.where(known & (mapped != IGNORE_LABEL), mapped, ignore).astype(np.int64)


# --------------------------------------------------------------------------- PLY

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip
_PLY_FORMATS = {"ascii": "", "binary_little_endian": "<", "binary_big_endian": ">"}


@dataclass
class _PlyElement:
    name: str
    count: int
    # (name, numpy type) for a scalar; (name, (count type, item type)) for a list
    properties: list[tuple[str, str | tuple[str, str]]] = field(default_factory=list)

    def has_lists(self) -> bool:
        return any(isinstance(kind, tuple) for _, kind in self.properties)


def _ply_header(path: Path, data: bytes) -> tuple[str, list[_PlyElement], int]:
    """(format, elements, offset of the body) of a PLY file's bytes."""
    end = re.search(rb"end_header[ \t]*\r?\n", data)
    if not data.startswith(b"ply") or end is None:
        raise DatasetError(f"{path} is not a PLY file (no 'ply' ... 'end_header' header)")
    fmt = None
    elements: list[_PlyElement] = []
    for raw in data[: end.start()].decode("ascii", errors="replace").splitlines()[1:]:
        words = raw.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format" and len(words) >= 2:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elements.append(_PlyElement(words[1], int(words[2])))
        elif words[0] == "property" and elements and len(words) == 3 and words[1] in _PLY_TYPES:
            elements[-1].properties.append((words[2], _PLY_TYPES[words[1]]))
        elif (
            words[0] == "property" and elements and len(words) == 5 and words[1] == "list"
            and words[2] in _PLY_TYPES and words[3] in _PLY_TYPES
        ):
            elements[-1].properties.append((words[4], (_PLY_TYPES[words[2]], _PLY_TYPES[words[3]])))
        else:
            raise DatasetError(f"{path}: cannot parse the PLY header line {raw.strip()!r}")
    if fmt not in _PLY_FORMATS:
        raise DatasetError(
            f"{path}: PLY format {fmt!r} is not one of {', '.join(_PLY_FORMATS)}"
        )
    return fmt, elements, end.end()


def _skip_binary_element(path: Path, data: bytes, offset: int, element: _PlyElement,
                         order: str) -> int:
    """The offset after a binary element that comes before ``vertex``."""
    if not element.has_lists():
        itemsize = sum(np.dtype(kind).itemsize for _, kind in element.properties)  # type: ignore[arg-type]
        return offset + itemsize * element.count
    for _ in range(element.count):  # rows of varying length: walk them (rare before vertex)
        for _, kind in element.properties:
            if isinstance(kind, tuple):
                count_type = np.dtype(order + kind[0])
                if offset + count_type.itemsize > len(data):
                    raise DatasetError(f"{path} is truncated inside element '{element.name}'")
                length = int(np.frombuffer(data, count_type, 1, offset)[0])
                offset += count_type.itemsize + length * np.dtype(kind[1]).itemsize
            else:
                offset += np.dtype(kind).itemsize
    return offset


def read_ply_vertices(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every scalar property of a PLY file's ``vertex`` element.

    Args:
        path: an ASCII or binary (little/big endian) PLY file.

    Returns:
        ``{property name: (N,) array}`` in the file's own dtypes (``x`` float32, ``red``
        uint8, ``label`` uint16, ...), in the file's property order.

    Raises:
        DatasetError: missing or unreadable file, a header this reader does not understand,
            no ``vertex`` element, a list property in ``vertex``, or a truncated body.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"cannot read PLY file {path}: {error.strerror or error}") from None
    fmt, elements, offset = _ply_header(path, data)
    order = _PLY_FORMATS[fmt]
    names = [element.name for element in elements]
    if "vertex" not in names:
        raise DatasetError(f"{path} has no 'vertex' element (elements: {', '.join(names)})")
    vertex = elements[names.index("vertex")]
    if vertex.has_lists():
        raise DatasetError(f"{path}: the 'vertex' element has a list property; expected scalars")
    dtype = np.dtype([(name, order + kind) for name, kind in vertex.properties])  # type: ignore[operator]
    if fmt == "ascii":
        lines = data[offset:].decode("ascii", errors="replace").splitlines()
        start = sum(element.count for element in elements[: names.index("vertex")])
        rows = lines[start : start + vertex.count]
        try:
            table = np.array([row.split() for row in rows], dtype=np.float64)
        except ValueError:
            table = None
        if table is None or len(rows) < vertex.count or (
            vertex.count and table.shape != (vertex.count, len(vertex.properties))
        ):
            raise DatasetError(
                f"{path} is truncated or malformed: expected {vertex.count} vertex lines of "
                f"{len(vertex.properties)} values"
            )
        table = table.reshape(vertex.count, len(vertex.properties))
        return {
            name: table[:, column].astype(dtype[name].newbyteorder("="))
            for column, (name, _) in enumerate(vertex.properties)
        }
    for element in elements[: names.index("vertex")]:
        offset = _skip_binary_element(path, data, offset, element, order)
    if offset + dtype.itemsize * vertex.count > len(data):
        raise DatasetError(
            f"{path} is truncated: its header promises {vertex.count} vertices of "
            f"{dtype.itemsize} bytes, the file ends before them"
        )
    table = np.frombuffer(data, dtype, vertex.count, offset)
    return {name: table[name].astype(dtype[name].newbyteorder("=")) for name in dtype.names}


def _vertex_columns(path: Path, vertices: dict[str, np.ndarray], names: Sequence[str],
                    what: str) -> np.ndarray:
    missing = [name for name in names if name not in vertices]
    if missing:
        raise DatasetError(
            f"{path} has no vertex property {', '.join(repr(n) for n in missing)}; {what} "
            f"(properties: {', '.join(vertices) or 'none'})"
        )
    return np.stack([vertices[name] for name in names], axis=1)


def read_mesh(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """The vertices of a coloured mesh (``_vh_clean_2.ply``).

    Returns:
        points: (N, 3) float32 x, y, z (world metres); colors: (N, 3) uint8 RGB.

    Raises:
        DatasetError: unreadable file, or no x/y/z or red/green/blue vertex properties.
    """
    path = Path(path)
    vertices = read_ply_vertices(path)
    points = _vertex_columns(path, vertices, ("x", "y", "z"), "expected vertex positions")
    colors = _vertex_columns(path, vertices, ("red", "green", "blue"), "expected vertex colours")
    if not np.isfinite(points).all():
        raise DatasetError(f"{path} has vertex positions that are NaN or infinite")
    return points.astype(np.float32), np.clip(colors, 0, 255).astype(np.uint8)


def read_mesh_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """The NYU40 id of every vertex of a labelled mesh (``_vh_clean_2.labels.ply``).

    Returns:
        (N,) int64, the vertex property ``label``.

    Raises:
        DatasetError: unreadable file or no ``label`` vertex property.
    """
    path = Path(path)
    vertices = read_ply_vertices(path)
    labels = _vertex_columns(path, vertices, ("label",), "expected NYU40 ids per vertex")
    return labels[:, 0].astype(np.int64)


def write_ply_vertices(
    path: str | os.PathLike[str],
    points: np.ndarray,
    colors: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> Path:
    """Write a binary little-endian PLY of vertices (no faces), atomically.

    Args:
        points: (N, 3) float, written as float32 x, y, z.
        colors: (N, 3) uint8 RGB, written as red, green, blue; optional.
        labels: (N,) integers in [0, 65535], written as the ushort property ``label``.
    """
    points = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if colors is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    if labels is not None:
        fields += [("label", "<u2")]
    table = np.empty(len(points), dtype=fields)
    for axis, name in enumerate("xyz"):
        table[name] = points[:, axis]
    if colors is not None:
        colors = np.asarray(colors).reshape(len(points), 3)
        for axis, name in enumerate(("red", "green", "blue")):
            table[name] = colors[:, axis]
    if labels is not None:
        table["label"] = np.asarray(labels).reshape(len(points))
    kinds = {"<f4": "float", "u1": "uchar", "<u2": "ushort"}
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(points)}"]
    header += [f"property {kinds[kind]} {name}" for name, kind in fields]
    header.append("end_header\n")
    with atomic_path(path) as temporary:
        temporary.write_bytes("\n".join(header).encode("ascii") + table.tobytes())
    return Path(path)


# --------------------------------------------------------------------------- frames


def _read_matrix(path: Path, what: str) -> np.ndarray:
    """A 4x4 (or 3x3, padded to 4x4) finite float64 matrix from a text file."""
    if not path.is_file():
        raise DatasetError(f"{what} file {path} does not exist")
    try:
        with warnings.catch_warnings():
            # an empty file is reported below, not as numpy's warning
            warnings.filterwarnings("ignore", message="loadtxt: input contained no data")
            matrix = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as error:
        reason = " ".join(str(error).split())
        raise DatasetError(f"{what} file {path} is not a matrix of numbers: {reason}") from None
    if matrix.size == 0:
        raise DatasetError(f"{what} file {path} is empty; expected a 4x4 matrix")
    if matrix.shape == (3, 3) and what.startswith("intrinsics"):
        padded = np.eye(4)
        padded[:3, :3] = matrix
        matrix = padded
    if matrix.shape != (4, 4):
        raise DatasetError(f"{what} file {path} holds a {matrix.shape} matrix; expected 4x4")
    if not np.isfinite(matrix).all():
        hint = (
            " (a frame whose tracking was lost); leave the frame out or export again skipping "
            "invalid poses" if what == "pose" else "; export the scene's frames again"
        )
        raise DatasetError(f"{what} file {path} holds NaN or infinite values{hint}")
    return matrix


def read_pose(path: str | os.PathLike[str]) -> np.ndarray:
    """(4, 4) float64 camera-to-world pose from a text file; DatasetError if not finite 4x4."""
    return _read_matrix(Path(path), "pose")


def read_intrinsics(path: str | os.PathLike[str]) -> np.ndarray:
    """(4, 4) float64 intrinsics (fx = [0, 0], fy = [1, 1], cx = [0, 2], cy = [1, 2]); a 3x3
    file is padded with the identity."""
    return _read_matrix(Path(path), "intrinsics")


def read_depth(
    path: str | os.PathLike[str],
    depth_shift: float = DEPTH_SHIFT,
    size: tuple[int, int] | None = DEPTH_SIZE,
) -> np.ndarray:
    """A depth PNG in metres.

    Args:
        path: a single-channel uint16 PNG (0 = no reading).
        depth_shift: raw units per metre.
        size: the (H, W) the frame must have; None accepts any.

    Returns:
        (H, W) float32 metres, raw / depth_shift.

    Raises:
        DatasetError: missing or unreadable file, not single-channel uint16, wrong size.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"depth file {path} does not exist")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise DatasetError(f"cannot read depth file {path}: not a PNG cv2 can decode")
    if raw.ndim != 2 or raw.dtype != np.uint16:
        raise DatasetError(
            f"depth file {path} has shape {raw.shape} and dtype {raw.dtype}; expected a "
            "single-channel uint16 PNG"
        )
    if size is not None and raw.shape != tuple(size):
        raise DatasetError(
            f"depth file {path} is {raw.shape[1]}x{raw.shape[0]}; expected "
            f"{size[1]}x{size[0]} (width x height), the depth grid of the intrinsics"
        )
    return (raw.astype(np.float32) / np.float32(depth_shift)).astype(np.float32)


def detect_layout(frames_dir: str | os.PathLike[str]) -> FrameLayout:
    """``frames_25k`` when ``intrinsics_depth.txt`` lies at the top of ``frames_dir``,
    ``export`` when ``intrinsic/intrinsic_depth.txt`` does; else a DatasetError naming both."""
    frames_dir = Path(frames_dir)
    if (frames_dir / "intrinsics_depth.txt").is_file():
        return "frames_25k"
    if (frames_dir / "intrinsic" / "intrinsic_depth.txt").is_file():
        return "export"
    raise DatasetError(
        f"no frames found in {frames_dir}: expected {frames_dir / 'intrinsic/intrinsic_depth.txt'}"
        f" (SensReader export) or {frames_dir / 'intrinsics_depth.txt'} (scannet_frames_25k); "
        "export them with datasets/prepare_scannet.py"
    )


def _frame_name(frame_id: int, layout: str) -> str:
    return f"{frame_id:06d}" if layout == "frames_25k" else str(frame_id)


def frame_paths(frames_dir: str | os.PathLike[str], frame_id: int,
                layout: FrameLayout) -> tuple[Path, Path, Path]:
    """(colour jpg, depth png, pose txt) of one frame, whether or not they exist."""
    frames_dir = Path(frames_dir)
    name = _frame_name(int(frame_id), layout)
    return (
        frames_dir / "color" / f"{name}.jpg",
        frames_dir / "depth" / f"{name}.png",
        frames_dir / "pose" / f"{name}.txt",
    )


def intrinsics_paths(frames_dir: str | os.PathLike[str],
                     layout: FrameLayout) -> tuple[Path, Path]:
    """(colour, depth) intrinsics files of a layout."""
    frames_dir = Path(frames_dir)
    if layout == "frames_25k":
        return frames_dir / "intrinsics_color.txt", frames_dir / "intrinsics_depth.txt"
    return (
        frames_dir / "intrinsic" / "intrinsic_color.txt",
        frames_dir / "intrinsic" / "intrinsic_depth.txt",
    )


def list_frames(frames_dir: str | os.PathLike[str], layout: FrameLayout | None = None) -> list[int]:
    """The frame numbers of the colour images in ``frames_dir/color``, sorted.

    Raises:
        DatasetError: no colour folder, a file name that is not a frame number, or no frames.
    """
    frames_dir = Path(frames_dir)
    layout = layout or detect_layout(frames_dir)
    color_dir = frames_dir / "color"
    if not color_dir.is_dir():
        raise DatasetError(f"frame folder {color_dir} does not exist")
    ids = []
    for path in color_dir.glob("*.jpg"):
        if not path.stem.isdigit():
            raise DatasetError(f"colour frame {path} is not named by its frame number")
        ids.append(int(path.stem))
    if not ids:
        raise DatasetError(f"frame folder {color_dir} holds no .jpg frames")
    return sorted(ids)


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class ScanNetScene:
    """One ScanNet scene as read by ``read_scene``.

    Attributes:
        scene_id: ``sceneXXXX_XX``.
        points: (N, 3) float32 vertex positions, world metres.
        colors: (N, 3) uint8 RGB vertex colours.
        nyu40: (N,) int64 NYU40 id per vertex; None when labels were not read.
        labels: (N,) int64 ScanNet-20 index per vertex (``IGNORE_LABEL`` for the rest); None
            when labels were not read.
        frame_ids: (F,) int64 frame numbers, in the order of the frame arrays.
        images: (F, Hc, Wc, 3) uint8 RGB colour frames as stored.
        depths: (F, Hd, Wd) float32 depth in metres (0 = no reading).
        poses: (F, 4, 4) float64 camera-to-world.
        intrinsic_color, intrinsic_depth: (4, 4) float64; None when no frame was read.
        layout: the frame layout read (``export``/``frames_25k``), None without frames.
    """

    scene_id: str
    points: np.ndarray
    colors: np.ndarray
    nyu40: np.ndarray | None
    labels: np.ndarray | None
    frame_ids: np.ndarray
    images: np.ndarray
    depths: np.ndarray
    poses: np.ndarray
    intrinsic_color: np.ndarray | None
    intrinsic_depth: np.ndarray | None
    layout: str | None

    @property
    def num_points(self) -> int:
        return len(self.points)

    @property
    def num_frames(self) -> int:
        return len(self.frame_ids)


def _read_frames(
    frames_dir: Path, ids: Sequence[int], layout: FrameLayout, depth_shift: float,
    depth_size: tuple[int, int] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # every file of every frame is checked to exist before any is decoded, so a missing
    # frame is reported at once instead of after minutes of decoding
    paths = [frame_paths(frames_dir, frame_id, layout) for frame_id in ids]
    for triple in paths:
        for kind, path in zip(("colour", "depth", "pose"), triple, strict=True):
            if not path.is_file():
                raise DatasetError(
                    f"{kind} file {path} of frame {path.stem} does not exist; the frame is "
                    "incomplete (export the scene's frames again)"
                )
    images, depths, poses = [], [], []
    for color_path, depth_path, pose_path in paths:
        poses.append(read_pose(pose_path))
        depth = read_depth(depth_path, depth_shift, depth_size)
        if depths and depth.shape != depths[0].shape:
            raise DatasetError(
                f"depth file {depth_path} is {depth.shape[1]}x{depth.shape[0]}; the scene's "
                f"first frame is {depths[0].shape[1]}x{depths[0].shape[0]}"
            )
        depths.append(depth)
        try:
            image = read_image(color_path)
        except ImageReadError as error:
            raise DatasetError(str(error)) from None
        if images and image.shape != images[0].shape:
            raise DatasetError(
                f"colour file {color_path} is {image.shape[1]}x{image.shape[0]}; the scene's "
                f"first frame is {images[0].shape[1]}x{images[0].shape[0]}"
            )
        images.append(image)
    return np.stack(images), np.stack(depths), np.stack(poses)


def read_scene(
    root: str | os.PathLike[str],
    scene_id: str,
    frames: Literal["all"] | Sequence[int] | None = "all",
    *,
    frames_root: str | os.PathLike[str] | None = None,
    layout: Literal["auto"] | FrameLayout = "auto",
    labels: bool = True,
    depth_shift: float = DEPTH_SHIFT,
    depth_size: tuple[int, int] | None = DEPTH_SIZE,
    ignore: int = IGNORE_LABEL,
) -> ScanNetScene:
    """Read a scene's mesh, labels and frames.

    Args:
        root: the folder of scene folders (``<datasets>/scannet/scans``); the meshes are
            ``<root>/<scene_id>/<scene_id>_vh_clean_2[.labels].ply``.
        scene_id: ``sceneXXXX_XX``.
        frames: ``"all"`` (every frame of ``color/``), frame numbers, or None / [] for none.
        frames_root: the folder holding ``<scene_id>/`` with the frames; default ``root``
            (frames exported into the scene folder). For the 25k subset pass
            ``<datasets>/scannet/scannet_frames_25k``.
        layout: ``auto`` (see ``detect_layout``), ``export`` or ``frames_25k``.
        labels: read ``_vh_clean_2.labels.ply`` (required then) into ``nyu40`` / ``labels``.
        depth_shift: raw depth units per metre.
        depth_size: the (H, W) every depth frame must have (ScanNet: 480x640); None: any,
            but one size per scene.
        ignore: the ScanNet-20 value of unevaluated NYU40 ids.

    Raises:
        DatasetError (one line naming the file): a missing mesh or frame file, a labels mesh
            without ``label``, with another vertex count or ids outside NYU40's 0..40, a pose
            or intrinsics with NaN/Inf, a depth frame of the wrong size or type, an
            unreadable colour frame, an unknown layout.
    """
    scene_dir = Path(root) / scene_id
    mesh_path = scene_dir / f"{scene_id}{MESH_SUFFIX}"
    if not mesh_path.is_file():
        raise DatasetError(
            f"mesh {mesh_path} of scene {scene_id} does not exist; see datasets/README.md"
        )
    points, colors = read_mesh(mesh_path)
    nyu40 = scannet20 = None
    if labels:
        labels_path = scene_dir / f"{scene_id}{LABELS_SUFFIX}"
        if not labels_path.is_file():
            raise DatasetError(
                f"labelled mesh {labels_path} of scene {scene_id} does not exist (test scenes "
                "have no labels: read them with labels=False)"
            )
        nyu40 = read_mesh_labels(labels_path)
        unknown = np.unique(nyu40[(nyu40 < 0) | (nyu40 >= NUM_NYU40_IDS)])
        if len(unknown):
            listed = ", ".join(str(v) for v in unknown[:8])
            raise DatasetError(
                f"labelled mesh {labels_path} holds label(s) {listed} outside the NYU40 ids "
                f"0..{NUM_NYU40_IDS - 1}; is it a ScanNet v2 _vh_clean_2.labels.ply?"
            )
        if len(nyu40) != len(points):
            raise DatasetError(
                f"labelled mesh {labels_path} has {len(nyu40)} vertices but {mesh_path} has "
                f"{len(points)}; the files do not belong together"
            )
        scannet20 = nyu40_to_scannet20(nyu40, ignore)

    frames_dir = Path(frames_root if frames_root is not None else root) / scene_id
    no_frames = frames is None or (not isinstance(frames, str) and len(frames) == 0)
    if no_frames:
        return ScanNetScene(
            scene_id, points, colors, nyu40, scannet20, np.zeros(0, np.int64),
            np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0, 0, 0), np.float32),
            np.zeros((0, 4, 4)), None, None, None,
        )
    if layout == "auto":
        layout = detect_layout(frames_dir)
    elif layout not in LAYOUTS:
        raise DatasetError(f"unknown frame layout {layout!r}; expected auto or one of {LAYOUTS}")
    if isinstance(frames, str):
        if frames != "all":
            raise DatasetError(f"frames={frames!r}: expected 'all', frame numbers or None")
        ids = list_frames(frames_dir, layout)
    else:
        ids = [int(frame_id) for frame_id in frames]
    intrinsic_color_path, intrinsic_depth_path = intrinsics_paths(frames_dir, layout)
    intrinsic_depth = read_intrinsics(intrinsic_depth_path)
    intrinsic_color = read_intrinsics(intrinsic_color_path)
    images, depths, poses = _read_frames(frames_dir, ids, layout, depth_shift, depth_size)
    return ScanNetScene(
        scene_id, points, colors, nyu40, scannet20, np.asarray(ids, dtype=np.int64), images,
        depths, poses, intrinsic_color, intrinsic_depth, layout,
    )

