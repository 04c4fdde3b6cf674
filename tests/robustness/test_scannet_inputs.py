"""ScanNet scenes with a broken file: a corrupt colour or depth frame, float depth with NaN, a
missing or malformed pose, NaN intrinsics, a corrupt or truncated mesh, labels that are not
NYU40 ids. ``read_scene`` stops with one DatasetError line naming the file (issue 23,
reliability; tests/test_scannet.py pins missing depth/labels/intrinsics, NaN/Inf poses, wrong
depth sizes and a truncated binary mesh)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg.data.scannet import read_scene
from ovseg.errors import DatasetError
from tests.fixtures.scannet import build_scannet_scene

DEPTH_SIZE = (48, 64)
SCENE = "scene0000_00"
MESH = f"{SCENE}_vh_clean_2.ply"
LABELS = f"{SCENE}_vh_clean_2.labels.ply"
MESH_HEADER = ("ply\nformat {fmt} 1.0\nelement vertex {count}\nproperty float x\n"
               "property float y\nproperty float z\nproperty uchar red\nproperty uchar green\n"
               "property uchar blue\nend_header\n")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scannet")
    build_scannet_scene(root, num_frames=2, layouts=("export",), depth_size=DEPTH_SIZE)
    return root


def _float_depth(path: Path) -> bytes:
    depth = np.full(DEPTH_SIZE, 1.5, np.float32)
    depth[0, 0] = np.nan
    buffer = io.BytesIO()
    Image.fromarray(depth).save(buffer, format="TIFF")  # decoded by content, whatever the name
    return buffer.getvalue()


def _cut(fraction: float):
    return lambda path: path.read_bytes()[: int(len(path.read_bytes()) * fraction)]


CASES = {
    # relative path in the scene folder: what to write there (bytes, None = delete the file)
    "colour-truncated": ("color/100.jpg", _cut(0.3), "cannot read image"),
    "colour-empty": ("color/0.jpg", lambda p: b"", "cannot read image"),
    "depth-empty": ("depth/0.png", lambda p: b"", "cannot read depth file"),
    "depth-truncated": ("depth/100.png", _cut(0.5), "cannot read depth file"),
    "depth-float-nan": ("depth/0.png", _float_depth, "dtype float32; expected a single-channel "
                        "uint16 PNG"),
    "pose-missing": ("pose/100.txt", lambda p: None, "of frame 100 does not exist"),
    "pose-empty": ("pose/0.txt", lambda p: b"", "is empty; expected a 4x4 matrix"),
    "pose-words": ("pose/0.txt", lambda p: b"a b c d\n" * 4, "is not a matrix of numbers"),
    "pose-3x4": ("pose/0.txt", lambda p: b"1 0 0 0\n" * 3, "holds a (3, 4) matrix"),
    "pose-ragged": ("pose/0.txt", lambda p: b"1 0 0 0\n1 0 0\n1 0 0 0\n0 0 0 1\n",
                    "is not a matrix of numbers"),
    "pose-binary": ("pose/0.txt", lambda p: b"\xff\xfe\x00\x01" * 16, "is not a matrix"),
    "intrinsics-nan": ("intrinsic/intrinsic_depth.txt",
                       lambda p: b"nan 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n",
                       "holds NaN or infinite values; export the scene's frames again"),
    "mesh-empty": (MESH, lambda p: b"", "is not a PLY file"),
    "mesh-text": (MESH, lambda p: b"a mesh, honestly\n", "is not a PLY file"),
    "mesh-header-cut": (MESH, lambda p: p.read_bytes()[:60], "is not a PLY file"),
    "mesh-negative-count": (MESH, lambda p: MESH_HEADER.format(fmt="ascii", count=-3).encode(),
                            "cannot parse the PLY header line 'element vertex -3'"),
    "mesh-count-lies": (MESH, lambda p: MESH_HEADER.format(
        fmt="binary_little_endian", count=10**11).encode(), "the file ends before them"),
    "mesh-ascii-short": (MESH, lambda p: MESH_HEADER.format(fmt="ascii", count=3).encode()
                         + b"0 0 0 1 2 3\n", "is truncated or malformed"),
    "mesh-nan-vertex": (MESH, lambda p: MESH_HEADER.format(fmt="ascii", count=1).encode()
                        + b"nan 0 0 1 2 3\n", "vertex positions that are NaN or infinite"),
    "labels-not-nyu40": (LABELS, lambda p: b"ply\nformat ascii 1.0\nelement vertex 400\n"
                         b"property int label\nend_header\n" + b"-5\n" * 399 + b"41\n",
                         "holds label(s) -5, 41 outside the NYU40 ids 0..40"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_a_broken_scene_file_is_one_line_naming_it(pristine, tmp_path, case):
    root = tmp_path / "scans"
    shutil.copytree(pristine / "scans", root)
    relative, make, expected = CASES[case]
    path = root / SCENE / relative
    data = make(path)
    path.unlink()
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(DatasetError) as info:
        read_scene(root, SCENE, depth_size=DEPTH_SIZE)
    message = str(info.value)
    assert str(path) in message and expected in message and "\n" not in message
