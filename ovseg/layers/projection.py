"""Point-pixel pairing: world points -> camera -> depth-grid pixels, with an occlusion test.

CLIP2Scene's ScanNet pairing (``specs/clip2scene.md``, step 2): a world point is moved into
the camera by the inverse of the frame's camera-to-world pose, projected with the **depth**
intrinsics (u = fx x / z + cx, v = fy y / z + cy; u is the column, v the row) onto the depth
grid (640x480 for ScanNet), and paired with the pixel when the projection lies inside the grid
(0 <= u <= W - 1, 0 <= v <= H - 1, on the unrounded values) and the depth there agrees with
the point's camera depth z:

- ``absolute`` (CLIP2Scene, default): |depth[round(v), round(u)] - z| <= 0.05 m;
- ``relative`` (OpenScene): |depth - z| <= 0.25 * depth;
- ``none`` (CLIP2Scene on nuScenes): no occlusion test.

The stored pixel is the rounded one (the one whose depth was tested). ``compat="reference"``
reproduces the reference code, which tests the depth at the rounded pixel but stores the
truncated one. All frames and points are paired in one batched computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

__all__ = [
    "DEPTH_THRESHOLD",
    "MAX_FRAMES",
    "RELATIVE_THRESHOLD",
    "PointPixelPairs",
    "camera_to_pixels",
    "pair_points_with_pixels",
    "sample_frames",
    "world_to_camera",
]

DEPTH_THRESHOLD = 0.05  # metres: CLIP2Scene's absolute occlusion threshold
RELATIVE_THRESHOLD = 0.25  # OpenScene's vis_thres: |d - z| <= 0.25 d
MAX_FRAMES = 8  # CLIP2Scene's frames per scene and load

Occlusion = Literal["absolute", "relative", "none"]
Compat = Literal["ours", "reference"]


def _as_tensor(values, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.to(dtype=dtype, device=device if device is not None else values.device)
    return torch.as_tensor(np.asarray(values), dtype=dtype, device=device)


def sample_frames(
    num_frames: int,
    max_frames: int = MAX_FRAMES,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Up to ``max_frames`` distinct random frame indices of ``num_frames``.

    Args:
        num_frames: how many frames the scene has.
        max_frames: at most this many are taken (all of them when the scene has fewer).
        rng: a numpy Generator, or a seed (the same seed gives the same frames).

    Returns:
        (min(max_frames, num_frames),) int64 indices into the scene's frames, sorted.
    """
    if num_frames < 0 or max_frames < 0:
        raise ValueError(f"num_frames={num_frames}, max_frames={max_frames}: expected >= 0")
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    chosen = generator.choice(num_frames, size=min(max_frames, num_frames), replace=False)
    return np.sort(chosen).astype(np.int64)


def world_to_camera(points, camera_to_world) -> torch.Tensor:
    """World points in each camera's frame.

    Args:
        points: (N, 3) world coordinates.
        camera_to_world: (F, 4, 4) or (4, 4) poses.

    Returns:
        (F, N, 3) float64 camera coordinates (x right, y down, z forward).
    """
    poses = _as_tensor(camera_to_world, torch.float64)
    if poses.ndim == 2:
        poses = poses[None]
    points = _as_tensor(points, torch.float64, poses.device).reshape(-1, 3)
    # the reference inverts the full 4x4 (np.linalg.inv), not the rigid-motion shortcut
    world_to_cam = torch.linalg.inv(poses)
    return points @ world_to_cam[:, :3, :3].transpose(1, 2) + world_to_cam[:, None, :3, 3]


def camera_to_pixels(camera_points: torch.Tensor, intrinsic) -> torch.Tensor:
    """Pinhole projection of camera points.

    Args:
        camera_points: (F, N, 3) camera coordinates.
        intrinsic: (3, 3), (4, 4) or (F, 3|4, 3|4); fx = [0, 0], fy = [1, 1], cx = [0, 2],
            cy = [1, 2] (skew is ignored, as in the reference).

    Returns:
        (F, N, 2) float64 (u, v) = (column, row), unrounded; inf/nan where z = 0.
    """
    k = _as_tensor(intrinsic, torch.float64, camera_points.device)
    if k.ndim == 2:
        k = k[None]
    fx, fy = k[:, 0, 0, None], k[:, 1, 1, None]
    cx, cy = k[:, 0, 2, None], k[:, 1, 2, None]
    x, y, z = camera_points.unbind(-1)
    return torch.stack((x * fx / z + cx, y * fy / z + cy), dim=-1)


