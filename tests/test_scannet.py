"""ScanNet data, point-pixel pairing and the .sens exporter (specs/clip2scene.md, "Tests to pin").

Pinned with numbers: a hand-placed point's depth-grid pixel, the absolute 0.05 m occlusion test
(and OpenScene's relative one), the rounded vs the reference's truncated stored pixel, the
NYU40 -> ScanNet-20 map on all 41 ids, PLY readers on generated files (binary, ASCII,
big-endian), both frame layouts reading to the same arrays, the .sens export, and every bad
input as one line naming the file.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ovseg.data import catalog
from ovseg.data.scannet import (
    IGNORE_LABEL,
    VALID_CLASS_IDS,
    nyu40_to_scannet20,
    read_mesh,
    read_mesh_labels,
    read_ply_vertices,
    read_scene,
    write_ply_vertices,
)
from ovseg.errors import DatasetError
from ovseg.layers.projection import (
    camera_to_pixels,
    pair_points_with_pixels,
    sample_frames,
    world_to_camera,
)
from tests.fixtures.scannet import build_scannet_scene, camera_pose, sens_bytes, write_sens

DATASETS_DIR = Path(__file__).resolve().parents[1] / "datasets"
if str(DATASETS_DIR) not in sys.path:
    sys.path.insert(0, str(DATASETS_DIR))
prepare_scannet = importlib.import_module("prepare_scannet")

SMALL = (48, 64)  # (H, W) of the generated frames
# intrinsic_depth.txt of a ScanNet scene (scene0000_00): fx, fy, cx, cy on the 640x480 grid
K_DEPTH = np.array([
    [577.590698, 0.0, 318.905426, 0.0],
    [0.0, 578.729797, 242.683609, 0.0],
    [0.0, 0.0, 1.0, 0.0],
    [0.0, 0.0, 0.0, 1.0],
])  # fmt: skip
# a camera at (1, 2, 0.5), turned 90 degrees about the world z axis
POSE = np.array([
    [0.0, -1.0, 0.0, 1.0],
    [1.0, 0.0, 0.0, 2.0],
    [0.0, 0.0, 1.0, 0.5],
    [0.0, 0.0, 0.0, 1.0],
])  # fmt: skip


def _world(camera_point) -> np.ndarray:
    """The world point that is ``camera_point`` in the camera of POSE."""
    return POSE[:3, :3] @ np.asarray(camera_point, dtype=np.float64) + POSE[:3, 3]


def _depth_map(metres: float = 2.0) -> np.ndarray:
    # through uint16 millimetres, as a depth PNG is read
    return (np.full((1, 480, 640), round(metres * 1000), np.uint16) / 1000.0).astype(np.float32)


# --------------------------------------------------------------------------- projection


def test_hand_placed_point_projects_to_its_depth_pixel() -> None:
    # camera (0.5, -0.25, 2.0) -> world (1.25, 2.5, 2.5);
    # u = 577.590698 * 0.25 + 318.905426 = 463.3031, v = 578.729797 * -0.125 + 242.683609
    # = 170.3424 -> pixel (463, 170)
    world = _world([0.5, -0.25, 2.0])
    np.testing.assert_allclose(world, [1.25, 2.5, 2.5])
    camera = world_to_camera(world[None], POSE)
    np.testing.assert_allclose(camera[0, 0].numpy(), [0.5, -0.25, 2.0], atol=1e-12)
    uv = camera_to_pixels(camera, K_DEPTH)
    np.testing.assert_allclose(uv[0, 0].numpy(), [463.3030805, 170.3423844], atol=1e-6)
    pairs = pair_points_with_pixels(world[None], POSE[None], K_DEPTH, _depth_map(2.0))
    assert pairs.visible.tolist() == [[True]]
    assert pairs.pixels[0, 0].tolist() == [463, 170]
    assert pairs.depth[0, 0].item() == pytest.approx(2.0)
    frame, point, pixel = pairs.pairs()
    assert frame.tolist() == [0] and point.tolist() == [0] and pixel.tolist() == [[463, 170]]


def test_absolute_depth_test_keeps_visible_and_rejects_occluded_points() -> None:
    # four points on the ray of pixel (463, 170) at z = 2.0, 2.04, 2.06, 3.0; the surface
    # there is 2.0 m away: |d - z| = 0, 0.04 (kept), 0.06, 1.0 (behind it: occluded)
    depths = [2.0, 2.04, 2.06, 3.0]
    points = np.stack([_world(np.array([0.25, -0.125, 1.0]) * z) for z in depths])
    pairs = pair_points_with_pixels(points, POSE[None], K_DEPTH, _depth_map(2.0))
    assert pairs.visible[0].tolist() == [True, True, False, False]
    assert pairs.pixels[0].tolist() == [[463, 170], [463, 170], [-1, -1], [-1, -1]]
    # OpenScene's relative test: |d - z| <= 0.25 d = 0.5 keeps 2.06 but not 3.0
    relative = pair_points_with_pixels(points, POSE[None], K_DEPTH, _depth_map(2.0),
                                       occlusion="relative")
    assert relative.visible[0].tolist() == [True, True, True, False]
    unchecked = pair_points_with_pixels(points, POSE[None], K_DEPTH, _depth_map(2.0),
                                        occlusion="none")
    assert unchecked.visible[0].tolist() == [True, True, True, True]


def test_inside_test_and_the_rounding_rules() -> None:
    z = 2.0
    fx, fy, cx, cy = K_DEPTH[0, 0], K_DEPTH[1, 1], K_DEPTH[0, 2], K_DEPTH[1, 2]

    def at(u: float, v: float, depth: float = z) -> np.ndarray:
        return np.array([(u - cx) / fx * depth, (v - cy) / fy * depth, depth])

    camera_points = np.stack([
        at(100.7, 50.2),  # rounds to (101, 50), truncates to (100, 50)
        at(638.9, 478.6),  # rounds to the last column and row (639, 479)
        at(639.2, 10.0),  # right of u <= W - 1 (on the unrounded value, as the reference)
        at(-0.3, 10.0),  # left of the grid
        at(10.0, 479.2),  # below the grid
        -at(100.0, 100.0),  # behind the camera
    ])  # fmt: skip
    identity = np.eye(4)[None]
    ours = pair_points_with_pixels(camera_points, identity, K_DEPTH, _depth_map(z))
    assert ours.visible[0].tolist() == [True, True, False, False, False, False]
    assert ours.pixels[0, :2].tolist() == [[101, 50], [639, 479]]
    reference = pair_points_with_pixels(camera_points, identity, K_DEPTH, _depth_map(z),
                                        compat="reference")
    assert reference.visible[0].tolist() == ours.visible[0].tolist()
    assert reference.pixels[0, :2].tolist() == [[100, 50], [638, 478]]
    # the depth test reads the rounded pixel: a hole there (0 m) rejects the point
    holed = _depth_map(z)
    holed[0, 50, 101] = 0.0
    assert not pair_points_with_pixels(camera_points[:1], identity, K_DEPTH, holed).visible.any()


def test_pairing_is_batched_over_frames(tmp_path: Path) -> None:
    scene = build_scannet_scene(tmp_path, layouts=("export",), depth_size=SMALL)
    read = read_scene(scene.scans_root, scene.scene_id, depth_size=SMALL)
    batched = pair_points_with_pixels(read.points, read.poses, read.intrinsic_depth, read.depths)
    assert batched.visible.shape == (4, 400) and batched.pixels.shape == (4, 400, 2)
    for index in range(read.num_frames):
        single = pair_points_with_pixels(read.points, read.poses[index], read.intrinsic_depth,
                                         read.depths[index])
        assert torch.equal(single.visible[0], batched.visible[index])
        assert torch.equal(single.pixels[0], batched.pixels[index])
    # the room is ray-cast exactly: every frame sees points, and their pixels have their colour
    assert (batched.visible.sum(1) > 10).all()
    frame, point, pixel = batched.pairs()
    seen = read.images[frame.numpy(), pixel[:, 1].numpy(), pixel[:, 0].numpy()].astype(int)
    assert np.abs(seen - read.colors[point.numpy()]).max(1).mean() < 8


def test_sample_frames_is_seeded_and_capped() -> None:
    first = sample_frames(30, rng=7)
    assert len(first) == 8 and len(set(first.tolist())) == 8
    assert np.all(np.diff(first) > 0) and first.max() < 30
    assert np.array_equal(first, sample_frames(30, rng=7))
    assert not np.array_equal(first, sample_frames(30, rng=8))
    assert sample_frames(5, rng=0).tolist() == [0, 1, 2, 3, 4]
    assert sample_frames(0, rng=0).tolist() == []


# --------------------------------------------------------------------------- labels


def test_nyu40_to_scannet20_on_all_41_ids() -> None:
    expected = [255] * 41
    for index, nyu40 in enumerate((1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33,
                                   34, 36, 39)):
        expected[nyu40] = index
    assert nyu40_to_scannet20(np.arange(41)).tolist() == expected
    assert VALID_CLASS_IDS == (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34,
                               36, 39)
    # CLIP2Scene's training ignore value, and ids outside 0..40
    assert nyu40_to_scannet20(np.array([0, 39, 40]), ignore=-100).tolist() == [-100, 19, -100]
    assert nyu40_to_scannet20(np.array([-1, 41, 65535])).tolist() == [255, 255, 255]
    info = catalog.get_benchmark("scannet_20")
    assert IGNORE_LABEL == info.ignore_value and info.num_classes == len(VALID_CLASS_IDS)
    names = catalog.class_names("scannet_20")
    assert (names[0], names[1], names[13], names[19]) == ("wall", "floor", "curtain",
                                                          "otherfurniture")


# --------------------------------------------------------------------------- PLY


def test_ply_readers_on_the_generated_meshes(tmp_path: Path) -> None:
    scene = build_scannet_scene(tmp_path, layouts=())
    prefix = scene.scene_dir / scene.scene_id
    points, colors = read_mesh(f"{prefix}_vh_clean_2.ply")
    assert points.dtype == np.float32 and colors.dtype == np.uint8
    assert np.array_equal(points, scene.points) and np.array_equal(colors, scene.colors)
    labels = read_mesh_labels(f"{prefix}_vh_clean_2.labels.ply")
    assert labels.dtype == np.int64 and np.array_equal(labels, scene.nyu40)
    vertices = read_ply_vertices(f"{prefix}_vh_clean_2.labels.ply")
    assert list(vertices) == ["x", "y", "z", "red", "green", "blue", "alpha", "label"]
    assert vertices["label"].dtype == np.uint16 and (vertices["alpha"] == 255).all()


def _ply_text(fmt: str, points: np.ndarray, labels: np.ndarray) -> bytes:
    # a face element before the vertices, so readers must skip lists to find them
    header = (f"ply\nformat {fmt} 1.0\nelement face 2\nproperty list uchar int vertex_indices\n"
              f"element vertex {len(points)}\nproperty double x\nproperty double y\n"
              "property double z\nproperty uchar red\nproperty uchar green\n"
              "property uchar blue\nproperty int label\nend_header\n")
    order = ">" if fmt == "binary_big_endian" else "<"
    if fmt == "ascii":
        body = "3 0 1 2\n4 0 1 2 3\n" + "".join(
            f"{x:.17g} {y:.17g} {z:.17g} 10 20 30 {label}\n"
            for (x, y, z), label in zip(points, labels, strict=True)
        )
        return header.encode() + body.encode()
    faces = (np.array([3], "u1").tobytes() + np.array([0, 1, 2], order + "i4").tobytes()
             + np.array([4], "u1").tobytes() + np.array([0, 1, 2, 3], order + "i4").tobytes())
    table = np.zeros(len(points), [("p", order + "f8", (3,)), ("c", "u1", (3,)),
                                   ("label", order + "i4")])
    table["p"], table["c"], table["label"] = points, (10, 20, 30), labels
    return header.encode() + faces + table.tobytes()


@pytest.mark.parametrize("fmt", ["ascii", "binary_little_endian", "binary_big_endian"])
def test_ply_reader_formats(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(0)
    points = rng.normal(size=(5, 3))
    labels = np.array([0, 1, 39, 40, 7])
    path = tmp_path / "mesh.ply"
    path.write_bytes(_ply_text(fmt, points, labels))
    read_points, colors = read_mesh(path)
    np.testing.assert_array_equal(read_points, points.astype(np.float32))
    assert colors.tolist() == [[10, 20, 30]] * 5
    assert read_mesh_labels(path).tolist() == labels.tolist()


def test_write_ply_vertices_round_trip(tmp_path: Path) -> None:
    points = np.arange(12, dtype=np.float32).reshape(4, 3) / 7
    colors = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [1, 2, 3]], np.uint8)
    path = write_ply_vertices(tmp_path / "out" / "pred.ply", points, colors, np.array([0, 1, 2,
                                                                                        19]))
    read_points, read_colors = read_mesh(path)
    assert np.array_equal(read_points, points) and np.array_equal(read_colors, colors)
    assert read_mesh_labels(path).tolist() == [0, 1, 2, 19]
    assert [p.name for p in path.parent.iterdir()] == ["pred.ply"]  # no temporary left


# --------------------------------------------------------------------------- scenes


def test_both_frame_layouts_read_to_the_same_arrays(tmp_path: Path) -> None:
    scene = build_scannet_scene(tmp_path, depth_size=SMALL, color_size=(60, 80))
    export = read_scene(scene.scans_root, scene.scene_id, depth_size=SMALL)
    subset = read_scene(scene.scans_root, scene.scene_id, frames_root=scene.frames_25k_root,
                        depth_size=SMALL)
    assert (export.layout, subset.layout) == ("export", "frames_25k")
    assert export.frame_ids.tolist() == subset.frame_ids.tolist() == [0, 100, 200, 300]
    for name in ("points", "colors", "nyu40", "labels", "images", "depths", "poses",
                 "intrinsic_color", "intrinsic_depth"):
        assert np.array_equal(getattr(export, name), getattr(subset, name)), name
    assert export.images.shape == (4, 60, 80, 3) and export.images.dtype == np.uint8
    assert export.depths.dtype == np.float32
    np.testing.assert_array_equal(export.depths, scene.depth_raw.astype(np.float32) / 1000)
    np.testing.assert_array_equal(export.poses, scene.poses)
    np.testing.assert_array_equal(export.intrinsic_depth, scene.intrinsic_depth)
    assert np.array_equal(export.labels, nyu40_to_scannet20(scene.nyu40))
    some = read_scene(
        scene.scans_root, scene.scene_id, [300, 100], frames_root=scene.frames_25k_root,
        depth_size=SMALL,
    )
    assert some.frame_ids.tolist() == [300, 100]
    assert np.array_equal(some.depths, export.depths[[3, 1]])
    mesh_only = read_scene(scene.scans_root, scene.scene_id, frames=None, labels=False)
    assert mesh_only.num_frames == 0 and mesh_only.labels is None and mesh_only.num_points == 400


def _one_line_error(call) -> str:
    with pytest.raises(DatasetError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def _overwrite(path: Path, data: bytes | str) -> Path:
    path.unlink(missing_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _break_missing_depth(scene) -> Path:
    path = scene.scene_dir / "depth" / "100.png"
    path.unlink()
    return path


def _break_nan_pose(scene) -> Path:
    return _overwrite(scene.scene_dir / "pose" / "200.txt",
                      "nan 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")


def _break_inf_pose(scene) -> Path:
    return _overwrite(scene.scene_dir / "pose" / "0.txt",
                      "-inf -inf -inf -inf\n" * 4)


def _break_depth_size(scene) -> Path:
    path = scene.scene_dir / "depth" / "300.png"
    assert cv2.imwrite(str(path), np.zeros((32, 32), np.uint16))
    return path


def _break_depth_type(scene) -> Path:
    path = scene.scene_dir / "depth" / "300.png"
    assert cv2.imwrite(str(path), np.zeros((*SMALL, 3), np.uint8))
    return path


def _break_missing_labels(scene) -> Path:
    path = scene.scene_dir / f"{scene.scene_id}_vh_clean_2.labels.ply"
    path.unlink()
    return path


def _break_labels_property(scene) -> Path:
    path = scene.scene_dir / f"{scene.scene_id}_vh_clean_2.labels.ply"
    return _overwrite(path, (scene.scene_dir / f"{scene.scene_id}_vh_clean_2.ply").read_bytes())


def _break_label_count(scene) -> Path:
    path = scene.scene_dir / f"{scene.scene_id}_vh_clean_2.labels.ply"
    write_ply_vertices(path, scene.points[:10], labels=scene.nyu40[:10])
    return path


def _break_truncated_mesh(scene) -> Path:
    path = scene.scene_dir / f"{scene.scene_id}_vh_clean_2.ply"
    return _overwrite(path, path.read_bytes()[:600])


def _break_missing_intrinsics(scene) -> Path:
    path = scene.scene_dir / "intrinsic" / "intrinsic_color.txt"
    path.unlink()
    return path


@pytest.mark.parametrize(
    "break_scene",
    [
        _break_missing_depth, _break_nan_pose, _break_inf_pose, _break_depth_size,
        _break_depth_type, _break_missing_labels, _break_labels_property, _break_label_count,
        _break_truncated_mesh, _break_missing_intrinsics,
    ],
)  # fmt: skip
def test_bad_scene_input_is_one_line_naming_the_file(tmp_path: Path, break_scene) -> None:
    scene = build_scannet_scene(tmp_path, layouts=("export",), depth_size=SMALL)
    path = break_scene(scene)
    message = _one_line_error(lambda: read_scene(scene.scans_root, scene.scene_id,
                                                 depth_size=SMALL))
    assert str(path) in message


def test_requested_frames_and_layouts_are_checked(tmp_path: Path) -> None:
    scene = build_scannet_scene(tmp_path, layouts=("export",), depth_size=SMALL)
    message = _one_line_error(lambda: read_scene(scene.scans_root, scene.scene_id, [5],
                                                 depth_size=SMALL))
    assert str(scene.scene_dir / "color" / "5.jpg") in message
    # ScanNet's own depth grid is 640x480 unless told otherwise
    message = _one_line_error(lambda: read_scene(scene.scans_root, scene.scene_id, [0]))
    assert "64x48" in message and "640x480" in message
    message = _one_line_error(lambda: read_scene(scene.scans_root, scene.scene_id,
                                                 frames_root=tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere" / scene.scene_id) in message
    message = _one_line_error(lambda: read_scene(scene.scans_root, "scene0999_00"))
    assert "scene0999_00_vh_clean_2.ply" in message


# --------------------------------------------------------------------------- .sens export


def _sens_scene(root: Path, **sens_kwargs):
    """A generated scene's meshes under <root>/scannet/scans/<id>/ and its 5 frames (numbered
    0..4) as <id>.sens beside them."""
    scene = build_scannet_scene(root / "scannet", num_frames=5, frame_step=1, layouts=(),
                                depth_size=SMALL)
    write_sens(scene.scene_dir / f"{scene.scene_id}.sens", scene, **sens_kwargs)
    return scene, scene.scene_dir


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    # stderr also holds the progress bar; the error is the one line starting with "error:"
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _written(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / "scannet").rglob("*")
                  if p.is_file() and p.suffix != ".sens")


def test_prepare_exports_every_kth_frame_in_both_layouts(tmp_path: Path) -> None:
    scene, scans = _sens_scene(tmp_path)
    assert prepare_scannet.main(["--root", str(tmp_path), "--every", "2"]) == 0
    read = read_scene(scans.parent, scene.scene_id, depth_size=SMALL)
    assert read.layout == "export" and read.frame_ids.tolist() == [0, 2, 4]
    assert np.array_equal(read.depths, scene.depth_raw[[0, 2, 4]].astype(np.float32) / 1000)
    np.testing.assert_array_equal(read.poses, scene.poses[[0, 2, 4]].astype(np.float32))
    np.testing.assert_allclose(read.intrinsic_depth, scene.intrinsic_depth, rtol=1e-6)
    # colour frames are the stream's JPEG bytes, unchanged
    assert (scans / "color" / "2.jpg").read_bytes() == scene.color_jpegs[2]
    assert (scans / "intrinsic" / "extrinsic_depth.txt").is_file()
    first = _written(tmp_path)
    assert prepare_scannet.main(["--root", str(tmp_path), "--every", "2"]) == 0  # skipped
    assert _written(tmp_path) == first

    args = ["--root", str(tmp_path), "--every", "3", "--layout", "frames_25k"]
    assert prepare_scannet.main(args) == 0
    subset_root = tmp_path / "scannet" / "scannet_frames_25k"
    assert (subset_root / scene.scene_id / "color" / "000003.jpg").is_file()
    subset = read_scene(scans.parent, scene.scene_id, frames_root=subset_root, depth_size=SMALL)
    assert subset.layout == "frames_25k" and subset.frame_ids.tolist() == [0, 3]
    assert np.array_equal(subset.depths, scene.depth_raw[[0, 3]].astype(np.float32) / 1000)
    assert np.array_equal(subset.images[0], read.images[0])


def _bad_version(scene):
    return {"version": 3}


def _truncated(scene):
    return {"truncate": 200}


def _bad_zlib(scene):
    return {"depth_payloads": {2: b"not zlib data"}}


def _nan_pose(scene):
    poses = scene.poses.copy()
    poses[4, 0, 0] = np.nan
    return {"poses": poses}


def _png_colour(scene):
    return {"color_compression": 1}


@pytest.mark.parametrize(
    ("make_kwargs", "expected"),
    [
        (_bad_version, "version field 3"),
        (_truncated, "is truncated"),
        (_bad_zlib, "frame 2's depth is not zlib data"),
        (_nan_pose, "frame 4 has a NaN/Inf pose"),
        (_png_colour, "colour compression type 1"),
    ],
)
def test_prepare_bad_stream_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make_kwargs, expected: str
) -> None:
    scene, scans = _sens_scene(tmp_path)
    kwargs = make_kwargs(scene)
    truncate = kwargs.pop("truncate", 0)
    data = sens_bytes(scene, **kwargs)
    sens = scans / f"{scene.scene_id}.sens"
    sens.write_bytes(data[: len(data) - truncate] if truncate else data)
    before = sorted(scans.iterdir())
    assert prepare_scannet.main(["--root", str(tmp_path), "--every", "2"]) == 2
    error = _error_line(capsys)
    assert expected in error and str(sens) in error
    assert sorted(scans.iterdir()) == before  # no frame folder, no staging folder


def test_prepare_can_skip_invalid_poses(tmp_path: Path) -> None:
    poses = build_scannet_scene(tmp_path / "other", num_frames=5, layouts=()).poses.copy()
    poses[2] = -np.inf
    scene, scans = _sens_scene(tmp_path, poses=poses)
    assert prepare_scannet.main(["--root", str(tmp_path), "--every", "2",
                                 "--skip-invalid-poses"]) == 0
    read = read_scene(scans.parent, scene.scene_id, depth_size=SMALL)
    assert read.frame_ids.tolist() == [0, 4]


def test_prepare_missing_stream_is_one_line(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert prepare_scannet.main(["--root", str(tmp_path), "--scenes", "scene0001_00"]) == 2
    assert "scene0001_00.sens" in _error_line(capsys)
    assert prepare_scannet.main(["--root", str(tmp_path)]) == 2
    assert str(tmp_path / "scannet" / "scans") in _error_line(capsys)


def test_camera_pose_helper_is_a_rotation() -> None:
    pose = camera_pose(0.7)
    rotation = pose[:3, :3]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
