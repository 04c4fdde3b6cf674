"""Sparse 3D ops: voxelisation with point <-> voxel maps and sparse convolution (torch / spconv)."""

from ovseg.layers.sparse.conv import (
    BACKENDS,
    CoordinateCache,
    SparseBatchNorm,
    SparseConv3d,
    SparseReLU,
    SparseTensor,
    cat,
    dense_weight,
    kernel_offsets,
    resolve_backend,
    sparse_conv,
)
from ovseg.layers.sparse.spconv_backend import SparseBackendError, spconv_available
from ovseg.layers.sparse.voxelize import (
    DEFAULT_VOXEL_SIZE,
    Voxels,
    batch_coordinates,
    pool_to_voxels,
    quantize,
    voxelize,
    voxels_to_points,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_VOXEL_SIZE",
    "CoordinateCache",
    "SparseBackendError",
    "SparseBatchNorm",
    "SparseConv3d",
    "SparseReLU",
    "SparseTensor",
    "Voxels",
    "batch_coordinates",
    "cat",
    "dense_weight",
    "kernel_offsets",
    "pool_to_voxels",
    "quantize",
    "resolve_backend",
    "spconv_available",
    "sparse_conv",
    "voxelize",
    "voxels_to_points",
]