@dataclass(frozen=True)
class PointPixelPairs:
    """Which point sees which pixel in which frame.

    Attributes:
        pixels: (F, N, 2) int64 (u, v) = (column, row) on the depth grid; -1 where not
            visible.
        visible: (F, N) bool, inside the grid, in front of the camera and through the
            occlusion test.
        depth: (F, N) float32 camera depth z of each point (metres).
    """

    pixels: torch.Tensor
    visible: torch.Tensor
    depth: torch.Tensor

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The visible pairs as flat lists: frame (K,), point (K,), pixel (K, 2) (u, v); all
        int64, ordered by frame then point."""
        frame, point = torch.nonzero(self.visible, as_tuple=True)
        return frame, point, self.pixels[frame, point]


def pair_points_with_pixels(
    points,
    camera_to_world,
    intrinsic_depth,
    depths,
    *,
    occlusion: Occlusion = "absolute",
    threshold: float = DEPTH_THRESHOLD,
    relative_threshold: float = RELATIVE_THRESHOLD,
    compat: Compat = "ours",
) -> PointPixelPairs:
    """Pair every point with its pixel in every frame (see the module docstring).

    Args:
        points: (N, 3) world coordinates (numpy or torch).
        camera_to_world: (F, 4, 4) poses of the frames.
        intrinsic_depth: (3|4, 3|4) or (F, 3|4, 3|4) depth intrinsics.
        depths: (F, H, W) depth maps in metres (0 = no reading); H, W set the grid.
        occlusion: ``absolute`` (|d - z| <= threshold), ``relative``
            (|d - z| <= relative_threshold * d) or ``none``.
        threshold: metres, for ``absolute``.
        relative_threshold: fraction of the depth, for ``relative``.
        compat: ``ours`` stores the rounded pixel; ``reference`` the truncated one (the depth
            test uses the rounded pixel either way).

    Returns:
        ``PointPixelPairs`` on the device of ``depths`` (CPU for numpy input).
    """
    if occlusion not in ("absolute", "relative", "none"):
        raise ValueError(f"occlusion={occlusion!r}: expected absolute, relative or none")
    if compat not in ("ours", "reference"):
        raise ValueError(f"compat={compat!r}: expected ours or reference")
    depth_maps = _as_tensor(depths, torch.float32)
    if depth_maps.ndim == 2:
        depth_maps = depth_maps[None]
    poses = _as_tensor(camera_to_world, torch.float64, depth_maps.device)
    if poses.ndim == 2:
        poses = poses[None]
    if poses.shape[0] != depth_maps.shape[0]:
        raise ValueError(f"{poses.shape[0]} poses but {depth_maps.shape[0]} depth maps")
    num_frames, height, width = depth_maps.shape
    camera = world_to_camera(_as_tensor(points, torch.float64, depth_maps.device), poses)
    uv = camera_to_pixels(camera, intrinsic_depth)
    z = camera[..., 2]
    u, v = uv.unbind(-1)
    # z > 0: a point behind the camera has no pixel (the reference does not check this; only
    # a point within 5 cm behind the camera plane over a pixel without depth could differ)
    inside = (z > 0) & (u >= 0) & (v >= 0) & (u <= width - 1) & (v <= height - 1)
    # round half to even, as np.round in the reference; outside values are clamped only to
    # index safely and are masked out below
    u_round = torch.round(torch.where(inside, u, 0)).long()
    v_round = torch.round(torch.where(inside, v, 0)).long()
    frame_index = torch.arange(num_frames, device=depth_maps.device)[:, None]
    measured = depth_maps[frame_index, v_round, u_round].double()
    if occlusion == "absolute":
        agrees = (measured - z).abs() <= threshold
    elif occlusion == "relative":
        agrees = (measured - z).abs() <= relative_threshold * measured
    else:
        agrees = torch.ones_like(inside)
    visible = inside & agrees
    if compat == "reference":
        # the reference casts the float (row, col) to int: truncation (values are >= 0)
        truncated = [torch.where(inside, value, 0).long() for value in (u, v)]
        stored = torch.stack(truncated, dim=-1)
    else:
        stored = torch.stack((u_round, v_round), dim=-1)
    pixels = torch.where(visible[..., None], stored, torch.full_like(stored, -1))
    return PointPixelPairs(pixels=pixels, visible=visible, depth=z.float())
