"""The spconv backend of :func:`ovseg.layers.sparse.conv.sparse_conv` (spconv 2.x, optional).

spconv's ``SubMConv3d`` / ``SparseConv3d`` run the stride-1 and strided convolutions; the
kernel is our MinkowskiEngine layout (K^3, C_in, C_out), x fastest, permuted to spconv's
(C_out, Kx, Ky, Kz, C_in) on each call (so gradients reach our parameter). spconv wants
non-negative indices: coordinates are shifted by a multiple of 2s and divided by the stride s,
which keeps ``floor(p / 2s)`` the same; ``conv.py`` puts a strided output in the order of its
kernel map. This module imports nothing of ``conv.py``.

Found on spconv 2.3.6 (CPU wheel, torch 2.14): its CPU backward calls ``torch.cuda`` and
fails without a GPU (so CPU training with spconv is refused here), and its CPU forward races
with more than one thread (a row or two wrong in most runs on 2 cores; exact with one),
so a CPU call runs it on one thread.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from ovseg.errors import OvsegError


class SparseBackendError(OvsegError, ImportError):
    """The sparse-convolution backend asked for is not installed."""


def spconv_available() -> bool:
    """Whether ``spconv.pytorch`` imports."""
    try:
        importlib.import_module("spconv.pytorch")
    except Exception:  # missing, or a build without this CUDA/torch
        return False
    return True


def require_spconv():
    """``spconv.pytorch``, or a :class:`SparseBackendError` saying how to get it."""
    try:
        return importlib.import_module("spconv.pytorch")
    except Exception as exc:
        raise SparseBackendError(
            f"sparse backend 'spconv' was asked for but spconv cannot be imported ({exc}); "
            "pip install spconv-cu120 (GPU; match your CUDA) or spconv (CPU), or set the "
            "backend to 'torch' (pure PyTorch) or 'auto'"
        ) from exc


def spconv_kernel(kernel: Tensor, kernel_size: int) -> Tensor:
    """(K^3, C_in, C_out) x-fastest -> spconv's (C_out, Kx, Ky, Kz, C_in)."""
    k = kernel_size
    return kernel.reshape(k, k, k, kernel.shape[1], kernel.shape[2]).permute(4, 2, 1, 0, 3)


def spconv_conv(coords: Tensor, feats: Tensor, tensor_stride: int, kernel: Tensor,
                kernel_size: int, stride: int) -> tuple[Tensor, Tensor]:
    """A stride-1 or stride-2 convolution through spconv.

    Args:
        coords: (M, 4) int ``(batch, x, y, z)`` at ``tensor_stride`` (finest-voxel units).
        feats: (M, C_in) features.
        kernel: (K^3, C_in, C_out), our layout.

    Returns:
        (M_out, 4) int64 output coordinates (finest-voxel units; the input's for stride 1) and
        (M_out, C_out) features in spconv's row order (the input's order for stride 1).
    """
    spconv = require_spconv()
    if feats.device.type == "cpu" and torch.is_grad_enabled() and (
        feats.requires_grad or kernel.requires_grad
    ):
        raise SparseBackendError(
            "spconv's backward runs only on CUDA (spconv 2.3.6 calls torch.cuda in its CPU "
            "backward); train on the CPU with sparse backend 'torch' or 'auto'"
        )
    step = 2 * tensor_stride
    low = torch.div(coords[:, 1:].long().min(0).values, step, rounding_mode="floor") * step
    grid = torch.div(coords[:, 1:].long() - low, tensor_stride, rounding_mode="floor")
    # kernel reach beyond the data stays inside the grid
    shape = (grid.max(0).values + kernel_size + 1).tolist()
    indices = torch.cat([coords[:, :1].long(), grid], 1).int().contiguous()
    batch = int(coords[:, 0].max()) + 1 if len(coords) else 1
    tensor = spconv.SparseConvTensor(feats.contiguous(), indices, shape, batch)
    in_c, out_c = kernel.shape[1], kernel.shape[2]
    if stride == 1:
        layer = spconv.SubMConv3d(in_c, out_c, kernel_size, bias=False)
    else:
        layer = spconv.SparseConv3d(in_c, out_c, kernel_size, stride=2, bias=False)
    layer = layer.to(feats.device)
    del layer.weight  # use our parameter, so autograd reaches it
    layer.weight = spconv_kernel(kernel, kernel_size).contiguous()
    threads = torch.get_num_threads()
    if feats.device.type == "cpu":
        torch.set_num_threads(1)  # spconv's CPU kernels race with more threads (see above)
    try:
        result = layer(tensor)
    finally:
        torch.set_num_threads(threads)
    if stride == 1:
        return coords.long(), result.features  # spconv keeps the input order
    out_index = result.indices.long()
    return torch.cat([out_index[:, :1], out_index[:, 1:] * step + low], 1), result.features
