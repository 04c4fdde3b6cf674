"""Voxelisation of point clouds with point <-> voxel maps (MinkowskiEngine's sparse_quantize).

CLIP2Scene (clip2scene.md, "Student") centres each scene (``points - points.mean(0)``), divides
by the voxel size (5 cm on ScanNet) and quantises with ``floor`` as MinkowskiEngine's
``sparse_quantize``; each voxel takes the features of one of its points (``feats[indexes]``,
not an average), and predictions go back to every point through the inverse map.

API::

    voxels = voxelize(points, voxel_size=0.05)  # Voxels(coords, point_to_voxel, voxel_to_point)
    voxel_feats = colors[voxels.voxel_to_point]  # (M, C): each voxel's representative point
    point_labels = voxel_labels[voxels.point_to_voxel]  # (N,): back to every point
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# the reference's ScanNet voxel (config voxel_size: 0.05 m)
DEFAULT_VOXEL_SIZE = 0.05


class Voxels(NamedTuple):
    """A voxelised cloud: unpacks as ``coords, point_to_voxel, voxel_to_point``."""

    coords: Tensor  # (M, 3) int32 voxel indices, sorted (x, then y, then z)
    point_to_voxel: Tensor  # (N,) int64: the voxel of each point (MinkowskiEngine's inverse map)
    voxel_to_point: Tensor  # (M,) int64: each voxel's representative point, its first one


def quantize(points: Tensor, voxel_size: float = DEFAULT_VOXEL_SIZE,
             centre: bool = True) -> Tensor:
    """Integer voxel indices of points: ``floor((points - mean) / voxel_size)``.

    Args:
        points: (N, 3) float coordinates in metres.
        voxel_size: the voxel edge in the points' unit (> 0).
        centre: subtract the cloud's mean first (the reference's ``coords - coords.mean(0)``).

    Returns:
        (N, 3) int32 voxel indices, one per point (duplicates kept).
    """
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"voxelize expects (N, 3) points, got {tuple(points.shape)}")
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be > 0, got {voxel_size}")
    points = points.double()  # float32 loses whole voxels far from the origin
    if not torch.isfinite(points).all():
        raise ValueError("voxelize: points hold NaN or Inf")
    if centre and len(points):
        points = points - points.mean(0)
    return torch.floor(points / voxel_size).to(torch.int32)


def voxelize(points: Tensor, voxel_size: float = DEFAULT_VOXEL_SIZE,
             centre: bool = True) -> Voxels:
    """Voxelise a cloud: unique voxels and the maps between points and voxels.

    Args:
        points: (N, 3) float coordinates.
        voxel_size: the voxel edge (0.05 = 5 cm for ScanNet metres).
        centre: subtract the cloud's mean before quantising (the reference does).

    Returns:
        :class:`Voxels`: ``coords`` (M, 3) int32 sorted lexicographically,
        ``point_to_voxel`` (N,) int64 with ``coords[point_to_voxel] == quantize(points)``, and
        ``voxel_to_point`` (M,) int64, the lowest index of a point in each voxel.
    """
    grid = quantize(points, voxel_size, centre)
    coords, point_to_voxel = torch.unique(grid, dim=0, return_inverse=True)
    count = len(coords)
    # the first point of each voxel: the smallest point index mapping to it
    first = torch.full((count,), len(points), dtype=torch.int64, device=points.device)
    first.scatter_reduce_(0, point_to_voxel, torch.arange(len(points), device=points.device),
                          reduce="amin")
    return Voxels(coords.to(torch.int32), point_to_voxel.long(), first)


def pool_to_voxels(values: Tensor, voxels: Voxels, reduce: str = "first") -> Tensor:
    """Per-voxel values of per-point ``values`` (N, ...) -> (M, ...).

    ``reduce="first"`` takes the representative point (the reference); ``"mean"`` averages
    every point of the voxel (floating values only).
    """
    if reduce == "first":
        return values[voxels.voxel_to_point]
    if reduce == "mean":
        count = len(voxels.coords)
        total = values.new_zeros((count, *values.shape[1:]))
        total.index_add_(0, voxels.point_to_voxel, values)
        hits = torch.bincount(voxels.point_to_voxel, minlength=count).clamp(min=1)
        return total / hits.view(-1, *([1] * (values.dim() - 1))).to(values.dtype)
    raise ValueError(f"pool_to_voxels: reduce must be 'first' or 'mean', got {reduce!r}")


def voxels_to_points(values: Tensor, voxels: Voxels) -> Tensor:
    """Per-point values (N, ...) of per-voxel ``values`` (M, ...): every point gets its
    voxel's value (a prediction copied back to every vertex)."""
    if len(values) != len(voxels.coords):
        raise ValueError(f"voxels_to_points: {len(values)} values for "
                         f"{len(voxels.coords)} voxels")
    return values[voxels.point_to_voxel]


def batch_coordinates(coords: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Stack per-sample (M_i, 3) voxel indices into (sum M_i, 4) int32 ``(batch, x, y, z)``
    rows (MinkowskiEngine's ``batched_coordinates``)."""
    rows = [
        torch.cat([torch.full((len(c), 1), b, dtype=torch.int32, device=c.device),
                   c.to(torch.int32)], dim=1)
        for b, c in enumerate(coords)
    ]
    if not rows:
        return torch.zeros((0, 4), dtype=torch.int32)
    return torch.cat(rows)
